"""Test fixtures only (pytest loads this file once); plain helpers live in tests/*_testing.py."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
from common_testing import SHARED_DIR, tiny_backbone  # noqa: E402
from training_testing import write_tiny_training_data  # noqa: E402


@pytest.fixture(scope="session")
def shared_dir():
    """The shared folder (xcos_tf.paths); tests that need it skip on a machine without it."""
    if not (SHARED_DIR / "data").is_dir():
        pytest.skip(f"needs the shared data folder at {SHARED_DIR} (absent on this machine)")
    return SHARED_DIR


@pytest.fixture
def make_tiny_backbone():
    return tiny_backbone


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Tiny face shards and evaluation pairs for training tests (`write_tiny_training_data`)."""
    return write_tiny_training_data(tmp_path_factory.mktemp("data"))
