"""Identity before proof: the function a proof reasons about must be the one torch evaluates.

``rf.prove`` reads the function from the module's structure (prove/models.py). A structure
can look like a supported one and compute something else: a subclass with its own
``forward``, a hook, a tied weight, an extra trained tensor the proof leaves out. Two layers of
checks refuse those, each with the reason:

* structural (before any constant is computed): no forward/backward hooks anywhere in the
  module tree nor global ones, no tied parameters, no compiled or scripted wrapper;
* numerical (after the ball-arithmetic f₀ and L₀ are known): P equals the number of trained
  values, every trained tensor is a term of the proof's function, and torch's own f₀ and L₀,
  evaluated in float64 through ``functional_call`` (so hooks and overridden ``forward``s run),
  lie in the proof's enclosures widened by a stated slack for torch's own rounding.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..data import Dataset
from ..problem import Problem
from ._arb import arb, down, up

__all__ = ["check_structure", "check_identity", "ROUNDING_SLACK", "UnsupportedModel"]

# torch's float64 f₀ is compared with the proof's ball widened by this relative slack
# (times 1 + max|f₀|): far above float64 rounding of the small sums proofs handle, far below
# any change of the function the structural checks could miss.
ROUNDING_SLACK = 1e-9

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


class UnsupportedModel(ValueError):
    """The model is outside the classes whose constants are known, or is not the function its
    structure describes: refused with the reason."""


def _unsupported(text: str) -> Exception:
    return UnsupportedModel(text)


def check_structure(module: nn.Module) -> None:
    """Refuse wrappers, hooks and tied parameters (raises UnsupportedModel with the reason)."""
    if hasattr(module, "_orig_mod"):
        raise _unsupported(f"the model is a torch.compile wrapper ({type(module).__name__}): "
                           "its compiled graph is not read by the proof; pass the original "
                           "module (model._orig_mod)")
    if isinstance(module, torch.jit.ScriptModule):
        raise _unsupported(f"the model is a TorchScript module ({type(module).__name__}): its "
                           "code is not read by the proof; pass the original nn.Module")
    mm = nn.modules.module
    for name in _GLOBAL_HOOKS:
        if getattr(mm, name, None):
            raise _unsupported(f"a global module hook is registered (torch.nn.modules.module."
                               f"{name}): it can change what every module computes; remove it "
                               "before proving")
    for path, sub in module.named_modules():
        for name in _HOOKS:
            hooks = getattr(sub, name, None)
            if hooks:
                where = path or "the root module"
                raise _unsupported(f"{where} ({type(sub).__name__}) has {len(hooks)} "
                                   f"{name.strip('_').replace('_', ' ')}: a hook can change "
                                   "the output or the gradient, and the proof reads only the "
                                   "module's structure; remove it (handle.remove()) before "
                                   "proving")
    seen: dict[int, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            raise _unsupported(f"parameters {seen[id(p)]!r} and {name!r} are one tensor (tied "
                               "weights): the proof treats every layer's weight as its own "
                               "coordinates")
        seen[id(p)] = name


def check_identity(problem: Problem, data: Dataset, used: tuple[str, ...], P: int,
                   outputs: list[arb], loss0: arb) -> str:
    """Compare the proof's function with torch's at θ₀; return the note that says so.

    ``used``: the trained tensors the proof's function contains; ``P``: its column count;
    ``outputs``: f₀(x_j)_c as balls (row order (j, c)); ``loss0``: L₀ as a ball.
    """
    params = problem.params
    missing = [k for k in params if k not in used]
    if missing:
        raise _unsupported(f"the model trains {', '.join(missing)}, which the proof's function "
                           f"does not contain: the proof would be about another function "
                           f"(P = {P} in the proof, {problem.model.n_params} trained values)")
    if P != problem.model.n_params:
        raise _unsupported(f"the proof's function has P = {P} parameters, the model trains "
                           f"{problem.model.n_params}")
    f_t, loss_t = _torch_f0_l0(problem, data)
    scale = 1 + max((abs(float(b.mid())) for b in outputs), default=0.0)
    tol = ROUNDING_SLACK * scale
    # L₀: the slack on f₀ carried through the loss (first order: ‖∇ℓ‖_D·‖δf‖_D; second order:
    # both Hessians ≤ 1) plus a relative 1e-12 for the loss's own float64 sum
    w_sum = float(problem.omega(data).double().sum())
    k = len(outputs) // data.n
    # (a slack, not a proven constant: float sqrt of the upper end is enough)
    s0 = math.sqrt(2 * max(up(loss0), 0.0)) if problem.loss.name == "square" else \
        math.sqrt(2 * w_sum)
    l_tol = s0 * tol * math.sqrt(k * w_sum) + w_sum * k * tol * tol + 1e-12 * abs(loss_t)
    lo, hi = down(loss0), up(loss0)
    if not lo - l_tol <= loss_t <= hi + l_tol:
        raise _unsupported(f"torch's L₀ = {loss_t:.6g} is outside the proof's enclosure "
                           f"[{lo:.6g}, {hi:.6g}] (slack {l_tol:.2g} for torch's float64 "
                           "rounding): the module does not compute the function its structure "
                           "describes")
    for i, (ball, v) in enumerate(zip(outputs, f_t.tolist(), strict=True)):
        lo, hi = down(ball), up(ball)
        if not lo - tol <= v <= hi + tol:
            raise _unsupported(
                f"torch's f₀(x_{i // k})_{i % k} = {v:.10g} is outside the proof's enclosure "
                f"[{lo:.10g}, {hi:.10g}] (slack {tol:.2g} for torch's float64 rounding): the "
                "module does not compute the function its structure describes")
    return (f"identity checked: torch's own f₀ and L₀ (float64, through functional_call) lie in "
            f"the proof's enclosures (slack {tol:.2g} on f₀; L₀ = {loss_t:.6g}); P = {P} = the "
            "trained values")


def _torch_f0_l0(problem: Problem, data: Dataset) -> tuple[torch.Tensor, float]:
    # the proof's own weights (the problem's, as held in its dtype)
    f, loss = problem.evaluate_float64(problem.params, data, problem.omega(data))
    return f.detach().reshape(-1), float(loss.detach())
