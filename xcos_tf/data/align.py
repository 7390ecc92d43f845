"""Face detection (YuNet) and 5-point alignment to the 112x112 ArcFace template.

OpenCV and numpy only: the on-device tool (`tools/tflite_verify.py`) imports this module without
TensorFlow.

Example:

```python
aligner = FaceAligner("../shared/models/yunet.onnx", choose="largest")
face = aligner.align(read_image("photo.jpg"))
face.image  # uint8 [112, 112, 3] RGB, eyes/nose/mouth on TEMPLATE_112
```
"""
import dataclasses
import os

import cv2
import numpy as np

# The one image reader lives in image_io; its names stay importable from here for the callers
# that read photos right before aligning them (explain, evaluate, export, tools).
from xcos_tf.data.image_io import ImageError, decode_image, read_image  # noqa: F401

ALIGNED_SIZE = 112

# The standard ArcFace template (insightface), x, y in pixels of the 112x112 crop: left-of-image
# eye, right-of-image eye, nose tip, left-of-image mouth corner, right-of-image mouth corner.
# YuNet returns its 5 landmarks in this same order.
TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)

CHOICES = ("central", "largest")


class FaceError(ValueError):
    """An image from which no usable face can be aligned."""


class NoFaceError(FaceError):
    """The detector found no face above the score threshold."""


class FaceTooSmallError(FaceError):
    """Faces were found, but all are smaller than `min_face_size`."""


def encode_image(image_rgb, image_format="jpeg", jpeg_quality=95):
    """RGB uint8 [H, W, 3] -> JPEG or PNG bytes (the same bytes for the same pixels)."""
    extensions = {"jpeg": ".jpg", "png": ".png"}
    if image_format not in extensions:
        raise ValueError(f"`image_format` must be 'jpeg' or 'png'. Received: {image_format!r}")
    params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if image_format == "jpeg" else []
    ok, data = cv2.imencode(
        extensions[image_format], cv2.cvtColor(_check_image(image_rgb), cv2.COLOR_RGB2BGR), params
    )
    if not ok:
        raise ImageError(f"OpenCV could not encode a {image_rgb.shape} image as {image_format}")
    return data.tobytes()


def _check_image(image_rgb):
    image_rgb = np.asarray(image_rgb)
    if image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(
            "Expected an RGB uint8 image of shape [H, W, 3]. "
            f"Received: dtype={image_rgb.dtype}, shape={image_rgb.shape}"
        )
    return image_rgb


def _check_landmarks(landmarks5):
    landmarks5 = np.asarray(landmarks5, dtype=np.float32)
    if landmarks5.shape != (5, 2) or not np.all(np.isfinite(landmarks5)):
        raise ValueError(
            f"Expected 5 finite (x, y) landmarks, shape (5, 2). Received: {landmarks5.tolist()}"
        )
    return landmarks5


def similarity_transform(landmarks5):
    """The 2x3 similarity matrix (rotation, uniform scale, shift) mapping landmarks to TEMPLATE_112."""
    matrix, _ = cv2.estimateAffinePartial2D(
        _check_landmarks(landmarks5), TEMPLATE_112, method=cv2.LMEDS
    )
    if matrix is None:
        raise FaceError(f"No similarity transform fits the landmarks {np.round(landmarks5, 1).tolist()}")
    return matrix


def transform_points(matrix, points):
    """Applies a 2x3 affine matrix to points [K, 2]."""
    points = np.asarray(points, dtype=np.float32)
    return (points @ matrix[:, :2].T + matrix[:, 2]).astype(np.float32)


def align_face(image_rgb, landmarks5):
    """Warps the face with these 5 landmarks onto TEMPLATE_112: RGB uint8 [112, 112, 3]."""
    return _warp(_check_image(image_rgb), similarity_transform(landmarks5))


def _warp(image_rgb, matrix):
    # Black border, as insightface's norm_crop: the teacher was trained on such crops.
    return cv2.warpAffine(image_rgb, matrix, (ALIGNED_SIZE, ALIGNED_SIZE), borderValue=0.0)


def is_aligned_crop(image):
    """True for an image that already has the aligned 112x112 RGB shape (detection is skipped)."""
    return tuple(np.shape(image)) == (ALIGNED_SIZE, ALIGNED_SIZE, 3)


@dataclasses.dataclass(frozen=True)
class AlignedFace:
    """One aligned face.

    Attributes:
        image: RGB uint8 [112, 112, 3].
        landmarks: float32 [5, 2], the 5 landmarks in the source image (template order).
        aligned_landmarks: float32 [5, 2], the same landmarks in the 112x112 crop.
        box: float32 [4], x, y, width, height of the face in the source image.
        score: detector confidence (1.0 for a crop taken as already aligned).
        num_faces: how many faces the detector found (1 for an already aligned crop).
    """

    image: np.ndarray
    landmarks: np.ndarray
    aligned_landmarks: np.ndarray
    box: np.ndarray
    score: float
    num_faces: int


def aligned_crop(image_rgb):
    """An image taken as an already aligned face (no detection), resized to 112x112 if needed;
    its landmarks are the template's, scaled to the image."""
    image_rgb = _check_image(image_rgb)
    height, width = image_rgb.shape[:2]
    if (height, width) != (ALIGNED_SIZE, ALIGNED_SIZE):
        image_rgb = cv2.resize(image_rgb, (ALIGNED_SIZE, ALIGNED_SIZE), interpolation=cv2.INTER_AREA)
    scale = np.array([width / ALIGNED_SIZE, height / ALIGNED_SIZE], np.float32)
    return AlignedFace(
        image=image_rgb,
        landmarks=TEMPLATE_112 * scale,
        aligned_landmarks=TEMPLATE_112.copy(),
        box=np.array([0, 0, width, height], np.float32),
        score=1.0,
        num_faces=1,
    )


class FaceAligner:
    """Detects faces with YuNet and aligns one of them to the 112x112 ArcFace template.

    Args:
        detector_path: str, path of the YuNet ONNX file (`cv2.FaceDetectorYN`).
        choose: str, which face when there are several: `"central"` (box centre nearest the
            image centre; right for LFW-style crops) or `"largest"` (largest box area).
        min_face_size: int, default 20. Faces whose box is smaller than this on both sides
            (source pixels) are ignored; `FaceTooSmallError` when only such faces were found.
        score_threshold: float, default 0.6. Detector confidence below which a box is ignored.
        detect_padding: int, default 0. Pixels of black border added on every side before
            detection, for crops where the face fills the image (e.g. UTKFace): YuNet needs a
            margin around a face to place its landmarks (on UTKFace, 24 pixels move them by
            7.6 px on average). The face is aligned from the padded image; `landmarks` and
            `box` are given in the original image.

    Call `align(image_rgb, assume_aligned=None)`: `image_rgb` is RGB uint8 [H, W, 3].
    `assume_aligned=True` takes the image as an already aligned crop (resized to 112x112 when
    needed, no detection); `None` does so only for images that are exactly 112x112
    (`is_aligned_crop`) and `detect_padding` is 0; `False` always detects. Raises
    `NoFaceError` / `FaceTooSmallError` (both `FaceError`, a `ValueError`).

    Not picklable (it owns an OpenCV detector): create one per worker process.
    """

    def __init__(self, detector_path, choose="central", min_face_size=20, score_threshold=0.6,
                 detect_padding=0):
        detector_path = os.fspath(detector_path)
        if choose not in CHOICES:
            raise ValueError(f"`choose` must be one of {CHOICES}. Received: choose={choose!r}")
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"`score_threshold` must be in [0, 1]. Received: {score_threshold}")
        if min_face_size < 0:
            raise ValueError(f"`min_face_size` must be >= 0. Received: {min_face_size}")
        if detect_padding < 0:
            raise ValueError(f"`detect_padding` must be >= 0 pixels. Received: {detect_padding}")
        if not os.path.isfile(detector_path):
            raise FileNotFoundError(
                f"Face detector model not found: {detector_path!r}. Pass the path of YuNet's ONNX "
                "file (e.g. ../shared/models/yunet.onnx, or face_detection_yunet_2023mar.onnx "
                "from the OpenCV Zoo)."
            )
        self.detector_path = detector_path
        self.choose = choose
        self.min_face_size = min_face_size
        self.score_threshold = score_threshold
        self.detect_padding = int(detect_padding)
        # OpenCV 5 warns on every create that its new DNN engine ignores target settings:
        # harmless, and noisy in a worker pool, so it is silenced for this call only.
        log_level = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        try:
            self._detector = cv2.FaceDetectorYN.create(
                detector_path, "", (320, 320), score_threshold=score_threshold
            )
        finally:
            cv2.utils.logging.setLogLevel(log_level)

    def detect(self, image_rgb):
        """All faces above the score threshold: float32 [K, 15] rows of YuNet's output
        (x, y, w, h, 5 landmarks as x, y, score); K may be 0."""
        image_rgb = _check_image(image_rgb)
        height, width = image_rgb.shape[:2]
        self._detector.setInputSize((width, height))
        _, faces = self._detector.detect(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
        if faces is None:
            return np.zeros((0, 15), np.float32)
        return faces[faces[:, 14] >= self.score_threshold].astype(np.float32)

    def _pick(self, faces, width, height):
        if self.choose == "largest":
            return faces[np.argmax(faces[:, 2] * faces[:, 3])]
        centres = faces[:, :2] + faces[:, 2:4] / 2.0
        distances = np.linalg.norm(centres - np.array([width / 2.0, height / 2.0]), axis=1)
        return faces[np.argmin(distances)]

    def align(self, image_rgb, assume_aligned=None):
        image_rgb = _check_image(image_rgb)
        taken_as_aligned = not self.detect_padding and is_aligned_crop(image_rgb)
        if assume_aligned or (assume_aligned is None and taken_as_aligned):
            return aligned_crop(image_rgb)
        padding = self.detect_padding
        if padding:
            # The crop is warped from the padded image itself: warping the original with the
            # landmarks (or the matrix) shifted back differs by one grey level in 133 (93) of
            # 300 UTKFace faces, measured (warpAffine's fixed-point rounding).
            image_rgb = cv2.copyMakeBorder(image_rgb, *[padding] * 4, cv2.BORDER_CONSTANT, value=0)
        height, width = image_rgb.shape[:2]
        faces = self.detect(image_rgb)
        if len(faces) == 0:
            raise NoFaceError(f"No face found (score threshold {self.score_threshold})")
        large = faces[np.maximum(faces[:, 2], faces[:, 3]) >= self.min_face_size]
        if len(large) == 0:
            biggest = float(np.max(np.maximum(faces[:, 2], faces[:, 3])))
            raise FaceTooSmallError(
                f"{len(faces)} face(s) found, the largest {biggest:.1f} px, smaller than "
                f"min_face_size={self.min_face_size}"
            )
        face = self._pick(large, width, height)
        landmarks = face[4:14].reshape(5, 2)
        matrix = similarity_transform(landmarks)
        return AlignedFace(
            image=_warp(image_rgb, matrix),
            landmarks=landmarks - np.float32(padding),
            aligned_landmarks=transform_points(matrix, landmarks),
            box=face[:4] - np.array([padding, padding, 0, 0], np.float32),
            score=float(face[14]),
            num_faces=len(faces),
        )
