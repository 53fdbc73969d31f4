"""Scale-out: tile executors, 2 gloo processes against 1, out-of-core kernels, dead ranks.

The 2-process tests proper are marked ``distributed`` (CI: ``python -m pytest -m distributed``);
the default selection keeps a quick 2-process smoke test.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import ntk_dist_worker
from cases import CASES, assert_close, inputs
from rayleighflow.distributed import DistributedError, init_distributed
from rayleighflow.ntk import (
    DistributedExecutor,
    KernelTooLargeError,
    LocalExecutor,
    empirical_ntk,
    extreme_eigenpairs,
    kernel_file_operator,
    kernel_matrix,
    plan_ntk,
)
from rayleighflow.ntk.executor import current_executor, torchrun_session, use_executor
from rayleighflow.reference import dense_gram


def _spawn(fn, tmp_path, world=2):
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(fn, args=(world, init, str(tmp_path)), nprocs=world, join=True,
                       start_method="spawn")


def test_two_gloo_processes_smoke(tmp_path):
    """Default suite: 2 gloo processes, one kernel and one sharded K v against 1 process."""
    _spawn(ntk_dist_worker.smoke, tmp_path)


# The 2-process selection: `python -m pytest -m distributed` (.ci/run). One spawn runs every
# check (starting two Python processes with torch costs ~10 s on 2 busy cores).
@pytest.mark.slow
@pytest.mark.distributed
def test_two_gloo_processes_equal_one_process_and_fail_loudly(tmp_path):
    """MLP, CNN and a model with fallback layers: kernels (all/rank0/rows, cross, out of core)
    equal the 1-process kernel to 1e-12 in float64; sharded K v and Lanczos to 1e-10. Then a
    rank that never joins (every started rank) and one that dies before an assembly (rank 0):
    DistributedError within the timeout, not a hang."""
    _spawn(ntk_dist_worker.all_checks, tmp_path)
    for rank in (0, 1):  # both started ranks of a 3-rank group whose rank 2 never starts
        waited, msg = (tmp_path / f"never-{rank}.txt").read_text().split("\n", 1)
        assert float(waited) < 30 and "within 3 s" in msg, (rank, waited, msg)
    waited, msg = (tmp_path / "died.txt").read_text().split("\n", 1)
    assert float(waited) < 30 and "peer process" in msg, (waited, msg)


@pytest.mark.parametrize(("name", "n", "limit"), [("mlp_tanh", 40, 60_000), ("cnn", 9, None)])
def test_out_of_core_kernel_and_its_spectrum(tmp_path, name, n, limit):
    case = CASES[name]
    model, x = case.build(), inputs(case, n)
    ref = empirical_ntk(model, x)
    path = tmp_path / "K.npy"
    if limit is not None:  # the kernel itself is larger than the memory allowed
        assert plan_ntk(model, x, max_memory=limit).result_bytes > limit
    k = empirical_ntk(model, x, out_file=path, max_memory=limit)
    assert_close(kernel_matrix(k), kernel_matrix(ref), what="out of core")
    on_disk = np.load(path, mmap_mode="r")
    assert on_disk.shape == tuple(kernel_matrix(ref).shape)
    del k
    full = torch.linalg.eigvalsh(kernel_matrix(ref)).numpy()
    op = kernel_file_operator(path, max_memory=2000)  # a few rows per read
    assert op.block_rows < on_disk.shape[0]
    vals, _ = extreme_eigenpairs(op, 3, tol=1e-12)
    np.testing.assert_allclose(vals, full[-3:], rtol=1e-10)
    # and against the dense jacrev reference (sum convention)
    ks = empirical_ntk(model, x, convention="sum", out_file=tmp_path / "S.npy", block_size=4)
    assert_close(kernel_matrix(ks), dense_gram(model, model.params, x), what="dense")


def test_local_executor_is_the_default():
    case = CASES["mlp_relu"]
    model, x = case.build(), inputs(case, 6)
    a = empirical_ntk(model, x, block_size=4)
    b = empirical_ntk(model, x, block_size=4, executor=LocalExecutor())
    assert torch.equal(a, b)


def test_bad_scale_out_inputs_say_the_fix(tmp_path):
    case = CASES["mlp_relu"]
    model, x = case.build(), inputs(case, 4)
    with pytest.raises(ValueError, match="must end in .npy"):
        empirical_ntk(model, x, out_file=tmp_path / "K.bin")
    with pytest.raises(ValueError, match="gather must be"):
        DistributedExecutor("everyone")
    with pytest.raises(RuntimeError, match="init_distributed"):
        empirical_ntk(model, x, executor=DistributedExecutor())
    with pytest.raises(TypeError, match="executor must be"):
        empirical_ntk(model, x, executor="local")
    env = {k: os.environ.pop(k) for k in ("MASTER_ADDR",) if k in os.environ}
    try:
        with pytest.raises(DistributedError, match="torchrun"):
            init_distributed("gloo")
    finally:
        os.environ.update(env)
    with pytest.raises(ValueError, match="square"):
        np.save(tmp_path / "r.npy", np.zeros((2, 3)))
        kernel_file_operator(tmp_path / "r.npy")
    with pytest.raises(KernelTooLargeError, match="out_file"):
        big = torch.randn(40_000, 4, dtype=torch.float64)
        empirical_ntk(model, big, max_memory="10GB")


def test_torchrun_session_is_a_no_op_in_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with torchrun_session() as main:
        assert main
        assert isinstance(current_executor(), LocalExecutor)
    with pytest.raises(ValueError, match="gather='all'"), use_executor(DistributedExecutor()):
        pass


@pytest.mark.slow  # two torchrun processes and one plain: ~35 s
@pytest.mark.distributed
def test_cli_ntk_under_torchrun_prints_the_same_once(tmp_path):
    root = Path(__file__).resolve().parents[1]
    exe = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(exe / "rayleighflow"), "ntk", str(root / "examples" / "my_experiment.toml")]
    one = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    two = subprocess.run([str(exe / "torchrun"), "--standalone", "--nproc-per-node", "2",
                          "--no-python", *cmd], capture_output=True, text=True, env=env,
                         timeout=300)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert one.stdout == two.stdout and "λ_max" in one.stdout
