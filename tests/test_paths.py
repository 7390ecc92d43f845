"""xcos_tf.paths: the one place that knows where the shared folder is."""
import os

import pytest

from xcos_tf import paths


def test_shared_dir_follows_the_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv(paths.ENV_VAR, str(tmp_path))
    assert paths.shared_dir() == str(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "yunet.onnx").write_bytes(b"")
    assert paths.require_shared("models", "yunet.onnx", what="detector") == str(tmp_path / "models" / "yunet.onnx")
    monkeypatch.delenv(paths.ENV_VAR)
    assert paths.shared_dir() == os.path.normpath(os.path.join(paths.REPO_ROOT, os.pardir, "shared"))


def test_a_missing_shared_file_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv(paths.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="detector not found at .*nowhere.*set XCOS_SHARED_DIR"):
        paths.require_shared("models", "yunet.onnx", what="detector")
