"""Tests for xcos_tf.data.align: image reading, alignment to the template, face choice."""
import json
import pathlib
import subprocess
import sys

import cv2
import numpy as np
import pytest

from xcos_tf.data import align


def _similarity(angle_degrees, scale, shift):
    angle = np.deg2rad(angle_degrees)
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return np.hstack([rotation, np.reshape(shift, (2, 1))]).astype(np.float32)


def _write(path, data):
    path.write_bytes(data)
    return path


def test_align_face_maps_landmarks_onto_the_template():
    # A photo where the template landmarks were moved by a known similarity: alignment undoes it.
    forward = _similarity(17.0, 2.3, (140.0, 60.0))
    landmarks = align.transform_points(forward, align.TEMPLATE_112)
    matrix = align.similarity_transform(landmarks)
    np.testing.assert_allclose(align.transform_points(matrix, landmarks), align.TEMPLATE_112, atol=1e-3)

    # Mark the landmarks with bright dots: after warping they sit on the template points.
    image = np.zeros((400, 450, 3), np.uint8)
    for x, y in landmarks:
        cv2.circle(image, (int(round(x)), int(round(y))), 5, (255, 255, 255), -1)
    aligned = align.align_face(image, landmarks)
    assert aligned.shape == (112, 112, 3) and aligned.dtype == np.uint8
    for x, y in align.TEMPLATE_112:
        assert aligned[int(round(y)), int(round(x))].min() > 200


@pytest.mark.parametrize("landmarks", [np.zeros((4, 2)), np.full((5, 2), np.nan)])
def test_align_face_rejects_bad_landmarks(landmarks):
    with pytest.raises(ValueError, match="5 finite"):
        align.align_face(np.zeros((50, 50, 3), np.uint8), landmarks)


def test_align_face_rejects_bad_images():
    with pytest.raises(ValueError, match="RGB uint8"):
        align.align_face(np.zeros((50, 50, 3), np.float32), align.TEMPLATE_112)


def test_read_image_errors_name_the_file(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    jpeg = align.encode_image(image, "jpeg")
    png = align.encode_image(image, "png")
    cases = {
        "missing.jpg": None,
        "empty.jpg": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated.png": png[: len(png) // 2],
        "text.jpg": b"not an image at all",
    }
    for name, data in cases.items():
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        with pytest.raises(align.ImageError, match=name):
            align.read_image(path)


def test_encode_decode_round_trip(tmp_path):
    image = np.random.default_rng(1).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    np.testing.assert_array_equal(align.read_image(_write(tmp_path / "a.png", align.encode_image(image, "png"))), image)
    smooth = cv2.resize(image[:4, :4], (24, 20), interpolation=cv2.INTER_LINEAR)
    decoded = align.decode_image(align.encode_image(smooth, "jpeg", jpeg_quality=95))
    assert decoded.shape == smooth.shape and np.abs(decoded.astype(int) - smooth).mean() < 5
    # Grey images come back as 3-channel RGB.
    grey = cv2.imencode(".png", image[..., 0])[1].tobytes()
    assert align.decode_image(grey).shape == (20, 24, 3)


def test_face_aligner_argument_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_yunet.onnx"):
        align.FaceAligner(tmp_path / "no_such_yunet.onnx")
    with pytest.raises(ValueError, match="`detect_padding` must be >= 0 pixels. Received: -1"):
        align.FaceAligner(tmp_path / "no_such_yunet.onnx", detect_padding=-1)


def test_aligned_crops_skip_detection(tmp_path, shared_dir):
    aligner = align.FaceAligner(shared_dir / "models" / "yunet.onnx")
    crop = np.full((112, 112, 3), 7, np.uint8)  # no face: detection would fail
    face = aligner.align(crop)
    assert align.is_aligned_crop(crop) and face.image is crop and face.num_faces == 1
    np.testing.assert_allclose(face.aligned_landmarks, align.TEMPLATE_112)
    resized = aligner.align(np.zeros((109, 89, 3), np.uint8), assume_aligned=True)
    assert resized.image.shape == (112, 112, 3)
    np.testing.assert_allclose(resized.landmarks[0], align.TEMPLATE_112[0] * [89 / 112, 109 / 112], rtol=1e-5)
    with pytest.raises(align.NoFaceError):
        aligner.align(crop, assume_aligned=False)
    with pytest.raises(ValueError, match="choose"):
        align.FaceAligner(shared_dir / "models" / "yunet.onnx", choose="first")


def test_detect_padding_aligns_crops_where_the_face_fills_the_image(shared_dir):
    # A UTKFace crop: 112x112 (so taken as aligned by default), but not on the template.
    detector = shared_dir / "models" / "yunet.onnx"
    image = align.read_image(shared_dir / "data" / "utkface_6k" / "images" / "100_0_0_20170112215240346.jpg")
    plain = align.FaceAligner(detector)
    assert plain.align(image).image is image
    face = align.FaceAligner(detector, detect_padding=24).align(image)
    assert face.score < 1.0 and face.num_faces == 1
    # Exactly what aligning a copy with a 24-pixel black border gives, in the original's pixels.
    reference = plain.align(cv2.copyMakeBorder(image, 24, 24, 24, 24, cv2.BORDER_CONSTANT, value=0))
    np.testing.assert_array_equal(face.image, reference.image)
    np.testing.assert_array_equal(face.aligned_landmarks, reference.aligned_landmarks)
    np.testing.assert_allclose(face.landmarks, reference.landmarks - 24, atol=1e-4)
    np.testing.assert_allclose(face.box, reference.box - [24, 24, 0, 0], atol=1e-4)
    assert face.score == reference.score
    # The eyes are inside the original image, where its pixels are.
    assert np.all((face.landmarks[:2] > 0) & (face.landmarks[:2] < 112))


def test_landmarks_land_near_the_template_on_celeba(shared_dir):
    aligner = align.FaceAligner(shared_dir / "models" / "yunet.onnx")
    identities = sorted((shared_dir / "data" / "celeba_subset" / "images").iterdir())[:3]
    errors = []
    for folder in identities:
        for path in sorted(folder.glob("*.jpg"))[:8]:
            face = aligner.align(align.read_image(path))
            errors.append(np.linalg.norm(face.aligned_landmarks - align.TEMPLATE_112, axis=1).mean())
            # The stored transform is consistent: source landmarks map to the aligned ones.
            matrix = align.similarity_transform(face.landmarks)
            np.testing.assert_allclose(align.transform_points(matrix, face.landmarks), face.aligned_landmarks, atol=1e-3)
    # A similarity transform cannot fit 5 points exactly (faces differ from the template);
    # measured here: mean 2.95 px over 100 CelebA faces.
    assert len(errors) == 24
    assert np.mean(errors) < 4.0, np.mean(errors)
    assert np.max(errors) < 12.0, np.max(errors)


def test_face_choice_and_no_face_on_wild_photos(shared_dir):
    wild = shared_dir / "data" / "wild"
    index = json.loads((wild / "index.json").read_text())
    central = align.FaceAligner(shared_dir / "models" / "yunet.onnx", choose="central")
    largest = align.FaceAligner(shared_dir / "models" / "yunet.onnx", choose="largest")
    for name in index["several_faces"][:3]:
        image = align.read_image(wild / name)
        faces = central.detect(image)
        assert len(faces) >= 2
        big = largest.align(image)
        assert big.num_faces == len(faces)
        np.testing.assert_allclose(big.box[2] * big.box[3], np.max(faces[:, 2] * faces[:, 3]), rtol=1e-5)
        middle = central.align(image)
        centres = faces[:, :2] + faces[:, 2:4] / 2
        distance = np.linalg.norm(middle.box[:2] + middle.box[2:] / 2 - [image.shape[1] / 2, image.shape[0] / 2])
        assert distance <= np.min(np.linalg.norm(centres - [image.shape[1] / 2, image.shape[0] / 2], axis=1)) + 1e-3
    for name in index["one_face"][:3]:
        assert central.align(align.read_image(wild / name)).num_faces == 1
    for name in index["no_face_found_by_yunet"]:
        with pytest.raises(align.NoFaceError):
            central.align(align.read_image(wild / name))
    too_strict = align.FaceAligner(shared_dir / "models" / "yunet.onnx", min_face_size=10_000)
    with pytest.raises(align.FaceTooSmallError, match="smaller than min_face_size"):
        too_strict.align(align.read_image(wild / index["one_face"][0]))


def test_align_does_not_import_tensorflow():
    code = "import sys, xcos_tf.data.align, xcos_tf.data.pairs; assert 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(__file__).resolve().parents[1])
