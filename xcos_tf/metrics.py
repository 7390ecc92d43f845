"""Face verification metrics in pure numpy (no TensorFlow): the training loop and the
evaluation tool share them."""
import collections
import math

import numpy as np

from xcos_tf.data import pairs

FoldAccuracy = collections.namedtuple("FoldAccuracy", ["mean", "std", "fold_accuracies", "thresholds"])
FoldAccuracy.__doc__ = """k-fold verification accuracy: mean and standard deviation over the test folds,
plus each fold's accuracy and the threshold chosen for it on the other folds."""


def best_threshold(scores, is_same):
    """The threshold `t` that maximises the accuracy of `score >= t` -> same, and that accuracy.

    Every cut between two distinct sorted scores is a candidate (plus "all same" and "all
    different"), so the result is exact; ties go to the lowest such cut. The threshold sits
    midway between the scores on either side of the cut, so that held-out scores close to
    the training ones fall on the side they are nearest to.
    """
    scores = np.asarray(scores, np.float64)
    is_same = np.asarray(is_same, bool)
    if scores.ndim != 1 or scores.shape != is_same.shape or scores.size == 0:
        raise ValueError(
            f"Expected non-empty 1-D scores and is_same of the same length. "
            f"Received: shapes {scores.shape} and {is_same.shape}"
        )
    if not np.all(np.isfinite(scores)):
        raise ValueError("Scores contain NaN or infinity.")
    order = np.argsort(scores, kind="stable")
    sorted_scores, sorted_same = scores[order], is_same[order]
    # Cut i: pairs before i say "different", pairs from i on say "same".
    different_below = np.concatenate([[0], np.cumsum(~sorted_same)])
    same_from = np.concatenate([np.cumsum(sorted_same[::-1])[::-1], [0]])
    correct = different_below + same_from
    # Only the first of equal scores is a real cut point.
    starts = np.concatenate([[True], sorted_scores[1:] != sorted_scores[:-1], [True]])
    correct = np.where(starts, correct, -1)
    best = int(np.argmax(correct))
    if best == scores.size:
        threshold = np.inf
    elif best == 0:
        threshold = sorted_scores[0]
    else:
        threshold = 0.5 * (sorted_scores[best - 1] + sorted_scores[best])
    return float(threshold), correct[best] / scores.size


def _fold_ids(folds, size):
    if np.ndim(folds) == 0:
        if folds < 2 or size < folds:
            raise ValueError(
                f"Need folds >= 2 and at least one pair per fold. Received: folds={folds}, pairs={size}"
            )
        return pairs.kfold_indices(size, folds)
    fold_ids = np.asarray(folds)
    if fold_ids.shape != (size,) or len(np.unique(fold_ids)) < 2:
        raise ValueError(
            f"Per-pair fold ids must be a 1-D array with one id per pair and at least 2 folds. "
            f"Received: shape {fold_ids.shape} for {size} pairs, {len(np.unique(fold_ids))} distinct"
        )
    return fold_ids


def k_fold_accuracy(scores, is_same, folds=10):
    """The standard LFW protocol: for each fold, the threshold is chosen on the other folds
    and the accuracy measured on this one.

    Args:
        scores: 1-D array, similarity of each pair (higher = more alike).
        is_same: 1-D bool array, whether each pair is the same person.
        folds: int >= 2, number of consecutive, equal-as-possible folds (LFW `pairs.txt`
            lists its 10 folds one after another), or a 1-D int array with each pair's fold
            (as pair shards store it). Defaults to 10.

    Returns:
        A `FoldAccuracy` (folds in increasing id order).
    """
    scores = np.asarray(scores, np.float64)
    is_same = np.asarray(is_same, bool)
    fold_ids = _fold_ids(folds, scores.size)
    accuracies, thresholds = [], []
    for fold in np.unique(fold_ids):
        test = fold_ids == fold
        threshold, _ = best_threshold(scores[~test], is_same[~test])
        accuracies.append(float(np.mean((scores[test] >= threshold) == is_same[test])))
        thresholds.append(threshold)
    accuracies = np.array(accuracies)
    return FoldAccuracy(float(accuracies.mean()), float(accuracies.std()), accuracies, np.array(thresholds))


TarAtFar = collections.namedtuple("TarAtFar", ["tar", "far", "threshold"])
TarAtFar.__doc__ = """True-accept rate at a false-accept-rate target: `tar` and `far` are the rates
measured at `threshold` (decision `score >= threshold` -> same; `far` <= the target)."""

Roc = collections.namedtuple("Roc", ["far", "tar", "thresholds"])
Roc.__doc__ = """ROC points for decreasing thresholds (decision `score >= threshold`), from
(0, 0) at +inf to (1, 1)."""


def _checked(scores, is_same):
    scores = np.asarray(scores, np.float64)
    is_same = np.asarray(is_same, bool)
    if scores.ndim != 1 or scores.shape != is_same.shape:
        raise ValueError(f"Expected 1-D scores and is_same of one length. Received: {scores.shape}, {is_same.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("Scores contain NaN or infinity.")
    if is_same.all() or not is_same.any():
        raise ValueError("Need both same-person and different-person pairs.")
    return scores, is_same


def tar_at_far(scores, is_same, far):
    """The true-accept rate at the lowest threshold whose false-accept rate is at most `far`.

    With D different-person pairs at most floor(far * D) of them may be accepted; below
    1 / far such pairs the target can only be met with none accepted (the estimate is
    then coarse: LFW's 3,000 allow 3 false accepts at 1e-3).
    """
    scores, is_same = _checked(scores, is_same)
    if not 0.0 <= far <= 1.0:
        raise ValueError(f"`far` must be in [0, 1]. Received: far={far}")
    different = np.sort(scores[~is_same])[::-1]
    allowed = int(np.floor(far * different.size + 1e-9))
    if allowed >= different.size:
        threshold = float(scores.min())
    else:
        # Just above the first different-person score that must be rejected.
        threshold = float(np.nextafter(different[allowed], np.inf))
    return TarAtFar(
        tar=float(np.mean(scores[is_same] >= threshold)),
        far=float(np.mean(different >= threshold)),
        threshold=threshold,
    )


def unresolved_far(far, num_different):
    """One line saying that `far` is below 1 / `num_different`, the smallest non-zero
    false-accept rate that many different-person pairs can measure, and which rate they do
    resolve; None when they resolve `far` (or it is 0). `tar_at_far` then accepts none of them:
    its threshold is set by the single highest different-person score, not by the target."""
    if num_different < 1:
        raise ValueError(f"`num_different` must be at least 1. Received: num_different={num_different}")
    if far == 0 or far * num_different >= 1 - 1e-9:  # the same tolerance as tar_at_far's floor
        return None
    return (f"FAR target {far:g} is below 1/{num_different} different-person pairs: the smallest FAR they resolve "
            f"is {1 / num_different:.3g} (the threshold accepts none of them); {math.ceil(1 / far - 1e-9)} or more "
            f"such pairs are needed for {far:g}")


def roc_curve(scores, is_same):
    """The ROC curve of `score >= threshold` -> same, one point per distinct score: a `Roc`."""
    scores, is_same = _checked(scores, is_same)
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_same = scores[order], is_same[order]
    # The last pair of each run of equal scores closes that threshold's point.
    last = np.concatenate([sorted_scores[1:] != sorted_scores[:-1], [True]])
    tar = np.cumsum(sorted_same)[last] / is_same.sum()
    far = np.cumsum(~sorted_same)[last] / (~is_same).sum()
    return Roc(
        far=np.concatenate([[0.0], far]),
        tar=np.concatenate([[0.0], tar]),
        thresholds=np.concatenate([[np.inf], sorted_scores[last]]),
    )
