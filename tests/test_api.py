"""The one-call API (xcos_tf.verify / xcos_tf.load) on the shipped model and sample photos.

Runs from the repository alone (exported/default and exported/samples); photos that need
detection also need YuNet in ../shared/models and skip without it.
"""
import json
import os
import subprocess
import sys
import types

import numpy as np
import PIL.Image
import pytest
from common_testing import REPO_ROOT

import xcos_tf
from xcos_tf import api, paths
from xcos_tf.data import align

MODEL_DIR = REPO_ROOT / "exported" / "default"
SAMPLES = REPO_ROOT / "exported" / "samples"
PHOTO_A, PHOTO_B, PHOTO_C = (str(SAMPLES / f"{name}.jpg") for name in "ABC")
CROP_A, CROP_B = (str(SAMPLES / "aligned" / f"{name}.png") for name in "AB")

pytestmark = pytest.mark.skipif(not (MODEL_DIR / "manifest.json").is_file(),
                                reason="exported/default is not in this checkout")
needs_detector = pytest.mark.skipif(not os.path.isfile(paths.DEFAULT_DETECTOR),
                                    reason=f"needs YuNet at {paths.DEFAULT_DETECTOR}")


@pytest.fixture(scope="module")
def onnx_model():
    return xcos_tf.load(format="onnx")  # the default model, without TensorFlow: fast to load


def test_import_and_onnx_verify_need_no_tensorflow():
    script = (
        "import sys, xcos_tf\n"
        "assert 'tensorflow' not in sys.modules and 'cv2' not in sys.modules, 'import xcos_tf is heavy'\n"
        f"r = xcos_tf.verify({CROP_A!r}, {CROP_B!r}, format='onnx')\n"
        "assert 'tensorflow' not in sys.modules, 'onnx verify imported TensorFlow'\n"
        "print(r['score'])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert 0.0 < float(result.stdout) <= 1.0


@needs_detector
def test_score_equals_the_explain_command_line():
    command = [sys.executable, "-m", "xcos_tf.explain", PHOTO_A, PHOTO_C, "--model", str(MODEL_DIR),
               "--json", "--out", ""]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    cli = json.loads(result.stdout.strip().splitlines()[-1])
    ours = xcos_tf.verify(PHOTO_A, PHOTO_C, model=str(MODEL_DIR))  # saved_model, as the CLI's default
    assert abs(ours["score"] - cli["score"]) <= 1e-4
    assert ours["same"] is (cli["decision"] == "same") and ours["threshold"] == pytest.approx(cli["threshold"])
    np.testing.assert_allclose(ours["cos_map"], cli["cos_map"], atol=1e-4)
    np.testing.assert_allclose(ours["attention_map"], cli["attention_map"], atol=1e-4)


@needs_detector
def test_paths_arrays_and_pil_images_give_one_score(onnx_model):
    by_path = onnx_model.verify(PHOTO_A, PHOTO_B)
    array_a = align.read_image(PHOTO_A)
    with PIL.Image.open(PHOTO_B) as pil_b:
        by_objects = onnx_model.verify(array_a, pil_b)
    assert by_path["same"] is True and by_path["score"] > by_path["threshold"]
    assert by_objects["score"] == pytest.approx(by_path["score"], abs=1e-6)
    assert by_path["cos_map"].shape == (7, 7) and by_path["attention_map"].shape == (7, 7)
    assert by_path["attention_map"].sum() == pytest.approx(1.0, abs=1e-4)
    assert by_path["face_a"].shape == (112, 112, 3) and by_path["face_a"].dtype == np.uint8
    assert onnx_model.verify(PHOTO_A, PHOTO_C)["same"] is False


def test_aligned_crops_are_taken_as_they_are(onnx_model):
    result = onnx_model.verify(CROP_A, CROP_B)
    np.testing.assert_array_equal(result["face_a"], align.read_image(CROP_A))
    assert any("aligned 112x112 crop" in note for note in result["notes"])
    with PIL.Image.open(CROP_A) as pil_a:
        assert onnx_model.verify(pil_a, align.read_image(CROP_B))["score"] == pytest.approx(result["score"], abs=1e-6)


def test_embed_is_the_runtime_embedding(onnx_model):
    embedded = onnx_model.embed(CROP_A)
    direct = onnx_model.runtime.embed(align.read_image(CROP_A)[None])
    np.testing.assert_allclose(embedded["embedding"], direct["embedding"][0], atol=1e-6)
    assert embedded["grid"].shape == tuple(onnx_model.runtime.grid_shape)
    assert np.linalg.norm(embedded["embedding"]) == pytest.approx(1.0, abs=1e-4)


def test_explain_returns_and_writes_the_picture(onnx_model, tmp_path):
    out = tmp_path / "pair.png"
    picture = onnx_model.explain(CROP_A, CROP_B, out=str(out))
    assert picture.shape == (560, 1500, 3)  # explain_picture: header and one xCos row
    np.testing.assert_array_equal(align.read_image(out), picture)
    assert onnx_model.explain(CROP_A, CROP_B).shape == picture.shape


@needs_detector
def test_a_photo_without_a_face_is_a_clear_error(onnx_model):
    grey = np.full((240, 320, 3), 128, np.uint8)
    with pytest.raises(align.NoFaceError, match="photo B: No face found"):
        onnx_model.verify(PHOTO_A, grey)


def test_bad_inputs_are_named(onnx_model, tmp_path):
    with pytest.raises(ValueError, match="photo A: a numpy image must be RGB uint8"):
        onnx_model.verify(np.zeros((112, 112, 3), np.float32), CROP_B)
    with pytest.raises(ValueError, match=r"photo B: a numpy image must be RGB \[H, W, 3\]"):
        onnx_model.verify(CROP_A, np.zeros((112, 112), np.uint8))
    with pytest.raises(align.ImageError, match="missing.jpg"):
        onnx_model.verify(CROP_A, str(tmp_path / "missing.jpg"))


def test_without_a_detector_crops_work_and_photos_say_why(tmp_path):
    model = api.FaceModel(xcos_tf.load(format="onnx").runtime, detector=tmp_path / "none.onnx")
    assert model.verify(CROP_A, CROP_B)["score"] > 0
    with pytest.raises(FileNotFoundError, match="face detector model not found"):
        model.verify(np.zeros((300, 200, 3), np.uint8), CROP_B)


def test_no_default_model_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(api, "DEFAULT_MODEL", tmp_path / "exported" / "default")
    with pytest.raises(FileNotFoundError, match="No default model .* pass model=DIR"):
        xcos_tf.load()


def test_decompose_needs_the_signature():
    fake = types.SimpleNamespace(threshold=0.5, manifest={"signatures": {"verify": {}}})
    with pytest.raises(NotImplementedError, match="no `decompose` signature"):
        api.FaceModel(fake).decompose(CROP_A, CROP_B)
