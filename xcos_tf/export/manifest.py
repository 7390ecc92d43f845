"""The manifest.json of an export: its constants, how it is built from the model, and a reader
that checks its schema (what `xcos_tf.runtime` relies on).

Facts about the model (input size, grid, pixel normalisation) are read from the model itself,
never written as constants.
"""
import datetime
import importlib.metadata
import json
import math
import os
import platform

import keras
import numpy as np

import xcos_tf
from xcos_tf import layers
from xcos_tf.data import records
from xcos_tf.runtime import FORMATS, MANIFEST_FILE

SIGNATURES = ("verify", "embed", "compare")
ONNX_OPSET = 17
TFLITE_SUFFIXES = {"tflite": "", "tflite_fp16": "_fp16", "tflite_int8": "_int8"}
# What int8 keeps in float32, and why (measured on a tiny model and real glint_sample faces):
# an int8 cosine divides by a quantised norm that rounds to zero (TFLite's DIV refuses to run);
# with only the division in float the cos map was off by up to 0.55; with the whole cosine in
# float but the attention convs and the softmax over 49 cells (~0.02 each, int8 step 1/256) in
# int8, the score was off by 0.017 against 0.0024 with the whole head in float. The head is
# about 1 M multiply-adds per pair against ~440 M for two MobileFaceNet passes, so it stays float.
INT8_NOTE = (
    "Backbone and a 1x1-conv grid head fully int8 (per-channel weights, int8 activations); a "
    "position-wise grid head (its per-cell int8 matmuls cost 0.04 in score) and the xCos head "
    "(cosine map, attention convs, softmax, score) and the embedding normalisation run in float32. "
    "Inputs and outputs are float32."
)


def onnx_files(name, decompose=False):
    """{signature: ONNX file name} of an export."""
    return {signature: f"{name}_{signature}.onnx" for signature in SIGNATURES + (("decompose",) if decompose else ())}


def onnx_weights_file(name):
    """The external-data file the ONNX graphs share (`onnx.share_weights`)."""
    return f"{name}_onnx_weights.bin"


def signature_specs(verifier, decompose=False):
    """The inputs and outputs of every signature: names, shapes (dynamic batch), dtypes
    (with `decompose`, the teacher's decomposition too)."""
    image_shape = tuple(verifier.embed.input["image"].shape[1:])
    grid_shape = tuple(verifier.embed.output["grid"].shape[1:])
    image = {"shape": [None, *image_shape], "dtype": "float32"}
    grid = {"shape": [None, *grid_shape], "dtype": "float32"}
    maps = {
        "score": {"shape": [None], "dtype": "float32"},
        "cos_map": {"shape": [None, *grid_shape[:2]], "dtype": "float32"},
        "attention_map": {"shape": [None, *grid_shape[:2]], "dtype": "float32"},
    }
    embedding = {"shape": [None, int(np.prod(grid_shape))], "dtype": "float32"}
    specs = {
        "verify": {"inputs": {"image_a": image, "image_b": image}, "outputs": maps},
        "embed": {"inputs": {"image": image}, "outputs": {"embedding": embedding, "grid": grid}},
        "compare": {"inputs": {"grid_a": grid, "grid_b": grid}, "outputs": maps},
    }
    if decompose:
        specs["decompose"] = {
            "inputs": {"image_a": image, "image_b": image},
            "outputs": {
                "score": {"shape": [None], "dtype": "float32"},
                "contribution_map": {"shape": [None, *grid_shape[:2]], "dtype": "float32"},
                "bias": {"shape": [None], "dtype": "float32"},
            },
            "note": "the original teacher's cosine (score) split exactly: score == sum(contribution_map) + bias",
        }
    return specs


def pixel_normalisation(verifier):
    """How the model normalises its 0..255 pixels, read from its first `Rescaling` layer:
    `{"inside_model": True, "mean": m, "std": s, "formula": "(pixels - mean) / std", "layer": name}`.

    The project's own backbones scale `x / 127.5 - 1` (mean 127.5, std 127.5); a body imported
    from ONNX keeps its model's own preprocessing, e.g. `(x - 127.5) / 128`. A backbone with
    no Rescaling layer is reported as such (`inside_model` None): nothing is assumed.
    """
    rescaling = first_rescaling_layer(verifier.embed)
    if rescaling is None:
        return {"inside_model": None, "note": "the backbone has no Rescaling layer: its pixel normalisation is unknown"}
    scale, offset = float(rescaling.scale), float(rescaling.offset)
    return {
        "inside_model": True,
        "formula": "(pixels - mean) / std",
        "mean": round(-offset / scale, 6),
        "std": round(1.0 / scale, 6),
        "layer": rescaling.name,
        "feed": "raw RGB pixels 0..255",
    }


def first_rescaling_layer(model):
    """The first `keras.layers.Rescaling` in `model`, searching nested models in layer order."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.Rescaling):
            return layer
        if isinstance(layer, keras.Model):
            found = first_rescaling_layer(layer)
            if found is not None:
                return found
    return None


def _versions():
    versions = {"xcos_tf": xcos_tf.__version__, "python": platform.python_version()}
    for package in ("tensorflow", "keras", "numpy", "tf2onnx", "onnx", "onnxruntime", "ai-edge-litert"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def file_digests(root):
    """{relative path: {"sha256", "bytes"}} of every file under `root`."""
    digests = {}
    for folder, _, files in sorted(os.walk(root)):
        for file_name in sorted(files):
            path = os.path.join(folder, file_name)
            digests[os.path.relpath(path, root)] = {"sha256": records.sha256_file(path), "bytes": os.path.getsize(path)}
    return digests


def build_manifest(verifier, name, formats, threshold, far, calibration_count, int8_summary, sample_note, teacher=None):
    """The manifest.json of an export (without "files", added once every file is written).

    `teacher`: None, or {"onnx", "sha256", "shares_xcos_body"} of the teacher whose cosine the
    `decompose` signature splits (SavedModel and ONNX only)."""
    xcos = next(layer for layer in verifier.compare.layers if isinstance(layer, layers.XCosLayer))
    specs = signature_specs(verifier, teacher is not None)
    decompose = ("decompose",) if teacher is not None else ()
    image_shape = specs["embed"]["inputs"]["image"]["shape"][1:]
    grid_shape = specs["embed"]["outputs"]["grid"]["shape"][1:]
    files = {}
    if "saved_model" in formats:
        files["saved_model"] = {
            "path": f"saved_model/{name}/1",
            "signatures": {
                "verify": "verify", "embed": "embed", "compare": "compare",
                "serving_default": "verify", "verify_uint8": "verify with uint8 inputs",
                **{signature: signature for signature in decompose},
            },
            "tf_serving": {"models_config": "models.config", "request": "tf_serving_request.json", "model_name": name},
        }
    for tflite_format, suffix in TFLITE_SUFFIXES.items():
        if tflite_format in formats:
            files[tflite_format] = {"path": f"{name}{suffix}.tflite", "signatures": list(SIGNATURES)}
            if decompose:
                files[tflite_format]["note"] = "no decompose signature: use the SavedModel or ONNX files"
    if "tflite_int8" in formats:
        files["tflite_int8"]["quantization"] = {
            "scheme": INT8_NOTE, "calibration_faces": calibration_count, **int8_summary
        }
    if "onnx" in formats:
        files["onnx"] = {
            "signatures": onnx_files(name, teacher is not None),
            "external_data": [onnx_weights_file(name)],
            "opset": ONNX_OPSET,
            "note": (
                "ONNX has one graph per file: one file per signature. Their weights are in one shared "
                f"external-data file, {onnx_weights_file(name)}, which must stay beside them."
            ),
        }
    return {
        "name": name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "model": {
            "grid_shape": grid_shape,
            "embedding_size": int(np.prod(grid_shape)),
            "attention": xcos.attention,
            "symmetric": xcos.symmetric,
            "parameters": int(verifier.verify.count_params()),
        },
        "input": {
            "shape": [None, *image_shape],
            "dtype": "float32",
            "uint8": "the SavedModel's verify_uint8 signature; xcos_tf.runtime casts uint8 itself",
            "layout": "NHWC",
            "color": "RGB",
            "range": [0, 255],
            "alignment": "5-point similarity transform to the 112x112 ArcFace template (xcos_tf.data.align)",
        },
        "normalisation": pixel_normalisation(verifier),
        "grid_size": grid_shape[:2],
        "teacher": teacher,
        "threshold": None if threshold is None else float(threshold),
        "threshold_far": None if far is None else float(far),
        "sample_faces": sample_note,
        "signatures": specs,
        "formats": files,
    }


def read_manifest(model_dir):
    """The manifest of an export folder, its schema checked; `ValueError` names what is wrong."""
    path = os.path.join(model_dir, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No {MANIFEST_FILE} in {model_dir!r}: not a folder written by xcos_tf.export.")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error}).") from None
    check_manifest(manifest, path)
    return manifest


def check_manifest(manifest, where="manifest"):
    """Raises `ValueError` naming the field when `manifest` lacks what a runtime needs."""
    if not isinstance(manifest, dict):
        raise ValueError(f"{where}: expected a JSON object. Received: {type(manifest).__name__}")
    formats = manifest.get("formats")
    if not isinstance(formats, dict) or not formats or set(formats) - set(FORMATS):
        raise ValueError(f"{where}: `formats` must map some of {', '.join(FORMATS)} to their files. Received: {formats!r}")
    threshold = manifest.get("threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not math.isfinite(threshold)):
        raise ValueError(f"{where}: `threshold` must be a finite number or null. Received: {threshold!r}")
    shape = (manifest.get("input") or {}).get("shape")
    if not (isinstance(shape, list) and len(shape) == 4 and all(isinstance(n, int) and n > 0 for n in shape[1:])):
        raise ValueError(f"{where}: `input.shape` must be [null, H, W, 3]. Received: {shape!r}")
    grid_shape = (manifest.get("model") or {}).get("grid_shape")
    if not (isinstance(grid_shape, list) and len(grid_shape) == 3 and all(isinstance(n, int) and n > 0 for n in grid_shape)):
        raise ValueError(f"{where}: `model.grid_shape` must be [h, w, C]. Received: {grid_shape!r}")
