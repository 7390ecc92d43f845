"""The one-call API: verify two photos, or load a model once and verify, embed and explain.

```python
import xcos_tf

result = xcos_tf.verify("a.jpg", "b.jpg")  # the repository's exported/default model
result["score"], result["same"], result["cos_map"], result["attention_map"], result["notes"]

model = xcos_tf.load("exported/default", format="onnx")
model.verify(pil_image, rgb_array)
model.embed("a.jpg")["embedding"]
model.explain("a.jpg", "b.jpg", out="pair.png")  # the picture, as explain's command line draws it
```

Photos are paths, RGB numpy arrays or PIL images. Raw photos are detected and aligned with
YuNet (the largest face); aligned 112x112 crops are taken as they are. A photo file of more
than `max_megapixels` (50 by default; `load` and `verify` take another) is refused from its
header before it is decoded. Alignment, scoring and the
picture are `xcos_tf.explain`'s own functions, so a score here is the explain command line's.

Nothing heavy is imported with `xcos_tf`: TensorFlow only when a `saved_model` is loaded.
"""
import os
import pathlib
import sys
import threading

import numpy as np

from xcos_tf import explain, explain_picture, runtime
from xcos_tf.data import align, image_io
from xcos_tf.paths import DEFAULT_DETECTOR

DEFAULT_MODEL = pathlib.Path(__file__).resolve().parents[1] / "exported" / "default"
DECOMPOSE = "decompose"


def default_model_dir():
    """The repository's exported/default folder; a clear error when this checkout has none."""
    if not (DEFAULT_MODEL / runtime.MANIFEST_FILE).is_file():
        raise FileNotFoundError(
            f"No default model at {DEFAULT_MODEL} (an installed package or a checkout without "
            "exported/): pass model=DIR, a folder written by `python -m xcos_tf.export`."
        )
    return str(DEFAULT_MODEL)


def as_rgb(image, label):
    """A path, an RGB numpy array or a PIL image -> a path (read later by explain) or RGB uint8 [H, W, 3].

    Paths stay paths, so error messages and notes name the file as the explain command line does.
    """
    if isinstance(image, (str, os.PathLike)):
        return image
    pil = sys.modules.get("PIL.Image")  # a PIL image implies PIL is imported: never import it here
    if pil is not None and isinstance(image, pil.Image):
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(
            f"{label}: a numpy image must be RGB uint8 [H, W, 3] (pixels 0..255). Received: "
            f"dtype={array.dtype}; for floats in 0..255 pass `image.round().astype(np.uint8)`"
        )
    if array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) == 0:
        raise ValueError(f"{label}: a numpy image must be RGB [H, W, 3]. Received: shape={array.shape}")
    return array


class _MissingDetector:
    """Stands in for the aligner when the detector file is absent: crops still work, raw photos get this."""

    choose = "largest"

    def __init__(self, path):
        self.path = path

    def align(self, image, assume_aligned=None):
        raise FileNotFoundError(
            f"face detector model not found: {self.path!r} (needed for photos that are not aligned "
            "112x112 crops); pass detector=PATH to YuNet's ONNX file"
        )


class FaceModel:
    """An exported xCos model with face alignment: what `xcos_tf.load` returns.

    Args:
        runtime_model: a `xcos_tf.runtime.Runtime` (or an object with its interface).
        detector: str, YuNet's ONNX file; used only for photos that are not aligned crops.
        max_megapixels: number > 0, photo files of more megapixels are refused (`ValueError`
            naming the file) before they are decoded. Defaults to 50.

    Attributes: `runtime` (the `Runtime`: batches of aligned faces, `compare` on stored grids),
    `threshold` (float or None), `max_pixels` (the photo limit in pixels).
    """

    def __init__(self, runtime_model, detector=DEFAULT_DETECTOR, max_megapixels=image_io.MAX_MEGAPIXELS):
        self.max_pixels = image_io.pixel_limit(max_megapixels)
        self.runtime = runtime_model
        threshold = runtime_model.threshold
        self.threshold = None if threshold is None else float(threshold)
        detector = os.fspath(detector)
        self._aligner = (align.FaceAligner(detector, choose="largest") if os.path.isfile(detector)
                         else _MissingDetector(detector))
        self._align_lock = threading.Lock()  # an OpenCV detector is not thread-safe

    def align(self, image, label="photo"):
        """(aligned RGB uint8 [112, 112, 3], note or None) of one photo, as explain aligns it.

        Raises `ValueError` naming the photo: unreadable or too large (`align.ImageError`), no
        usable face (`align.FaceError`), or a wrong array.
        """
        with self._align_lock:
            return explain.align_photo(as_rgb(image, label), label, self._aligner, self.max_pixels)

    def _pair(self, image_a, image_b):
        face_a, note_a = self.align(image_a, "photo A")
        face_b, note_b = self.align(image_b, "photo B")
        return face_a, face_b, [note for note in (note_a, note_b) if note]

    def verify(self, image_a, image_b):
        """Verifies two photos.

        Returns:
            dict: `score` float, `same` bool (None when the model has no calibrated
            threshold), `threshold`, `decision` ("same" / "different" / None), `cos_map` and
            `attention_map` float32 [7, 7], `face_a` and `face_b` the aligned RGB uint8 faces,
            `notes` list of str (several faces found, crop taken as it is).
        """
        face_a, face_b, notes = self._pair(image_a, image_b)
        result = explain.explain_faces(face_a, face_b, self.runtime, notes)
        result["same"] = None if result["decision"] is None else result["decision"] == "same"
        return result

    def embed(self, image):
        """{"embedding" float32 [D] (unit norm), "grid" float32 [7, 7, C], "face", "notes"} of one photo."""
        face, note = self.align(image, "photo")
        outputs = self.runtime.embed(face[None])
        return {"embedding": outputs["embedding"][0], "grid": outputs["grid"][0], "face": face,
                "notes": [note] if note else []}

    def explain(self, image_a, image_b, out=None):
        """The explanation picture (RGB uint8 [H, W, 3]) of a pair; also written as a PNG at `out`."""
        result = self.verify(image_a, image_b)
        title = explain.pair_title(image_a, image_b)  # as the command line titles its picture
        if out is not None:
            return explain_picture.save_explanation(out, result["face_a"], result["face_b"], result, title=title)
        return explain_picture.render_explanation(result["face_a"], result["face_b"], result, title=title)

    def decompose(self, image_a, image_b):
        """The exact per-cell decomposition of the teacher's cosine, for exports with a `decompose` signature."""
        if DECOMPOSE not in self.runtime.manifest.get("signatures", {}):
            raise NotImplementedError(
                "this model has no `decompose` signature (exports made before the decomposition "
                "was added have none): re-export it with a teacher to get one"
            )
        if not hasattr(self.runtime, DECOMPOSE):
            raise NotImplementedError(
                f"the model has a `decompose` signature, but this runtime ({type(self.runtime).__name__}) "
                "cannot run it: update xcos_tf"
            )
        face_a, face_b, notes = self._pair(image_a, image_b)
        outputs = self.runtime.decompose(face_a[None], face_b[None])
        return dict({key: np.asarray(value)[0] for key, value in outputs.items()},
                    face_a=face_a, face_b=face_b, notes=notes)


def load(model=None, format="saved_model", detector=DEFAULT_DETECTOR, num_threads=None,  # noqa: A002
         max_megapixels=image_io.MAX_MEGAPIXELS):
    """Loads an exported model (default: the repository's exported/default) as a `FaceModel`.

    Args:
        model: str, a folder written by `python -m xcos_tf.export`, or None for exported/default.
        format: one of `xcos_tf.runtime.FORMATS`; only `saved_model` imports TensorFlow.
        detector: str, YuNet's ONNX file (needed for photos that are not aligned crops).
        num_threads: optional int, CPU threads for TFLite / onnxruntime.
        max_megapixels: number > 0, the largest photo file accepted (checked from its header
            before decoding). Defaults to 50.
    """
    image_io.pixel_limit(max_megapixels)  # a wrong limit is reported before the (slow) load
    model_dir = default_model_dir() if model is None else os.fspath(model)
    return FaceModel(runtime.load(model_dir, format=format, num_threads=num_threads), detector, max_megapixels)


_CACHE = {}
_CACHE_LOCK = threading.Lock()


def verify(image_a, image_b, model=None, format="saved_model", detector=DEFAULT_DETECTOR,  # noqa: A002
           max_megapixels=image_io.MAX_MEGAPIXELS):
    """Verifies two photos in one call (see `FaceModel.verify` for the result); photo files of
    more than `max_megapixels` (50 by default) are refused.

    The loaded model is kept for later calls with the same `model` and `format` (and the
    `FaceModel` for the same `detector` and limit), so only the first call pays for loading it.
    """
    max_pixels = image_io.pixel_limit(max_megapixels)
    model_dir = os.path.abspath(default_model_dir() if model is None else os.fspath(model))
    key = (model_dir, format, os.path.abspath(os.fspath(detector)), max_pixels)
    with _CACHE_LOCK:
        if key not in _CACHE:
            loaded = next((cached.runtime for cached_key, cached in _CACHE.items() if cached_key[:2] == key[:2]), None)
            _CACHE[key] = FaceModel(loaded or runtime.load(model_dir, format=format), detector, max_megapixels)
        face_model = _CACHE[key]
    return face_model.verify(image_a, image_b)
