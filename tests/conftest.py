"""Test-wide settings: CI runs property tests with a fixed seed so a red run can be replayed.

One intra-op thread: the tests use small tensors, where OpenMP threads only spin against each
other; on a busy 2-core machine two spinning threads made the suite ~15× slower.
"""

import json
import os

import pytest
import torch
from hypothesis import settings

torch.set_num_threads(1)

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def two_layer_quick(tmp_path_factory):
    """`rayleighflow run two-layer --quick` once, through the command line: (folder, summary)
    for the CLI test of test_experiments.py and the science tests of test_two_layer.py."""
    from rayleighflow.cli import main

    out = tmp_path_factory.mktemp("two-layer") / "run"
    assert main(["run", "two-layer", "--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "summary.json").read_text())
