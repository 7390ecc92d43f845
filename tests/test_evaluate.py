"""The evaluation tool: occluders, deletion and localisation against theory, the whole run, the CLI."""
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import tiny_verifiers
from common_testing import REPO_ROOT

from xcos_tf import evaluate, faithfulness, metrics, occlusion, paths, scoring
from xcos_tf.data import align


def test_occluders_sit_where_the_template_says():
    eyes, nose, mouth = align.TEMPLATE_112[:2], align.TEMPLATE_112[2], align.TEMPLATE_112[3:]

    def covers(box, point):
        x0, y0, x1, y1 = box
        return x0 <= point[0] < x1 and y0 <= point[1] < y1

    glasses = evaluate.occluder_box("sunglasses")
    mask = evaluate.occluder_box("mask")
    assert all(covers(glasses, eye) for eye in eyes) and not any(covers(glasses, m) for m in mouth)
    assert all(covers(mask, corner) for corner in mouth) and not any(covers(mask, eye) for eye in eyes)
    assert covers(mask, nose) and glasses[3] <= mask[1]  # the mask covers the nose, below the glasses
    rng = np.random.default_rng(0)
    squares = {evaluate.occluder_box("square", rng) for _ in range(20)}
    assert len(squares) > 1
    for x0, y0, x1, y1 in squares:
        assert x1 - x0 == y1 - y0 == evaluate.SQUARE_SIZE and 0 <= x0 and x1 <= 112 and 0 <= y0 and y1 <= 112
    with pytest.raises(ValueError, match="valid choices"):
        evaluate.occluder_box("hat")


def test_occlude_pastes_and_returns_the_mask():
    face = tiny_verifiers.smooth_faces(1)[0]
    occluded, mask = evaluate.occlude(face, "sunglasses", np.random.default_rng(0))
    x0, y0, x1, y1 = evaluate.occluder_box("sunglasses")
    assert mask.sum() == (x1 - x0) * (y1 - y0)
    np.testing.assert_array_equal(occluded[~mask], face[~mask])
    assert (occluded[mask] == 20).all()


def test_cell_coverage_by_hand():
    mask = np.zeros((112, 112), bool)
    mask[0:16, 0:8] = True  # half of cell (0, 0)
    mask[16:48, 16:32] = True  # cells (1, 1) and (2, 1) whole
    coverage = evaluate.cell_coverage(mask, (7, 7))
    assert coverage[0, 0] == 0.5 and coverage[1, 1] == coverage[2, 1] == 1.0
    assert coverage.sum() == 2.5


def test_grey_cells_greys_exactly_those_patches():
    face = tiny_verifiers.smooth_faces(1)[0]
    greyed = occlusion.grey_cells(face, [0, 8, 48], (7, 7))  # cells (0,0), (1,1), (6,6)
    assert (greyed[0:16, 0:16] == 127.5).all() and (greyed[16:32, 16:32] == 127.5).all()
    assert (greyed[96:, 96:] == 127.5).all()
    untouched = np.ones((112, 112), bool)
    untouched[0:16, 0:16] = untouched[16:32, 16:32] = untouched[96:, 96:] = False
    np.testing.assert_array_equal(greyed[untouched], face[untouched])


def test_curve_area():
    assert faithfulness.curve_area([1, 1, 1]) == 1.0
    assert faithfulness.curve_area([1, 0]) == 0.5
    assert faithfulness.curve_area([1, 0.5, 0]) == 0.5


@pytest.fixture(scope="module")
def patch_uniform():
    """Cells that see only their own patch, uniform attention: score = mean of the cos map."""
    return tiny_verifiers.patch_runtime("uniform")


def test_greying_one_cell_follows_theory_with_uniform_attention(patch_uniform):
    face_a, face_b = tiny_verifiers.smooth_faces(2, seed=3)
    face_b = (0.5 * face_a + 0.5 * face_b).astype(np.uint8)  # some cells alike, some not
    clean = patch_uniform.verify(face_a[None], face_b[None])
    cos_map = clean["cos_map"][0].reshape(-1)
    _, grid_a = scoring.embed_faces(patch_uniform, face_a[None])
    # Greying cell k zeroes that cell (cosine 0) and nothing else: the score drops by cos_k / 49.
    single = np.stack([occlusion.grey_cells(face_b, [k], (7, 7)) for k in range(49)])
    _, grid_b = scoring.embed_faces(patch_uniform, single)
    drops = clean["score"][0] - scoring.compare_grids(patch_uniform, np.repeat(grid_a, 49, 0), grid_b)["score"]
    np.testing.assert_allclose(drops, cos_map / 49, atol=1e-5)
    assert np.argmax(drops) == np.argmax(cos_map)  # removing the most similar cell costs most


def test_lowest_cos_cell_lies_under_the_occluder(patch_uniform):
    faces = tiny_verifiers.smooth_faces(6, seed=1)
    rng = np.random.default_rng(0)
    for kind in evaluate.OCCLUDERS:
        occluded, masks = zip(*(evaluate.occlude(face, kind, rng) for face in faces))
        # The same face against its occluded copy: only cells under the occluder differ.
        outputs = patch_uniform.verify(faces, np.stack(occluded))
        coverage = np.stack([evaluate.cell_coverage(mask, (7, 7)) for mask in masks])
        lowest = np.argmin(outputs["cos_map"].reshape(6, -1), axis=1)
        assert (coverage.reshape(6, -1)[np.arange(6), lowest] > 0).all(), kind  # always a touched cell
        hits = faithfulness.localisation(outputs["cos_map"], coverage)
        hit_rate, chance = hits["localisation"], hits["localisation_chance"]
        assert 0 < chance < 0.5 and hits["pointing"] == 1.0
        if kind != "square":  # the glasses, the mask and the band cover every cell they touch at least half
            assert hit_rate == 1.0, kind


def _synthetic_pairs(count=40):
    """Pairs of random faces: same = the face and a slightly noisy copy, different = two faces."""
    rng = np.random.default_rng(0)
    faces = tiny_verifiers.smooth_faces(count)
    noisy = np.clip(faces + rng.normal(0, 12, faces.shape), 0, 255).astype(np.uint8)
    is_same = np.arange(count) % 2 == 0
    index_b = np.where(is_same, count + np.arange(count), (np.arange(count) + 1) % count)
    return evaluate.PairSet(
        faces=np.concatenate([faces, noisy]), index_a=np.arange(count), index_b=index_b,
        is_same=is_same, folds=np.repeat(np.arange(10), count // 10),
        teacher_cos=np.where(is_same, 0.8, 0.1) + rng.normal(0, 0.05, count), source="synthetic")


def test_evaluate_pairs_reports_every_measure(tmp_path):
    runtime = tiny_verifiers.learned_runtime()
    pairs = _synthetic_pairs()
    results = evaluate.evaluate_pairs(runtime, pairs, deletion_pairs=3, methods=("xcos", "gradcam"))
    assert set(results["verification"]) == {"xcos", "cosine", "teacher"}  # teacher from the pairs
    for row in results["verification"].values():
        assert 0 <= row["accuracy"] <= 1 and len(row["fold_accuracies"]) == 10
        assert set(row["tar_at_far"]) == {"0.01", "0.001"}
    # Noisy copies of the same face are easy: xCos must beat chance clearly even untrained.
    assert results["verification"]["xcos"]["accuracy"] > 0.8
    assert set(results["occlusion"]) == set(evaluate.OCCLUDERS)
    assert set(results["occlusion"]["mask"]["accuracy"]) == {"xcos", "cosine"}  # no teacher model
    assert list(results["faithfulness"]) == ["xcos", "gradcam"]
    assert results["faithfulness"]["xcos"]["curve_pairs"] == 3
    assert len(results["faithfulness"]["gradcam"]["insertion"]["contribution_curve"]) == 50
    assert -1 <= results["correlation"]["pearson_xcos_teacher"] <= 1
    restored = json.loads(json.dumps(results))
    assert restored["verification"]["xcos"]["accuracy"] == results["verification"]["xcos"]["accuracy"]
    table = evaluate.format_table(results)
    for text in ("10-fold accuracy", "TAR @ FAR=0.001", "occluded (eye_band)", "deletion AUC", "insertion AUC",
                 "pointing game", "Pearson"):
        assert text in table
    # 20 different-person pairs resolve neither FAR 1e-2 nor 1e-3: one line says so for each.
    assert [line.strip() for line in table.splitlines() if "below 1/20" in line] == [
        metrics.unresolved_far(1e-2, 20), metrics.unresolved_far(1e-3, 20)]
    written = evaluate.save_plots(results, pairs, tmp_path)
    assert [os.path.basename(p) for p in written] == ["roc.png", "deletion.png", "occluders.png"]
    assert all(align.read_image(p).std() > 5 for p in written)


def test_decompose_row_and_its_exactness():
    """With a `decompose` signature: its own verification row from its score (here the cosine of
    the flattened grids, so it must equal the plain cosine row), the largest |sum + bias - score|,
    and its gap to the teacher row, with what the stored teacher cosines saw."""
    runtime = tiny_verifiers.StubDecompose(tiny_verifiers.patch_runtime("uniform"))
    pairs = _synthetic_pairs()
    pairs.teacher_cos_note = "the stored cosines saw other pixels"
    results = evaluate.evaluate_pairs(runtime, pairs, occluders=(), deletion_pairs=0, decompose=True)
    verification = results["verification"]
    assert list(verification) == ["xcos", "cosine", "teacher", "decompose"]
    assert verification["decompose"]["fold_accuracies"] == verification["cosine"]["fold_accuracies"]
    check = results["decompose_check"]
    assert check["max_abs_sum_plus_bias_minus_score"] < 1e-5
    outputs = runtime.decompose(pairs.faces[pairs.index_a], pairs.faces[pairs.index_b])
    assert check["max_abs_minus_teacher"] == pytest.approx(np.abs(outputs["score"] - pairs.teacher_cos).max(), abs=1e-6)
    table = evaluate.format_table(results)
    assert "decompose (teacher)" in table and "|sum(contribution_map) + bias - score| <= " in table
    assert "decompose vs teacher cosine: |difference| mean" in table and "(the stored cosines saw other pixels)" in table
    assert "decompose_check" not in evaluate.evaluate_pairs(runtime, pairs, occluders=(), deletion_pairs=0)


def test_stored_teacher_note_names_a_lossy_encoding():
    assert "before make_shards stored them as JPEG" in evaluate._stored_teacher_note("jpeg")
    assert evaluate._stored_teacher_note("png") == ""


def _write_pair_shards(out_dir, pairs, image_format="png"):
    from xcos_tf.data import records

    teacher = np.random.default_rng(1).normal(size=(len(pairs.faces), 8)).astype(np.float32)
    teacher /= np.linalg.norm(teacher, axis=1, keepdims=True)
    serialized = [
        records.encode_pair_example(
            align.encode_image(pairs.faces[a], image_format), align.encode_image(pairs.faces[b], image_format), image_format,
            same, fold, f"a{i}", f"b{i}", f"a{i}.png", f"b{i}.png", teacher[a], teacher[b])
        for i, (a, b, same, fold) in enumerate(zip(pairs.index_a, pairs.index_b, pairs.is_same, pairs.folds))
    ]
    os.makedirs(out_dir)
    records.write_shard(os.path.join(out_dir, records.shard_name("pairs", 0)), serialized)
    return teacher


def test_pair_shards_load_as_a_pair_set(tmp_path):
    pairs = _synthetic_pairs()
    teacher = _write_pair_shards(tmp_path / "shards", pairs)
    loaded = evaluate.load_pairs(tmp_path / "shards", paths.DEFAULT_DETECTOR, max_pairs=20)
    chosen = evaluate.spread_subset(len(pairs), 20)
    assert len(loaded) == 20 and loaded.faces.shape == (40, 112, 112, 3)
    np.testing.assert_array_equal(loaded.faces[loaded.index_a], pairs.faces[pairs.index_a[chosen]])
    np.testing.assert_array_equal(loaded.faces[loaded.index_b], pairs.faces[pairs.index_b[chosen]])
    np.testing.assert_array_equal(loaded.is_same, pairs.is_same[chosen])
    np.testing.assert_array_equal(loaded.folds, pairs.folds[chosen])
    expected_cos = np.sum(teacher[pairs.index_a[chosen]] * teacher[pairs.index_b[chosen]], axis=1)
    np.testing.assert_allclose(loaded.teacher_cos, expected_cos, atol=1e-5)
    assert loaded.teacher_cos_note == ""  # PNG faces: the stored cosines saw the same pixels
    _write_pair_shards(tmp_path / "jpeg", pairs, image_format="jpeg")
    assert "as JPEG" in evaluate.load_pairs(tmp_path / "jpeg", paths.DEFAULT_DETECTOR).teacher_cos_note


def test_spread_subset_covers_every_fold():
    chosen = evaluate.spread_subset(6000, 60)
    assert len(chosen) == 60 and len(np.unique(chosen // 600)) == 10
    np.testing.assert_array_equal(evaluate.spread_subset(5, None), np.arange(5))


def _run_evaluate(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "xcos_tf.evaluate", *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600, env=env)


def test_main_on_pair_shards(tmp_path, tmp_path_factory, shared_dir, capsys):
    """The tool's `main` with real flags' values on an exported SavedModel (in this process:
    the subprocess test below covers `python -m`)."""
    import export_testing

    exported = export_testing.exported_model(tmp_path_factory)  # shared with test_export
    values = {"model": str(exported.dir), "format": "saved_model",
              "pairs": str(tmp_path / "shards"), "teacher": None, "out_dir": str(tmp_path / "out"), "max_pairs": None,
              "deletion_pairs": 2, "seed": 0, "detector": paths.DEFAULT_DETECTOR,
              "occluders": list(evaluate.OCCLUDERS), "methods": ["xcos", "decomposition", "gradcam"],
              "max_megapixels": 50.0}
    _write_pair_shards(values["pairs"], _synthetic_pairs())
    args = types.SimpleNamespace(**{name: types.SimpleNamespace(value=value) for name, value in values.items()})
    evaluate.main(["evaluate"], args)
    printed = capsys.readouterr().out
    assert "10-fold accuracy" in printed and "teacher cosine" in printed
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["pairs"] == 40 and results["model"]["format"] == "saved_model"
    assert {"roc.png", "deletion.png", "occluders.png"} <= set(os.listdir(tmp_path / "out"))
    # Every method is measured or named as skipped (the tiny export has no teacher to decompose).
    assert set(results["faithfulness"]) | set(results.get("faithfulness_skipped", {})) == set(evaluate.METHODS)
    assert {"xcos", "gradcam"} <= set(results["faithfulness"])


def test_methods_the_model_cannot_run_are_named_and_skipped():
    face = tiny_verifiers.smooth_faces(1)[0]
    plain = tiny_verifiers.patch_runtime("uniform")  # no decompose at all
    runnable, skipped = evaluate.runnable_methods(plain, ["xcos", "decomposition", "gradcam"], face)
    assert runnable == ["xcos", "gradcam"] and "no decompose signature" in skipped["decomposition"]
    stub = tiny_verifiers.StubDecompose(plain)
    assert evaluate.runnable_methods(stub, ["decomposition"], face) == (["decomposition"], {})

    class WithoutTheSignature(tiny_verifiers.StubDecompose):  # as a TFLite runtime of such an export
        def decompose(self, image_a, image_b):
            raise ValueError("this export's TFLiteRuntime has no decompose signature")

    runnable, skipped = evaluate.runnable_methods(WithoutTheSignature(plain), ["decomposition", "xcos"], face)
    assert runnable == ["xcos"] and skipped == {"decomposition": "this export's TFLiteRuntime has no decompose signature"}


def test_fold_count_labels_the_accuracy_and_warns_below_ten():
    pairs = _synthetic_pairs()
    pairs.folds = pairs.folds % 5
    results = evaluate.evaluate_pairs(tiny_verifiers.learned_runtime(), pairs, occluders=(), deletion_pairs=0)
    table = evaluate.format_table(results)
    assert "5-fold accuracy" in table and "10-fold accuracy" not in table
    assert "warning: the pairs have 5 folds, fewer than the 10" in table


def test_cli_names_a_missing_pairs_folder(tmp_path):
    run = _run_evaluate("--model", tmp_path, "--pairs", tmp_path / "nowhere")
    assert run.returncode == 2 and "--pairs" in run.stderr and "nowhere" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.slow
def test_real_lfw_pairs_with_the_teacher(shared_dir, tmp_path):
    """A real LFW run on a few pairs: alignment, the teacher row and the correlation."""
    from xcos_tf.teacher import Teacher

    aligner = align.FaceAligner(shared_dir / "models" / "yunet.onnx", choose="central")
    pairs = evaluate.load_lfw(shared_dir / "data" / "lfw", aligner, max_pairs=60)
    assert len(pairs) == 60 and len(np.unique(pairs.folds)) == 10 and pairs.is_same.sum() == 30
    teacher = Teacher(shared_dir / "models" / "teacher_mobilefacenet.onnx")
    runtime = tiny_verifiers.learned_runtime()
    results = evaluate.evaluate_pairs(runtime, pairs, teacher=teacher, deletion_pairs=2)
    # The teacher is a real face model: on LFW it is far above chance even on 60 pairs.
    assert results["verification"]["teacher"]["accuracy"] > 0.85
    assert set(results["occlusion"]["sunglasses"]["accuracy"]) == {"xcos", "cosine", "teacher"}
    assert "pearson_xcos_teacher" in results["correlation"]
