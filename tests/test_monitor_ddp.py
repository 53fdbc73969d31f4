"""rf.Monitor under DistributedDataParallel: 2 gloo processes (loopback) against 1 process."""

import json
import time

import torch.multiprocessing as mp

import monitor_ddp_worker
from rayleighflow.report import validate_summary


def test_ddp_monitor_equals_the_single_process_monitor(tmp_path):
    """Per step, in float64 to 1e-10: the DDP monitor's L_B, ‖∇L_B‖², ‖∇ℓ‖²_D, R(K; ∇ℓ) and
    per-layer quotients equal the single-process monitor on the concatenated batch and
    rf.measure there (mean and sum conventions, unequal per-rank batches with DDP's weights,
    a sharded full-data estimate); un-synchronized gradients void the quotient; only rank 0
    writes its run folder. Collectives time out after 30 s, so a dead rank fails the test."""
    t0 = time.perf_counter()
    mp.start_processes(monitor_ddp_worker.monitor_ddp,
                       args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)),
                       nprocs=2, join=True, start_method="spawn")
    assert json.loads((tmp_path / "ok.json").read_text())["world"] == 2
    assert not (tmp_path / "run1").exists()
    summary = json.loads((tmp_path / "run0" / "summary.json").read_text())
    assert validate_summary(summary) == []
    assert any("distributed: 2 ranks" in n for n in summary["notes"])
    assert time.perf_counter() - t0 < 120
