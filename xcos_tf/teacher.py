"""The frozen teacher: a pretrained face embedder whose cosine supervises the xCos score.

Loaded from ONNX (onnxruntime), a TensorFlow SavedModel, or a `.tflite` file (ai-edge-litert),
with the preprocessing declared by the caller. TensorFlow and LiteRT are imported only for their
own formats, so shard writing with an ONNX teacher never starts TensorFlow.

Example:

```python
teacher = Teacher("../shared/models/teacher_mobilefacenet.onnx")  # RGB, (x-127.5)/128, NCHW
embeddings = teacher.embed(aligned_faces)  # uint8 [N, 112, 112, 3] -> float32 [N, 128], unit norm
```
"""
import os

import numpy as np

from xcos_tf.paths import DEFAULT_TEACHER

FORMATS = ("onnx", "saved_model", "tflite")
_EPSILON = 1e-12


def teacher_format(path):
    """'onnx', 'tflite' or 'saved_model' from the path; ValueError for anything else."""
    path = os.fspath(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "saved_model.pb")):
        return "saved_model"
    if path.endswith(".onnx"):
        return "onnx"
    if path.endswith(".tflite"):
        return "tflite"
    raise ValueError(
        f"Unknown teacher format: {path!r}. Expected an .onnx file, a .tflite file or a "
        "SavedModel folder (with saved_model.pb)."
    )


class _OnnxRunner:
    def __init__(self, path, num_threads):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
            options.inter_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(
            path, options, providers=["CPUExecutionProvider"]
        )
        model_input = self._session.get_inputs()[0]
        self._input_name = model_input.name
        self.input_shape = tuple(d if isinstance(d, int) else None for d in model_input.shape)

    def __call__(self, x):
        return self._session.run(None, {self._input_name: x})[0]


class _TFLiteRunner:
    def __init__(self, path, num_threads):
        from ai_edge_litert.interpreter import Interpreter

        self._interpreter = Interpreter(model_path=path, num_threads=num_threads or None)
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]
        shape = tuple(int(d) for d in self._input["shape_signature"])
        self.input_shape = tuple(None if d < 0 else d for d in shape)
        self._batch = None

    def __call__(self, x):
        if self._batch != len(x):
            self._interpreter.resize_tensor_input(self._input["index"], x.shape)
            self._interpreter.allocate_tensors()
            self._batch = len(x)
        self._interpreter.set_tensor(self._input["index"], x)
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output["index"])


class _SavedModelRunner:
    def __init__(self, path, num_threads):
        import tensorflow as tf

        self._tf = tf
        self._function = tf.saved_model.load(path).signatures["serving_default"]
        (self._input_name, spec), = self._function.structured_input_signature[1].items()
        self.input_shape = tuple(spec.shape)

    def __call__(self, x):
        outputs = self._function(**{self._input_name: self._tf.constant(x)})
        return next(iter(outputs.values())).numpy()


_RUNNERS = {"onnx": _OnnxRunner, "tflite": _TFLiteRunner, "saved_model": _SavedModelRunner}


class Teacher:
    """A frozen face embedder with declared preprocessing.

    Args:
        path: str, an `.onnx` file, a `.tflite` file or a SavedModel folder (its
            `serving_default` signature, one input). Default: the shared MobileFaceNet teacher.
        color: str, `"rgb"` or `"bgr"`: the channel order the model expects.
        mean: float, default 127.5, subtracted from the 0..255 pixels.
        scale: float, default 1/128, multiplies `pixels - mean`.
        layout: str, `"nchw"` or `"nhwc"`: the model's input layout.
        batch_size: int, default 64, images per model call (a model with a fixed batch
            dimension uses that instead).
        num_threads: int or None, threads for the runtime (None: the runtime's default; use 1
            per worker process when embedding in a process pool).

    `embed(faces)` takes aligned RGB faces, uint8 or float 0..255, [N, 112, 112, 3] (or one
    [112, 112, 3]) and returns float32 [N, D], each row L2-normalised.
    """

    def __init__(self, path=DEFAULT_TEACHER, color="rgb", mean=127.5, scale=1.0 / 128.0,
                 layout="nchw", batch_size=64, num_threads=None):
        path = os.fspath(path)
        if color not in ("rgb", "bgr"):
            raise ValueError(f"`color` must be 'rgb' or 'bgr'. Received: color={color!r}")
        if layout not in ("nchw", "nhwc"):
            raise ValueError(f"`layout` must be 'nchw' or 'nhwc'. Received: layout={layout!r}")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1. Received: batch_size={batch_size}")
        if not os.path.exists(path):
            raise FileNotFoundError(f"Teacher model not found: {path!r}")
        self.path = path
        self.format = teacher_format(path)
        self.color = color
        self.mean = float(mean)
        self.scale = float(scale)
        self.layout = layout
        self._runner = _RUNNERS[self.format](path, num_threads)
        self._fixed_batch = self._runner.input_shape[0] if self._runner.input_shape else None
        self.batch_size = self._fixed_batch or batch_size
        self.image_size = self._image_size()

    def _image_size(self):
        shape = self._runner.input_shape
        if len(shape) != 4:
            raise ValueError(f"{self.path}: expected a 4-D image input. Received shape {shape}")
        size = shape[2:4] if self.layout == "nchw" else shape[1:3]
        channels = shape[1] if self.layout == "nchw" else shape[3]
        if channels not in (3, None):
            raise ValueError(
                f"{self.path}: input shape {shape} has {channels} channels in layout "
                f"{self.layout!r}; is `layout` right?"
            )
        return tuple(d or 112 for d in size)

    @property
    def name(self):
        return os.path.basename(os.path.normpath(self.path))

    def get_config(self):
        """The declared preprocessing, recorded in shard manifests."""
        return {
            "name": self.name,
            "format": self.format,
            "color": self.color,
            "mean": self.mean,
            "scale": self.scale,
            "layout": self.layout,
        }

    def preprocess(self, faces):
        faces = np.asarray(faces)
        if faces.ndim == 3:
            faces = faces[None]
        if faces.ndim != 4 or faces.shape[1:] != (*self.image_size, 3):
            raise ValueError(
                f"Expected aligned RGB faces [N, {self.image_size[0]}, {self.image_size[1]}, 3]. "
                f"Received shape {faces.shape}"
            )
        x = faces.astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise ValueError("Faces contain NaN or infinite pixel values")
        if self.color == "bgr":
            x = x[..., ::-1]
        x = (x - self.mean) * self.scale
        if self.layout == "nchw":
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x)

    def _run(self, chunk):
        count = len(chunk)
        if self._fixed_batch and count < self._fixed_batch:
            # A model exported with a fixed batch size: pad the last chunk, drop the padding.
            padding = np.zeros((self._fixed_batch - count, *chunk.shape[1:]), chunk.dtype)
            chunk = np.concatenate([chunk, padding])
        return np.asarray(self._runner(chunk))[:count].reshape(count, -1)

    def embed(self, faces):
        x = self.preprocess(faces)
        chunks = [self._run(x[i:i + self.batch_size]) for i in range(0, len(x), self.batch_size)]
        embeddings = np.concatenate(chunks).astype(np.float32)
        norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
        if not np.all(np.isfinite(embeddings)):
            raise ValueError(f"Teacher {self.name} produced NaN or infinite embeddings")
        return embeddings / np.maximum(norms, _EPSILON)
