"""The monitor's periodic estimates (full data, probe spectrum), its forecast and its summary.
A mixin of :class:`~rayleighflow.Monitor`, which holds the state it reads."""

from __future__ import annotations

import datetime as _dt
import math
import time
from typing import Any

import torch

from .._io import finite_or_none
from .diagnose import Diagnosis, Forecast, forecast, gauss_newton_sharpness, stability
from .fulldata import full_data_estimate

__all__ = ["Reports"]

_SCOPE_NOTE = ("These are diagnostics, not certificates: a certificate in the sense of "
               "CERTIFICATES.md needs full-batch gradient descent or flow, and the monitor "
               "watches mini-batch or adaptive updates. A forecast assumes the KL ratio stays "
               "≥ μ; nothing checks that it will.")


class Reports:
    """Full-data estimates, probe spectra, forecasts and summary.json (mixed into Monitor)."""

    # -- periodic estimates -----------------------------------------------------------------
    def _guarded(self, what: str, step: int, run: Any) -> None:
        """``run(step)``; a failure that the run's state explains (a non-finite loss or
        parameters, an eigensolver that cannot converge on them) is recorded and said once,
        and the user's loop goes on, unless ``strict``."""
        try:
            run(step)
        except (FloatingPointError, torch.linalg.LinAlgError, ValueError, RuntimeError) as err:
            explained = isinstance(err, FloatingPointError | torch.linalg.LinAlgError) or \
                not all(bool(torch.isfinite(p).all()) for p in self.layout.params)
            if self.strict or not explained:
                raise
            count = self._periodic_failed.get(what, 0)
            self._periodic_failed[what] = count + 1
            if not count:   # one message per condition, not one per due step
                self._emit(Diagnosis(step, "non-finite", (
                    f"step {step}: the {what} failed ({err}); no row was written and training "
                    "goes on (Monitor(strict=True) raises instead); later ones are tried again "
                    "and their failures counted in the summary")))

    def _full(self, step: int) -> None:
        est = full_data_estimate(self.model, self.full_data, self.loss,
                                 convention=self.convention, layout=self.layout,
                                 split=self.split, ranks=self.ranks)
        row: dict[str, Any] = {"t": step, "step": step, **est.as_row()}
        for d in self.family:
            row[f"kl[{d.name}]"] = float(d.kl_ratio(est.loss, est.grad_sq))
        # The decrease from the previous estimate (step a) to this one (step b) is made by the
        # updates of steps a..b-1; step b's own update comes after this estimate.
        current = self.rows[-1].get("gd_decrease", 0.0) if self.rows else 0.0
        current = current if math.isfinite(current) else 0.0
        made = self._gd_since_full - current
        if self.full_rows and self._group_of_param is not None and made > 0:
            row["decrease_ratio"] = (self.full_rows[-1]["loss"] - est.loss) / made
        self._gd_since_full = current
        self.full_rows.append(row)
        for s in self.sinks:
            s.write("full", [row])
        for d in self.diagnoser.update_full(row):
            self._emit(d)
        if self.target_loss is not None:
            self._update_forecast()

    def full_estimate(self):
        """The exact full-data estimate now (no record is written)."""
        if self.full_data is None:
            raise ValueError("no full_data loader was given to the Monitor")
        return full_data_estimate(self.model, self.full_data, self.loss,
                                  convention=self.convention, layout=self.layout,
                                  split=self.split, ranks=self.ranks)

    def _probe(self, step: int) -> None:
        spec = self.probe.spectrum()
        row = {"t": step, "step": step, **spec.as_row(),
               "lambda_min_label": spec.lambda_min_label}
        self.probe_rows.append(row)
        for s in self.sinks:
            s.write("probe", [row])
        opt = self.optimizer
        if opt is not None:
            g0 = opt.param_groups[0]
            lr = max(float(g["lr"]) for g in opt.param_groups)
            adaptive = not isinstance(opt, torch.optim.SGD)
            beta = 0.0 if adaptive else float(g0.get("momentum", 0.0))
            margin = self.diagnoser.thresholds.stability
            d = stability(step, lr, beta, adaptive, spec.lambda_max, self.loss.name,
                          margin=margin)
            if d is not None and self.loss.name != "square":
                # past the worst-case bound: measure the curvature the loss has (one kernel)
                sharp = gauss_newton_sharpness(self.probe, self.loss.name)
                if sharp is not None:
                    d = stability(step, lr, beta, adaptive, spec.lambda_max, self.loss.name,
                                  sharp, margin)
            if d is not None and not self._unstable:
                self._emit(d)
            self._unstable = d is not None

    # -- forecast ---------------------------------------------------------------------------
    def forecast(self, target: float | None = None) -> Forecast:
        """Forecast (if the ratio stays ≥ μ) of the step at which the loss reaches ``target``:
        from the last five full-data estimates when there are two or more, else from the last
        window of batch records (see :func:`rayleighflow.monitor.diagnose.forecast`)."""
        target = self.target_loss if target is None else target
        if target is None:
            raise ValueError("give a target loss: monitor.forecast(0.01)")
        self.flush()
        full = [r for r in self.full_rows if math.isfinite(r["loss"])]
        if len(full) >= 2:
            recent = full[-5:]
            return forecast(self.phi, target, [r["step"] for r in recent],
                            [r["loss"] for r in recent], [r["grad_sq"] for r in recent],
                            f"full-data estimates at steps {recent[0]['step']}–"
                            f"{recent[-1]['step']}", self.diagnoser.floor)
        rec = list(self._recent)
        src = (f"batch records, steps {rec[0][0]}–{rec[-1][0]}" if rec else "no batch record")
        return forecast(self.phi, target, [r[0] for r in rec], [r[1] for r in rec],
                        [r[2] for r in rec], src, self.diagnoser.floor)

    def _update_forecast(self) -> None:
        self.last_forecast = self.forecast()

    def summary(self, status: str = "complete") -> dict[str, Any]:
        """summary.json for the run folder (docs/RUN_FOLDER.md); ``certificates`` stays empty."""
        from ..rundir import versions

        last_main = self.rows[-1] if self.rows else {}
        full = self.full_rows[-1] if self.full_rows else None
        probe = self.probe_rows[-1] if self.probe_rows else None
        k = self._k or 0
        nk = int(full["n_samples"] * k) if full else int((self._batch_n or 0) * k)
        fc = self.last_forecast if self.target_loss is not None else None
        kinds = ("collapse", "plateau", "saddle", "tiny-gradient", "rising",
                 "edge-of-stability", "non-finite", "loss-mismatch", "missing-gradients",
                 "zero-gradient", "frozen", "update-rule",
                 "distributed", "unequal-rank-batches", "unsynchronized-gradients", "clipped",
                 "voided", "sampled", "huggingface-normalization", "huggingface-ignored",
                 "huggingface-unchecked")
        notes = [_SCOPE_NOTE]
        notes += [d.message for d in self.diagnoses if d.kind in kinds]
        notes += [f"the {what} failed at {n} due step(s)"
                  for what, n in self._periodic_failed.items()]
        notes.append("t is the optimizer step; loss_final is the last "
                     + ("full-data estimate" if full else "batch loss")
                     + f"; nk = {nk} counts the " + ("full data" if full else "last batch")
                     + f" (n·k, k = {k})")
        if probe is not None:
            notes.append(f"rank and λ are those of the probe set (nk = {int(probe['nk'])}); "
                         f"λ_min label: {probe['lambda_min_label']}")
        if fc is not None:
            notes.append(fc.text)
        return {
            "experiment": self.name, "status": status, "convention": self.convention.value,
            "P": self.layout.n_params, "nk": nk,
            "loss_initial": self._first_loss,
            "loss_final": full["loss"] if full else last_main.get("loss"),
            "t_final": last_main.get("step"),
            "rank": None if probe is None or probe["rank"] is None else int(probe["rank"]),
            "lambda_min": None if probe is None else probe["lambda_min"],
            "lambda_max": None if probe is None else probe["lambda_max"],
            "rayleigh_min": finite_or_none(self._rayleigh_min),
            "certificates": [],
            "run_time_s": time.perf_counter() - self._begin,
            "versions": versions(),
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "description": f"rayleighflow.Monitor on a user training loop ({self.loss.name} "
                           "loss): diagnostics, not certificates",
            "notes": notes,
            "steps": self._step,
            "steps_measured": -(-self._step // self.every),
            "update_rule": self.update_rule()[1],
            "forecast": None if fc is None else fc.as_dict(),
            "diagnoses": [{"step": d.step, "kind": d.kind, "message": d.message}
                          for d in self.diagnoses],
        }
