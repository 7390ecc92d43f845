"""The project's one image reader: the header is checked by content before anything is decoded.

A few hundred bytes of PNG can claim 60000x60000 pixels, and a 4 MB Radiance-HDR file named
`.png` decodes to 8000x8000: decoding first and asking later costs gigabytes or crashes OpenCV
(`CV_IO_MAX_IMAGE_PIXELS`). So every image goes through `decode_image`, which

1. refuses an empty file and a JPEG/PNG without its end marker (OpenCV would decode a cut JPEG
   with a grey lower half and only a warning);
2. reads the format and the size from the header, by content (the file name plays no part), and
   accepts only `FORMATS` (PNG, JPEG, BMP, WebP): every other type OpenCV could decode (HDR,
   EXR, TIFF, PNM, GIF, ...) is refused before OpenCV sees it;
3. refuses more than `max_pixels` pixels (`MAX_PIXELS`, 50 megapixels, by default; every program
   that reads photos raises it with `--max_megapixels`, the API with `max_megapixels=`: both
   read by `pixel_limit`), with one line naming the file, its size and the limit;
4. only then decodes with `cv2.imdecode`, and checks that the decoded size is the header's.

OpenCV and numpy only (the on-device tool imports this without TensorFlow).

```python
image = read_image("photo.jpg")             # RGB uint8 [H, W, 3]
image = decode_image(data, name="upload")   # the same from bytes
```
"""
import math
import os
import struct

import cv2
import numpy as np

MAX_MEGAPIXELS = 50
MAX_PIXELS = MAX_MEGAPIXELS * 1_000_000
FORMATS = ("png", "jpeg", "bmp", "webp")
# The JPEG start-of-frame markers that carry the frame size (C4, C8 and CC are not frames).
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD9)}  # TEM, RSTn, SOI: markers without a length
_HEAD_BYTES = 1 << 18  # read_image checks this much first (a JPEG's size may follow 64 KB of EXIF)


class ImageError(ValueError):
    """A file that is missing, empty, truncated, too large or not a decodable image."""


class ImageTooLargeError(ImageError):
    """An image whose header claims more pixels than the limit."""


def _is_truncated(data):
    """JPEG must end with its EOI marker and PNG with its IEND chunk (trailing padding tolerated)."""
    if data[:2] == b"\xff\xd8":
        return b"\xff\xd9" not in data[-64:]
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return b"IEND" not in data[-64:]
    return False


def _png_size(data):
    # The IHDR chunk must come first: length 13, "IHDR", width, height (big-endian).
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", data[16:24])


def _jpeg_size(data):
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _JPEG_STANDALONE:
            position += 2
            continue
        (length,) = struct.unpack(">H", data[position + 2:position + 4])
        if marker in _JPEG_SOF:
            if position + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[position + 5:position + 9])
            return width, height
        if marker in (0xD9, 0xDA) or length < 2:  # end of image or scan data before any frame
            return None
        position += 2 + length
    return None


def _bmp_size(data):
    if len(data) < 26:
        return None
    (header_size,) = struct.unpack("<I", data[14:18])
    if header_size == 12:  # BITMAPCOREHEADER: 16-bit sizes
        return struct.unpack("<HH", data[18:22])
    width, height = struct.unpack("<ii", data[18:26])
    return abs(width), abs(height)  # a negative height means rows stored top-down


def _webp_size(data):
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        (bits,) = struct.unpack("<I", data[21:25])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        return (int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1)
    return None


def image_header(data):
    """(format, width, height) from the first bytes of an encoded image, or None when the content
    is not one of `FORMATS` or its header holds no size."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        kind, size = "png", _png_size(data)
    elif data[:3] == b"\xff\xd8\xff":
        kind, size = "jpeg", _jpeg_size(data)
    elif data[:2] == b"BM":
        kind, size = "bmp", _bmp_size(data)
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        kind, size = "webp", _webp_size(data)
    else:
        return None
    return None if size is None else (kind, *size)


def pixel_limit(megapixels):
    """`max_pixels` for a limit given in megapixels (a finite number > 0, e.g. 0.01 or 200): how
    `--max_megapixels` and the API's `max_megapixels` are read. `ValueError` otherwise."""
    try:
        value = float(megapixels)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(megapixels, bool) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"the megapixel limit must be a finite number > 0. Received: {megapixels!r}")
    return max(1, round(value * 1_000_000))


def _check_pixels(header, name, max_pixels):
    _, width, height = header
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{name}: {width}x{height} pixels is more than the {max_pixels / 1e6:g} megapixel limit"
        )
    return header


def decode_image(data, name="<bytes>", max_pixels=MAX_PIXELS):
    """Encoded image bytes -> RGB uint8 [H, W, 3]; `ImageError` (one line naming `name`) otherwise.

    Args:
        data: bytes (or a uint8 numpy buffer) of a PNG, JPEG, BMP or WebP file.
        name: str, how errors refer to the image (a path, "photo A (x.jpg)", a .bin index).
        max_pixels: int, width * height above which the image is refused before decoding.
    """
    data = bytes(data)
    if not data:
        raise ImageError(f"{name}: empty file")
    if _is_truncated(data):
        raise ImageError(f"{name}: truncated image file ({len(data)} bytes, no end marker)")
    header = image_header(data)
    if header is None:
        raise ImageError(
            f"{name}: not a decodable image ({len(data)} bytes; the content is not a "
            f"{', '.join(f.upper() for f in FORMATS)} file with a readable size)"
        )
    _, width, height = _check_pixels(header, name, max_pixels)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        raise ImageError(f"{name}: not a decodable image ({len(data)} bytes)")
    # The decoder must read the header's size; OpenCV turns a JPEG by its EXIF orientation
    # (a phone photo taken upright), which swaps the two.
    if image.shape[:2] not in ((height, width), (width, height)):
        raise ImageError(f"{name}: header says {width}x{height} pixels, the data {image.shape[1]}x{image.shape[0]}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_image(path, max_pixels=MAX_PIXELS):
    """Reads an image file as RGB uint8 [H, W, 3]; raises `ImageError` naming the file.

    The first `_HEAD_BYTES` are checked before the rest is read: an oversized image is refused
    without reading the whole file.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read(_HEAD_BYTES)
            header = image_header(data)
            if header is not None:
                _check_pixels(header, path, max_pixels)
            data += f.read()
    except OSError as e:
        raise ImageError(f"{path}: cannot read image file ({e.strerror or e})") from None
    return decode_image(data, name=path, max_pixels=max_pixels)
