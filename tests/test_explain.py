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

from xcos_tf import explain
from xcos_tf.data import align

RNG = np.random.default_rng(0)
FACES = tiny_verifiers.smooth_faces(2)
LOGITS = RNG.normal(size=(7, 7))
RESULT = {
    "score": np.array([0.42], np.float32),
    "cos_map": np.clip(RNG.normal(0.3, 0.3, size=(1, 7, 7)), -1, 1).astype(np.float32),
    "attention_map": (np.exp(LOGITS) / np.exp(LOGITS).sum())[None].astype(np.float32),
}


def _blank(picture, ax):
    """Whether the panel of `ax` in the rendered picture is one flat colour."""
    height = picture.shape[0]
    box = ax.get_window_extent()
    x0, x1 = int(box.x0) + 2, int(box.x1) - 2
    y0, y1 = height - int(box.y1) + 2, height - int(box.y0) - 2  # display y runs upwards
    return picture[y0:y1, x0:x1].std() < 1.0


def test_picture_has_the_documented_layout():
    figure = explain.explanation_figure(FACES[0], FACES[1], RESULT, threshold=0.25, title="a.jpg vs b.jpg")
    picture = explain.render_explanation(FACES[0], FACES[1], RESULT, threshold=0.25, title="a.jpg vs b.jpg")
    assert picture.dtype == np.uint8 and picture.shape == (760, 1300, 3)
    panels, colour_bars = figure.axes[:8], figure.axes[8:]
    assert len(colour_bars) == 2
    titles = [ax.get_title() for ax in panels]
    assert titles[:4] == ["face A (aligned)", "face B (aligned)", "cos map: how alike each cell is",
                          "attention: % of the score per cell"]
    assert all(title for title in titles)
    for ax in panels:
        assert not _blank(picture, ax), ax.get_title()
    # The maps panels show the maps themselves, every cell's value written in.
    cos_panel, attention_panel = panels[2], panels[3]
    np.testing.assert_allclose(cos_panel.images[0].get_array(), RESULT["cos_map"][0])
    np.testing.assert_allclose(attention_panel.images[0].get_array(), 100 * RESULT["attention_map"][0], rtol=1e-6)
    assert len(cos_panel.texts) == 49 and len(attention_panel.texts) == 49
    assert cos_panel.texts[0].get_text() == f"{RESULT['cos_map'][0, 0, 0]:.2f}"
    # The diverging cos colours are centred at the threshold.
    assert cos_panel.images[0].norm.vcenter == pytest.approx(0.25)
    suptitle = figure.get_suptitle()
    assert "a.jpg vs b.jpg" in suptitle and "0.420" in suptitle and "SAME person" in suptitle


def test_picture_says_different_and_no_decision():
    below = explain.explanation_figure(FACES[0], FACES[1], RESULT, threshold=0.5)
    assert "DIFFERENT people" in below.get_suptitle()
    undecided = explain.explanation_figure(FACES[0], FACES[1], RESULT, threshold=None)
    assert "no calibrated threshold" in undecided.get_suptitle()
    assert undecided.axes[2].images[0].norm.vcenter == 0.0


def test_picture_rejects_mismatched_maps():
    with pytest.raises(ValueError, match="differ in shape"):
        explain.render_explanation(FACES[0], FACES[1], dict(RESULT, attention_map=np.ones((4, 4))))


def test_save_explanation_writes_a_png(tmp_path):
    path = tmp_path / "pair.png"
    picture = explain.save_explanation(path, FACES[0], FACES[1], RESULT, threshold=0.25)
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
    expected = tiny_runtime.verify(result["face_a"][None], result["face_b"][None])
    assert result["score"] == pytest.approx(float(expected["score"][0]), abs=1e-6)
    assert result["cos_map"].shape == result["attention_map"].shape == (7, 7)
    assert result["decision"] == explain.decide(result["score"], 0.3) and result["threshold"] == 0.3
    # The JSON part round-trips.
    restored = json.loads(json.dumps(explain.explanation_json(result)))
    assert restored["decision"] == result["decision"] and restored["threshold"] == 0.3
    np.testing.assert_allclose(restored["cos_map"], result["cos_map"], atol=1e-6)
    np.testing.assert_allclose(np.sum(restored["attention_map"]), 1.0, atol=1e-4)


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
              "detector": explain.DEFAULT_DETECTOR, **flag_values}
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
    assert align.read_image(out).shape == (760, 1300, 3)


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
    assert set(printed) == {"score", "decision", "threshold", "cos_map", "attention_map", "notes"}
    threshold = exported.manifest["threshold"]
    assert printed["threshold"] == pytest.approx(threshold)
    assert printed["decision"] == explain.decide(printed["score"], threshold)
    assert np.shape(printed["cos_map"]) == np.shape(printed["attention_map"]) == (7, 7)
    assert "faces found" in run.stderr and "using the largest" in run.stderr  # said on stderr
    assert align.read_image(out).shape == (760, 1300, 3)


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
