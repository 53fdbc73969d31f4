"""benchmarks/gpu_check.sh's summary: the CUDA tests' JUnit XML → gpu_check-cuda.json.

Usage: python benchmarks/gpu_check_summary.py JUNIT TESTS_RC TESTS_S BENCH_RC DEVICES [--out F]
(keys: benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path

from _env import environment

ROOT = Path(__file__).resolve().parents[1]
_OUTCOME = {"failure": "failed", "error": "error", "skipped": "skipped"}


def summarize(junit: Path, tests_rc: int, tests_s: int, bench_rc: int, devices: int,
              device: str = "cuda") -> dict:
    cases = []
    if junit.exists():
        for tc in ET.parse(junit).getroot().iter("testcase"):
            outcome, reason = "passed", ""
            for tag, name in _OUTCOME.items():
                el = tc.find(tag)
                if el is not None:
                    outcome, reason = name, (el.get("message") or "")[:300]
            cases.append({"test": tc.get("name"), "outcome": outcome, "reason": reason,
                          "time_s": float(tc.get("time") or 0)})
    count = {k: sum(c["outcome"] == k for c in cases)
             for k in ("passed", "failed", "error", "skipped")}
    nccl = [c for c in cases if (c["test"] or "").startswith("test_two_nccl")]
    said = "not run" if not nccl else nccl[0]["outcome"] + (
        f": {nccl[0]['reason']}" if nccl[0]["reason"] else "")
    return {"environment": environment(device), "cuda_devices": devices,
            "tests_exit_code": tests_rc, "tests_s": tests_s, "tests": count, "nccl": said,
            "benchmarks_exit_code": bench_rc, "cases": cases}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("junit", "tests_rc", "tests_s", "bench_rc", "devices"):
        ap.add_argument(name)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                         "gpu_check-cuda.json"))
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # tests: "cpu"
    a = ap.parse_args()
    report = summarize(Path(a.junit), int(a.tests_rc), int(a.tests_s), int(a.bench_rc),
                       int(a.devices), a.device)
    Path(a.out).write_text(json.dumps(report, indent=2))
    print(f"gpu_check: tests {report['tests']}, NCCL {report['nccl']}; wrote {a.out}")


if __name__ == "__main__":
    main()
