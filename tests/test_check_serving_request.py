"""tools/check_serving_request.py: a TF Serving request checked against the shipped SavedModel and run."""
import json
import types

import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from common_testing import REPO_ROOT

from tools import check_serving_request as check
from xcos_tf import cli, runtime

MODEL_DIR = REPO_ROOT / "exported" / "default"
REQUEST = MODEL_DIR / "tf_serving_request.json"

pytestmark = pytest.mark.skipif(not REQUEST.is_file(), reason="exported/default is not in this checkout")


@pytest.fixture(scope="module")
def signatures():
    return tf.saved_model.load(check.saved_model_path(str(MODEL_DIR))).signatures


def _main(*argv):
    """The tool's `main` in this process, its flags parsed by absl as on the command line."""
    flag_values = flags.FlagValues()
    args = check.define_flags(flag_values)
    check.main(flag_values(["check_serving_request.py", *argv]), args)


def _run(capsys, *argv):
    """(exit code, captured output) of a run that fails: `cli.run` prints the error on one line, exit 2."""
    with pytest.raises(cli.UserError) as error:
        _main(*argv)
    captured = capsys.readouterr()
    return cli.EXIT_USER_ERROR, types.SimpleNamespace(out=captured.out, err=captured.err + f"error: {error.value}\n")


def test_shipped_request_runs_as_the_runtime_answers(capsys):
    _main(str(REQUEST), "--model", str(MODEL_DIR))
    captured = capsys.readouterr()
    assert "matches signature `verify`" in captured.err
    prediction = json.loads(captured.out)["predictions"][0]
    request = json.loads(REQUEST.read_text())["instances"][0]
    expected = runtime.load(str(MODEL_DIR), format="onnx").verify(np.asarray(request["image_a"], np.float32),
                                                                  np.asarray(request["image_b"], np.float32))
    assert prediction["score"] == pytest.approx(float(expected["score"][0]), abs=1e-4)
    np.testing.assert_allclose(prediction["cos_map"], expected["cos_map"][0], atol=1e-4)


def test_row_and_columnar_forms_agree(tmp_path, signatures):
    signature, rows, form = check.read_request(str(REQUEST))
    assert (signature, form, sorted(rows)) == ("verify", "row", ["image_a", "image_b"])
    columnar = tmp_path / "columnar.json"
    columnar.write_text(json.dumps({"signature_name": "verify", "inputs": rows}))
    signature, columns, form = check.read_request(str(columnar))
    assert form == "columnar"
    specs = signatures["verify"].structured_input_signature[1]
    arrays = check.match_signature(columns, specs, "verify")
    assert arrays["image_a"].shape == (1, 112, 112, 3) and arrays["image_a"].dtype == np.float32
    outputs = {"score": np.array([0.5]), "cos_map": np.zeros((1, 7, 7))}
    assert check.response(outputs, "columnar")["outputs"]["score"] == [0.5]
    assert check.response(outputs, "row")["predictions"][0]["score"] == 0.5


@pytest.mark.parametrize("signature, values, message", [
    ("verify", {"image_a": np.zeros((1, 112, 112, 3))}, "lacks image_b"),
    ("verify", {"image_a": np.zeros((1, 112, 112, 3)), "image_b": np.zeros((1, 112, 112, 3)), "x": [1]},
     "has unknown x"),
    ("verify", {"image_a": np.zeros((1, 64, 64, 3)), "image_b": np.zeros((1, 112, 112, 3))},
     r"image_a`: shape \[1, 64, 64, 3\] does not match"),
    ("verify", {"image_a": [[1, 2], [3]], "image_b": np.zeros((1, 112, 112, 3))}, "not a rectangular array"),
    ("verify", {"image_a": np.full((1, 112, 112, 3), np.nan), "image_b": np.zeros((1, 112, 112, 3))}, "NaN"),
    ("verify_uint8", {"image_a": np.full((1, 112, 112, 3), 300), "image_b": np.zeros((1, 112, 112, 3))},
     r"integers in 0..255"),
    ("verify", {None: np.zeros((1, 112, 112, 3))}, "name them in the request"),
])
def test_mismatches_are_named(signatures, signature, values, message):
    values = {name: np.asarray(value).tolist() if isinstance(value, np.ndarray) else value
              for name, value in values.items()}
    with pytest.raises(check.RequestError, match=message):
        check.match_signature(values, signatures[signature].structured_input_signature[1], signature)


def test_command_line_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert _run(capsys, str(bad), "--model", str(MODEL_DIR))[1].err.startswith(f"error: {bad}: not JSON")
    both = tmp_path / "both.json"
    both.write_text(json.dumps({"instances": [1], "inputs": [1]}))
    assert "exactly one of `instances`" in _run(capsys, str(both), "--model", str(MODEL_DIR))[1].err
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"signature_name": "nope", "instances": [{"image": 1}]}))
    code, captured = _run(capsys, str(unknown), "--model", str(MODEL_DIR))
    assert code == 2 and "signature `nope`" in captured.err and "compare" in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    code, captured = _run(capsys, str(REQUEST), "--model", str(tmp_path))
    assert code == 2 and "neither a SavedModel folder" in captured.err


def test_grpc_route_builds_the_predict_request_and_names_an_absent_server(capsys, monkeypatch):
    pytest.importorskip("tensorflow_serving", reason="needs tensorflow-serving-api")
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    sent = {}

    class Stub:  # stands in for a running TF Serving: records the request, answers like it
        def __init__(self, channel):
            del channel

        def Predict(self, request, timeout):  # noqa: N802 (gRPC's method name)
            sent["request"] = request
            reply = type("Reply", (), {"outputs": {"score": tf.make_tensor_proto(np.array([0.25], np.float32))}})
            return reply

    monkeypatch.setattr(prediction_service_pb2_grpc, "PredictionServiceStub", Stub)
    _main(str(REQUEST), "--model", str(MODEL_DIR), "--grpc", "localhost:1")
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"predictions": [{"score": 0.25}]}
    request = sent["request"]
    assert (request.model_spec.name, request.model_spec.signature_name) == ("xcos", "verify")
    assert tf.make_ndarray(request.inputs["image_a"]).shape == (1, 112, 112, 3)
    monkeypatch.undo()  # the real client, against a closed port
    code, captured = _run(capsys, str(REQUEST), "--model", str(MODEL_DIR), "--grpc", "127.0.0.1:1")
    assert code == 2 and "--grpc 127.0.0.1:1: UNAVAILABLE" in captured.err
