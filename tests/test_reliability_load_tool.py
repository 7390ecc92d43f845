"""tools/load_test_demo.py: loopback only, and its arithmetic (the measured run is in docs/reliability.md)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "load_test_demo.py")


@pytest.mark.parametrize("url", ["http://example.com:7860/", "http://10.0.0.5:7860/", "http://0.0.0.0:7860/"])
def test_load_test_refuses_a_server_that_is_not_on_loopback(url):
    result = subprocess.run([sys.executable, TOOL, "--url", url, "--requests", "1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "error: --url must be on 127.0.0.1 or localhost" in result.stderr
    assert "successes" not in result.stdout  # nothing was sent


def test_percentiles_are_of_the_sorted_latencies():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import load_test_demo
    finally:
        sys.path.pop(0)
    latencies = [0.5, 0.1, 0.4, 0.2, 0.3]
    assert load_test_demo.percentile(latencies, 50) == 0.3
    assert load_test_demo.percentile(latencies, 95) == 0.5
    assert load_test_demo.percentile([2.0], 95) == 2.0
