"""Run an exported xCos model (`python -m xcos_tf.export`) in any of its formats.

```python
model = xcos_tf.runtime.load("exported/default", format="tflite")
outputs = model.verify(face_a, face_b)  # uint8 or float32 [N, 112, 112, 3] or [112, 112, 3]
outputs["score"], outputs["cos_map"], outputs["attention_map"]  # numpy [N], [N, 7, 7], [N, 7, 7]
model.threshold  # the decision threshold from the manifest, or None
```

Only the chosen format's runtime is imported: TensorFlow for `saved_model`, ai-edge-litert
for the TFLite formats, onnxruntime for `onnx`. This module itself needs only numpy, so a
device app or a TFLite/ONNX server runs without TensorFlow.

What a `Runtime` promises (docs/reliability.md lists the tests):
- `load` refuses a manifest with a missing or wrong field (`manifest_check.ManifestError`) and,
  unless `check_files=False`, any model file whose size or sha256 differs from the manifest
  (`manifest_check.ModelFileError`); a file the engine cannot load is a `ModelFileError` too.
- Inputs are checked before they reach the engine (`ValueError` naming the input): pixels must be
  finite and in 0..255, grids finite with |value| <= `GRID_LIMIT`; nothing is clipped or
  sanitised. The raw signatures in the files (SavedModel, TFLite, ONNX) check nothing: fed NaN
  or out-of-range values they return numbers, so go through this module.
- An output holding NaN or infinity is never returned: `ModelOutputError`.
- One object may be shared by threads: the TFLite interpreter runs one call at a time under a
  lock; onnxruntime sessions and TensorFlow functions are thread-safe themselves.
"""
import json
import os
import threading

import numpy as np

from xcos_tf import manifest_check

FORMATS = manifest_check.KNOWN_FORMATS
MANIFEST_FILE = "manifest.json"
# Grid values of a real face are O(1..100); 1e30 overflows the cosine's float32 squares to inf.
GRID_LIMIT = 1e6


class SignatureUnavailableError(ValueError):
    """The loaded format or export lacks the signature asked for (e.g. decompose in TFLite)."""


class ModelOutputError(ValueError):
    """The model returned NaN or infinity: its weights are broken (a check_files=False load of a
    damaged file, or a bad training run). Never shown as a score."""


def _as_batch(array, name, item_shape, pixels):
    """float32 [N, *item_shape] from one item or a batch; a clear error for anything else.

    `pixels`: values must lie in 0..255 (else: grid values, |x| <= GRID_LIMIT)."""
    array = np.asarray(array)
    if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"`{name}` must be uint8 or float. Received: dtype={array.dtype}")
    if array.shape == tuple(item_shape):
        array = array[None]
    if array.ndim != len(item_shape) + 1 or array.shape[1:] != tuple(item_shape) or len(array) == 0:
        raise ValueError(
            f"`{name}` must have shape [N, {', '.join(map(str, item_shape))}] or "
            f"[{', '.join(map(str, item_shape))}]. Received: shape={array.shape}"
        )
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise ValueError(f"`{name}` contains NaN or infinite values.")
    if pixels and (array.min() < 0 or array.max() > 255):
        raise ValueError(
            f"`{name}` must hold RGB pixels in 0..255 (the model normalises them itself). "
            f"Received values in [{array.min():g}, {array.max():g}]"
        )
    if not pixels and np.abs(array).max() > GRID_LIMIT:
        raise ValueError(
            f"`{name}` must hold grid values with |value| <= {GRID_LIMIT:g} (as `embed` returns them). "
            f"Received values in [{array.min():g}, {array.max():g}]"
        )
    return np.ascontiguousarray(array)


def _finite(signature, outputs):
    for key, value in outputs.items():
        if not np.isfinite(value).all():
            raise ModelOutputError(
                f"the model's {signature} returned NaN or infinite `{key}`: its weights are broken "
                "(re-export it, or load it with the sha256 check on)"
            )
    return outputs


def _same_batch(first, second):
    if len(first) != len(second):
        raise ValueError(f"Both sides need the same batch size. Received: {len(first)} and {len(second)}")


class Runtime:
    """The verify / embed / compare API over one backend (a subclass supplies `_run`).

    Args:
        image_shape: (H, W, 3) of the aligned faces.
        grid_shape: (h, w, C) of the grids that embed returns and compare takes.
        manifest: dict, the export's manifest ({} when there is none).
    """

    def __init__(self, image_shape, grid_shape, manifest=None):
        self.image_shape = tuple(image_shape)
        self.grid_shape = tuple(grid_shape)
        self.manifest = manifest or {}
        self.threshold = self.manifest.get("threshold")

    def verify(self, image_a, image_b):
        """{"score" [N], "cos_map" [N, h, w], "attention_map" [N, h, w]} of aligned face pairs."""
        image_a = _as_batch(image_a, "image_a", self.image_shape, pixels=True)
        image_b = _as_batch(image_b, "image_b", self.image_shape, pixels=True)
        _same_batch(image_a, image_b)
        return _finite("verify", self._run("verify", {"image_a": image_a, "image_b": image_b}))

    def embed(self, image):
        """{"embedding" [N, h*w*C] (L2-normalised), "grid" [N, h, w, C]} of aligned faces."""
        return _finite("embed", self._run("embed", {"image": _as_batch(image, "image", self.image_shape, pixels=True)}))

    def compare(self, grid_a, grid_b):
        """verify's outputs from two batches of stored grids (no backbone run)."""
        grid_a = _as_batch(grid_a, "grid_a", self.grid_shape, pixels=False)
        grid_b = _as_batch(grid_b, "grid_b", self.grid_shape, pixels=False)
        _same_batch(grid_a, grid_b)
        return _finite("compare", self._run("compare", {"grid_a": grid_a, "grid_b": grid_b}))

    def decompose(self, image_a, image_b):
        """{"score" [N], "contribution_map" [N, h, w], "bias" [N]} of aligned face pairs: the
        original teacher's cosine split exactly, `score == sum(contribution_map) + bias`.

        Raises `SignatureUnavailableError` when this format (TFLite) or export has no `decompose`."""
        if not self._has_signature("decompose"):
            raise SignatureUnavailableError(
                f"this export's {type(self).__name__} has no decompose signature (it is in the SavedModel and "
                "ONNX files of exports made with a teacher: python -m xcos_tf.export --teacher_onnx=PATH)"
            )
        image_a = _as_batch(image_a, "image_a", self.image_shape, pixels=True)
        image_b = _as_batch(image_b, "image_b", self.image_shape, pixels=True)
        _same_batch(image_a, image_b)
        return _finite("decompose", self._run("decompose", {"image_a": image_a, "image_b": image_b}))

    def _has_signature(self, signature):
        raise NotImplementedError

    def _run(self, signature, inputs):
        raise NotImplementedError


def _not_loadable(path, kind, error):
    """An engine's load failure (InvalidProtobuf, DataLossError, IndexError, ...) as one line."""
    first_line = (str(error).strip().splitlines() or [""])[0][:200]
    return manifest_check.ModelFileError(
        f"{path}: not a loadable {kind} ({type(error).__name__}: {first_line}); re-export or restore it"
    )


class SavedModelRuntime(Runtime):
    """A SavedModel's signatures, run by TensorFlow."""

    def __init__(self, path, image_shape, grid_shape, manifest=None):
        super().__init__(image_shape, grid_shape, manifest)
        import tensorflow as tf

        self._tf = tf
        if not os.path.isdir(path):
            raise FileNotFoundError(f"SavedModel not found: {path!r}")
        try:
            self._saved_model = tf.saved_model.load(path)  # keeps the variables alive
        except Exception as error:  # any engine failure here means a damaged folder
            raise _not_loadable(path, "SavedModel", error) from None
        self._signatures = self._saved_model.signatures

    def _has_signature(self, signature):
        return signature in self._signatures

    def _run(self, signature, inputs):
        outputs = self._signatures[signature](**{k: self._tf.constant(v) for k, v in inputs.items()})
        return {key: value.numpy() for key, value in outputs.items()}


class TFLiteRuntime(Runtime):
    """A TFLite model's signatures through ai-edge-litert's signature runners.

    Shapes come from the model itself, so a bare `.tflite` file works without a manifest.
    An interpreter is not thread-safe (shared threads crashed it or swapped their answers): one
    call runs at a time under `_lock`, which also guards the lazy creation of the runners.
    """

    def __init__(self, path, manifest=None, num_threads=None):
        from ai_edge_litert.interpreter import Interpreter

        if not os.path.isfile(path):
            raise FileNotFoundError(f"TFLite model not found: {path!r}")
        self._lock = threading.Lock()
        try:
            self._interpreter = Interpreter(model_path=path, num_threads=num_threads)
        except Exception as error:  # ValueError / RuntimeError from a damaged flatbuffer
            raise _not_loadable(path, "TFLite model", error) from None
        missing = {"verify", "embed", "compare"} - set(self._interpreter.get_signature_list())
        if missing:
            raise ValueError(f"{path}: not an xCos export, signatures {sorted(missing)} are missing.")
        self._runners = {}
        embed_inputs = self._runner("embed").get_input_details()
        compare_inputs = self._runner("compare").get_input_details()
        super().__init__(embed_inputs["image"]["shape"][1:], compare_inputs["grid_a"]["shape"][1:], manifest)

    def _has_signature(self, signature):
        return signature in self._interpreter.get_signature_list()

    def _runner(self, signature):
        if signature not in self._runners:
            self._runners[signature] = self._interpreter.get_signature_runner(signature)
        return self._runners[signature]

    def _run(self, signature, inputs):
        # The runner resizes to the batch and returns views of its buffers: copy them out
        # before another thread's call overwrites them.
        with self._lock:
            return {key: np.array(value) for key, value in self._runner(signature)(**inputs).items()}


class ONNXRuntime(Runtime):
    """One ONNX graph per signature, run by onnxruntime on the CPU (`InferenceSession.run` is
    thread-safe)."""

    def __init__(self, paths, image_shape, grid_shape, manifest=None, num_threads=None):
        super().__init__(image_shape, grid_shape, manifest)
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
        self._sessions = {}
        for signature, path in paths.items():
            if not os.path.isfile(path):
                raise FileNotFoundError(f"ONNX model not found: {path!r}")
            try:
                self._sessions[signature] = onnxruntime.InferenceSession(
                    path, options, providers=["CPUExecutionProvider"]
                )
            except Exception as error:  # InvalidProtobuf, Fail, ... from a damaged file
                raise _not_loadable(path, "ONNX model", error) from None

    def _has_signature(self, signature):
        return signature in self._sessions

    def _run(self, signature, inputs):
        session = self._sessions[signature]
        names = [output.name for output in session.get_outputs()]
        return dict(zip(names, session.run(names, inputs)))


def read_manifest(model_dir):
    """The checked manifest of an export folder (`manifest_check.ManifestError` for a bad field)."""
    path = os.path.join(model_dir, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No {MANIFEST_FILE} in {model_dir!r}: not a folder written by xcos_tf.export.")
    with open(path) as f:
        try:
            # NaN/Infinity are not JSON: refused here rather than read as a float threshold.
            manifest = json.load(f, parse_constant=_no_constant)
        except ValueError as e:
            raise manifest_check.ManifestError(f"{path}: not valid JSON ({e})") from None
    try:
        return manifest_check.check_manifest(manifest)
    except manifest_check.ManifestError as e:
        raise manifest_check.ManifestError(f"{path}: {e}") from None


def _no_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def load(model_dir, format="saved_model", num_threads=None, check_files=True):  # noqa: A002 (the brief's API name)
    """The exported model in `model_dir`, in one of `FORMATS`, as a `Runtime`.

    Args:
        model_dir: str, a folder written by `xcos_tf.export`.
        format: str, which of the exported formats to run. Defaults to `"saved_model"`.
        num_threads: optional int, CPU threads for TFLite / onnxruntime (their default if None).
        check_files: bool, compare the format's files with the manifest's sizes and sha256
            first (once per process and file while its size and mtime stay). Defaults to True.
    """
    if format not in FORMATS:
        raise ValueError(f"`format` must be one of {FORMATS}. Received: format={format!r}")
    manifest = read_manifest(model_dir)
    entry = manifest["formats"].get(format)
    if entry is not None and check_files:
        manifest_check.check_files(model_dir, manifest, manifest_check.format_files(manifest, format))
    if entry is None:
        raise ValueError(
            f"{model_dir!r} has no {format} export; it has: {', '.join(manifest['formats']) or 'none'}."
        )
    image_shape = manifest["input"]["shape"][1:]
    grid_shape = manifest["model"]["grid_shape"]
    if format == "saved_model":
        return SavedModelRuntime(os.path.join(model_dir, entry["path"]), image_shape, grid_shape, manifest)
    if format == "onnx":
        paths = {signature: os.path.join(model_dir, file) for signature, file in entry["signatures"].items()}
        return ONNXRuntime(paths, image_shape, grid_shape, manifest, num_threads=num_threads)
    return TFLiteRuntime(os.path.join(model_dir, entry["path"]), manifest, num_threads=num_threads)
