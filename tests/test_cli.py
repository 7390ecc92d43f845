"""xcos_tf.cli: every program exits 2 with one `error:` line on a user error, absl's flag errors included."""
import os
import subprocess
import sys

import pytest

from common_testing import REPO_ROOT


def _run(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("args, message", [
    (["-m", "tools.make_shards", "--no_such_flag"], "error: Unknown command line flag 'no_such_flag'"),
    (["-m", "tools.make_shards", "--out_dir=unused", "--flagfile=/nonexistent.flags"], "Unable to open flagfile"),
    (["-m", "tools.make_shards", "--out_dir=unused", "--shard_mb=abc"], "error: flag --shard_mb=abc"),
    (["-m", "tools.make_shards", "--out_dir=unused", "--input=/nonexistent"], "error: make_shards: --input"),
])
def test_flag_and_user_errors_exit_2_with_one_line(args, message):
    result = _run(*args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and "USAGE" not in result.stderr


def test_export_refuses_a_non_number_threshold_with_exit_2():
    result = _run("-m", "xcos_tf.export", "--weights=x.keras", "--out=unused", "--threshold=abc")
    assert result.returncode == 2
    assert "error: flag --threshold=abc" in result.stderr and "Traceback" not in result.stderr
