"""Test-wide settings: CI runs property tests with a fixed seed so a red run can be replayed.

One intra-op thread: the tests use small tensors, where OpenMP threads only spin against each
other; on a busy 2-core machine two spinning threads made the suite ~15× slower.
"""

import os

import torch
from hypothesis import settings

torch.set_num_threads(1)

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
