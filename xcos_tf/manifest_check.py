"""Checks an export folder before it is run: the manifest's fields, and the model files' sha256.

`xcos_tf.export` writes `manifest.json` with the sha256 and size of every file; `xcos_tf.runtime.load`
calls `check_manifest` and then `check_files` for the files of the chosen format, so a truncated,
flipped or swapped model file is refused with one line naming it instead of giving a crash deep
inside TFLite/onnxruntime/TensorFlow or, worse, a plausible wrong score.

Hashing 13 MB takes a few tens of ms; a file is hashed once per process and then trusted while its
size and modification time stay the same (`_VERIFIED`).

numpy-free and engine-free: the TFLite/ONNX servers import this without TensorFlow.
"""
import hashlib
import math
import numbers
import os
import threading

KNOWN_FORMATS = ("saved_model", "tflite", "tflite_fp16", "tflite_int8", "onnx")
# (real path, size, mtime_ns) of files whose sha256 matched their manifest in this process.
_VERIFIED = set()
_VERIFIED_LOCK = threading.Lock()


class ManifestError(ValueError):
    """A manifest.json field that is missing or of the wrong kind."""


class ModelFileError(ValueError):
    """A model file that is missing, or differs from the size / sha256 in its manifest."""


def _shape(manifest, keys, length, allow_none_first=False):
    value = manifest
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    name = ".".join(keys)
    ok = isinstance(value, list) and len(value) == length and all(
        (isinstance(v, int) and not isinstance(v, bool) and v > 0) or (allow_none_first and i == 0 and v is None)
        for i, v in enumerate(value)
    )
    if not ok:
        raise ManifestError(f"manifest `{name}` must be a list of {length} positive integers. Received: {value!r}")
    return value


def check_manifest(manifest):
    """Raises `ManifestError` naming the first field `runtime.load` needs that is missing or wrong.

    Fields: `formats` (a dict; each known format's entry a dict with its `path`, or for ONNX its
    `signatures` files; other names are left alone), `threshold` (null, or a finite
    number in [-1, 1]: the score is a weighted cosine), `input.shape` [null, H, W, 3] and
    `model.grid_shape` [h, w, C]. Returns the manifest.
    """
    if not isinstance(manifest, dict):
        raise ManifestError(f"manifest must be a JSON object. Received: {type(manifest).__name__}")
    formats = manifest.get("formats")
    if not isinstance(formats, dict) or not formats:
        raise ManifestError(f"manifest `formats` must be an object naming the exported formats. Received: {formats!r}")
    for name, entry in formats.items():
        if name not in KNOWN_FORMATS:
            continue  # a format of a newer export: this runtime cannot run it, and need not
        if not isinstance(entry, dict):
            raise ManifestError(f"manifest `formats.{name}` must be an object naming its files. Received: {entry!r}")
        if name == "onnx":
            signatures = entry.get("signatures")
            if not isinstance(signatures, dict) or not all(isinstance(v, str) for v in signatures.values()):
                raise ManifestError(
                    f"manifest `formats.onnx.signatures` must map signatures to files. Received: {signatures!r}"
                )
        elif not isinstance(entry.get("path"), str):
            raise ManifestError(f"manifest `formats.{name}.path` must be a path. Received: {entry.get('path')!r}")
    threshold = manifest.get("threshold")
    if threshold is not None:
        if (not isinstance(threshold, numbers.Real) or isinstance(threshold, bool)
                or not math.isfinite(threshold) or not -1.0 <= threshold <= 1.0):
            raise ManifestError(
                f"manifest `threshold` must be null or a finite number in [-1, 1]. Received: {threshold!r}"
            )
    _shape(manifest, ("input", "shape"), 4, allow_none_first=True)
    _shape(manifest, ("model", "grid_shape"), 3)
    return manifest


def format_files(manifest, model_format):
    """The files (relative to the export folder) that `model_format` runs from (of a manifest
    that passed `check_manifest`)."""
    entry = manifest["formats"][model_format]
    if model_format == "onnx":  # the graphs and the external-data file(s) holding their weights
        return sorted(entry["signatures"].values()) + sorted(entry.get("external_data") or [])
    path = entry["path"]
    if model_format != "saved_model":
        return [path]
    prefix = path.rstrip("/") + "/"
    listed = sorted(name for name in manifest.get("files") or {} if name.startswith(prefix))
    return listed or [path + "/saved_model.pb"]  # no listing: check_files names the missing sha256


def check_files(model_dir, manifest, relative_paths):
    """Each file must exist and match the size and sha256 listed in `manifest["files"]`.

    Raises `ModelFileError` with one line naming the first file that differs.
    """
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        raise ModelFileError(f"{model_dir}: the manifest lists no file checksums (`files`); re-export the model")
    for relative in relative_paths:
        path = os.path.join(model_dir, relative)
        entry = listed.get(relative)
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise ModelFileError(f"{path}: not listed with a sha256 in the manifest")
        try:
            stat = os.stat(path)
        except OSError as e:
            raise ModelFileError(f"{path}: model file missing or unreadable ({e.strerror or e})") from None
        key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
        with _VERIFIED_LOCK:
            if key in _VERIFIED:
                continue
        if entry.get("bytes") is not None and stat.st_size != entry["bytes"]:
            raise ModelFileError(
                f"{path}: {stat.st_size} bytes where the manifest says {entry['bytes']}: the file is "
                "truncated or replaced; re-export or restore it"
            )
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != entry["sha256"]:
            raise ModelFileError(
                f"{path}: sha256 differs from the manifest: the file is corrupted or replaced; re-export or restore it"
            )
        with _VERIFIED_LOCK:
            _VERIFIED.add(key)
