"""tools/benchmark_training.py --compare: machine report, skipped variants, the table, bad flags, one real run."""
import pathlib
import subprocess
import sys

import pytest

from tools import benchmark_training as bench

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

TOOL = str(REPO_ROOT / "tools" / "benchmark_training.py")


def test_cpu_info_reads_model_and_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU @ 2.0GHz\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n")
    assert bench.cpu_info(str(cpuinfo)) == ("Some CPU @ 2.0GHz", {"fpu", "avx2", "avx512f", "avx512_bf16"})


def test_bfloat16_runs_only_with_avx512_bf16():
    assert "AVX512_BF16" in bench.skip_reason("fused_bn+prelu+bf16", {"avx2", "avx512f"})
    assert bench.skip_reason("fused_bn+prelu+bf16", {"avx512f", "avx512_bf16"}) is None
    assert all(bench.skip_reason(v, set()) is None for v in ("keras_bn", "fused_bn", "fused_bn+prelu", "fused_bn+prelu+xla"))


def _worker(label, rounds, images_per_step=32):
    worker = bench._Worker.__new__(bench._Worker)
    worker.label, worker.images_per_step = label, images_per_step
    worker.rounds = [{"steps": s, "seconds": sec, "cpu_seconds": cpu, "loss": 1.0} for s, sec, cpu in rounds]
    return worker


def test_table_sums_the_rounds_and_gives_ratios():
    workers = [
        _worker("keras_bn", [(10, 20.0, 40.0), (10, 20.0, 40.0)]),  # 640 images / 80 CPU-s = 8
        _worker("fused_bn", [(15, 20.0, 40.0), (15, 20.0, 40.0)]),  # 12
        _worker("keras_insightface", [(12, 20.0, 24.0)]),  # 16
        _worker("fused_bn+prelu+xla", []),  # no round finished
    ]
    rows = bench.compare_table("mobilefacenet", workers, "keras_bn", "keras_insightface")
    assert rows[0].endswith("| vs keras_bn | vs keras_insightface |")
    assert rows[2] == "| mobilefacenet | keras_bn | 32 | 16.0 | 8.0 (8.0, 8.0) | 1.00x | 0.50x |"
    assert rows[3] == "| mobilefacenet | fused_bn | 32 | 24.0 | 12.0 (12.0, 12.0) | 1.50x | 0.75x |"
    assert rows[4] == "| mobilefacenet | keras_insightface | 32 | 19.2 | 16.0 (16.0) | 2.00x | 1.00x |"
    assert "failed" in rows[5]


def test_table_without_the_baseline_has_no_baseline_column():
    workers = [_worker("fused_bn", [(15, 20.0, 40.0)]), _worker("keras_insightface", [(12, 20.0, 24.0)])]
    rows = bench.compare_table("mobilefacenet", workers, "keras_bn", "keras_insightface")
    assert rows[0].endswith("(per round) | vs keras_insightface |")
    assert rows[2] == "| mobilefacenet | fused_bn | 32 | 24.0 | 12.0 (12.0) | 0.75x |"


@pytest.mark.parametrize("flag", ["--models=resnet18", "--variants=fused", "--pairs_per_step=mobilefacenet=0",
                                  "--keras_insightface_dir=/nonexistent"])
def test_bad_compare_flags_end_with_one_line_and_exit_2(flag):
    result = subprocess.run([sys.executable, TOOL, "--compare", flag], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and flag.split("=")[0] in result.stderr


@pytest.mark.slow
def test_compare_times_two_variants_in_alternating_rounds():
    result = subprocess.run(
        [sys.executable, TOOL, "--compare", "--models=mobilefacenet", "--variants=keras_bn,fused_bn+prelu,fused_bn+prelu+bf16",
         "--pairs_per_step=mobilefacenet=2", "--rounds=2", "--round_seconds=0", "--warmup=1"],
        capture_output=True, text=True, timeout=900, cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "machine: " in out and "avx512_bf16" in out and "tensorflow" in out
    assert out.count("round 1/2 done") == 1 and out.count("round 2/2 done") == 1
    for variant in ("keras_bn", "fused_bn+prelu"):
        assert f"| mobilefacenet | {variant} | 4 |" in out
    assert ("fused_bn+prelu+bf16: skipped" in out) != ("| mobilefacenet | fused_bn+prelu+bf16 | 4 |" in out)
