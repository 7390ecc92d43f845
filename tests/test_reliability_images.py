"""Reliability of image reading (issue 16 items 5, 6, 7): one reader that checks the header by
content before decoding, a pixel limit in every entry point, and a `.bin` unpickler whose every
allocation is bounded by the file.

No ../shared needed: the images are made here (a few hundred bytes claim 60000x60000 pixels).
"""
import os
import pickle
import struct
import subprocess
import sys
import zlib

import cv2
import numpy as np
import pytest
from common_testing import huge_png

from xcos_tf import demo, evaluate
from xcos_tf.data import image_io, pairs, prepare, shard_writer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join(ROOT, "exported", "default")


def huge_jpeg(width=20000, height=20000):
    """A real 16x16 JPEG whose start-of-frame says width x height."""
    data = bytearray(cv2.imencode(".jpg", np.full((16, 16, 3), 128, np.uint8))[1].tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def face_png(seed=0):
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (7, 7, 3), dtype=np.uint8)
    return cv2.imencode(".png", cv2.resize(coarse, (112, 112)))[1].tobytes()


# === The header, by content ===

@pytest.mark.parametrize("suffix, kind", [(".png", "png"), (".jpg", "jpeg"), (".bmp", "bmp"), (".webp", "webp")])
def test_header_gives_the_size_opencv_decodes(suffix, kind):
    image = np.random.default_rng(0).integers(0, 256, (23, 37, 3), dtype=np.uint8)
    data = cv2.imencode(suffix, image)[1].tobytes()
    assert image_io.image_header(data) == (kind, 37, 23)
    assert image_io.decode_image(data).shape == (23, 37, 3)


def test_lossless_webp_and_top_down_bmp_headers():
    image = np.zeros((5, 9, 3), np.uint8)
    assert image_io.image_header(cv2.imencode(".webp", image, [cv2.IMWRITE_WEBP_QUALITY, 101])[1].tobytes()) == ("webp", 9, 5)
    bmp = bytearray(cv2.imencode(".bmp", image)[1].tobytes())
    bmp[22:26] = struct.pack("<i", -5)  # rows stored top-down
    assert image_io.image_header(bytes(bmp)) == ("bmp", 9, 5)


@pytest.mark.parametrize("data", [huge_png(), huge_jpeg()], ids=["png_60000", "jpeg_20000"])
def test_oversized_header_is_refused_before_decoding(data, tmp_path):
    with pytest.raises(image_io.ImageTooLargeError, match=r"pixels is more than the 50 megapixel limit"):
        image_io.decode_image(data, name="big")
    path = tmp_path / "big.png"
    path.write_bytes(data)
    with pytest.raises(image_io.ImageTooLargeError, match=f"{path}: .* pixels is more than"):
        image_io.read_image(path)


def test_pixel_limit_is_a_parameter():
    data = cv2.imencode(".png", np.zeros((200, 300, 3), np.uint8))[1].tobytes()
    assert image_io.decode_image(data).shape == (200, 300, 3)
    with pytest.raises(image_io.ImageTooLargeError, match="300x200 pixels is more than the 0.05 megapixel limit"):
        image_io.decode_image(data, max_pixels=50_000)
    assert image_io.decode_image(data, max_pixels=60_000).shape == (200, 300, 3)  # exactly at the limit


@pytest.mark.parametrize("suffix", [".hdr", ".tiff", ".ppm"])
def test_other_formats_are_refused_by_content_whatever_the_name(suffix, tmp_path):
    image = np.ones((8, 8, 3), np.float32 if suffix in (".hdr", ".exr") else np.uint8)
    try:
        ok, data = cv2.imencode(suffix, image)
    except cv2.error:
        pytest.skip(f"this OpenCV cannot write {suffix}")
    if not ok:
        pytest.skip(f"this OpenCV cannot write {suffix}")
    path = tmp_path / "photo.png"  # named like a PNG: the content decides
    path.write_bytes(data.tobytes())
    with pytest.raises(image_io.ImageError, match="not a decodable image .*not a PNG, JPEG, BMP, WEBP file"):
        image_io.read_image(path)
    with pytest.raises(demo.UploadError, match="not a decodable image"):
        demo.read_upload(str(path), "photo A (photo.png)", max_bytes=demo.MB)


def test_a_header_that_lies_about_the_size_is_refused():
    data = bytearray(cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))[1].tobytes())
    ihdr = bytes(data[12:16]) + struct.pack(">II", 5, 4) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", 5, 4)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    with pytest.raises(image_io.ImageError):
        image_io.decode_image(bytes(data), name="liar.png")


def test_exif_rotated_jpeg_is_read_turned():
    """A phone photo stored landscape with EXIF orientation 6 (turn 90 degrees clockwise)."""
    data = cv2.imencode(".jpg", np.zeros((20, 40, 3), np.uint8))[1].tobytes()
    tiff = b"MM\0\x2a" + struct.pack(">IH", 8, 1) + struct.pack(">HHIHH", 0x0112, 3, 1, 6, 0) + b"\0\0\0\0"
    exif = b"Exif\0\0" + tiff
    rotated = data[:2] + b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif + data[2:]
    assert image_io.image_header(rotated) == ("jpeg", 40, 20)
    assert image_io.decode_image(rotated).shape == (40, 20, 3)


# === The limit in every entry point ===

def test_demo_refuses_an_oversized_upload(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(huge_png())
    with pytest.raises(demo.UploadError, match=r"\(huge.png\): 60000x60000 pixels is more than the 50 megapixel"):
        demo.read_upload(str(path), "photo A (huge.png)", max_bytes=demo.MB)


@pytest.mark.skipif(not os.path.isfile(os.path.join(MODEL_DIR, "manifest.json")), reason="exported/default is absent")
def test_explain_refuses_an_oversized_photo_in_one_line(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(huge_png())
    face = os.path.join(ROOT, "exported", "samples", "aligned", "A.png")
    result = subprocess.run(
        [sys.executable, "-m", "xcos_tf.explain", str(path), face, "--model", MODEL_DIR, "--format", "tflite",
         "--out", ""], capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {path}: 60000x60000 pixels is more than the 50 megapixel limit"


def test_evaluate_names_an_oversized_lfw_photo(tmp_path):
    (tmp_path / "pairs.txt").write_text("1\nA 1 2\nA 1 B 1\n")
    for name, data in (("A/A_0001.jpg", huge_png()), ("A/A_0002.jpg", face_png(1)), ("B/B_0001.jpg", face_png(2))):
        (tmp_path / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "images" / name).write_bytes(data)
    with pytest.raises(image_io.ImageTooLargeError, match="A_0001.jpg: 60000x60000 pixels"):
        evaluate.load_lfw(tmp_path, aligner=None)


ALIGNED_CROPS = prepare.Settings(detector=None, assume_aligned=True)


def test_make_shards_lists_an_oversized_image_as_a_reject(tmp_path):
    (tmp_path / "in" / "x").mkdir(parents=True)
    (tmp_path / "in" / "x" / "face.png").write_bytes(face_png())
    (tmp_path / "in" / "x" / "huge.png").write_bytes(huge_png())
    manifest = shard_writer.make_face_shards(
        [("x/face.png", "x"), ("x/huge.png", "x")], tmp_path / "in", tmp_path / "out", ALIGNED_CROPS,
        num_workers=1, progress=False,
    )
    assert manifest["complete"] and manifest["num_records"] == 1
    [reject] = manifest["rejects"]
    assert reject["path"] == "x/huge.png" and "60000x60000 pixels is more than" in reject["detail"]


def test_bin_pair_shards_list_an_oversized_image_as_a_reject(tmp_path):
    images = [face_png(0), face_png(1), huge_png(), face_png(2)]
    with open(tmp_path / "tiny.bin", "wb") as f:
        pickle.dump((images, [True, False]), f, protocol=2)
    manifest = shard_writer.make_bin_pair_shards(tmp_path / "tiny.bin", tmp_path / "out", ALIGNED_CROPS,
                                                 num_workers=1, progress=False, num_folds=2)
    assert manifest["complete"] and manifest["num_records"] == 1
    [reject] = manifest["rejects"]
    assert reject["path"] == "tiny/000002" and "60000x60000 pixels" in reject["detail"]


# === .bin: exactly a tuple of a list of bytes and a list of bools ===

class _Call:
    """Pickles as a call of `function(*args)`: how a hostile .bin asks for memory."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize(
    "content, message",
    [
        (([_Call(bytes, 10**9)], [True]), r"refusing (bytes\(int\)|to load __builtin__.bytes)"),
        (([_Call(bytearray, 10**15)], [True]), r"refusing bytearray\(int\)"),
        (([b"a", b"b"], _Call(np.ndarray, (10**12,), np.bool_)), "refusing|not a readable"),
        (([b"a", b"b"], np.zeros(2, np.float64)), "refusing numpy dtype"),
        (([b"a", b"b"], np.array([b"x", None], dtype=object)), "refusing numpy dtype"),
    ],
    ids=["bytes_1e9", "bytearray_1e15", "ndarray_1e12", "float_flags", "object_flags"],
)
def test_bin_allocations_are_bounded_by_the_file(tmp_path, content, message, protocol):
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(content, protocol=protocol))
    with pytest.raises(ValueError, match=message) as error:
        pairs.read_insightface_bin(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_bin_images_cannot_repeat_one_object(tmp_path):
    """Memo references make a list of many images out of one: more image bytes than the file."""
    image = b"\xff\xd8" + b"\0" * 10_000
    path = tmp_path / "repeated.bin"
    path.write_bytes(pickle.dumps(([image] * 100, [True] * 50), protocol=4))
    with pytest.raises(ValueError, match="more bytes than the file"):
        pairs.read_insightface_bin(path)


def test_bin_reader_still_reads_python2_style_and_numpy_flags(tmp_path):
    images = [face_png(i) for i in range(4)]
    for protocol, flags in ((2, [True, False]), (4, np.array([True, False])), (0, [True, False])):
        path = tmp_path / f"ok{protocol}.bin"
        path.write_bytes(pickle.dumps((images, flags), protocol=protocol))
        read_images, read_flags = pairs.read_insightface_bin(path)
        assert read_images == images and read_flags.tolist() == [True, False]
