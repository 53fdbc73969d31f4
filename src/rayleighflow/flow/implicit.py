"""A stiff integrator for gradient flows: scipy's implicit solvers (LSODA, BDF, Radau) on
θ̇ = −∇L(θ) with the exact Hessian as the Jacobian.

Gradient flows of small networks are stiff near their limits: the Hessian's small eigenvalues
set the slow modes, the large ones cap an explicit step, so Dopri5 or gradient descent need
~1e4–1e8 steps to reach limits an implicit solver reaches in hundreds. The Jacobian of the
right-hand side is −∇²L(θ), computed densely by torch.func (so P is limited, see
:attr:`Implicit.max_params`). Solver-internal evaluations (Newton iterates, trial states) are
counted against the budget but are not points of the flow: the per-evaluation log holds one
gradient evaluation at each accepted step, so certificates check the accepted path (scope PATH
with the delayed check, as for Dopri5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ..hessian import MAX_DENSE_PARAMS, hessian_of_flat
from .base import Integrator, Run, State, evaluate, flatten, unflatten
from .stops import FlowStatus, Stop
from .times import _positive

__all__ = ["Implicit"]

_METHODS = ("LSODA", "BDF", "Radau")


@dataclass(frozen=True)
class Implicit(Integrator):
    """Implicit, stiff integration of θ̇ = −∇L(θ) by scipy.integrate (``method`` LSODA, BDF or
    Radau) with the exact Hessian as Jacobian (``jacobian="dense"``, P ≤ ``max_params``).

    Example:
        >>> import torch, rayleighflow as rf
        >>> x = torch.linspace(-1, 1, 8, dtype=torch.float64).unsqueeze(1)
        >>> problem = rf.Problem(rf.Model(torch.nn.Linear(1, 1).double()),
        ...                      rf.Dataset.from_arrays(x, 2 * x + 1), "square")
        >>> run = rf.gradient_flow(problem, rf.Implicit(), t_max=1e6)
        >>> run.status.value, bool(run.trajectory["loss"][-1] < 1e-12)
        ('t_max', True)
        >>> rf.Implicit("BDF", rtol=1e-6).describe()
        'implicit BDF (scipy), rtol 1e-06, atol 1e-12, dense Hessian Jacobian'
    """

    method: str = "LSODA"
    rtol: float = 1e-8
    atol: float = 1e-12
    jacobian: str = "dense"
    name: ClassVar[str] = "adaptive"
    step: ClassVar[None] = None
    #: the largest P whose dense Hessian (P² float64 values) the integrator forms
    max_params: ClassVar[int] = MAX_DENSE_PARAMS

    def __post_init__(self) -> None:
        if self.method not in _METHODS:
            raise ValueError(f"Implicit: method must be one of {', '.join(_METHODS)} (got "
                             f"{self.method!r})")
        _positive("rtol", self.rtol, "Implicit")
        _positive("atol", self.atol, "Implicit")
        if self.jacobian != "dense":
            # scipy's BDF, Radau and LSODA factor I − hγJ by LU: they need J as a matrix, so a
            # Newton–Krylov (Hessian-vector product) Jacobian would mean a hand-rolled solver
            raise ValueError(f"Implicit: jacobian must be 'dense' (got {self.jacobian!r}); a "
                             "Hessian-vector-product (Newton–Krylov) Jacobian is not available: "
                             "scipy's stiff solvers factor the Jacobian as a matrix. For P > "
                             f"{MAX_DENSE_PARAMS} use Dopri5 or GradientDescent")

    @staticmethod
    def rtol_floor(dtype: torch.dtype) -> float:
        """The smallest rtol worth asking of gradients in ``dtype``: 100·eps."""
        return 100.0 * torch.finfo(dtype).eps

    def describe(self) -> str:
        return (f"implicit {self.method} (scipy), rtol {self.rtol:g}, atol {self.atol:g}, dense "
                "Hessian Jacobian")

    def init(self, run: Run) -> State:
        state = State(run.theta, run.t_start, run.evals_start)
        like, train, problem = run.theta, run.train, run.problem
        assert train is not None
        hess = hessian_of_flat(problem, like, train)   # refuses P > MAX_DENSE_PARAMS
        dtype = next(iter(like.values())).dtype
        device = next(iter(like.values())).device
        floor = self.rtol_floor(dtype)
        if self.rtol < floor:
            # below it the solver chases the gradients' rounding: ~1e4× more steps, no accuracy
            raise ValueError(f"Implicit: rtol {self.rtol:g} is below what {dtype} gradients "
                             f"resolve (100·eps = {floor:.2g}); use rtol ≥ {floor:.2g}, or "
                             "float64 parameters")

        def to_theta(y: np.ndarray) -> dict[str, torch.Tensor]:
            return unflatten(torch.as_tensor(y, dtype=dtype, device=device), like)

        def fun(t: float, y: np.ndarray) -> np.ndarray:
            run.limits.spend(state.evals, t)
            state.evals += 1
            grad = evaluate(problem, to_theta(y), train, t, None)[1]
            return -flatten(grad).detach().cpu().double().numpy()

        def jac(t: float, y: np.ndarray) -> np.ndarray:
            h = hess(torch.as_tensor(y, dtype=dtype, device=device))
            return -h.detach().cpu().double().numpy()

        state.work = {"fun": fun, "jac": jac, "to_theta": to_theta, "run": run,
                      "y": flatten(like).detach().cpu().double().numpy()}
        return state

    def advance(self, state: State, t_next: float) -> None:
        from scipy import integrate

        work: dict[str, Any] = state.work
        run: Run = work["run"]
        if work.get("solver") is None:
            # one solver from the start to t_max: records are read off its dense output, so
            # they do not restart it (a restart repeats the small starting steps)
            work["solver"] = getattr(integrate, self.method)(
                work["fun"], state.t, work["y"], run.limits.t_max, rtol=self.rtol,
                atol=self.atol, jac=work["jac"])
            work["pending"] = None
        solver = work["solver"]
        target = float(t_next)
        pending, work["pending"] = work["pending"], None
        if pending is not None:  # the accepted point past the previous record
            self._log_point(state, run, work, *pending)
        while solver.t < target and solver.status == "running":
            message = solver.step()
            if solver.status == "failed":
                raise Stop(FlowStatus.SOLVER_FAILED,
                           f"implicit {self.method} failed after t = {solver.t:.6g}: {message}")
            if not np.all(np.isfinite(solver.y)):
                raise Stop(FlowStatus.NON_FINITE, f"non-finite parameters at t = {solver.t:.6g}")
            if solver.t < target:
                self._log_point(state, run, work, solver.t, solver.y)
            elif solver.t > target:
                # logged once the next record interval begins: the log stays in time order
                work["pending"] = (solver.t, solver.y.copy())
        if solver.t < target:
            raise Stop(FlowStatus.SOLVER_FAILED,
                       f"implicit {self.method} stopped at t = {solver.t:.6g} before "
                       f"t = {target:.6g} ({solver.status})")
        y = solver.y if solver.t == target else solver.dense_output()(target)
        work["y"] = np.array(y, dtype=np.float64)
        state.t = target
        state.theta = {k: v.clone() for k, v in work["to_theta"](work["y"]).items()}

    @staticmethod
    def _log_point(state: State, run: Run, work: dict[str, Any], t: float,
                   y: np.ndarray) -> None:
        """An accepted point of the flow: its gradient, logged like a Dopri5 stage."""
        if run.log is None:
            return
        run.limits.spend(state.evals, t)
        state.evals += 1
        assert run.train is not None
        evaluate(run.problem, work["to_theta"](y), run.train, t, run.log)
