"""Verification metrics against cases small enough to work out by hand."""
import numpy as np
import pytest

from xcos_tf import metrics

# Fold 0: 0.9 0.8 0.7 same, 0.6 different. Fold 1: 0.3 same, 0.2 0.5 0.1 different.
SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.3, 0.2, 0.5, 0.1])
IS_SAME = np.array([1, 1, 1, 0, 1, 0, 0, 0], bool)


def test_best_threshold_is_exact_and_takes_the_lowest_of_ties():
    # On fold 1 alone: cutting below 0.3 accepts 0.3 and 0.5 (3 of 4 right); rejecting all is
    # 3 of 4 right too; the lowest cut wins the tie, midway between 0.2 and 0.3.
    threshold, accuracy = metrics.best_threshold(SCORES[4:], IS_SAME[4:])
    assert threshold == pytest.approx(0.25) and accuracy == 0.75
    assert metrics.best_threshold([0.4, 0.1], [True, True]) == (0.1, 1.0)  # all same
    assert metrics.best_threshold([0.4, 0.1], [False, False]) == (np.inf, 1.0)  # all different


def test_ten_fold_protocol_matches_the_hand_computation():
    # Fold 0 tested with fold 1's threshold 0.25: everything accepted, 3 of 4 right.
    # Fold 1 tested with fold 0's 0.65 (perfect on fold 0): nothing accepted, 3 of 4.
    result = metrics.k_fold_accuracy(SCORES, IS_SAME, folds=2)
    np.testing.assert_allclose(result.fold_accuracies, [0.75, 0.75])
    np.testing.assert_allclose(result.thresholds, [0.25, 0.65])
    assert result.mean == 0.75 and result.std == 0.0


def test_per_pair_fold_ids_choose_the_threshold_on_the_other_folds():
    folds = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    result = metrics.k_fold_accuracy(SCORES, IS_SAME, folds=folds)
    # Fold 1 = 0.8s 0.6d 0.2d 0.1d: its best cut is between 0.6 and 0.8 (0.7, 4 of 4).
    # Fold 0 = 0.9s 0.7s 0.3s 0.5d tested at 0.7: 0.3 rejected wrongly, 3 of 4 right.
    # Fold 0's best: accepting all and cutting at 0.6 both get 3 of 4; the lowest (all,
    # threshold 0.3) wins. Fold 1 tested at 0.3: 0.6 accepted wrongly, 3 of 4.
    np.testing.assert_allclose(result.fold_accuracies, [0.75, 0.75])
    np.testing.assert_allclose(result.thresholds, [0.7, 0.3])
    assert result.mean == pytest.approx(0.75)


def test_ten_folds_on_a_separable_set_are_perfect():
    rng = np.random.default_rng(0)
    is_same = np.tile([True, False], 50)
    scores = np.where(is_same, rng.uniform(0.6, 1, 100), rng.uniform(-1, 0.2, 100))
    result = metrics.k_fold_accuracy(scores, is_same)
    assert result.mean == 1.0 and len(result.fold_accuracies) == 10


def test_tar_at_far_by_hand():
    # 4 different pairs: FAR 0.25 allows one false accept (0.6), so the threshold sits just
    # above 0.5: same pairs 0.9 0.8 0.7 accepted, 0.3 not -> TAR 0.75.
    result = metrics.tar_at_far(SCORES, IS_SAME, 0.25)
    assert (result.tar, result.far) == (0.75, 0.25)
    assert 0.5 < result.threshold < 0.5 + 1e-9
    # FAR 0: no different pair may pass; the threshold sits just above 0.6.
    strict = metrics.tar_at_far(SCORES, IS_SAME, 0.0)
    assert (strict.tar, strict.far) == (0.75, 0.0) and 0.6 < strict.threshold < 0.6 + 1e-9
    # FAR 1e-3 with only 4 different pairs: also none allowed.
    assert metrics.tar_at_far(SCORES, IS_SAME, 1e-3) == strict
    everything = metrics.tar_at_far(SCORES, IS_SAME, 1.0)
    assert (everything.tar, everything.far) == (1.0, 1.0)


def test_unresolved_far_names_the_smallest_resolvable_far():
    # 100 different pairs resolve FAR 0.01 (one false accept) but not 1e-3.
    note = metrics.unresolved_far(1e-3, 100)
    assert note == ("FAR target 0.001 is below 1/100 different-person pairs: the smallest FAR they resolve is 0.01 "
                    "(the threshold accepts none of them); 1000 or more such pairs are needed for 0.001")
    assert metrics.unresolved_far(1e-2, 100) is None and metrics.unresolved_far(1e-3, 1000) is None
    assert metrics.unresolved_far(0.0, 100) is None  # FAR 0 means "accept none": always resolved
    with pytest.raises(ValueError, match="num_different"):
        metrics.unresolved_far(1e-3, 0)


def test_choose_threshold_warns_when_the_far_target_is_unresolvable(monkeypatch, capsys):
    import json
    import types

    from tools import choose_threshold
    scores = np.linspace(0, 1, 150)
    is_same = np.arange(150) >= 100  # 100 different-person pairs
    monkeypatch.setattr(choose_threshold.xcos_model, "build_verifier", lambda path: None)
    monkeypatch.setattr(choose_threshold, "pair_scores", lambda verifier, patterns: (scores, is_same))
    values = {"weights": "w.keras", "pairs": ["p"], "far": 1e-3}
    args = types.SimpleNamespace(**{name: types.SimpleNamespace(value=value) for name, value in values.items()})
    choose_threshold.main(["choose_threshold"], args)
    out, err = capsys.readouterr()
    assert err.strip() == "warning: " + metrics.unresolved_far(1e-3, 100)
    result = json.loads(out)
    assert result["smallest_resolved_far"] == 0.01 and result["far"] == 0.0 and result["target_far"] == 1e-3


def test_tar_at_far_never_exceeds_the_target_with_ties():
    scores = np.array([0.9, 0.5, 0.5, 0.5, 0.1, 0.1])
    is_same = np.array([1, 1, 0, 0, 0, 0], bool)
    result = metrics.tar_at_far(scores, is_same, 0.25)  # one false accept allowed, ties give two
    assert result.far == 0.0 and result.tar == 0.5


def test_roc_curve_by_hand():
    roc = metrics.roc_curve(SCORES, IS_SAME)
    np.testing.assert_allclose(roc.far, [0, 0, 0, 0, 0.25, 0.5, 0.5, 0.75, 1])
    np.testing.assert_allclose(roc.tar, [0, 0.25, 0.5, 0.75, 0.75, 0.75, 1, 1, 1])
    assert roc.thresholds[0] == np.inf and roc.thresholds[-1] == 0.1


def test_roc_merges_equal_scores_into_one_point():
    roc = metrics.roc_curve([0.5, 0.5, 0.2], [True, False, False])
    np.testing.assert_allclose(roc.far, [0, 0.5, 1])
    np.testing.assert_allclose(roc.tar, [0, 1, 1])


@pytest.mark.parametrize(
    "scores, is_same, message",
    [
        ([0.1, np.nan], [True, False], "NaN"),
        ([0.1, 0.2], [True, True], "both"),
        ([0.1, 0.2, 0.3], [True, False], "one length"),
    ],
)
def test_bad_inputs_are_named(scores, is_same, message):
    with pytest.raises(ValueError, match=message):
        metrics.roc_curve(scores, is_same)


def test_bad_fold_ids_are_named():
    with pytest.raises(ValueError, match="fold ids"):
        metrics.k_fold_accuracy(SCORES, IS_SAME, folds=np.zeros(8, int))
