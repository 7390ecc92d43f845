"""Shared test fixtures: the ../shared data folder and tiny backbones that keep tests fast."""
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402

from xcos_tf import paths  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DIR = pathlib.Path(paths.shared_dir())  # $XCOS_SHARED_DIR, else ../shared


@pytest.fixture(scope="session")
def shared_dir():
    """The shared folder (xcos_tf.paths); tests that need it skip on a machine without it."""
    if not (SHARED_DIR / "data").is_dir():
        pytest.skip(f"needs the shared data folder at {SHARED_DIR} (absent on this machine)")
    return SHARED_DIR


def tiny_backbone(input_shape=(32, 32, 3), channels=16, name="tiny"):
    """A few convs from pixels to a (H/8, W/8, channels) map: a stand-in for a real backbone."""
    image = keras.Input(input_shape, name="image")
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)(image)
    for i, filters in enumerate((8, 12, channels)):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", name=f"{name}_conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"{name}_bn{i}")(x)
        x = keras.layers.ReLU(name=f"{name}_relu{i}")(x)
    return keras.Model(image, x, name=name)


@pytest.fixture
def make_tiny_backbone():
    return tiny_backbone
