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
    (["tools/check_serving_request.py", "--model=unused"], "error: expected one request file"),
    (["tools/tflite_verify.py", "a.jpg", "--model=unused"], "error: expected two photos"),
    (["-m", "tools.choose_threshold", "--weights=w", "--pairs=p", "extra"], "error: unexpected arguments: extra"),
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


def _user_env():
    """The environment of a user who set no logging variables (the test run may have)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("TF_CPP", "ABSL", "GLOG"))}
    return dict(env, PYTHONPATH=str(REPO_ROOT))


def test_explain_quick_start_prints_at_most_four_lines(tmp_path):
    """The docs' Quick start on the shipped model: score, decision, picture, notes; none of
    TensorFlow's start-up lines (they come back with --verbose)."""
    model, samples = REPO_ROOT / "exported" / "default", REPO_ROOT / "exported" / "samples" / "aligned"
    if not (model / "manifest.json").is_file():
        pytest.skip("exported/default is not in this checkout")
    command = ["-m", "xcos_tf.explain", str(samples / "A.png"), str(samples / "B.png"), "--model", str(model),
               "--out", str(tmp_path / "x.png")]
    env = _user_env()
    quiet = subprocess.run([sys.executable, *command], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                           timeout=240)
    assert quiet.returncode == 0, quiet.stderr
    lines = (quiet.stdout + quiet.stderr).splitlines()
    assert len(lines) <= 4, lines
    printed = quiet.stdout.splitlines()
    assert printed[0].startswith("score ") and printed[-1] == f"picture: {tmp_path / 'x.png'}"
    assert all(line.startswith("note: ") for line in quiet.stderr.splitlines()), quiet.stderr
    verbose = subprocess.run([sys.executable, *command, "--verbose"], cwd=REPO_ROOT, env=env, capture_output=True,
                             text=True, timeout=240)
    assert verbose.returncode == 0 and "cudart_stub" in verbose.stderr  # what quiet hides, on this CPU machine


def test_progress_lines_in_a_log_are_plain():
    import io

    from xcos_tf import progress

    log = io.StringIO()  # not a terminal
    assert isinstance(progress.bar(total=3, file=log), progress.LineProgress)
    bar = progress.LineProgress(range(1200), description="faces", unit="img", file=log, interval=0.0)
    assert sum(1 for _ in bar) == 1200
    lines = log.getvalue().splitlines()
    assert len(lines) == 1200 and lines[0].startswith("faces 1/1200 (0%) ") and lines[-1].startswith("faces 1200/1200 (100%) ")
    assert all(line.endswith(" img/s") for line in lines) and "\r" not in log.getvalue()
    steps = progress._StepLines(total=10, description="step", unit="step", file=log, interval=3600.0)
    log.truncate(0)
    log.seek(0)
    for step in range(1, 11):
        steps.update(step, [("loss", 1.0 / step)])
    # One line per interval (none in an hour) and the last one when the target is reached.
    assert log.getvalue().splitlines() == [log.getvalue().splitlines()[0]]
    assert log.getvalue().startswith("step 10/10 (100%) ")


def test_training_progress_in_a_log_file_is_plain_lines(tmp_path):
    """`python -m xcos_tf.train ... > train.log 2>&1`, as the flagfiles suggest: no keras bar
    redrawn with carriage returns, backspaces or colour codes; one line at the last step."""
    from common_testing import TINY_BACKBONE_SPEC

    log_path = tmp_path / "train.log"
    with open(log_path, "w") as log:
        result = subprocess.run(
            [sys.executable, "-m", "xcos_tf.train", "--data=synthetic", "--num_classes=4",
             f"--backbone={TINY_BACKBONE_SPEC}", "--image_size=32", "--batch_size=4", "--train_steps=5",
             "--export_formats=", f"--model_dir={tmp_path / 'run'}"],
            cwd=REPO_ROOT, env=_user_env(), stdout=log, stderr=subprocess.STDOUT, timeout=300)
    text = log_path.read_text()
    assert result.returncode == 0, text[-3000:]
    assert "\r" not in text and "\x1b" not in text and "\b" not in text
    assert any(line.startswith("step 5/5 (100%) ") and " loss " in line for line in text.splitlines()), text[-2000:]
    assert "cudart_stub" not in text and "cuInit" not in text  # TensorFlow's start-up noise


def test_make_holdout_pairs_help_keeps_its_example_on_two_lines():
    result = _run("-m", "tools.make_holdout_pairs", "--help")  # absl's --help exits 1
    lines = result.stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if "python -m tools.make_holdout_pairs" in line)
    assert lines[first].rstrip().endswith("\\") and lines[first + 1].strip().startswith("--out_dir=")


PHOTO_READERS = [["-m", "xcos_tf.explain"], ["-m", "xcos_tf.evaluate"], ["-m", "xcos_tf.gallery"],
                 ["-m", "xcos_tf.demo"], ["-m", "xcos_tf.export"], ["-m", "tools.make_shards"],
                 ["tools/tflite_verify.py"], ["tools/load_test_demo.py"]]


@pytest.mark.parametrize("program", PHOTO_READERS, ids=lambda program: program[-1])
def test_every_program_that_reads_photos_lists_the_shared_flags(program):
    """The flags of xcos_tf.cli's definers are listed in each program's own --helpshort."""
    result = _run(*program, "--helpshort")  # absl's --help exits 1
    listed = {line.split(":")[0].strip() for line in result.stdout.splitlines() if line.startswith("  --")}
    assert {"--max_megapixels", "--[no]verbose"} <= listed, result.stdout[-3000:]
    if program[-1] not in ("xcos_tf.export", "tools.make_shards"):
        assert {"--model", "--detector"} <= listed
