"""xcos_tf.runtime and tools/tflite_verify.py: every format agrees with Keras, inputs are
checked, and the TFLite / ONNX paths run without TensorFlow."""
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

import export_testing
from common_testing import REPO_ROOT
from xcos_tf import runtime


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_testing.exported_model(tmp_path_factory)


@pytest.fixture(scope="module")
def pairs(exported):
    """Held-out faces (real ones when the shared folder is there), uint8: (faces A, faces B), 22 pairs."""
    return exported.faces[0::2], exported.faces[1::2]


@pytest.mark.parametrize("model_format", runtime.FORMATS)
def test_verify_matches_keras_on_real_faces(exported, pairs, model_format):
    export_testing.require_format(exported, model_format)
    model = runtime.load(str(exported.dir), format=model_format)
    faces_a, faces_b = pairs
    expected = export_testing.keras_outputs(
        exported.verifier.verify, {"image_a": faces_a.astype(np.float32), "image_b": faces_b.astype(np.float32)}
    )
    outputs = model.verify(faces_a, faces_b)
    assert {key: value.shape for key, value in outputs.items()} == {
        "score": (len(faces_a),), "cos_map": (len(faces_a), 7, 7), "attention_map": (len(faces_a), 7, 7)
    }
    export_testing.assert_within(outputs, expected, export_testing.BOUNDS[model_format], model_format)
    np.testing.assert_allclose(outputs["attention_map"].sum(axis=(1, 2)), 1.0, atol=1e-3)
    # Dynamic batch: one pair without a batch axis, then three, give the same rows.
    single = model.verify(faces_a[0], faces_b[0].astype(np.float32))
    np.testing.assert_allclose(single["score"], outputs["score"][:1], atol=1e-5)
    np.testing.assert_allclose(model.verify(faces_a[:3], faces_b[:3])["cos_map"], outputs["cos_map"][:3], atol=1e-5)
    assert model.threshold == export_testing.THRESHOLD
    assert model.manifest["formats"][model_format]


@pytest.mark.parametrize("model_format", runtime.FORMATS)
def test_embed_and_compare_match_keras(exported, pairs, model_format):
    export_testing.require_format(exported, model_format)
    model = runtime.load(str(exported.dir), format=model_format)
    faces_a, faces_b = pairs
    expected_a = export_testing.keras_outputs(exported.verifier.embed, {"image": faces_a.astype(np.float32)})
    expected_b = export_testing.keras_outputs(exported.verifier.embed, {"image": faces_b.astype(np.float32)})
    embedded = model.embed(faces_a)
    assert embedded["embedding"].shape == (len(faces_a), 1568) and embedded["grid"].shape == (len(faces_a), 7, 7, 32)
    embedding_bound, grid_bound = export_testing.EMBED_BOUNDS[model_format]
    assert np.abs(embedded["embedding"] - expected_a["embedding"]).max() <= embedding_bound
    grid_error = np.abs(embedded["grid"] - expected_a["grid"]).max() / np.abs(expected_a["grid"]).max()
    assert grid_error <= grid_bound, f"grid differs by {grid_error:.3g} of its range"
    # compare on Keras's grids checks the head alone: float everywhere, even in the int8 model.
    compared = model.compare(expected_a["grid"], expected_b["grid"])
    expected = export_testing.keras_outputs(
        exported.verifier.compare, {"grid_a": expected_a["grid"], "grid_b": expected_b["grid"]}
    )
    head_bound = 1e-2 if model_format == "tflite_fp16" else 1e-4
    export_testing.assert_within(compared, expected, head_bound, f"{model_format} compare")


def test_tflite_and_onnx_run_without_tensorflow(exported):
    script = (
        "import sys, numpy as np\n"
        "from xcos_tf import runtime\n"
        "face = np.full((112, 112, 3), 100, np.uint8)\n"
        f"for model_format in {tuple(f for f in ('tflite', 'tflite_int8', 'onnx') if f in exported.formats)!r}:\n"
        f"    model = runtime.load({str(exported.dir)!r}, format=model_format)\n"
        "    assert model.verify(face, face)['score'].shape == (1,)\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] in ('tensorflow', 'keras')))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    assert result.stdout.strip() == "[]"


def run_tool(*args):
    """tools/tflite_verify.py in a fresh interpreter with -X importtime: (result, imported modules)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(REPO_ROOT / "tools" / "tflite_verify.py"), *map(str, args)],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )
    modules = {
        line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")
    }
    return result, modules


def test_tflite_verify_tool_on_raw_photos(exported, shared_dir):
    person = shared_dir / "data" / "lfw" / "images" / "Aaron_Peirsol"
    photo_a, photo_b = person / "Aaron_Peirsol_0001.jpg", person / "Aaron_Peirsol_0002.jpg"
    result, modules = run_tool(photo_a, photo_b, "--model", exported.dir / "xcos_int8.tflite",
                               "--detector", shared_dir / "models" / "yunet.onnx", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not {name for name in modules if name.split(".")[0] in ("tensorflow", "keras")}
    assert {"ai_edge_litert.interpreter", "cv2", "numpy"} <= modules
    output = json.loads(result.stdout)
    assert np.shape(output["cos_map"]) == (7, 7) and np.shape(output["attention_map"]) == (7, 7)
    assert np.sum(output["attention_map"]) == pytest.approx(1.0, abs=2e-3)
    assert output["score"] == pytest.approx(np.sum(np.multiply(output["cos_map"], output["attention_map"])), abs=2e-3)
    assert output["threshold"] == export_testing.THRESHOLD  # read from manifest.json beside the model
    assert output["decision"] == ("same" if output["score"] >= export_testing.THRESHOLD else "different")
    assert output["faces"]["a"]["faces_found"] >= 1


def test_tflite_verify_tool_names_a_photo_without_a_face(exported, shared_dir, tmp_path):
    blank = tmp_path / "wall.png"
    cv2.imwrite(str(blank), np.full((200, 200, 3), 180, np.uint8))
    result, _ = run_tool(blank, blank, "--model", exported.dir / "xcos.tflite",
                         "--detector", shared_dir / "models" / "yunet.onnx")
    assert result.returncode == 2 and "wall.png" in result.stderr and "Traceback" not in result.stderr


class EchoRuntime(runtime.Runtime):
    """A backend that returns its checked inputs: for the input checks, with no model."""

    def _run(self, signature, inputs):
        return inputs


@pytest.fixture
def echo():
    return EchoRuntime((112, 112, 3), (7, 7, 32), {"threshold": 0.3})


def test_inputs_become_float32_batches(echo):
    face = np.full((112, 112, 3), 7, np.uint8)
    inputs = echo.verify(face, np.stack([face]).astype(np.float64))
    assert inputs["image_a"].shape == (1, 112, 112, 3) and inputs["image_a"].dtype == np.float32
    assert inputs["image_b"].dtype == np.float32 and echo.threshold == 0.3


@pytest.mark.parametrize(
    "image_a, image_b, message",
    [
        (np.zeros((2, 96, 96, 3), np.uint8), np.zeros((2, 96, 96, 3), np.uint8), "shape \\[N, 112, 112, 3\\]"),
        (np.zeros((2, 112, 112, 3)), np.zeros((3, 112, 112, 3)), "same batch size"),
        (np.full((112, 112, 3), np.nan), np.zeros((112, 112, 3)), "NaN"),
        (np.full((112, 112, 3), -1.0), np.zeros((112, 112, 3)), "pixels in 0..255"),
        (np.zeros((112, 112, 3), np.int32), np.zeros((112, 112, 3)), "uint8 or float"),
        (np.zeros((0, 112, 112, 3)), np.zeros((0, 112, 112, 3)), "shape"),
    ],
)
def test_bad_inputs_are_named(echo, image_a, image_b, message):
    with pytest.raises(ValueError, match=message):
        echo.verify(image_a, image_b)


def test_bad_grids_are_named(echo):
    with pytest.raises(ValueError, match="grid_b"):
        echo.compare(np.zeros((1, 7, 7, 32)), np.zeros((1, 7, 7, 16)))


def test_load_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder written by xcos_tf.export"):
        runtime.load(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({
        "formats": {"saved_model": {"path": "saved_model/x/1"}},
        "input": {"shape": [None, 112, 112, 3]},
        "model": {"grid_shape": [7, 7, 32]},
    }))
    with pytest.raises(ValueError, match="has no onnx export; it has: saved_model"):
        runtime.load(str(tmp_path), format="onnx")
    with pytest.raises(ValueError, match="`format` must be one of"):
        runtime.load(str(tmp_path), format="tensorrt")
