"""Reliability of xcos_tf.runtime (issue 16 items 1, 2, 3, 10): shared objects in threads, no NaN
answer, model files checked against the manifest, tampered export folders named in one line.

Runs from the repository alone: the shipped model in exported/default (copied to tmp_path before
any tampering) and its sample crops. Never writes into exported/.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

from xcos_tf import manifest_check, runtime
from xcos_tf.data import image_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join(ROOT, "exported", "default")
ALIGNED = os.path.join(ROOT, "exported", "samples", "aligned")
THREADS = 4
CALLS_PER_THREAD = 12

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(MODEL_DIR, "manifest.json")),
                                reason="exported/default is not in this checkout")


@pytest.fixture(scope="module")
def faces():
    """The four aligned sample crops and four mirrored ones: eight distinct faces."""
    crops = np.stack([image_io.read_image(os.path.join(ALIGNED, f"{n}.png")) for n in "ABCD"])
    return np.concatenate([crops, crops[:, :, ::-1]])


@pytest.fixture
def model_copy(tmp_path):
    """A copy of exported/default to tamper with."""
    return shutil.copytree(MODEL_DIR, tmp_path / "model", ignore=shutil.ignore_patterns("MODEL_CARD.md"))


def _batches(faces, count, seed=0):
    """`count` (image_a, image_b) batches of 1-3 pairs drawn from `faces`."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        size = int(rng.integers(1, 4))
        batches.append((faces[rng.integers(0, len(faces), size)], faces[rng.integers(0, len(faces), size)]))
    return batches


# === 1. One runtime object shared by threads ===

@pytest.mark.parametrize("model_format", ["tflite", "tflite_int8", "onnx", "saved_model"])
def test_shared_runtime_gives_every_thread_its_own_answer(faces, model_format):
    model = runtime.load(MODEL_DIR, format=model_format, num_threads=1)
    batches = _batches(faces, THREADS * CALLS_PER_THREAD)
    reference = [model.verify(a, b) for a, b in batches]  # single-threaded
    answers, errors = {}, []

    def work(thread):
        try:
            # Each thread runs its share of the batches; the shares interleave in time.
            for index in range(thread, len(batches), THREADS):
                answers[index] = model.verify(*batches[index])
        except Exception as error:  # collected: a thread's exception would not fail the test
            errors.append(error)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert sorted(answers) == list(range(len(batches)))
    for index, expected in enumerate(reference):
        for key in ("score", "cos_map", "attention_map"):
            np.testing.assert_allclose(
                answers[index][key], expected[key], rtol=0, atol=1e-5,
                err_msg=f"{model_format}: call {index} ({key}) differs from the single-threaded answer",
            )


# === 2. No NaN answer, no unchecked input ===

class _NaNRuntime(runtime.Runtime):
    """A backend with broken weights: every output is NaN."""

    def _run(self, signature, inputs):
        batch = len(next(iter(inputs.values())))
        return {"score": np.full(batch, np.nan, np.float32), "cos_map": np.zeros((batch, 7, 7), np.float32),
                "attention_map": np.zeros((batch, 7, 7), np.float32)}


def test_non_finite_output_is_an_error_not_a_score():
    model = _NaNRuntime((112, 112, 3), (7, 7, 32))
    face = np.zeros((112, 112, 3), np.uint8)
    with pytest.raises(runtime.ModelOutputError, match="verify returned NaN or infinite `score`"):
        model.verify(face, face)
    with pytest.raises(runtime.ModelOutputError, match="compare returned NaN"):
        model.compare(np.ones((7, 7, 32)), np.ones((7, 7, 32)))


@pytest.mark.parametrize("grid_value, message", [(1e30, "grid_a` must hold grid values"), (np.inf, "NaN or infinite")])
def test_compare_refuses_huge_or_infinite_grids(grid_value, message):
    model = runtime.load(MODEL_DIR, format="tflite")
    grid = np.full((1, *model.grid_shape), grid_value, np.float32)  # the shipped model's grid, whatever its width
    with pytest.raises(ValueError, match=message):
        model.compare(grid, np.ones_like(grid))


@pytest.mark.parametrize("pixel, message", [(np.nan, "NaN"), (256.0, "0..255"), (-0.5, "0..255")])
def test_verify_refuses_bad_pixels_in_every_format(faces, pixel, message):
    for model_format in ("tflite", "onnx"):
        model = runtime.load(MODEL_DIR, format=model_format)
        bad = faces[:1].astype(np.float32)
        bad[0, 50, 50, 1] = pixel
        with pytest.raises(ValueError, match=message):
            model.verify(bad, faces[:1])


def _corrupt_tflite_weights(model_dir, keep_manifest_true):
    """Overwrites the largest float32 weight tensor of xcos.tflite with NaN (the flatbuffer stays
    valid). `keep_manifest_true`: also write the damaged file's sha256 and size into the
    manifest, as an export of already broken weights would."""
    from ai_edge_litert.interpreter import Interpreter

    path = os.path.join(model_dir, "xcos.tflite")
    data = bytearray(open(path, "rb").read())
    interpreter = Interpreter(model_path=path)
    weights = max(
        (interpreter.get_tensor(d["index"]).tobytes() for d in interpreter.get_tensor_details()
         if d["dtype"] == np.float32 and np.prod(d["shape"]) > 1000 and _is_constant(interpreter, d)),
        key=len,
    )
    offset = data.find(weights)
    assert offset > 0, "no float32 weights found in the file"
    data[offset:offset + len(weights)] = np.full(len(weights) // 4, np.nan, np.float32).tobytes()
    open(path, "wb").write(bytes(data))
    if keep_manifest_true:
        manifest_path = os.path.join(model_dir, "manifest.json")
        manifest = json.load(open(manifest_path))
        manifest["files"]["xcos.tflite"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        json.dump(manifest, open(manifest_path, "w"))
    return path


def test_corrupted_weights_are_refused_by_sha256_or_by_the_output_check(model_copy, faces):
    path = _corrupt_tflite_weights(model_copy, keep_manifest_true=False)
    with pytest.raises(manifest_check.ModelFileError, match=f"{path}: sha256 differs"):
        runtime.load(str(model_copy), format="tflite")
    model = runtime.load(str(model_copy), format="tflite", check_files=False)
    with pytest.raises(runtime.ModelOutputError, match="NaN"):
        model.verify(faces[:2], faces[2:4])


def _is_constant(interpreter, detail):
    try:
        interpreter.get_tensor(detail["index"])  # only constants have data before allocation
        return True
    except ValueError:
        return False


def _error_lines(stderr):
    """The tool's own error lines (the TFLite engine logs an INFO line of its own)."""
    return [line for line in stderr.splitlines() if not line.startswith("INFO: ")]


def _explain(model_dir, model_format, *extra):
    photos = [os.path.join(ALIGNED, "A.png"), os.path.join(ALIGNED, "B.png")]
    return subprocess.run(
        [sys.executable, "-m", "xcos_tf.explain", *photos, "--model", str(model_dir), "--format", model_format,
         "--out", "", *extra],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )


def test_explain_json_never_prints_nan(model_copy):
    _corrupt_tflite_weights(model_copy, keep_manifest_true=True)  # passes the sha256 check
    result = _explain(model_copy, "tflite", "--json")
    assert result.returncode == 2, result
    assert "NaN" not in result.stdout and "nan" not in result.stdout
    errors = _error_lines(result.stderr)
    assert len(errors) == 1 and "returned NaN or infinite" in errors[0], result.stderr


# === 3. Manifest fields and file checksums ===

@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(threshold="0.52"), "`threshold` must be null or a finite number"),
        (lambda m: m.update(threshold=[0.52]), "`threshold` must be null or a finite number"),
        (lambda m: m.update(threshold=True), "`threshold` must be null or a finite number"),
        (lambda m: m.update(threshold=2.5), "`threshold` must be null or a finite number in \\[-1, 1\\]"),
        (lambda m: m.pop("formats"), "`formats` must be an object"),
        (lambda m: m.update(formats=["tflite"]), "`formats` must be an object"),
        (lambda m: m["model"].pop("grid_shape"), "`model.grid_shape` must be a list"),
        (lambda m: m["formats"]["tflite"].pop("path"), "`formats.tflite.path` must be a path"),
        (lambda m: m["formats"].update(onnx="xcos.onnx"), "`formats.onnx` must be an object"),
    ],
)
def test_bad_manifest_fields_are_named(model_copy, change, message):
    path = model_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(manifest_check.ManifestError, match=message) as error:
        runtime.load(str(model_copy), format="tflite")
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_a_format_this_runtime_does_not_know_is_left_alone(model_copy):
    path = model_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["formats"]["coreml"] = {"path": "xcos.mlpackage"}  # e.g. from a newer export
    path.write_text(json.dumps(manifest))
    assert runtime.load(str(model_copy), format="tflite").threshold == manifest["threshold"]


def test_nan_threshold_in_the_manifest_is_refused(model_copy):
    path = model_copy / "manifest.json"
    text = path.read_text()
    manifest = json.loads(text)
    path.write_text(text.replace(json.dumps(manifest["threshold"]), "NaN", 1))
    with pytest.raises(manifest_check.ManifestError, match="not valid JSON.*NaN is not a JSON number"):
        runtime.load(str(model_copy), format="tflite")


def test_files_are_hashed_once_per_process_until_they_change(model_copy, monkeypatch):
    monkeypatch.setattr(manifest_check, "_VERIFIED", set())
    hashed = []
    file_digest = hashlib.file_digest

    def counting(f, digest):
        hashed.append(os.path.basename(f.name))
        return file_digest(f, digest)

    monkeypatch.setattr(manifest_check.hashlib, "file_digest", counting)
    runtime.load(str(model_copy), format="tflite")
    runtime.load(str(model_copy), format="tflite")
    assert hashed == ["xcos.tflite"]
    os.utime(model_copy / "xcos.tflite", ns=(0, 0))  # a new mtime: hashed again
    runtime.load(str(model_copy), format="tflite")
    assert hashed == ["xcos.tflite", "xcos.tflite"]


# === 10. Tampered export folders: one line naming the file, with and without the sha256 check ===

def _truncate(path, keep=0.5):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: int(len(data) * keep)])


def _flip(path):
    data = bytearray(open(path, "rb").read())
    for offset in range(len(data) // 3, len(data) // 3 + 4096):
        data[offset] ^= 0x5A
    open(path, "wb").write(bytes(data))


VARIABLES = os.path.join("saved_model", "xcos", "1", "variables", "variables.data-00000-of-00001")
TAMPERING = {
    "truncated_onnx": ("onnx", "xcos_verify.onnx", _truncate),
    "truncated_tflite": ("tflite", "xcos.tflite", _truncate),
    "truncated_variables": ("saved_model", VARIABLES, _truncate),
    "flipped_variables": ("saved_model", VARIABLES, _flip),
}


@pytest.mark.parametrize("case", sorted(TAMPERING))
@pytest.mark.parametrize("check_files", [True, False])
def test_tampered_model_file_is_named_in_one_line(model_copy, case, check_files):
    model_format, relative, tamper = TAMPERING[case]
    tamper(os.path.join(model_copy, relative))
    with pytest.raises(manifest_check.ModelFileError) as error:
        runtime.load(str(model_copy), format=model_format, check_files=check_files)
    message = str(error.value)
    # Without the checksum the engine's error names the file (ONNX, TFLite) or the SavedModel folder.
    named = relative if check_files or model_format != "saved_model" else os.path.dirname(os.path.dirname(relative))
    assert os.path.join(str(model_copy), named) in message and "\n" not in message, message


def test_explain_names_a_tampered_file_and_exits_2(model_copy):
    _truncate(os.path.join(model_copy, "xcos_verify.onnx"))
    result = _explain(model_copy, "onnx")
    assert result.returncode == 2
    errors = _error_lines(result.stderr)
    assert len(errors) == 1 and "xcos_verify.onnx: " in errors[0] and "Traceback" not in result.stderr, result.stderr


def test_tflite_verify_tool_reads_the_checked_threshold(model_copy):
    sys.path.insert(0, ROOT)
    try:
        from tools import tflite_verify
    finally:
        sys.path.pop(0)
    tflite = str(model_copy / "xcos.tflite")
    assert tflite_verify.manifest_threshold(tflite) == json.loads((model_copy / "manifest.json").read_text())["threshold"]
    manifest = json.loads((model_copy / "manifest.json").read_text())
    manifest["threshold"] = "0.52"
    (model_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(manifest_check.ManifestError, match="`threshold` must be null or a finite number"):
        tflite_verify.manifest_threshold(tflite)


def test_demo_never_renders_a_nan_score():
    """The page's compare raises ModelOutputError (shown as the page's error message) instead of
    drawing `score nan`; aligned crops need no face detector."""
    from xcos_tf import demo

    uploads = [{"path": os.path.join(ALIGNED, f"{n}.png"), "orig_name": f"{n}.png"} for n in "AB"]
    with pytest.raises(runtime.ModelOutputError, match="returned NaN"):
        demo.compare_uploads(*uploads, _NaNRuntime((112, 112, 3), (7, 7, 32)), aligner=None, max_bytes=demo.MB)
