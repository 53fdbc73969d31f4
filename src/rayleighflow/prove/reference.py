"""An independent slow reference in mpmath (50 digits) that re-derives a two-layer proof's
constants at small size: the Jacobian from mpmath's own σ and a numerical derivative
(mp.diff, not the closed forms of prove/activations.py), the Gram spectrum by mp.eigsy, the
residual, ‖J₀*g₀‖, L₀, Lip_J from its formula, and sup|σ′|, sup|σ″| by locating the critical
points numerically. Values here are accurate to ~40 digits (not bounds): the implementation's
upper bounds must be ≥ them and its lower bounds ≤ them.
"""

from __future__ import annotations

from typing import Any

from .._optional import guard
from ..activations import ACTIVATIONS
from ..data import Dataset
from ..problem import Problem

__all__ = ["reference_constants"]

with guard("prove", "the proofs' mpmath reference (rayleighflow.prove.reference)"):
    import mpmath as mp

def _sigma(name: str):
    """σ in mpmath, from the activation registry's reference form."""
    ref = ACTIVATIONS[name].reference
    return lambda z: ref(mp, z)


def _sup_abs(fn, lo=-12, hi=12, n=2401) -> Any:
    """max |fn| on [lo, hi] by a grid then golden-section refinement around the best point
    (the tails beyond ±12 are smaller for every activation here)."""
    xs = [mp.mpf(lo) + (hi - lo) * mp.mpf(i) / (n - 1) for i in range(n)]
    vals = [abs(fn(x)) for x in xs]
    i = max(range(n), key=lambda k: vals[k])
    a, b = xs[max(i - 1, 0)], xs[min(i + 1, n - 1)]
    gr = (mp.sqrt(5) - 1) / 2
    for _ in range(120):
        c, d = b - gr * (b - a), a + gr * (b - a)
        if abs(fn(c)) > abs(fn(d)):
            b = d
        else:
            a = c
    return max(abs(fn((a + b) / 2)), vals[i])


def reference_constants(problem: Problem, data: Dataset | None = None,
                        dps: int = 50) -> dict[str, Any]:
    net = problem.model.module
    data = problem.data if data is None else data
    with mp.workdps(dps):
        sig = _sigma(net.activation)
        d1 = lambda z: mp.diff(sig, z)                   # noqa: E731
        d2 = lambda z: mp.diff(sig, z, 2)                # noqa: E731
        params = {**problem.model.buffers, **problem.params}
        W = params["hidden.weight"].detach().cpu().double().numpy()
        b = params["hidden.bias"].detach().cpu().double().numpy()
        A = params["out.weight"].detach().cpu().double().numpy()
        train = [n in problem.params for n in ("hidden.weight", "hidden.bias", "out.weight")]
        X = data.x.detach().cpu().double().numpy()
        Y = data.y.detach().cpu().double().numpy().reshape(X.shape[0], -1)
        w = problem.omega(data).detach().cpu().double().numpy()
        n, dim = X.shape
        k, m = A.shape
        rows, resid = [], []
        for j in range(n):
            sw = mp.sqrt(mp.mpf(float(w[j])) / m)
            z = [mp.fsum(mp.mpf(float(W[i, c])) * mp.mpf(float(X[j, c])) for c in range(dim))
                 + mp.mpf(float(b[i])) for i in range(m)]
            s = [sig(zi) for zi in z]
            ds = [d1(zi) for zi in z]
            for c in range(k):
                row = []
                if train[0]:
                    for i in range(m):
                        row += [sw * mp.mpf(float(A[c, i])) * ds[i] * mp.mpf(float(X[j, t]))
                                for t in range(dim)]
                if train[1]:
                    row += [sw * mp.mpf(float(A[c, i])) * ds[i] for i in range(m)]
                if train[2]:
                    for cc in range(k):
                        row += [sw * s[i] if cc == c else mp.mpf(0) for i in range(m)]
                rows.append(row)
                f = mp.fsum(mp.mpf(float(A[c, i])) * s[i] for i in range(m)) / mp.sqrt(m)
                resid.append(mp.sqrt(mp.mpf(float(w[j]))) * (f - mp.mpf(float(Y[j, c]))))
        J = mp.matrix(rows)
        nk, P = J.rows, J.cols
        G = J * J.T if nk <= P else J.T * J
        ev, _ = mp.eigsy(G)
        ev = sorted(ev[i] for i in range(ev.rows))
        g = mp.matrix(resid)
        jg = J.T * g
        s0 = mp.sqrt(mp.fsum(x ** 2 for x in resid))
        sup1 = _sup_abs(d1)
        sup2 = _sup_abs(d2)
        ainf = max(mp.sqrt(mp.fsum(mp.mpf(float(A[c, i])) ** 2 for c in range(k)))
                   for i in range(m))
        tot = mp.mpf(0)
        for j in range(n):
            xt = [mp.mpf(float(v)) for v in X[j]] + ([mp.mpf(1)] if train[1] else [])
            xn = mp.sqrt(mp.fsum(v ** 2 for v in xt))
            cj = sup2 * ainf * xn ** 2 + (sup1 * xn if train[2] else 0)
            tot += mp.mpf(float(w[j])) * cj ** 2
        lip = mp.sqrt(tot / m) if train[0] else mp.mpf(0)
        return {
            "norm_j0": float(mp.sqrt(ev[-1])),
            "smin_j0": float(mp.sqrt(max(ev[0], 0))) if nk <= P else 0.0,
            "a0": float(mp.sqrt(mp.fsum(jg[i] ** 2 for i in range(P)))),
            "s0": float(s0), "loss0": float(s0 ** 2 / 2), "lip_j": float(lip),
            "sup_d1": float(sup1), "sup_d2": float(sup2), "ainf": float(ainf),
            "mp": {"norm_j0": mp.sqrt(ev[-1]), "s0": s0, "lip_j": lip, "sup_d1": sup1,
                   "sup_d2": sup2,
                   "smin_j0": mp.sqrt(max(ev[0], 0)) if nk <= P else mp.mpf(0),
                   "a0": mp.sqrt(mp.fsum(jg[i] ** 2 for i in range(P)))},
        }



