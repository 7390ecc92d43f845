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
"""
import json
import os

import numpy as np

FORMATS = ("saved_model", "tflite", "tflite_fp16", "tflite_int8", "onnx")
MANIFEST_FILE = "manifest.json"


def _as_batch(array, name, item_shape, pixels):
    """float32 [N, *item_shape] from one item or a batch; a clear error for anything else."""
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
    return np.ascontiguousarray(array)


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
        return self._run("verify", {"image_a": image_a, "image_b": image_b})

    def embed(self, image):
        """{"embedding" [N, h*w*C] (L2-normalised), "grid" [N, h, w, C]} of aligned faces."""
        return self._run("embed", {"image": _as_batch(image, "image", self.image_shape, pixels=True)})

    def compare(self, grid_a, grid_b):
        """verify's outputs from two batches of stored grids (no backbone run)."""
        grid_a = _as_batch(grid_a, "grid_a", self.grid_shape, pixels=False)
        grid_b = _as_batch(grid_b, "grid_b", self.grid_shape, pixels=False)
        _same_batch(grid_a, grid_b)
        return self._run("compare", {"grid_a": grid_a, "grid_b": grid_b})

    def _run(self, signature, inputs):
        raise NotImplementedError


class SavedModelRuntime(Runtime):
    """A SavedModel's signatures, run by TensorFlow."""

    def __init__(self, path, image_shape, grid_shape, manifest=None):
        super().__init__(image_shape, grid_shape, manifest)
        import tensorflow as tf

        self._tf = tf
        self._saved_model = tf.saved_model.load(path)  # keeps the variables alive
        self._signatures = self._saved_model.signatures

    def _run(self, signature, inputs):
        outputs = self._signatures[signature](**{k: self._tf.constant(v) for k, v in inputs.items()})
        return {key: value.numpy() for key, value in outputs.items()}


class TFLiteRuntime(Runtime):
    """A TFLite model's signatures through ai-edge-litert's signature runners.

    Shapes come from the model itself, so a bare `.tflite` file works without a manifest.
    """

    def __init__(self, path, manifest=None, num_threads=None):
        from ai_edge_litert.interpreter import Interpreter

        if not os.path.isfile(path):
            raise FileNotFoundError(f"TFLite model not found: {path!r}")
        self._interpreter = Interpreter(model_path=path, num_threads=num_threads)
        missing = {"verify", "embed", "compare"} - set(self._interpreter.get_signature_list())
        if missing:
            raise ValueError(f"{path}: not an xCos export, signatures {sorted(missing)} are missing.")
        self._runners = {}
        embed_inputs = self._runner("embed").get_input_details()
        compare_inputs = self._runner("compare").get_input_details()
        super().__init__(embed_inputs["image"]["shape"][1:], compare_inputs["grid_a"]["shape"][1:], manifest)

    def _runner(self, signature):
        if signature not in self._runners:
            self._runners[signature] = self._interpreter.get_signature_runner(signature)
        return self._runners[signature]

    def _run(self, signature, inputs):
        # The runner resizes to the batch and returns views of its buffers: copy them out.
        return {key: np.array(value) for key, value in self._runner(signature)(**inputs).items()}


class ONNXRuntime(Runtime):
    """One ONNX graph per signature, run by onnxruntime on the CPU."""

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
            self._sessions[signature] = onnxruntime.InferenceSession(
                path, options, providers=["CPUExecutionProvider"]
            )

    def _run(self, signature, inputs):
        session = self._sessions[signature]
        names = [output.name for output in session.get_outputs()]
        return dict(zip(names, session.run(names, inputs)))


def read_manifest(model_dir):
    path = os.path.join(model_dir, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No {MANIFEST_FILE} in {model_dir!r}: not a folder written by xcos_tf.export.")
    with open(path) as f:
        return json.load(f)


def load(model_dir, format="saved_model", num_threads=None):  # noqa: A002 (the brief's API name)
    """The exported model in `model_dir`, in one of `FORMATS`, as a `Runtime`.

    Args:
        model_dir: str, a folder written by `xcos_tf.export`.
        format: str, which of the exported formats to run. Defaults to `"saved_model"`.
        num_threads: optional int, CPU threads for TFLite / onnxruntime (their default if None).
    """
    if format not in FORMATS:
        raise ValueError(f"`format` must be one of {FORMATS}. Received: format={format!r}")
    manifest = read_manifest(model_dir)
    entry = manifest["formats"].get(format)
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
