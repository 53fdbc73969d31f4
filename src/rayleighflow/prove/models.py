"""The model-specific part of a proof: the Jacobian J₀ at θ₀ as a float64 matrix with a
rigorous entrywise error bound, the outputs f_{θ₀}(x_j) as balls, and a Lipschitz constant of
θ ↦ J_θ around θ₀, for the model classes whose constants are known in closed form.

Everything is in the L²(D) geometry of the problem's convention: row (j, c) of J is
√ω_j ∂f_c(x_j)/∂θ, so ‖J v‖ = ‖J_θ v‖_D, ‖Jᵀ g̃‖ = ‖J_θ* g‖ with g̃_j = √ω_j g_j, and the
singular values of J are the square roots of the eigenvalues of the tangent kernel K.

**Two-layer network** F(x) = m^{-1/2} Σ_i a_i σ(w_i·x + b_i) (a_i ∈ R^k, TwoLayer). Write x̃
for x with a 1 appended when the bias is trained (x alone otherwise), δ = (ΔW̃, Δa) a parameter
step and v = (Ṽ, α) a direction. The Jacobian difference at one input splits into three terms
(A. = the a of θ₀):

    (J_θ(x) − J_θ₀(x))v = m^{-1/2} Σ_i [α_i(σ(z_i′) − σ(z_i)) + Δa_i σ′(z_i′) ũ_i
                                        + a_i(σ′(z_i′) − σ′(z_i)) ũ_i],   ũ_i = ṽ_i·x̃,

and |σ(z′) − σ(z)| ≤ sup|σ′|·|Δz_i|, |σ′(z′) − σ′(z)| ≤ sup|σ″|·|Δz_i|, |Δz_i| ≤ ‖Δw̃_i‖‖x̃‖,
Cauchy–Schwarz over i and over (δ, v) give

    ‖J_θ(x) − J_θ₀(x)‖₂ ≤ m^{-1/2} (sup|σ′|·‖x̃‖·[both layers trained]
                                    + sup|σ″|·max_i‖a_i⁰‖·‖x̃‖²) · ‖θ − θ₀‖,

and over the data ‖J_θ − J_θ₀‖ ≤ Lip_J ‖θ − θ₀‖ with Lip_J² = (1/m) Σ_j ω_j c_j², c_j the
bracket at x_j. A frozen hidden layer makes F linear in θ (Lip_J = 0).

**Linear model** f(x) = W x (+ b): J does not depend on θ, Lip_J = 0 exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..activations import ACTIVATIONS, module_activation
from ..data import Dataset
from ..problem import Problem
from ._arb import U, arb, down, gamma, up
from .activations import get_activation
from .identity import UnsupportedModel, check_structure

__all__ = ["ModelBounds", "model_bounds", "UnsupportedModel"]


@dataclass
class ModelBounds:
    kind: str
    jhat: np.ndarray             # (nk, P) float64, rows weighted by √ω_j
    jerr: np.ndarray             # (nk, P) entrywise |J − Ĵ| upper bounds
    outputs: list[arb]           # f_θ₀(x_j)_c as balls, row order (j, c) of jhat
    lip_j: arb                   # ‖J_θ − J_θ₀‖ ≤ lip_j ‖θ − θ₀‖ on all of R^P
    lip_j_how: str
    activation: str | None = None
    width: int | None = None
    notes: list[str] = field(default_factory=list)
    constants: list[tuple[str, float, str]] = field(default_factory=list)
    used: tuple[str, ...] = ()   # the trained tensors that are terms of the proof's function
    r_cap: float = math.inf       # the proof's function is torch's on balls of radius < r_cap


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def _split(b: arb) -> tuple[float, float]:
    """(nearest float to the ball's midpoint, an upper bound on |x − that float| over the ball)."""
    m = float(b.mid())
    return m, up(abs(b - arb(m)))


def _param(problem: Problem, name: str) -> tuple[np.ndarray, bool]:
    if name in problem.params:
        return _np(problem.params[name]), True
    buffers = problem.model.buffers if problem.model.module is not None else {}
    if name in buffers:
        return _np(buffers[name]), False
    raise UnsupportedModel(f"parameter {name!r} not found")


def _weights(problem: Problem, data: Dataset) -> list[arb]:
    omega = _np(problem.omega(data))
    return [arb(float(w)) for w in omega]


def model_bounds(problem: Problem, data: Dataset) -> ModelBounds:
    """Dispatch on the module's exact type: TwoLayer (theorems.two_layer), a bare nn.Linear or
    nn.Sequential(Linear, activation, Linear). Subclasses are refused: their ``forward`` may
    compute another function (prove/identity.py checks the rest)."""
    from ..theorems.two_layer import TwoLayer

    module = problem.model.module
    if data.x.dim() != 2:
        raise UnsupportedModel("inputs must be (n, d) vectors")
    if module is None:
        raise UnsupportedModel("a parameter function f(params, x) has no structure to read: "
                               "proofs need an nn.Module of a supported type")
    check_structure(module)
    if type(module) is TwoLayer:
        return _two_layer(problem, data, _twolayer_spec(module))
    if type(module) is nn.Linear:
        return _linear(problem, data, module)
    if type(module) is nn.Sequential:
        named = [(n, c) for n, c in module.named_children() if not _is_flatten(c)]
        if len(named) == 1 and type(named[0][1]) is nn.Linear:
            return _linear(problem, data, named[0][1], prefix=named[0][0] + ".")
        if len(named) == 3 and type(named[0][1]) is nn.Linear \
                and type(named[2][1]) is nn.Linear:
            act, threshold = _activation_name(named[1][1])
            h, o = named[0][0], named[2][0]
            return _two_layer(problem, data, _Spec(
                f"{h}.weight", f"{h}.bias" if named[0][1].bias is not None else None,
                f"{o}.weight", f"{o}.bias" if named[2][1].bias is not None else None, act,
                False, threshold))
        layout = ", ".join(type(c).__name__ for _, c in module.named_children())
        raise UnsupportedModel(
            f"nn.Sequential({layout}) is not a supported layout: proofs cover exactly "
            "Sequential(Linear) and Sequential(Linear, activation, Linear) (an nn.Flatten "
            "allowed); deeper networks are not proven yet")
    parent = next((b.__name__ for b in (TwoLayer, nn.Linear, nn.Sequential)
                   if isinstance(module, b)), None)
    if parent is not None:
        raise UnsupportedModel(f"{type(module).__name__} is a subclass of {parent}: its forward "
                               f"may compute another function, so the proof, which reads the "
                               f"structure, does not apply; use {parent} itself")
    raise UnsupportedModel(
        f"no closed-form Lipschitz constant of the Jacobian for {type(module).__name__}: proofs "
        "cover two-layer networks (rayleighflow.theorems.two_layer.TwoLayer, or "
        "nn.Sequential(Linear, activation, Linear); tanh, softplus, sigmoid, GELU) and linear "
        "models (nn.Linear), by exact type (a subclass may compute another function); deeper "
        "networks are not proven yet")


def _is_flatten(mod: nn.Module) -> bool:
    # on (n, d) inputs Flatten(1, -1) is the identity
    return type(mod) is nn.Flatten and mod.start_dim == 1 and mod.end_dim == -1


def _twolayer_spec(module) -> _Spec:
    if type(module.hidden) is not nn.Linear or type(module.out) is not nn.Linear:
        raise UnsupportedModel(f"TwoLayer's layers are {type(module.hidden).__name__} and "
                               f"{type(module.out).__name__}: the proof covers nn.Linear ones")
    if module.out.bias is not None:
        raise UnsupportedModel("TwoLayer's output layer has a bias (out.bias), which "
                               "TwoLayer.forward scales by m^(-1/2) with the rest: the proof's "
                               "function m^(-1/2) Σ a_i σ(w_i·x + b_i) has none")
    if module.width != module.hidden.out_features:
        raise UnsupportedModel(f"TwoLayer.width = {module.width} but the hidden layer has "
                               f"{module.hidden.out_features} units: forward divides by "
                               "√width, the proof by √m")
    entry = ACTIVATIONS.get(module.activation)
    fn = None if entry is None else entry.function
    if fn is not _torch_function(module.activation):
        raise UnsupportedModel(f"TwoLayer's activation {module.activation!r} is not torch's "
                               "function of that name (the table was changed)")
    # nn.functional.softplus's defaults: beta = 1, threshold = 20
    threshold = 20.0 if module.activation == "softplus" else None
    return _Spec("hidden.weight", "hidden.bias", "out.weight", None, module.activation, True,
                 threshold)


@dataclass(frozen=True)
class _Spec:
    """Where a two-layer network keeps its tensors; ``ntk_scale``: the m^{-1/2} of TwoLayer."""

    w: str
    b: str | None
    a: str
    a_bias: str | None
    activation: str
    ntk_scale: bool
    threshold: float | None = None   # softplus: torch returns z where z > threshold


def _torch_function(name: str) -> object:
    """torch's function called ``name`` (torch.NAME, else nn.functional.NAME): what the registry's
    entry must be for a proof of TwoLayer to be about the function it computes."""
    return getattr(torch, name, None) or getattr(nn.functional, name, None)


def _activation_name(mod: nn.Module) -> tuple[str, float | None]:
    """The proof's name for an activation module of an exact supported type, and the softplus
    threshold (None for the others)."""
    kind = type(mod)
    entry = module_activation(kind)   # exact type: a subclass is no entry
    if entry is not None and entry.proven:
        if kind is nn.GELU:
            if mod.approximate == "none":
                return "gelu", None
            raise UnsupportedModel(f"GELU(approximate={mod.approximate!r}) has no proven "
                                   "sup|σ″| (the exact erf form, approximate='none', has)")
        if kind is nn.Softplus:
            if mod.beta != 1:
                raise UnsupportedModel(f"Softplus(beta={mod.beta}) is not covered (beta = 1 is)")
            return "softplus", float(mod.threshold)
        return entry.name, None
    parent = next((s.module.__name__ for s in ACTIVATIONS.values()
                   if s.proven and isinstance(mod, s.module)), None)
    if parent is not None:
        raise UnsupportedModel(f"activation {kind.__name__} is a subclass of nn.{parent}: its "
                               "forward may compute another function; use nn."
                               f"{parent} itself")
    raise UnsupportedModel(f"activation {kind.__name__} has no proven sup|σ″| (supported, by "
                           "exact type: Tanh, Sigmoid, GELU (exact), Softplus (beta = 1))")


def _two_layer(problem: Problem, data: Dataset, spec: _Spec) -> ModelBounds:
    try:
        act = get_activation(spec.activation)
    except ValueError as exc:
        raise UnsupportedModel(str(exc)) from None
    W, train_w = _param(problem, spec.w)
    if spec.b is not None:
        b, train_b = _param(problem, spec.b)
    else:
        b, train_b = np.zeros(W.shape[0]), False
    A, train_a = _param(problem, spec.a)   # (k, m)
    if spec.a_bias is not None:
        beta, train_beta = _param(problem, spec.a_bias)
    else:
        beta, train_beta = np.zeros(A.shape[0]), False
    X = _np(data.x)
    n, d = X.shape
    k, m = A.shape
    omega = _weights(problem, data)
    if train_b and not train_w:
        raise UnsupportedModel("a trained bias with a frozen hidden weight is not covered")
    # z = W x + b as balls: float product with Higham's bound γ_{d+1}(|W||x| + |b|)
    zhat = X @ W.T + b
    zerr = (np.abs(X) @ np.abs(W).T + np.abs(b)) * gamma(d + 2) * (1 + 8 * U)
    if not (np.isfinite(zhat).all() and np.isfinite(zerr).all()):
        raise UnsupportedModel("non-finite pre-activations at θ₀")
    inv_sqrt_m = 1 / arb(m).sqrt() if spec.ntk_scale else arb(1)
    scale = [(w.sqrt() * inv_sqrt_m) for w in omega]             # √(ω_j/m)
    q_hat = np.empty((n, m))           # √(ω_j/m) σ′(z_ji)
    q_err = np.empty((n, m))
    p_hat = np.empty((n, m))           # √(ω_j/m) σ(z_ji)
    p_err = np.empty((n, m))
    resid: list[arb] = []
    for j in range(n):
        sj = scale[j]
        f = [arb(0)] * k
        for i in range(m):
            z = arb(float(zhat[j, i]), float(zerr[j, i]))
            s = act.value(z)
            p_hat[j, i], p_err[j, i] = _split(sj * s)
            q_hat[j, i], q_err[j, i] = _split(sj * act.deriv(z))
            for c in range(k):
                f[c] += arb(float(A[c, i])) * s
        for c in range(k):
            resid.append(f[c] * inv_sqrt_m + arb(float(beta[c])))
    xt = np.concatenate([X, np.ones((n, 1))], axis=1) if train_b else X
    blocks, errs = [], []
    g2 = gamma(2) / (1 - gamma(2)) * (1 + 4 * U)
    for c in range(k):
        rows, rerr = [], []
        if train_w:
            # ∂f_c/∂w̃_i = √(ω_j/m) a_ci σ′(z_ji) x̃_j  (row-major (i, input))
            jh = (A[c][None, :] * q_hat)[:, :, None] * xt[:, None, :]
            je = np.abs(A[c])[None, :, None] * np.abs(xt)[:, None, :] * q_err[:, :, None] \
                + g2 * np.abs(jh)
            rows.append(jh.reshape(n, -1))
            rerr.append(je.reshape(n, -1))
        if train_a:
            # ∂f_c/∂a_{c'i} = δ_{cc'} √(ω_j/m) σ(z_ji)
            oh = np.zeros((n, k, m))
            oe = np.zeros((n, k, m))
            oh[:, c, :] = p_hat
            oe[:, c, :] = p_err
            rows.append(oh.reshape(n, -1))
            rerr.append(oe.reshape(n, -1))
        if train_beta:
            # ∂f_c/∂β_c' = δ_{cc'} √ω_j
            bh = np.zeros((n, k))
            be = np.zeros((n, k))
            for j in range(n):
                bh[j, c], be[j, c] = _split(omega[j].sqrt())
            rows.append(bh)
            rerr.append(be)
        blocks.append(np.concatenate(rows, axis=1))
        errs.append(np.concatenate(rerr, axis=1))
    # rows ordered (j, c) like resid
    jhat = np.stack(blocks, axis=1).reshape(n * k, -1)
    jerr = np.stack(errs, axis=1).reshape(n * k, -1) * (1 + 16 * U)
    # Lip_J
    a_inf = max((sum((arb(float(v)) ** 2 for v in A[:, i]), arb(0))).sqrt() for i in range(m))
    a_inf_f = up(a_inf)
    if not train_w:
        lip = arb(0)
        how = "0: the hidden layer is frozen, so f is linear in the trained θ"
    else:
        tot = arb(0)
        for j in range(n):
            xn = sum((arb(float(v)) ** 2 for v in xt[j]), arb(0)).sqrt()
            cj = act.d2 * arb(a_inf_f) * xn * xn + (act.d1 * xn if train_a else arb(0))
            tot += omega[j] * cj * cj
        lip = tot.sqrt() * inv_sqrt_m
        how = (f"{'m^(-1/2)·' if spec.ntk_scale else ''}(Σ_j ω_j c_j²)^(1/2), c_j = sup|σ′|·‖x̃_j‖"
               f"{'' if train_a else ' (dropped: output layer frozen)'} + sup|σ″|·max_i‖a_i⁰‖·"
               f"‖x̃_j‖², in ball arithmetic; three-term split of J_θ − J_θ₀ (prove/models.py)")
    mb = ModelBounds(
        kind=f"two-layer {act.name} network, m = {m}"
             + ("" if spec.ntk_scale else " (no m^(-1/2) scaling)"),
        jhat=jhat, jerr=jerr, outputs=resid, lip_j=lip, lip_j_how=how, activation=act.name, width=m)
    mb.constants += [
        ("sup|σ′|", up(act.d1), act.how_d1),
        ("sup|σ″|", up(act.d2), act.how_d2),
        ("max_i ‖a_i⁰‖", a_inf_f, "column norms of the output weight at θ₀, ball arithmetic"),
    ]
    trained = [nm for nm, t in ((spec.w, train_w), (spec.b, train_b), (spec.a, train_a),
                                (spec.a_bias, train_beta)) if t]
    mb.notes.append(f"trained: {', '.join(trained)}; pre-activations z = Wx + b as balls "
                    f"(float64 with |error| ≤ γ_(d+2)(|W||x| + |b|), max {float(zerr.max()):.2g}),"
                    f" σ(z) and σ′(z) in arb at {106} bits")
    mb.used = tuple(trained)
    if spec.threshold is not None:
        mb.r_cap, note = _softplus_cap(spec.threshold, zhat, zerr, xt, train_w)
        mb.notes.append(note)
    return mb


def _softplus_cap(threshold: float, zhat: np.ndarray, zerr: np.ndarray, xt: np.ndarray,
                  train_w: bool) -> tuple[float, str]:
    """torch's softplus is log(1 + eᶻ) where z ≤ threshold and z itself above (a jump of
    log(1 + e^(−threshold)), not C² there): the proof is about torch's function on the balls
    where no pre-activation reaches the threshold, |Δz_ji| ≤ ‖θ − θ₀‖·‖x̃_j‖."""
    z_hi = up(arb(float((zhat + zerr).max())))
    if not z_hi < threshold:
        raise UnsupportedModel(
            f"torch's Softplus(threshold={threshold:g}) returns z itself where z > "
            f"{threshold:g}, and a pre-activation at θ₀ reaches {z_hi:.4g}: there the function "
            "is not log(1 + eᶻ) (and jumps at the switch); raise the threshold (e.g. 20, the "
            "default) or scale the inputs")
    if not train_w:
        return math.inf, (f"torch's softplus switches to z above threshold = {threshold:g}; the "
                          f"pre-activations are ≤ {z_hi:.4g} and fixed (hidden layer frozen)")
    x_hi = up(max((sum((arb(float(v)) ** 2 for v in row), arb(0))).sqrt() for row in xt))
    cap = down((arb(threshold) - arb(z_hi)) / arb(x_hi))
    return cap, (f"torch's softplus switches to z above threshold = {threshold:g}; the "
                 f"pre-activations at θ₀ are ≤ {z_hi:.4g} and move by ≤ ‖x̃‖·r ≤ {x_hi:.4g}·r, "
                 f"so every ball used has r < {cap:.4g}, where torch's function is log(1 + eᶻ)")


def _linear(problem: Problem, data: Dataset, lin: nn.Linear, prefix: str = "") -> ModelBounds:
    W, train_w = _param(problem, prefix + "weight")
    if lin.bias is not None:
        b, train_b = _param(problem, prefix + "bias")
    else:
        b, train_b = np.zeros(W.shape[0]), False
    X = _np(data.x)
    n, d = X.shape
    k = W.shape[0]
    omega = _weights(problem, data)
    if not (train_w or train_b):
        raise UnsupportedModel("nothing trained")
    sq = [w.sqrt() for w in omega]
    cols = []
    if train_w:
        cols.append(X)
    if train_b:
        cols.append(np.ones((n, 1)))
    xt = np.concatenate(cols, axis=1)                 # (n, q): features per output
    q = xt.shape[1]
    s_hat = np.empty(n)
    s_err = np.empty(n)
    for j in range(n):
        s_hat[j], s_err[j] = _split(sq[j])
    jhat = np.zeros((n, k, k, q))
    jerr = np.zeros((n, k, k, q))
    for c in range(k):
        jhat[:, c, c, :] = s_hat[:, None] * xt
        jerr[:, c, c, :] = (np.abs(xt) * s_err[:, None] + U * np.abs(s_hat[:, None] * xt)) \
            * (1 + 4 * U)
    resid = []
    for j in range(n):
        for c in range(k):
            f = sum((arb(float(W[c, t])) * arb(float(X[j, t])) for t in range(d)), arb(0)) \
                + arb(float(b[c]))
            resid.append(f)
    mb = ModelBounds(kind=f"linear model, {k} output(s), {d} input(s)",
                     jhat=jhat.reshape(n * k, k * q), jerr=jerr.reshape(n * k, k * q),
                     outputs=resid, lip_j=arb(0),
                     lip_j_how="0 exactly: f is linear in θ, so J does not depend on θ")
    mb.notes.append("linear model: J_θ = J₀ for every θ, so the only approximations are the "
                    "rounding errors bounded below")
    mb.used = tuple(nm for nm, t in ((prefix + "weight", train_w), (prefix + "bias", train_b))
                    if t)
    return mb
