#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA device (at most about 8 minutes on one H100/H200):
#   1. the CUDA tests (tests/test_cuda.py, `pytest -m cuda`): kernels against float64 CPU
#      references, the monitor's short path and cross-entropy sums on the device, and
#      2 NCCL processes against one when 2 devices exist (else the test says why it skipped);
#   2. the GPU benchmarks: benchmarks/ntk.py --device cuda (rayleighflow against the torch.func
#      tutorial's recipes, the structured path's fraction of the measured fp32 matmul rate)
#      and benchmarks/monitor.py --device cuda (the monitor's per-step cost).
# Writes benchmarks/results/gpu_check-cuda.json (the tests' outcome), ntk-cuda.json and
# monitor-cuda.json; their keys are documented in benchmarks/README.md.
# On a machine without CUDA it says so and exits 0, running nothing.
#
# Run from anywhere, in an environment with the project installed (pip install -e ".[test]"):
#     bash benchmarks/gpu_check.sh          # PYTHON=... to choose the interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"

devices="$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo none)"
if [ "$devices" = "none" ]; then
  echo "gpu_check: cannot import torch with $PY: install the project first (pip install -e '.[test]')"
  exit 2
fi
if [ "$devices" = "0" ]; then
  echo "gpu_check: no CUDA device (torch.cuda.is_available() is False): nothing to check here"
  exit 0
fi
echo "gpu_check: $devices CUDA device(s); CUDA tests, then GPU benchmarks"
results=benchmarks/results
mkdir -p "$results"
junit="$(mktemp -d)/cuda.xml"
start=$(date +%s)
timeout 240 "$PY" -m pytest -m cuda tests/test_cuda.py -p no:cacheprovider -q -rs \
  --junitxml="$junit"
tests_rc=$?
tests_s=$(( $(date +%s) - start ))

bench_rc=0
timeout 150 "$PY" benchmarks/ntk.py --device cuda --cases mlp784,mlp3072,cnn,cnn_fullres,big \
  --repeats 3 || bench_rc=$?
timeout 60 "$PY" benchmarks/monitor.py --device cuda --cases mlp-digits,resnet-cifar \
  --steps 100 --arms-steps 200 --arms-runs 2 || bench_rc=$?

"$PY" benchmarks/gpu_check_summary.py "$junit" "$tests_rc" "$tests_s" "$bench_rc" "$devices"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
