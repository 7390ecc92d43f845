"""Plain helpers shared by the tests (imported as `common_testing`; conftest.py only holds fixtures):
the repository root, the shared folder, a tiny backbone that keeps tests fast, and a PNG that
claims a huge size."""
import pathlib
import struct
import zlib

import keras

from xcos_tf import paths

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DIR = pathlib.Path(paths.shared_dir())  # $XCOS_SHARED_DIR, else ../shared
# The tiny backbone as a --backbone value: subprocesses run in the repo root, where it imports as
# tests.common_testing.
TINY_BACKBONE_SPEC = "tests.common_testing:tiny_backbone"


def tiny_backbone(input_shape=(32, 32, 3), channels=16, name="tiny"):
    """A few convs from pixels to a (H/8, W/8, channels) map: a stand-in for a real backbone."""
    image = keras.Input(input_shape, name="image")
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)(image)
    for i, filters in enumerate((8, 12, channels)):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", name=f"{name}_conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"{name}_bn{i}")(x)
        x = keras.layers.ReLU(name=f"{name}_relu{i}")(x)
    return keras.Model(image, x, name=name)


def _png_chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def huge_png(width=60000, height=60000):
    """A complete, valid-looking PNG of a few dozen bytes whose header claims width x height."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))
