"""The explanation picture, explain_photos on real photos, and the explain command line."""
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import tiny_verifiers
from common_testing import REPO_ROOT

from xcos_tf import explain, explain_picture, paths
from xcos_tf.data import align
from xcos_tf.explanations import gradcam

RNG = np.random.default_rng(0)
FACES = tiny_verifiers.smooth_faces(2)
LOGITS = RNG.normal(size=(7, 7))
COS_MAP = np.clip(RNG.normal(0.3, 0.3, size=(7, 7)), -1, 1).astype(np.float32)
ATTENTION_MAP = (np.exp(LOGITS) / np.exp(LOGITS).sum()).astype(np.float32)
GRADCAM_A, GRADCAM_B = RNG.normal(0, 0.003, size=(2, 7, 7)).astype(np.float32)
CONTRIBUTIONS = RNG.normal(0.01, 0.01, size=(7, 7)).astype(np.float32)
EXPLANATIONS = {
    "xcos": {"explains": "xcos score", "explained_score": float(np.sum(COS_MAP * ATTENTION_MAP)),
             "contribution_map": COS_MAP * ATTENTION_MAP, "cos_map": COS_MAP, "attention_map": ATTENTION_MAP},
    "decomposition": {"explains": "teacher cosine", "explained_score": float(CONTRIBUTIONS.sum()) + 0.05,
                      "contribution_map": CONTRIBUTIONS, "bias": 0.05},
    "gradcam": {"explains": "embedding cosine", "explained_score": 0.4, "contribution_map": (GRADCAM_A + GRADCAM_B) / 2,
                "gradcam_a": GRADCAM_A, "gradcam_b": GRADCAM_B},
}


def _result(methods=("xcos",), threshold=0.25, notes=("photo A: 3 faces found in group.jpg, using the largest one",)):
    score = EXPLANATIONS["xcos"]["explained_score"]
    return {"score": score, "threshold": threshold, "decision": explain.decide(score, threshold),
            "methods": {name: EXPLANATIONS[name] for name in methods}, "notes": list(notes)}


def _blank(picture, ax):
    """Whether the panel of `ax` in the rendered picture is one flat colour."""
    height = picture.shape[0]
    box = ax.get_window_extent()
    x0, x1 = int(box.x0) + 2, int(box.x1) - 2
    y0, y1 = height - int(box.y1) + 2, height - int(box.y0) - 2  # display y runs upwards
    return picture[y0:y1, x0:x1].std() < 1.0


def test_xcos_picture_has_the_documented_layout():
    result = _result()
    figure = explain_picture.explanation_figure(FACES[0], FACES[1], result, title="a.jpg vs b.jpg")
    picture = explain_picture.render_explanation(FACES[0], FACES[1], result, title="a.jpg vs b.jpg")
    assert picture.dtype == np.uint8 and picture.shape == (560, 1500, 3)
    titles = [ax.get_title() for ax in figure.axes]
    assert titles[:2] == ["face A (aligned)", "face B (aligned)"]
    # header (2 faces + notes), one row of 5 panels, 3 colour bars
    assert len(figure.axes) == 3 + 5 + 3
    panels = {ax.get_title(): ax for ax in figure.axes if ax.get_title()}
    contribution_title = "contribution per cell (values x 1000)"  # the range here is ±0.05, written as ±50
    for title in ("face A (aligned)", "cos x attention on face A", "cos x attention on face B",
                  contribution_title, "cos map: how alike each cell is", "attention: % of the score per cell"):
        assert not _blank(picture, panels[title]), title
    contribution, cos, attention = (panels[t] for t in (contribution_title, "cos map: how alike each cell is",
                                                        "attention: % of the score per cell"))
    np.testing.assert_allclose(contribution.images[0].get_array(), COS_MAP * ATTENTION_MAP)
    np.testing.assert_allclose(cos.images[0].get_array(), COS_MAP)
    np.testing.assert_allclose(attention.images[0].get_array(), 100 * ATTENTION_MAP, rtol=1e-6)
    assert len(cos.texts) == len(attention.texts) == len(contribution.texts) == 49
    assert cos.texts[0].get_text() == f"{COS_MAP[0, 0]:.2f}"
    assert contribution.images[0].norm.vmax == 0.05
    assert contribution.texts[0].get_text() == f"{round(1000 * COS_MAP[0, 0] * ATTENTION_MAP[0, 0]) + 0.0:.0f}"
    # The cos scale is -1..1 centred at 0 with even ticks; contributions are centred at 0 on a
    # round symmetric range; the attention scale is the same in every picture.
    assert (cos.images[0].norm.vmin, cos.images[0].norm.vmax) == (-1, 1)
    limit = contribution.images[0].norm.vmax
    assert contribution.images[0].norm.vmin == -limit and limit >= np.abs(COS_MAP * ATTENTION_MAP).max()
    assert f"{limit:g}"[-1] in "125"
    assert attention.images[0].norm.vmax == explain_picture.ATTENTION_MAX_PERCENT
    np.testing.assert_allclose(cos.images[0].colorbar.get_ticks(), [-1, -0.5, 0, 0.5, 1])
    np.testing.assert_allclose(contribution.images[0].colorbar.get_ticks(), np.linspace(-limit, limit, 5))
    suptitle = figure.get_suptitle()
    assert "a.jpg vs b.jpg" in suptitle and f"{result['score']:.3f}" in suptitle and "SAME person" in suptitle
    # The notes and the bottom row's reading are in the picture, not only on stderr.
    text = "\n".join(t.get_text() for ax in figure.axes for t in ax.texts)
    assert "3 faces found in group.jpg" in text and "Bottom row (neck" in text


def test_all_methods_draw_one_row_each_in_the_same_layout():
    result = _result(("xcos", "decomposition", "gradcam"))
    figure = explain_picture.explanation_figure(FACES[0], FACES[1], result)
    picture = explain_picture.render_explanation(FACES[0], FACES[1], result)
    assert picture.shape == (560 + 2 * 300, 1500, 3)
    rows = figure.subfigs[1:]
    assert [row.get_suptitle().split(":")[0] for row in rows] == [
        "xCos", "Exact decomposition of the teacher's cosine", "Grad-CAM (signed, on the grid) of the embedding cosine"]
    for row, name in zip(rows, ("xcos", "decomposition", "gradcam")):
        first = [ax for ax in row.axes if ax.get_title()][:3]
        assert first[2].get_title().startswith("contribution per cell")
        np.testing.assert_allclose(first[2].images[0].get_array(), EXPLANATIONS[name]["contribution_map"])
        for ax in first:
            assert not _blank(picture, ax), (name, ax.get_title())
    decomposition_text = "\n".join(t.get_text() for ax in rows[1].axes for t in ax.texts)
    assert f"+ constant {0.05:.4f}" in decomposition_text
    gradcam_panel = next(ax for ax in rows[2].axes if ax.get_title().startswith("Grad-CAM of face B"))
    np.testing.assert_allclose(gradcam_panel.images[0].get_array(), GRADCAM_B)
    written = [t.get_text() for t in gradcam_panel.texts]
    assert "-0.0" not in written and max(map(len, written)) <= 5  # e.g. "-4.2" (±0.01 written as ±10.0)


def test_picture_says_different_and_no_decision():
    below = explain_picture.explanation_figure(FACES[0], FACES[1], _result(threshold=0.5))
    assert "DIFFERENT people" in below.get_suptitle()
    undecided = explain_picture.explanation_figure(FACES[0], FACES[1], _result(threshold=None))
    assert "no calibrated threshold" in undecided.get_suptitle()


def test_picture_rejects_unknown_methods_and_bad_maps():
    with pytest.raises(ValueError, match="must name some of"):
        explain_picture.render_explanation(FACES[0], FACES[1], dict(_result(), methods={"lime": {}}))
    bad = dict(_result(), methods={"xcos": dict(EXPLANATIONS["xcos"], cos_map=np.ones((2, 4, 4)))})
    with pytest.raises(ValueError, match="one \\(H, W\\) map"):
        explain_picture.render_explanation(FACES[0], FACES[1], bad)


def test_round_range():
    assert [explain_picture.round_range(np.array([v])) for v in (0.04, 0.05, 0.051, 0.3, 7.0, 0.0)] == \
        [0.05, 0.05, 0.1, 0.5, 10.0, 1.0]


def test_save_explanation_writes_a_png(tmp_path):
    path = tmp_path / "pair.png"
    picture = explain_picture.save_explanation(path, FACES[0], FACES[1], _result())
    np.testing.assert_array_equal(align.read_image(path), picture)


def test_decide():
    assert explain.decide(0.3, 0.3) == "same"
    assert explain.decide(0.29, 0.3) == "different"
    assert explain.decide(0.9, None) is None


@pytest.fixture(scope="module")
def tiny_runtime():
    return tiny_verifiers.learned_runtime(threshold=0.3)


@pytest.fixture(scope="module")
def aligner(shared_dir):
    return align.FaceAligner(shared_dir / "models" / "yunet.onnx", choose="largest")


def _wild(shared_dir, group, index=0):
    # NB: the first "no_face_found_by_yunet" photo (008482.jpg, 800 px) does have a face that
    # YuNet finds once the photo is scaled to DETECTION_MAX_SIDE; the second has none.
    with open(shared_dir / "data" / "wild" / "index.json") as f:
        return shared_dir / "data" / "wild" / json.load(f)[group][index]


def test_explain_photos_on_raw_photos_and_crops(shared_dir, tiny_runtime, aligner):
    crop = next((shared_dir / "data" / "glint_sample" / "images" / "Barack_Obama").glob("*.jpg"))
    result = explain.explain_photos(_wild(shared_dir, "several_faces"), crop, tiny_runtime, aligner)
    assert result["face_a"].shape == result["face_b"].shape == (112, 112, 3)
    np.testing.assert_array_equal(result["face_b"], align.read_image(crop))  # the crop as it is
    assert "faces found" in result["notes"][0] and "largest" in result["notes"][0]
    assert "used as it is" in result["notes"][1]
    # The library's picture names the photos as the command line's does.
    assert result["title"] == f"{_wild(shared_dir, 'several_faces').name}  vs  {crop.name}"
    figure = explain_picture.explanation_figure(result["face_a"], result["face_b"], result)
    assert result["title"] in figure.get_suptitle()
    expected = tiny_runtime.verify(result["face_a"][None], result["face_b"][None])
    assert result["score"] == pytest.approx(float(expected["score"][0]), abs=1e-6)
    xcos = result["methods"]["xcos"]
    assert xcos["cos_map"].shape == xcos["attention_map"].shape == (7, 7)
    assert result["decision"] == explain.decide(result["score"], 0.3) and result["threshold"] == 0.3
    # The JSON part round-trips, the method's keys beside the verdict.
    restored = json.loads(json.dumps(explain.explanation_json(result)))
    assert restored["decision"] == result["decision"] and restored["threshold"] == 0.3
    assert restored["method"] == "xcos" and restored["explains"] == "xcos score"
    np.testing.assert_allclose(restored["cos_map"], xcos["cos_map"], atol=1e-6)
    np.testing.assert_allclose(np.sum(restored["attention_map"]), 1.0, atol=1e-4)
    # xCos's contributions add up to its score.
    np.testing.assert_allclose(np.sum(restored["contribution_map"]), result["score"], atol=1e-4)


def test_each_method_gives_a_contribution_map(tiny_runtime):
    faces = tiny_verifiers.smooth_faces(2, seed=5)
    decomposing = tiny_verifiers.DecomposingRuntime(tiny_runtime)
    result = explain.explain_faces(faces[0], faces[1], decomposing, methods=list(explain.METHODS))
    assert list(result["methods"]) == ["xcos", "decomposition", "gradcam"]
    decomposition = result["methods"]["decomposition"]
    assert decomposing.calls == [((1, 112, 112, 3), (1, 112, 112, 3))]
    np.testing.assert_array_equal(decomposition["contribution_map"], tiny_verifiers.DecomposingRuntime.CONTRIBUTIONS[0])
    assert decomposition["explained_score"] == pytest.approx(decomposition["contribution_map"].sum() + 0.07, abs=1e-6)
    # Grad-CAM is the library's, on the grids that the runtime's embed gives.
    grids = tiny_runtime.embed(faces.astype(np.float32))["grid"]
    expected = gradcam.grid_gradcam(grids[:1], grids[1:])
    for key in ("contribution_map", "gradcam_a", "gradcam_b"):
        np.testing.assert_allclose(result["methods"]["gradcam"][key], expected[key][0], atol=1e-7)
    assert result["methods"]["gradcam"]["explained_score"] == pytest.approx(float(expected["score"][0]))
    printed = json.loads(json.dumps(explain.explanation_json(result)))
    assert set(printed) == {"score", "decision", "threshold", "notes", "methods"}
    for name, entry in printed["methods"].items():
        assert np.shape(entry["contribution_map"]) == (7, 7), name
        assert {"explains", "explained_score"} <= set(entry)
    assert printed["methods"]["decomposition"]["bias"] == pytest.approx(0.07)


def test_decomposition_needs_a_decompose_signature(tiny_runtime):
    faces = tiny_verifiers.smooth_faces(2, seed=5)
    assert not explain.method_available(tiny_runtime, "decomposition")
    with pytest.raises(explain.MethodUnavailableError, match="this model folder has no decompose signature"):
        explain.explain_faces(faces[0], faces[1], tiny_runtime, methods=["decomposition"])
    with pytest.raises(ValueError, match="must be some of"):
        explain.explain_faces(faces[0], faces[1], tiny_runtime, methods=["lime"])
    # A runtime whose manifest lists its signatures has the method only when decompose is listed.
    listed = tiny_verifiers.DecomposingRuntime(tiny_runtime)
    listed.manifest = {"signatures": {"verify": {}, "embed": {}, "compare": {}}}
    assert not explain.method_available(listed, "decomposition")
    listed.manifest["signatures"]["decompose"] = {}
    assert explain.method_available(listed, "decomposition")


def test_a_face_filling_a_large_photo_is_found_and_aligned_at_full_resolution(shared_dir, aligner):
    import cv2

    close_up = align.read_image(shared_dir / "data" / "lfw" / "images" / "Aaron_Peirsol" / "Aaron_Peirsol_0001.jpg")
    with pytest.raises(align.NoFaceError):  # what YuNet does with the full 1600 px photo
        aligner.align(cv2.resize(close_up, (1600, 1600), interpolation=cv2.INTER_CUBIC))
    large = {side: explain.align_photo(cv2.resize(close_up, (side, side), interpolation=cv2.INTER_CUBIC), "A", aligner)
             for side in (640, 1600)}
    assert large[1600][1] is None
    # Detected in the same 640 px copy, but cut from the sharper original.
    assert np.abs(large[1600][0].astype(int) - large[640][0]).mean() < 3


def test_explain_photos_names_the_photo_without_a_face(shared_dir, tiny_runtime, aligner):
    no_face = _wild(shared_dir, "no_face_found_by_yunet", 1)
    with pytest.raises(align.NoFaceError, match=str(no_face)):
        explain.explain_photos(_wild(shared_dir, "one_face"), no_face, tiny_runtime, aligner)


def _run_explain(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "xcos_tf.explain", *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=240, env=env)


def _main(capsys, *photos, **flag_values):
    """Runs explain's `main` in this process: (exit code, stdout, stderr)."""
    values = {"model": None, "format": "saved_model", "out": "", "json": False,
              "detector": paths.DEFAULT_DETECTOR, "method": "xcos", "choose": "largest",
              "max_megapixels": 50.0, **flag_values}
    args = types.SimpleNamespace(**{name: types.SimpleNamespace(value=value) for name, value in values.items()})
    code = 0
    try:
        explain.main(["explain", *map(str, photos)], args)
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def bad_photos(tmp_path):
    import cv2

    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"this is not a JPEG")
    truncated = tmp_path / "truncated.jpg"
    face = tiny_verifiers.smooth_faces(1)[0]
    truncated.write_bytes(cv2.imencode(".jpg", np.tile(face, (3, 3, 1)))[1].tobytes()[:2000])
    return {"corrupt": corrupt, "truncated": truncated, "missing": tmp_path / "missing.jpg"}


def test_bad_photo_exits_2_with_a_message_in_a_subprocess(bad_photos, tmp_path):
    photo = bad_photos["corrupt"]
    # No model is loaded before both photos are aligned, so no export is needed here.
    run = _run_explain(photo, photo, "--model", tmp_path / "no_model")
    assert run.returncode == 2
    assert str(photo) in run.stderr and "not a decodable image" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("kind, message", [("truncated", "truncated"), ("missing", "cannot read")])
def test_bad_photo_exits_2_with_a_message(bad_photos, capsys, kind, message):
    code, _, err = _main(capsys, bad_photos[kind], bad_photos[kind])
    assert code == 2 and str(bad_photos[kind]) in err and message in err


def test_photo_without_a_face_exits_2(shared_dir, capsys):
    no_face = _wild(shared_dir, "no_face_found_by_yunet", 1)
    code, _, err = _main(capsys, _wild(shared_dir, "one_face"), no_face)
    assert code == 2 and "No face found" in err and str(no_face) in err


def test_wrong_number_of_photos_exits_2(capsys, tmp_path):
    code, _, err = _main(capsys, tmp_path / "one.jpg")
    assert code == 2 and "expected two photos" in err


def test_without_a_threshold_only_the_score_is_printed(shared_dir, capsys, monkeypatch, tmp_path):
    from xcos_tf import runtime

    undecided = tiny_verifiers.learned_runtime(threshold=None)
    monkeypatch.setattr(runtime, "load", lambda model_dir, format: undecided)
    out = tmp_path / "pair.png"
    code, printed, err = _main(capsys, _wild(shared_dir, "one_face"), _wild(shared_dir, "one_face", 1),
                               model="any", out=out)
    assert code == 0
    assert printed.startswith("score ") and "same" not in printed and "different" not in printed
    assert f"picture: {out}" in printed and "no calibrated threshold" in err
    assert align.read_image(out).shape == (560, 1500, 3)


def test_cli_methods(shared_dir, capsys, monkeypatch, tiny_runtime):
    from xcos_tf import runtime

    photos = _wild(shared_dir, "one_face"), _wild(shared_dir, "one_face", 1)
    monkeypatch.setattr(runtime, "load", lambda model_dir, format: tiny_runtime)
    code, _, err = _main(capsys, *photos, model="tiny", method="decomposition")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: --method decomposition --model tiny: this model folder has no decompose signature")
    # all: the rows the model can run, and a note for the one it cannot.
    code, printed, err = _main(capsys, *photos, model="tiny", method="all", json=True)
    assert code == 0, err
    printed = json.loads(printed)
    assert list(printed["methods"]) == ["xcos", "gradcam"]
    assert "no decomposition row: this model folder has no decompose signature" in printed["notes"]
    monkeypatch.setattr(runtime, "load", lambda model_dir, format: tiny_verifiers.DecomposingRuntime(tiny_runtime))
    code, printed, err = _main(capsys, *photos, model="tiny", method="decomposition", json=True)
    assert code == 0, err
    printed = json.loads(printed)
    assert printed["method"] == "decomposition" and printed["explains"] == "teacher cosine"
    assert {"score", "decision", "threshold", "contribution_map", "bias"} <= set(printed)


def test_choose_picks_another_face_and_says_so(shared_dir, capsys, monkeypatch, tiny_runtime):
    from xcos_tf import runtime

    monkeypatch.setattr(runtime, "load", lambda model_dir, format: tiny_runtime)
    group = _wild(shared_dir, "several_faces", 4)  # its largest face is not its most central one
    scores = {}
    for choice in ("largest", "central"):
        code, printed, err = _main(capsys, group, _wild(shared_dir, "one_face"), model="tiny", choose=choice, json=True)
        assert code == 0, err
        printed = json.loads(printed)
        assert f"using the {choice} one" in printed["notes"][0] and f"using the {choice} one" in err
        scores[choice] = printed["score"]
    assert scores["largest"] != scores["central"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, shared_dir):
    import export_testing

    return export_testing.exported_model(tmp_path_factory)  # one export, shared with test_export


@pytest.mark.parametrize("model_format", ["tflite", "onnx"])
def test_cli_end_to_end_without_tensorflow(shared_dir, exported, tmp_path, model_format):
    """`python -m xcos_tf.explain` on a TFLite or ONNX export never imports TensorFlow."""
    photo_a, photo_b = _wild(shared_dir, "several_faces"), _wild(shared_dir, "one_face")
    out = tmp_path / "pair.png"
    argv = ["explain", str(photo_a), str(photo_b), "--model", str(exported.dir), "--format", model_format,
            "--out", str(out), "--json"]
    blocked = ("import runpy, sys; sys.modules['tensorflow'] = None; "  # any TensorFlow import fails
               f"sys.argv = {argv!r}; runpy.run_module('xcos_tf.explain', run_name='__main__')")
    run = subprocess.run([sys.executable, "-c", blocked], cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr
    printed = json.loads(run.stdout)
    assert set(printed) == {"score", "decision", "threshold", "notes", "method", "explains", "explained_score",
                            "contribution_map", "cos_map", "attention_map"}
    threshold = exported.manifest["threshold"]
    assert printed["threshold"] == pytest.approx(threshold)
    assert printed["decision"] == explain.decide(printed["score"], threshold)
    assert np.shape(printed["cos_map"]) == np.shape(printed["attention_map"]) == (7, 7)
    assert "faces found" in run.stderr and "using the largest" in run.stderr  # said on stderr
    assert align.read_image(out).shape == (560, 1500, 3)


def test_aligned_crops_need_no_face_detector(capsys, tmp_path):
    """The README's first command on a fresh clone: shipped aligned samples, no ../shared."""
    samples = REPO_ROOT / "exported" / "samples" / "aligned"
    missing = str(tmp_path / "no_yunet.onnx")
    code, out, err = _main(capsys, samples / "A.png", samples / "B.png", model=str(REPO_ROOT / "exported" / "default"),
                           format="tflite", detector=missing)
    assert code == 0, err
    assert out.startswith("score ") and "same" in out
    # A raw photo does need the detector, and the message says which photo and why.
    raw = REPO_ROOT / "exported" / "samples" / "A.jpg"
    code, _, err = _main(capsys, raw, samples / "B.png", detector=missing)
    assert code == 2 and "--detector" in err and "A.jpg" in err
