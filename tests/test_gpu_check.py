"""benchmarks/gpu_check.sh: with no CUDA device it says so and exits 0; its summary reads the
CUDA tests' JUnit XML into the documented keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_without_a_cuda_device_it_says_so_and_exits_0():
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env,
                          capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == [
        "gpu_check: no CUDA device (torch.cuda.is_available() is False): nothing to check here"]


def test_summary_counts_outcomes_and_says_why_nccl_skipped(tmp_path):
    junit = tmp_path / "cuda.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="t" name="test_kernel_on_cuda[a]" time="1.5"/>'
        '<testcase classname="t" name="test_kernel_on_cuda[b]" time="0.5">'
        '<failure message="relative error 3e-4 &gt; 2e-5"/></testcase>'
        '<testcase classname="t" name="test_two_nccl_processes_equal_one_process" time="0">'
        '<skipped message="1 CUDA device here: the NCCL check needs two"/></testcase>'
        '</testsuite></testsuites>')
    out = tmp_path / "gpu.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check_summary.py"),
                    str(junit), "1", "42", "0", "1", "--out", str(out), "--device", "cpu"],
                   check=True, capture_output=True, timeout=120)
    rep = json.loads(out.read_text())
    assert rep["tests"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 1}
    assert rep["nccl"] == "skipped: 1 CUDA device here: the NCCL check needs two"
    assert (rep["cuda_devices"], rep["tests_exit_code"], rep["tests_s"]) == (1, 1, 42)
    assert rep["cases"][1]["reason"] == "relative error 3e-4 > 2e-5"
    assert {"environment", "benchmarks_exit_code"} <= set(rep)
