"""Export reliability (issue 16): SavedModel signatures refuse wrong shapes before any op runs,
stale staging folders of killed exports are removed, a full disk is one line and keeps the old export."""
import errno
import os
import subprocess
import sys
import textwrap

import pytest
import tensorflow as tf

import export_testing
from xcos_tf import export
from xcos_tf.export import saved_model, staging

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def saved_model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model"
    export.export_model(export_testing.tiny_trainer(), str(out), formats=["saved_model"])
    return str(out / "saved_model" / "xcos" / "1")


# Run in a child: the bug this guards against aborted the whole process (oneDNN, exit 134).
_WRONG_SHAPES = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf
    signatures = tf.saved_model.load(sys.argv[1]).signatures
    cases = {
        "verify rank 2": ("verify", {"image_a": np.zeros((112, 336), np.float32), "image_b": np.zeros((112, 336), np.float32)}),
        "verify_uint8 rank 3": ("verify_uint8", {"image_a": np.zeros((112, 112, 3), np.uint8), "image_b": np.zeros((112, 112, 3), np.uint8)}),
        "embed 64x64": ("embed", {"image": np.zeros((1, 64, 64, 3), np.float32)}),
        "compare rank 2": ("compare", {"grid_a": np.zeros((7, 7), np.float32), "grid_b": np.zeros((7, 7), np.float32)}),
    }
    for case, (name, inputs) in cases.items():
        try:
            signatures[name](**{key: tf.constant(value) for key, value in inputs.items()})
        except (tf.errors.InvalidArgumentError, ValueError) as error:
            guarded = "not compatible with expected shape" in str(error)  # EnsureShape's message, before any op
            print(case, "refused" if guarded else "failed inside the model:", type(error).__name__)
        else:
            print(case, "ran")
""")


def test_signatures_refuse_wrong_ranks_and_shapes_without_aborting(saved_model_dir):
    result = subprocess.run([sys.executable, "-c", _WRONG_SHAPES, saved_model_dir], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])  # 134 was the abort
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 4 and all(line.endswith("refused InvalidArgumentError") for line in lines), result.stdout


def test_a_killed_exports_staging_folder_is_removed_by_the_next_export(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a PID that is no longer running
    stale = tmp_path / f".deploy.partial-{dead.pid}-abcd1234"
    (stale / "saved_model").mkdir(parents=True)
    live = tmp_path / f".deploy.partial-{os.getppid()}-efgh5678"  # a running process: left alone
    live.mkdir()
    old_style = tmp_path / ".deploy.partial-x1y2z3w4"  # before PIDs were in the name
    old_style.mkdir()
    os.utime(old_style, (0, 0))
    other = tmp_path / f".other.partial-{dead.pid}-abcd1234"  # another folder's staging: not ours
    other.mkdir()
    with export.staged_folder(str(tmp_path / "deploy")) as folder:
        (open(os.path.join(folder, "new.txt"), "w")).close()
    assert sorted(os.listdir(tmp_path)) == sorted(["deploy", live.name, other.name])


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    tf.errors.ResourceExhaustedError(None, None, f"saved_model/variables/variables.data-00000-of-00001; {os.strerror(errno.ENOSPC)}"),
])
def test_a_full_disk_keeps_the_previous_export(tmp_path, monkeypatch, error):
    out = tmp_path / "deploy"
    out.mkdir()
    (out / "manifest.json").write_text("the previous, good export")

    def disk_full(*args, **kwargs):
        raise error

    monkeypatch.setattr(saved_model, "write_saved_model", disk_full)
    with pytest.raises(staging.DiskFullError, match="the disk is full .* the previous .*deploy was kept"):
        export.export_model(export_testing.tiny_trainer(), str(out), formats=["saved_model"])
    assert os.listdir(tmp_path) == ["deploy"] and (out / "manifest.json").read_text() == "the previous, good export"


def test_cli_says_the_disk_is_full_on_one_line(tmp_path):
    weights = tmp_path / "tiny.keras"
    export_testing.tiny_trainer().save(weights)
    out = tmp_path / "deploy"
    out.mkdir()
    driver = textwrap.dedent(f"""
        import errno, os, runpy, sys
        from xcos_tf.export import saved_model
        def disk_full(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        saved_model.write_saved_model = disk_full
        sys.argv = ["export", "--weights={weights}", "--out={out}", "--formats=saved_model"]
        runpy.run_module("xcos_tf.export", run_name="__main__")
    """)
    result = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the disk is full" in errors[0] and "was kept" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and os.listdir(out) == []
