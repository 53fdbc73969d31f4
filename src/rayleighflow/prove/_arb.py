"""Outward-rounded helpers: arb balls (python-flint) to floats rounded the safe way, the
a-posteriori rounding-error bound of a float64 Gram product, and rigorous eigenvalue bounds of a
symmetric float64 matrix by an LDLᵀ factorization in ball arithmetic.

Sources of the inequalities used here:

* a float64 inner product of length p (any summation order, with or without FMA) satisfies
  |fl(xᵀy) − xᵀy| ≤ γ_p |x|ᵀ|y|, γ_p = p·u/(1 − p·u), u = 2⁻⁵³ (Higham, *Accuracy and Stability
  of Numerical Algorithms*, 2nd ed., §3.1, eq. (3.5));
* Weyl: |λ_i(A + E) − λ_i(A)| ≤ ‖E‖₂ ≤ ‖E‖_F for symmetric A, E, and
  |σ_i(A + E) − σ_i(A)| ≤ ‖E‖₂ for singular values (Horn & Johnson, Cor. 4.3.15, 7.3.5);
* a symmetric matrix is positive definite iff every pivot of its LDLᵀ factorization (without
  pivoting) is positive; in ball arithmetic a pivot whose ball lies in (0, ∞) is positive for
  every matrix in the ball, the exact one included.
"""

from __future__ import annotations

import math

import numpy as np

from .._optional import guard

# Every proof is built on these balls: importing rayleighflow.prove without python-flint is the
# one error naming the extra (``import rayleighflow`` never imports this package).
with guard("prove", "rf.prove (proof-grade certificates)"):
    from flint import arb, ctx

__all__ = ["arb", "up", "down", "U", "gamma", "gram_bounds", "norm_up", "ball", "sqrt_nonneg"]

ctx.prec = 106  # double-double working precision for the scalar constants

U = 2.0 ** -53  # unit roundoff of float64 (round to nearest)


def up(x: arb | float | int) -> float:
    """The smallest float ≥ every point of the ball ``x`` (raises on a non-finite ball)."""
    x = arb(x)
    if not x.is_finite():
        raise ArithmeticError(f"non-finite ball {x}")
    hi = x.upper()
    f = float(hi.mid())
    while arb(f) < hi:
        f = math.nextafter(f, math.inf)
    return f


def sqrt_nonneg(x: arb) -> arb:
    """√x for a ball that encloses a quantity known to be ≥ 0 (a sum of squares): a ball whose
    lower end dips below 0 by rounding (an exact fit, L₀ = 0) gets the ball [0, √upper]
    instead of NaN."""
    if x > 0:
        return x.sqrt()
    hi = arb(up(x)).sqrt()
    return ball(0.0, up(hi))


def down(x: arb | float | int) -> float:
    """The largest float ≤ every point of the ball ``x``."""
    return -up(-arb(x))


def ball(lo: float, hi: float) -> arb:
    """The ball containing [lo, hi] (floats, exact)."""
    return arb(lo).union(arb(hi))


def gamma(p: int) -> float:
    """γ_p = p·u/(1 − p·u), rounded up (Higham §3.1)."""
    return up(arb(p) * U / (1 - arb(p) * U))


def norm_up(a: np.ndarray) -> float:
    """An upper bound on the Euclidean (Frobenius) norm of a float array: the float sum of
    squares of p terms is within γ_p of the exact one (all terms ≥ 0), then √ rounded up."""
    a = np.abs(np.asarray(a, dtype=np.float64)).ravel()
    if not a.size:
        return 0.0
    s = float(np.dot(a, a))
    if not math.isfinite(s):
        raise ArithmeticError("non-finite norm")
    return up((arb(s) * (1 + arb(gamma(a.size)))).sqrt() * (1 + arb(U)))


def _pd(mat: np.ndarray, shift: float, sign: int) -> bool:
    """Whether sign·(mat − shift·I) is positive definite for the exact float matrix ``mat``,
    decided by Gaussian elimination (symmetric: the pivots of LDLᵀ) in ball arithmetic; False
    when a pivot is not provably positive."""
    n = mat.shape[0]
    a = [[arb(float(mat[i, j])) * sign for j in range(n)] for i in range(n)]
    for i in range(n):
        a[i][i] = a[i][i] - sign * arb(shift)
    for k in range(n):
        piv = a[k][k]
        if not piv > 0:
            return False
        row = a[k]
        for i in range(k + 1, n):
            lik = a[i][k] / piv
            ai = a[i]
            for j in range(k + 1, n):
                ai[j] = ai[j] - lik * row[j]
    return True


def sym_eig_bounds(mat: np.ndarray) -> tuple[float, float]:
    """Rigorous (λ_min lower, λ_max upper) of a symmetric float64 matrix (exact as given).

    Float eigenvalues give candidates; each is moved outward until an LDLᵀ in ball arithmetic
    proves mat − lo·I ≻ 0 and hi·I − mat ≻ 0. The lower bound is never above the true λ_min.
    """
    mat = np.asarray(mat, dtype=np.float64)
    ev = np.linalg.eigvalsh(mat)
    scale = max(float(np.max(np.abs(ev))), 1e-300)
    lo, hi = float(ev[0]), float(ev[-1])
    step = 1e-12 * scale
    for _ in range(60):
        if _pd(mat, lo - step, 1):
            lo = lo - step
            break
        step *= 4
    else:
        lo = -math.inf
    step = 1e-12 * scale
    for _ in range(60):
        if _pd(mat, hi + step, -1):
            hi = hi + step
            break
        step *= 4
    else:
        hi = math.inf
    return lo, hi


def gram_bounds(jhat: np.ndarray, err: np.ndarray) -> dict[str, float]:
    """Bounds on the singular values of an exact matrix J with |J − Ĵ| ≤ err entrywise.

    Ĝ = fl(Ĵ Ĵᵀ) (or fl(ĴᵀĴ), the smaller side) in float64; |Ĝ − ĴĴᵀ| ≤ γ_p·|Ĵ||Ĵ|ᵀ entrywise
    (Higham 3.5), itself computed in float64 and inflated by 1/(1 − γ_p); then Weyl twice:
    λ(ĴĴᵀ) within ‖Δ‖_F of λ(Ĝ), σ(J) within ‖err‖_F of σ(Ĵ). Returns ``norm_up`` (‖J‖₂ upper),
    ``smin_lo`` (σ_min lower, 0 when J has more rows than columns or when undecided),
    ``e_j`` (‖J − Ĵ‖_F upper), ``gram_err`` (‖Δ‖_F upper), ``lam_min_lo``, ``lam_max_up``.
    """
    rows, cols = jhat.shape
    a = jhat if rows <= cols else jhat.T
    p = a.shape[1]
    g = a @ a.T
    h = np.abs(a) @ np.abs(a).T
    gp = gamma(p)
    delta = norm_up(h) * up(arb(gp) / (1 - arb(gp)) / (1 - arb(gp)))
    # mirror the lower triangle (an exact operation): every entry stays within γ_p·h of
    # the exact Gram entry, and the matrix handed to the eigenvalue bounds is symmetric
    g = np.tril(g) + np.tril(g, -1).T
    lmin, lmax = sym_eig_bounds(g)
    e_j = norm_up(err)
    lam_max_up = up(arb(lmax) + arb(delta))
    norm_j = up(arb(lam_max_up).sqrt() + arb(e_j))
    smin = 0.0
    if rows <= cols:
        lam_lo = arb(lmin) - arb(delta)
        if lam_lo > 0:
            smin = max(0.0, down(lam_lo.sqrt() - arb(e_j)))
    return {"norm_up": norm_j, "smin_lo": smin, "e_j": e_j, "gram_err": delta,
            "lam_min_lo": down(arb(lmin) - arb(delta)), "lam_max_up": lam_max_up}
