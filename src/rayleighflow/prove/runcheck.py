"""Does a run obey its proof? Track ‖θ − θ₀‖ and L at every model evaluation of a flow (records
and every solver stage) and compare the run with the proven statement.

The proof says, for the exact flow: L_t ≤ its (piecewise exponential) bound at every t,
θ_t ∈ B(θ₀, r) while L_t > L_target (forever when L_target = 0), and ‖θ_t − θ₀‖ ≤ the
path-length envelope at the current loss. A computed flow approximates the exact one, so the
comparison carries a stated relative tolerance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.func import functional_call

from ..problem import Model, Problem
from ..trajectory import Trajectory
from ._proof import Proof

__all__ = ["BallTracker", "RunCheck", "check_run", "proven_bound"]


class BallTracker:
    """Wraps a problem's module as a parameter function that logs (‖θ − θ₀‖, L(θ)) at every
    plain (untransformed) evaluation on the full dataset, and keeps a thinned set of θ."""

    def __init__(self, problem: Problem, keep_every: int = 10, keep_max: int = 200) -> None:
        if problem.model.module is None:
            raise ValueError("BallTracker needs a problem built on an nn.Module")
        self.module = problem.model.module
        self.buffers = problem.model.buffers
        self.names = list(problem.params)
        self.theta0 = {k: v.detach().clone() for k, v in problem.params.items()}
        data = problem.data
        self.n = data.x.shape[0]  # type: ignore[union-attr]
        self.y = problem.targets(data, problem.model(problem.params, data.x))  # type: ignore[arg-type, union-attr]
        self.w = problem.omega(data)  # type: ignore[arg-type]
        self.loss_fn = problem.loss
        self.dist: list[float] = []
        self.loss: list[float] = []
        self.kept: list[torch.Tensor] = []
        self._calls = 0
        self.keep_every, self.keep_max = keep_every, keep_max

    def model(self) -> Model:
        return Model(self._fn, params={k: v.clone() for k, v in self.theta0.items()})

    def _fn(self, params, x):
        out = functional_call(self.module, (params, self.buffers), (x,))
        try:
            with torch.no_grad():
                d2 = sum(((params[k].detach() - self.theta0[k]) ** 2).sum() for k in self.names)
                d = float(d2) ** 0.5
                if x.shape[0] == self.n:
                    f = out.detach().reshape(self.n, -1)
                    loss = float(self.loss_fn.value(f, self.y, self.w))
                    self.dist.append(d)
                    self.loss.append(loss)
                    self._calls += 1
                    if self._calls % self.keep_every == 1 and len(self.kept) < self.keep_max:
                        self.kept.append(torch.cat([params[k].detach().reshape(-1)
                                                    for k in self.names]).clone())
        except (RuntimeError, ValueError):  # inside a torch.func transform: nothing to log
            pass
        return out


def proven_bound(proof: Proof, t: np.ndarray) -> np.ndarray:
    """The proven bound on L_t (piecewise exponential, then the target), valid at every t ≥ 0
    (NaN if no proof)."""
    return proof.bound(t)


def envelope(proof: Proof, loss: np.ndarray) -> np.ndarray:
    """The proven bound on ‖θ_t − θ₀‖ when L_t = loss > L_target."""
    return proof.envelope(loss)


@dataclass
class RunCheck:
    """The run against its proof.

    Records are points of the computed flow: there the bound, the ball and the path-length
    envelope must hold (``passed``; a failure contradicts the proof up to the solver's error).
    Solver evaluations (every Runge–Kutta stage, rejected trial steps included) and every model
    evaluation are checked against the bound and the ball too, but a stage is not a point of the
    flow (a rejected trial step can sit far off it), so what they show is reported separately
    (``stages_ok``, ``stage_failures``). Evaluations past the last record (stages of the step
    that overshoots t_max before interpolation) are counted, not checked.
    """

    passed: bool
    stages_ok: bool
    n_records: int
    record_points: int                 # records found among the tracked points (distance known)
    max_record_excess: float           # max (L − B)/B over records (≤ rtol passes)
    max_record_distance: float         # max ‖θ − θ₀‖ at records with L > L_target
    max_envelope_excess: float         # max ‖θ − θ₀‖ − envelope(L) at those records
    n_evaluations: int                 # gradient evaluations checked (t ≤ last record)
    n_evaluations_after: int           # past the last record: not checked
    n_points: int                      # tracked model evaluations
    max_eval_excess: float             # max (L − B)/B over the checked gradient evaluations
    max_distance: float                # max ‖θ − θ₀‖ over tracked points with L > L_target
    eval_above_bound: int
    points_outside_ball: int
    radius: float
    rtol: float
    failures: list[str] = field(default_factory=list)
    stage_failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                for k, v in self.__dict__.items()}


def check_run(proof: Proof, traj: Trajectory, tracker: BallTracker | None,
              rtol: float = 1e-6) -> RunCheck:
    """Compare a computed flow with a HOLDS proof at every record, every logged gradient
    evaluation and (with a tracker) every model evaluation's distance from θ₀."""
    if proof.target is None:
        raise ValueError("no proof to check the run against")
    fails: list[str] = []
    stage: list[str] = []
    t, loss = traj["t"], traj["loss"]
    b = proven_bound(proof, t)
    rec = float(np.max((loss - b) / b)) if t.size else -math.inf
    if rec > rtol:
        i = int(np.argmax((loss - b) / b))
        fails.append(f"record t = {t[i]:.4g}: L = {loss[i]:.6g} > proven bound {b[i]:.6g}")
    ev = traj.evaluations
    n_ev, n_after, ev_ex, n_above = 0, 0, -math.inf, 0
    if ev is not None and ev["t"].size:
        inside = ev["t"] <= (t[-1] if t.size else math.inf)
        n_after = int((~inside).sum())
        te, le = ev["t"][inside], ev["loss"][inside]
        if te.size:
            be = proven_bound(proof, te)
            ex = (le - be) / be
            n_ev, ev_ex = int(te.size), float(np.max(ex))
            n_above = int((ex > rtol).sum())
            if n_above:
                i = int(np.argmax(ex))
                stage.append(f"{n_above} evaluation(s) above the bound, worst t = {te[i]:.4g}: "
                             f"L = {le[i]:.6g} > {be[i]:.6g}")
    max_d, rec_d, env_ex, n_pts, n_rec_pts, n_out = 0.0, 0.0, -math.inf, 0, 0, 0
    if tracker is not None and tracker.dist:
        d, lo = np.array(tracker.dist), np.array(tracker.loss)
        n_pts = int(d.size)
        live = lo > proof.target * (1 + rtol)
        if live.any():
            max_d = float(d[live].max())
            n_out = int((d[live] > proof.radius).sum())
        if n_out:
            stage.append(f"{n_out} model evaluation(s) outside B(θ₀, {proof.radius:.4g}) above "
                         f"the target, farthest at {max_d:.4g}")
        # records among the tracked points: the record's loss was computed at the record's θ
        is_rec = np.zeros(d.shape, dtype=bool)
        for lr in loss:
            is_rec |= np.abs(lo - lr) <= 1e-12 * abs(lr)
        pick = is_rec & live
        n_rec_pts = int(pick.sum())
        if pick.any():
            rec_d = float(d[pick].max())
            env_ex = float(np.max(d[pick] - envelope(proof, lo[pick]) * (1 + rtol)))
        if rec_d > proof.radius:  # type: ignore[operator]
            fails.append(f"‖θ_t − θ₀‖ = {rec_d:.6g} > r = {proof.radius:.6g} at a record above "
                         "the target")
        if env_ex > 1e-12:
            fails.append(f"‖θ_t − θ₀‖ at a record exceeds the path-length envelope by "
                         f"{env_ex:.3g}")
    return RunCheck(not fails, not stage, int(t.size), n_rec_pts, rec, rec_d, env_ex, n_ev,
                    n_after, n_pts, ev_ex, max_d, n_above, n_out, proof.radius, rtol, fails,  # type: ignore[arg-type]
                    stage)
