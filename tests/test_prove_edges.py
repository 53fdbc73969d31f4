"""Issue 17, the smaller items: no crash where a searched target underflows or L₀ = 0, and
sentences built from the numbers (a proof is not "checked at 0 records", equal bounds are not
"1× tighter", a valid constant is not filed as sharp)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

import rayleighflow as rf
from rayleighflow.certificate import CertificateStatus
from rayleighflow.prove import prove_details
from rayleighflow.prove.ce import rho_at_ce
from rayleighflow.theorems.two_layer import TwoLayer


def _linear_ce(seed: int) -> rf.Problem:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, generator=g, dtype=torch.float64)   # P = 27 ≥ nk = 6, Lip_J = 0
    y = torch.randint(0, 3, (2,), generator=g)
    torch.manual_seed(seed)
    return rf.Problem(rf.Model(nn.Linear(8, 3).double()), rf.Dataset.from_arrays(x, y),
                      "cross-entropy")


def test_cross_entropy_with_underflowing_targets_does_not_crash():
    for seed in range(4):
        proof = prove_details(_linear_ce(seed))
        cert = proof.certificate
        if cert.holds:   # the smallest target whose time float64 can still hold
            assert proof.target > 0 and math.isfinite(proof.time)
            assert np.all(np.isfinite(cert.t)) and np.all(cert.bound[1:] <= cert.bound[0])
        else:
            assert cert.reason is not None
    # at a huge radius the proven target underflows: it is no target, not 0
    c = prove_details(_linear_ce(0)).constants
    far = rho_at_ce(c, 1e6, 0.5)
    assert far.rho > 0 and far.target_min == math.inf


def test_an_exact_fit_is_handled():
    net = TwoLayer(2, 8, generator=torch.Generator().manual_seed(0))
    x = torch.rand(4, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        y = net(x)
    proof = prove_details(rf.Problem(rf.Model(net), rf.Dataset.from_arrays(x, y), "square"))
    assert proof.constants.loss0_lo == 0.0 and proof.constants.loss0 < 1e-25
    assert proof.certificate.status in (CertificateStatus.HOLDS, CertificateStatus.UNAVAILABLE)


def test_a_proven_certificate_does_not_say_it_was_checked_at_records():
    g = torch.Generator().manual_seed(0)
    data = rf.Dataset.from_arrays(torch.randn(3, 4, generator=g, dtype=torch.float64),
                                  torch.randn(3, 1, generator=g, dtype=torch.float64))
    cert = rf.prove(rf.Problem(rf.Model(nn.Linear(4, 1).double()), data, "square"))
    assert cert.holds
    line = cert.describe()
    assert "a-priori argument for the exact flow" in line and "records" not in line


def test_logistic_note_says_equal_when_the_bounds_are_equal():
    from rayleighflow.experiments.logistic import _tighter

    assert _tighter(1.0000001, "the classical one") == \
        "equal to the classical one (ratio 1)"
    assert _tighter(2.5, "it") == "2.5× tighter than it"
    assert _tighter(0.5, "it") == "0.5× looser than it"
    assert "no value" in _tighter(None, "it")


def test_sum_convention_constant_with_unequal_weights_is_valid_not_sharp():
    w = torch.tensor([0.1, 0.2, 0.7], dtype=torch.float64)
    fkl = rf.SoftmaxCrossEntropy().functional_kl(w, rf.Convention.SUM, n_classes=3)
    assert "not sharp" in fkl.reason
    uniform = rf.SoftmaxCrossEntropy().functional_kl(torch.full((3,), 1 / 3), rf.Convention.SUM,
                                                     n_classes=3)
    assert "not sharp" not in uniform.reason
    # valid: φ′(L)‖∇ℓ‖² ≥ c on random logits (φ′ = (1 − e^(−L))^(−2) for cross-entropy)
    g = torch.Generator().manual_seed(0)
    loss = rf.SoftmaxCrossEntropy()
    omega = 3 * w
    for _ in range(200):
        f = 4 * torch.randn(3, 3, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (3,), generator=g)
        L = float((omega * loss.per_sample(f, y)).sum())
        gsq = float((omega * (loss.functional_grad(f, y) ** 2).sum(-1)).sum())
        assert gsq / (1 - math.exp(-L)) ** 2 >= fkl.c * (1 - 1e-12)
