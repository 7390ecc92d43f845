"""xcos_tf.export: the deployment folder, its signatures, the TF Serving request, atomicity."""
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

import export_testing
from common_testing import REPO_ROOT
from xcos_tf import export
from xcos_tf.export import manifest as export_manifest
from xcos_tf.export import onnx as export_onnx
from xcos_tf.data import records

SIGNATURE_IO = {
    "verify": ({"image_a", "image_b"}, {"score", "cos_map", "attention_map"}),
    "embed": ({"image"}, {"embedding", "grid"}),
    "compare": ({"grid_a", "grid_b"}, {"score", "cos_map", "attention_map"}),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_testing.exported_model(tmp_path_factory)


def test_folder_holds_every_format_with_checksums(exported):
    out = exported.dir
    manifest = json.loads((out / "manifest.json").read_text())
    written = {
        os.path.relpath(os.path.join(folder, name), out) for folder, _, names in os.walk(out) for name in names
    }
    assert written - {"manifest.json"} == set(manifest["files"])
    for path, entry in manifest["files"].items():
        assert records.sha256_file(out / path) == entry["sha256"], path
    assert {"saved_model/xcos/1/saved_model.pb", "models.config", "tf_serving_request.json", "xcos.tflite",
            "xcos_fp16.tflite", "xcos_verify.onnx", "xcos_embed.onnx", "xcos_compare.onnx"} <= written
    assert manifest["threshold"] == export_testing.THRESHOLD and manifest["threshold_far"] == export_testing.FAR
    assert manifest["grid_size"] == [7, 7] and manifest["model"]["embedding_size"] == 1568
    assert manifest["input"]["shape"] == [None, 112, 112, 3] and manifest["input"]["range"] == [0, 255]
    assert manifest["versions"]["tensorflow"] == tf.__version__
    assert manifest["normalisation"]["mean"] == 127.5 and manifest["normalisation"]["std"] == 127.5
    config = (out / "models.config").read_text()
    assert 'name: "xcos"' in config and 'base_path: "/models/xcos/saved_model/xcos"' in config


def test_int8_keeps_the_xcos_head_in_float(exported):
    export_testing.require_format(exported, "tflite_int8")
    assert "xcos_int8.tflite" in exported.manifest["files"]
    quantization = exported.manifest["formats"]["tflite_int8"]["quantization"]
    assert quantization["calibration_faces"] > 100 and quantization["int8_ops"] > 0
    assert "SOFTMAX" in quantization["float32_op_types"]  # the xCos head stays float, as documented


def test_saved_model_cli_lists_the_signatures(exported):
    # A subprocess: importing saved_model_cli defines absl flags (--overwrite...) that clash with train's.
    shown = subprocess.run(
        ["saved_model_cli", "show", "--all", "--dir", str(exported.dir / "saved_model" / "xcos" / "1")],
        capture_output=True, text=True, check=True,
    ).stdout
    for signature in ("serving_default", "verify", "verify_uint8", "embed", "compare"):
        assert f"signature_def['{signature}']" in shown
    for name in ("image_a", "image_b", "image", "grid_a", "grid_b", "score", "cos_map", "attention_map",
                 "embedding", "grid"):
        assert f"['{name}'] tensor_info" in shown
    assert "shape: (-1, 112, 112, 3)" in shown and "shape: (-1, 7, 7)" in shown and "dtype: DT_UINT8" in shown


@pytest.mark.parametrize("file_name", ["xcos.tflite", "xcos_fp16.tflite", "xcos_int8.tflite"])
def test_tflite_has_the_three_signatures_with_float_io(exported, file_name):
    if file_name == "xcos_int8.tflite":
        export_testing.require_format(exported, "tflite_int8")
    interpreter = Interpreter(model_path=str(exported.dir / file_name))
    signatures = interpreter.get_signature_list()
    assert {name: (set(io["inputs"]), set(io["outputs"])) for name, io in signatures.items()} == SIGNATURE_IO
    details = interpreter.get_signature_runner("verify").get_input_details()
    assert details["image_a"]["dtype"] == np.float32 and list(details["image_a"]["shape_signature"]) == [-1, 112, 112, 3]


def test_onnx_graphs_are_named_with_a_dynamic_batch(exported):
    for signature, (inputs, outputs) in SIGNATURE_IO.items():
        model = onnx.load(str(exported.dir / f"xcos_{signature}.onnx"))
        onnx.checker.check_model(model)
        assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= 17
        assert {v.name for v in model.graph.input} == inputs and {v.name for v in model.graph.output} == outputs
        for value in list(model.graph.input) + list(model.graph.output):
            assert value.type.tensor_type.shape.dim[0].dim_param == "batch"


def serve_like_tf_serving(signatures, request):
    """TF Serving's REST :predict, in process: the row (`instances`) or columnar (`inputs`)
    format in, the matching `predictions` / `outputs` JSON out (its documented mapping)."""
    signature = signatures[request.get("signature_name", "serving_default")]
    specs = signature.structured_input_signature[1]
    if "instances" in request:
        columns = {name: [row[name] for row in request["instances"]] for name in specs}
    else:
        columns = request["inputs"]
    outputs = signature(**{name: tf.constant(columns[name], dtype=spec.dtype) for name, spec in specs.items()})
    outputs = {key: value.numpy() for key, value in outputs.items()}
    if "instances" in request:
        batch = len(request["instances"])
        return {"predictions": [{key: value[i].tolist() for key, value in outputs.items()} for i in range(batch)]}
    return {"outputs": {key: value.tolist() for key, value in outputs.items()}}


def test_tf_serving_request_in_row_and_columnar_format(exported):
    request = json.loads((exported.dir / "tf_serving_request.json").read_text())
    assert request["signature_name"] == "verify" and len(request["instances"]) == 1
    face_a = np.asarray(request["instances"][0]["image_a"], np.float32)[None]
    face_b = np.asarray(request["instances"][0]["image_b"], np.float32)[None]
    assert face_a.shape == (1, 112, 112, 3) and face_a.std() > 10  # real faces, not placeholders
    expected = export_testing.keras_outputs(exported.verifier.verify, {"image_a": face_a, "image_b": face_b})
    signatures = tf.saved_model.load(str(exported.dir / "saved_model" / "xcos" / "1")).signatures

    rows = json.loads(json.dumps(serve_like_tf_serving(signatures, request)))
    [prediction] = rows["predictions"]
    assert np.shape(prediction["score"]) == () and np.shape(prediction["cos_map"]) == (7, 7)
    assert np.shape(prediction["attention_map"]) == (7, 7)
    export_testing.assert_within({k: np.asarray(v)[None] for k, v in prediction.items()}, expected, 1e-4, "rows")

    columnar = {"signature_name": "verify", "inputs": {"image_a": face_a.tolist(), "image_b": face_b.tolist()}}
    columns = json.loads(json.dumps(serve_like_tf_serving(signatures, columnar)))["outputs"]
    assert np.shape(columns["score"]) == (1,) and np.shape(columns["cos_map"]) == (1, 7, 7)
    export_testing.assert_within({k: np.asarray(v) for k, v in columns.items()}, expected, 1e-4, "columns")

    default = serve_like_tf_serving(signatures, {"instances": request["instances"]})  # serving_default
    assert default["predictions"][0]["score"] == pytest.approx(prediction["score"], abs=1e-6)


def test_verify_uint8_signature_matches_float(exported):
    signatures = tf.saved_model.load(str(exported.dir / "saved_model" / "xcos" / "1")).signatures
    faces = exported.faces[:4]
    as_uint8 = signatures["verify_uint8"](image_a=tf.constant(faces[:2]), image_b=tf.constant(faces[2:]))
    as_float = signatures["verify"](
        image_a=tf.constant(faces[:2], tf.float32), image_b=tf.constant(faces[2:], tf.float32)
    )
    for key in ("score", "cos_map", "attention_map"):
        np.testing.assert_allclose(as_uint8[key].numpy(), as_float[key].numpy(), atol=1e-6)


def test_failed_export_leaves_the_previous_folder_untouched(exported, tmp_path, monkeypatch):
    out = tmp_path / "deploy"
    out.mkdir()
    (out / "manifest.json").write_text("the previous, good export")

    def broken_onnx(*args, **kwargs):
        raise RuntimeError("simulated crash in the ONNX step")

    monkeypatch.setattr(export_onnx, "convert_onnx", broken_onnx)
    with pytest.raises(RuntimeError, match="simulated crash"):
        export.export_model(exported.verifier, str(out), formats=["saved_model", "onnx"])
    assert os.listdir(tmp_path) == ["deploy"]  # no staging folder left beside it
    assert os.listdir(out) == ["manifest.json"]
    assert (out / "manifest.json").read_text() == "the previous, good export"


def test_staged_folder_replaces_only_when_complete(tmp_path):
    out = tmp_path / "deploy"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with export.staged_folder(str(out)) as staging:
        (open(os.path.join(staging, "new.txt"), "w")).close()
        assert os.listdir(out) == ["old.txt"]  # untouched while the new one is written
    assert os.listdir(out) == ["new.txt"]
    assert os.listdir(tmp_path) == ["deploy"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"formats": ["saved_model", "coreml"]}, "Unknown or no formats"),
        ({"formats": ["tflite_int8"]}, "tflite_int8 needs `calibration_images`"),
        ({"far": 1e-3}, "pass `threshold` too"),
        ({"name": "../x"}, "`name` must be"),
        ({"calibration_images": np.zeros((4, 64, 64, 3), np.uint8)}, "uint8 \\[N, 112, 112, 3\\]"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, message):
    # The faces' expected size is read from the model (the tiny model takes 112x112 faces).
    verifier = export.resolve_verifier(export_testing.tiny_trainer())
    with pytest.raises(ValueError, match=message):
        export.export_model(verifier, str(tmp_path / "out"), **kwargs)
    assert not (tmp_path / "out").exists()


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.keras"):
        export.resolve_verifier(str(tmp_path / "missing.keras"))
    with pytest.raises(ValueError, match="without params.json"):
        export.resolve_verifier(str(tmp_path))
    with pytest.raises(ValueError, match="Expected a `.keras` file"):
        export.resolve_verifier(str(tmp_path / "weights.h5"))


def test_a_training_run_folder_is_restored_through_train(tmp_path, monkeypatch):
    from xcos_tf.training import run_folder

    (tmp_path / "params.json").write_text("{}")
    trainer = export_testing.tiny_trainer()
    restored_from = []
    monkeypatch.setattr(run_folder, "load_trainer", lambda model_dir: restored_from.append(model_dir) or trainer)
    verifier = export.resolve_verifier(str(tmp_path))
    assert restored_from == [str(tmp_path)]
    assert verifier.verify.get_layer("xcos") is trainer.xcos


def test_cli_names_a_missing_model_file(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "xcos_tf.export", f"--weights={tmp_path / 'missing.keras'}",
         f"--out={tmp_path / 'out'}", "--formats=saved_model"],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert result.returncode == 2
    assert "Model file not found" in result.stderr and "missing.keras" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("scale, offset, mean, std", [(1 / 127.5, -1.0, 127.5, 127.5), (1 / 128, -127.5 / 128, 127.5, 128.0)])
def test_manifest_normalisation_reproduces_the_models_first_layer(scale, offset, mean, std):
    """The project's backbones scale x / 127.5 - 1, an ONNX body (x - 127.5) / 128: the manifest says
    which, read from the model, and its formula gives the first layer's output."""
    import keras

    from xcos_tf import model as xcos_model
    from xcos_tf.backbones import common

    image, pixels = common.pixel_input((32, 32, 3), scale=scale, offset=offset)
    features = keras.layers.Conv2D(4, 3, strides=8, padding="same")(pixels)
    trainer = xcos_model.build_trainer(keras.Model(image, features), num_classes=2, image_shape=(32, 32, 3), grid_channels=4)
    verifier = xcos_model.build_verifier(trainer)
    normalisation = export_manifest.pixel_normalisation(verifier)
    assert normalisation["inside_model"] and (normalisation["mean"], normalisation["std"]) == (mean, std)
    rescaling = export_manifest.first_rescaling_layer(verifier.embed)
    first_layer = keras.Model(rescaling.input, rescaling.output)
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        np.asarray(first_layer(pixels)), (pixels - normalisation["mean"]) / normalisation["std"], rtol=0, atol=1e-6
    )


def test_read_manifest_checks_the_schema(tmp_path):
    good = {"formats": {"onnx": {}}, "threshold": 0.5, "input": {"shape": [None, 112, 112, 3]},
            "model": {"grid_shape": [7, 7, 32]}}
    (tmp_path / "manifest.json").write_text(json.dumps(good))
    assert export_manifest.read_manifest(str(tmp_path)) == good
    for field, bad in [("threshold", "0.5"), ("threshold", float("nan")), ("formats", {}), ("formats", ["onnx"])]:
        (tmp_path / "manifest.json").write_text(json.dumps(dict(good, **{field: bad})))
        with pytest.raises(ValueError, match=f"`{field}`"):
            export_manifest.read_manifest(str(tmp_path))
