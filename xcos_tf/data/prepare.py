"""One image -> one aligned, encoded face with its teacher embeddings, or a reject with a reason.

The per-image work of `tools/make_shards.py`, run in worker processes: OpenCV, numpy and the
teacher's runtime only (no TensorFlow, so spawning a worker is cheap). Every number it produces
depends only on the image and the settings (one thread, fixed teacher batch of face + flip),
which is what makes re-runs byte-identical whatever the number of workers.
"""
import dataclasses
from typing import Optional

import cv2
import numpy as np

from xcos_tf import teacher as teacher_lib
from xcos_tf.data import align, image_io

REJECT_REASONS = {
    align.ImageError: "unreadable",
    align.NoFaceError: "no_face",
    align.FaceTooSmallError: "too_small",
    align.FaceError: "no_alignment",
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """How faces are prepared; recorded in the manifest.

    Args:
        detector: str, YuNet ONNX path, or None: no detection, every image is taken as an
            aligned crop (needs `assume_aligned=True`).
        choose: "central" or "largest".
        min_face_size: int, faces smaller than this (pixels) are rejected as too small.
        score_threshold: float, detector confidence threshold.
        assume_aligned: bool, True takes every image as an aligned crop (resized to 112x112 when
            needed); False detects, except on images that are exactly 112x112.
        detect_padding: int, pixels of black border around each image for detection (then
            112x112 images are detected too), for crops where the face fills the image.
        image_format: "jpeg" or "png".
        jpeg_quality: int.
        teacher: dict of `teacher.Teacher` arguments (path, color, mean, scale, layout) or None.
        max_pixels: int, larger images are rejected as unreadable (from the header, before
            decoding). Defaults to `image_io.MAX_PIXELS`, 50 megapixels.
    """

    detector: str
    choose: str = "central"
    min_face_size: int = 20
    score_threshold: float = 0.6
    assume_aligned: bool = False
    detect_padding: int = 0
    image_format: str = "jpeg"
    jpeg_quality: int = 95
    teacher: Optional[dict] = None
    max_pixels: int = image_io.MAX_PIXELS


@dataclasses.dataclass(frozen=True)
class PreparedFace:
    encoded: bytes
    landmarks: np.ndarray
    teacher_embedding: Optional[np.ndarray]
    teacher_embedding_flip: Optional[np.ndarray]


@dataclasses.dataclass(frozen=True)
class Reject:
    reason: str
    detail: str


class FacePreparer:
    """Reads, aligns, encodes and embeds faces with one `Settings`."""

    def __init__(self, settings):
        self.settings = settings
        self.aligner = None
        if settings.detector is not None:
            self.aligner = align.FaceAligner(
                settings.detector, settings.choose, settings.min_face_size, settings.score_threshold,
                settings.detect_padding,
            )
        elif not settings.assume_aligned:
            raise ValueError("Without a face detector, images must be aligned crops: set assume_aligned")
        if settings.detect_padding and (settings.assume_aligned or settings.detector is None):
            raise ValueError(
                f"detect_padding={settings.detect_padding} pads images for face detection, but "
                "assume_aligned (or no detector) takes them as aligned crops without detection"
            )
        self.teacher = None
        if settings.teacher is not None:
            self.teacher = teacher_lib.Teacher(**settings.teacher, batch_size=2, num_threads=1)

    def prepare(self, name, source):
        """`source` is a file path or encoded image bytes; `name` is how rejects refer to it."""
        try:
            if isinstance(source, bytes):
                image = align.decode_image(source, name, self.settings.max_pixels)
            else:
                image = align.read_image(source, self.settings.max_pixels)
            if self.aligner is None:
                face = align.aligned_crop(image)
            else:
                face = self.aligner.align(image, assume_aligned=self.settings.assume_aligned or None)
        except (align.ImageError, align.FaceError) as e:
            reason = next(r for cls, r in REJECT_REASONS.items() if isinstance(e, cls))
            detail = str(e) if isinstance(source, bytes) else str(e).replace(str(source), name)
            return Reject(reason, detail)
        embedding = flipped = None
        if self.teacher is not None:
            # Always the same batch (face, mirrored face): identical floats in every run.
            embedding, flipped = self.teacher.embed(np.stack([face.image, face.image[:, ::-1]]))
        return PreparedFace(
            align.encode_image(face.image, self.settings.image_format, self.settings.jpeg_quality),
            face.landmarks,
            embedding,
            flipped,
        )


_PREPARER = None


def init_worker(settings):
    """Pool initializer: one detector and teacher per process, one thread each."""
    global _PREPARER
    cv2.setNumThreads(1)
    _PREPARER = FacePreparer(settings)


def prepare_in_worker(item):
    """Pool task: `item` is (name, path or bytes)."""
    return _PREPARER.prepare(*item)
