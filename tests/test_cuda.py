"""On a CUDA device: kernels against float64 CPU references, the monitor's short path and its
cross-entropy sums, and 2 NCCL processes against one.

Marked ``cuda``, so the default selection (CPU machines, CI) leaves them out; run by
``benchmarks/gpu_check.sh`` (``python -m pytest -m cuda``). TF32 stays off: the kernels' own
default (``allow_tf32=False``), and the monitor's gradients are float64 here.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

import ntk_dist_worker
from cases import CASES, TOL, assert_close, inputs
from rayleighflow.data import Dataset
from rayleighflow.losses import get_loss
from rayleighflow.monitor import Monitor
from rayleighflow.monitor._batch import batch_sums
from rayleighflow.ntk import NTKOperator, empirical_ntk, kernel_matrix
from rayleighflow.problem import Model, Problem
from rayleighflow.rayleigh import measure
from rayleighflow.reference import dense_gram

pytestmark = pytest.mark.cuda

MODULE_CASES = [name for name, case in CASES.items() if name != "callable"]


@pytest.fixture(scope="module")
def cuda() -> torch.device:
    # RAYLEIGHFLOW_CUDA_TESTS_ON=cpu runs these tests' logic on the CPU (a check of the tests
    # themselves on a machine without a GPU); they prove nothing about CUDA that way.
    if os.environ.get("RAYLEIGHFLOW_CUDA_TESTS_ON") == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here: these run on a GPU machine (benchmarks/gpu_check.sh)")
    return torch.device("cuda")


def _on(model: Model, device: torch.device, dtype: torch.dtype) -> Model:
    module = model.module
    assert module is not None
    return Model(module.to(device, dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", ["structured", "jacobian"])
@pytest.mark.parametrize("name", MODULE_CASES)
def test_kernel_on_cuda_matches_the_float64_cpu_reference(cuda, name, method, dtype):
    case = CASES[name]
    cpu_model, x = case.build(), inputs(case, 6)
    ref = dense_gram(cpu_model, cpu_model.params, x)
    model = _on(case.build(), cuda, dtype)
    xd = x.to(cuda, dtype) if x.is_floating_point() else x.to(cuda)
    got = empirical_ntk(model, xd, convention="sum", method=method)
    assert got.device.type == cuda.type
    assert_close(kernel_matrix(got), ref, dtype, what=f"{name}/{method}/{dtype}")


@pytest.mark.parametrize("name", ["mlp_tanh", "cnn", "residual"])
def test_operator_products_on_cuda_match_the_cpu_kernel(cuda, name):
    case = CASES[name]
    cpu_model, x = case.build(), inputs(case, 6)
    dense = kernel_matrix(empirical_ntk(cpu_model, x))
    v = torch.randn(dense.shape[0], generator=torch.Generator().manual_seed(3),
                    dtype=torch.float64)
    op = NTKOperator(_on(case.build(), cuda, torch.float64), x.to(cuda))
    assert_close(op.matvec(v.to(cuda)), dense @ v, torch.float64, what=f"{name} K v")


@pytest.mark.parametrize("loss", ["cross-entropy", "square"])
def test_monitor_short_path_on_cuda_equals_measure_on_cpu(cuda, loss):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(),
                              torch.nn.Linear(7, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 5, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (12,), generator=g) if loss == "cross-entropy" else \
        torch.randn(12, 3, dtype=torch.float64, generator=g)
    ref = measure(Problem(Model(net), Dataset.from_arrays(x, y), loss, "mean"))
    net = net.to(cuda)
    mon = Monitor(net, loss, convention="mean", echo=None)
    out = net(x.to(cuda))
    lv = (torch.nn.functional.cross_entropy(out, y.to(cuda)) if loss == "cross-entropy"
          else 0.5 * ((out - y.to(cuda)) ** 2).sum(-1).mean())
    lv.backward()
    mon.step(out, y.to(cuda), lv)
    mon.close()
    row = mon.rows[0]
    for key, want in (("rayleigh", ref.rayleigh), ("grad_sq", ref.grad_sq),
                      ("fgrad_sq", ref.fgrad_sq), ("loss", ref.loss)):
        assert row[key] == pytest.approx(want, rel=1e-10), key


@pytest.mark.parametrize("scale", [1.0, 30.0, 1e3, 1e10])
def test_cross_entropy_sums_on_cuda_match_the_cpu_reference(cuda, scale):
    g = torch.Generator().manual_seed(0)
    f = torch.randn(50, 7, dtype=torch.float64, generator=g) * scale
    y = f.argmax(-1)
    y[:10] = torch.randint(0, 7, (10,), generator=g)
    ce = get_loss("cross-entropy")
    ell, gsq = batch_sums(ce, f.to(cuda), y.to(cuda))
    ref_g = ce.functional_grad(f, y)
    assert ell.cpu().tolist() == pytest.approx(ce.per_sample(f, y).tolist(), rel=1e-12, abs=0)
    assert gsq.cpu().tolist() == pytest.approx((ref_g * ref_g).sum(-1).tolist(), rel=1e-12,
                                               abs=0)
    ell32, gsq32 = batch_sums(ce, f.float().to(cuda), y.to(cuda))
    tol = 50 * TOL[torch.float32]
    assert ell32.double().cpu().tolist() == pytest.approx(ell.cpu().tolist(), rel=tol, abs=tol)
    assert gsq32.double().cpu().tolist() == pytest.approx(gsq.cpu().tolist(), rel=tol,
                                                          abs=tol)


def test_two_nccl_processes_equal_one_process(cuda, tmp_path):
    if cuda.type != "cuda" or torch.cuda.device_count() < 2:
        pytest.skip(f"{torch.cuda.device_count()} CUDA device here: the NCCL check needs two")
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(ntk_dist_worker.nccl_kernels, args=(2, init, str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    assert sorted(p.name for p in tmp_path.glob("nccl-ok-*")) == ["nccl-ok-0", "nccl-ok-1"]
