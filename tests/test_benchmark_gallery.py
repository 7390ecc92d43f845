"""tools/benchmark_gallery.py: recall, the synthetic grids, bad flags, and one small real run (needs ../shared)."""
import json
import subprocess
import sys

import numpy as np
import pytest
from common_testing import REPO_ROOT

from tools import benchmark_gallery as bench


def _run(*args):
    return subprocess.run([sys.executable, "-m", "tools.benchmark_gallery", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def test_recall_counts_the_true_row_among_the_k_best():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1], [0.0, 0.1, 0.2]])
    # probe 0's row 2 is second, probe 1's row 1 first, probe 2's row 0 last
    found = bench.recall(scores, [2, 1, 0])
    assert found[1] == pytest.approx(1 / 3) and found[10] == 1.0 and set(found) == set(bench.RECALL_AT)


def test_synthetic_grids_slice_like_rows():
    pool = np.random.default_rng(0).normal(size=(5, 2, 2, 3)).astype(np.float32)
    grids = bench.SyntheticGrids(pool, 60)
    assert len(grids) == 60 and grids.shape == (60, 2, 2, 3)
    np.testing.assert_array_equal(grids[10:13], grids[[10, 11, 12]])
    np.testing.assert_allclose(grids[37], pool[2] + pool[2] / 2 + pool[1] / 4)  # 37 = 2 + 5*7 (7 % 5 = 2) + 25*1
    assert len({grids[i].tobytes() for i in range(60)}) == 60


@pytest.mark.parametrize("args, message", [
    (("--sizes", "10,x"), "error: --sizes must be whole numbers"),
    (("--sizes", "0"), "error: --sizes must be positive"),
    (("--lfw", "/nonexistent"), "error: --lfw /nonexistent: not found"),
    (("--people", "-1"), "error: flag --people=-1"),
])
def test_bad_flags_are_one_line(args, message):
    result = _run(*args)
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_small_run_prints_the_machine_the_command_and_both_parts(shared_dir, tmp_path):
    if not (REPO_ROOT / "exported" / "default" / "manifest.json").is_file():
        pytest.skip("exported/default is not in this checkout")
    args = ("--people", "6", "--sizes", "300", "--queries", "2", "--brute_force_max", "300", "--shortlist", "20",
            "--scale_dir", str(tmp_path / "scale"))
    result = _run(*args)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("Machine: ") and "logical CPUs" in out.splitlines()[0]
    assert "Versions: python " in out and "faiss " in out
    assert f"Command: python -m tools.benchmark_gallery {' '.join(args)}" in out
    assert "Rank-1 on 6 LFW people, 6 faces enrolled" in out and "xCos, FAISS shortlist of 20 re-ranked" in out
    assert "cell sums (the index's summaries)" in out
    grid_shape = json.loads((REPO_ROOT / "exported" / "default" / "manifest.json").read_text())["model"]["grid_shape"]
    assert f"grids {2 * int(np.prod(grid_shape)):,} B" in out  # float16 on disk
    rows = [line.split() for line in out.splitlines() if line.split()[:1] == ["300"]]
    # written, opened, then searched through each FAISS index and by brute force
    assert [row[1] for row in rows] == ["entries", "opened", "flat", "sq8", "brute"]
    assert list((tmp_path / "scale").iterdir()) == []  # each size's index is removed
