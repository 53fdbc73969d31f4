"""NTK spectrum on a fixed probe set, through the NTK engine (``rayleighflow.ntk.ntk_spectrum``).

λ_min is reported as max(λ, 0) with its label (CERTIFICATES.md §6): ``structural`` when
nk > P (rank K ≤ P < nk, no computation needed), ``numerical`` when it lies below the stated
rank threshold, ``positive`` otherwise. A probe set is a subset of the data: its kernel does not
certify the full-data kernel (interlacing gives only λ_min(K) ≤ (|S|/n) λ_min(K_S)).

The probe inputs are a tensor (n, ...) or a mapping of named tensors sharing dimension 0 (a
Hugging Face batch, ``{"input_ids": ..., "attention_mask": ...}``, passed as
``module(**x)``; an output object is read through its ``logits``). For named inputs
R(K; ∇ℓ) = ‖J*∇ℓ‖²/‖∇ℓ‖²_D is taken by one VJP (``NTKOperator.rayleigh``), the same
quotient ``rayleighflow.measure`` gives on a tensor probe.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import final

import torch
from torch import Tensor, nn

from .._types import Convention, effective_weights
from ..data import Dataset
from ..losses import Loss
from ..ntk import NTKOperator, ntk_spectrum
from ..ntk._batch import Batch, as_batch
from ..problem import Model, Problem, output_tensor
from ..rayleigh import measure
from ._batch import flatten_batch
from ._params import ParamLayout, eval_mode

__all__ = ["ProbeSpectrum", "ProbeSet"]

_DTYPE_NOTE = "the dtype decides the answer"   # the ntk.spectrum warning, said once here


@final
@dataclass(frozen=True)
class ProbeSpectrum:
    """Spectrum of K on the probe set and, when targets were given, R(K; ∇ℓ) there."""

    size: int                 # nk of the probe set
    n_params: int
    rank: int | None
    threshold: float | None
    lambda_max: float
    lambda_min: float         # max(λ_min, 0)
    lambda_min_label: str     # structural | numerical | positive
    lambda_min_nonzero: float | None
    rayleigh: float | None
    loss: float | None

    def as_row(self) -> dict[str, float | str | None]:
        lam_plot = self.lambda_min
        if self.threshold is not None:
            lam_plot = max(lam_plot, self.threshold)
        return {"lambda_max": self.lambda_max, "lambda_min": self.lambda_min,
                "lambda_min_plot": lam_plot, "lambda_min_nonzero": self.lambda_min_nonzero,
                "rank": None if self.rank is None else float(self.rank),
                "rank_threshold": self.threshold, "rayleigh": self.rayleigh,
                "loss": self.loss, "nk": float(self.size),
                "lambda_min_structural": float(self.lambda_min_label == "structural")}


@final
class ProbeSet:
    """A fixed probe set (x, optional y) and the machinery to take its spectrum repeatedly."""

    def __init__(self, module: nn.Module, layout: ParamLayout, loss: Loss,
                 convention: Convention, x: Tensor | Mapping[str, Tensor],
                 y: Tensor | None = None) -> None:
        self.module, self.layout, self.loss, self.convention = module, layout, loss, convention
        dev = layout.params[0].device
        if isinstance(x, Tensor):
            self.x: Tensor | Batch = x.to(dev)
        elif isinstance(x, Mapping):
            self.x = as_batch(x, "probe").to(dev)
        else:
            raise TypeError(f"the probe inputs must be a Tensor or a mapping of named input "
                            f"tensors, got {type(x).__name__}")
        self.y = None if y is None else y.to(dev)
        self._problem: Problem | None = None
        self._model: Model | None = None
        self._dtype_said: set[str] = set()

    def _params(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in zip(self.layout.names, self.layout.params,
                                               strict=True)}

    def spectrum(self) -> ProbeSpectrum:
        params = self._params()
        with eval_mode(self.module), torch.autocast(self.x.device.type, enabled=False):
            if self._model is None:
                self._model = Model(self.module, params)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                spec = ntk_spectrum(self._model, self.x, params=params,
                                    convention=self.convention)
            self._rewarn(caught)
            rayleigh = loss = None
            if self.y is not None and isinstance(self.x, Batch):
                rayleigh, loss = self._named_rayleigh(params)
            elif self.y is not None:
                if self._problem is None:
                    with torch.no_grad():
                        out = self.module(self.x)
                    f, y = flatten_batch(self.loss, out, self.y)
                    if f.shape[0] != self.x.shape[0]:
                        raise ValueError("the probe set's R(K; ∇ℓ) needs one output vector per "
                                         f"input; the model gave {f.shape[0]} for "
                                         f"{self.x.shape[0]}")
                    data = Dataset.from_arrays(self.x, y.reshape(y.shape[0], *y.shape[1:]),
                                               dtype=f.dtype,
                                               index_inputs=not self.x.is_floating_point())
                    self._problem = Problem(self._model, data, self.loss, self.convention)
                m = measure(self._problem, params=params)
                rayleigh, loss = m.rayleigh, m.loss
        lam = spec.lambda_min if spec.lambda_min is not None else 0.0
        if spec.n_params is not None and spec.size > spec.n_params:
            label = "structural"
        elif spec.threshold is not None and lam <= spec.threshold:
            label = "numerical"
        else:
            label = "positive"
        return ProbeSpectrum(spec.size, self.layout.n_params, spec.rank, spec.threshold,
                             float(spec.lambda_max), max(float(lam), 0.0), label,
                             spec.lambda_min_nonzero, rayleigh, loss)

    def _rewarn(self, caught: list[warnings.WarningMessage]) -> None:
        """Pass the spectrum's warnings on, the dtype note once per model dtype: its numbers
        move a little from probe to probe, so Python's own once-per-text filter repeats it."""
        for w in caught:
            text = str(w.message)
            if text.startswith(_DTYPE_NOTE):
                key = text.split("'s threshold", 1)[0]
                if key in self._dtype_said:
                    continue
                self._dtype_said.add(key)
                w.message = type(w.message)(
                    f"{text} (said once for this probe set; later spectra where the dtype would "
                    "decide again are not warned)")
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    def _named_rayleigh(self, params: dict[str, Tensor]) -> tuple[float, float]:
        """(R(K; ∇ℓ), L) on named probe inputs: R = ‖J*g‖²/‖g‖²_ω with g_i = ∂ℓ_i/∂f_i."""
        assert isinstance(self.x, Batch) and self.y is not None and self._model is not None
        n = self.x.shape[0]
        with torch.no_grad():
            out = output_tensor(self.module(**self.x))
        f, y = flatten_batch(self.loss, out, self.y)
        if f.shape[0] != n:
            raise ValueError("the probe set's R(K; ∇ℓ) needs one output vector per input; "
                             f"the model gave {f.shape[0]} for {n}")
        y = self.loss.check_targets(f, y)
        weights = torch.full((n,), 1.0 / n, dtype=torch.float64, device=f.device)
        omega = effective_weights(weights, self.convention).to(f.dtype)
        loss = float(self.loss.value(f, y, omega))
        g = self.loss.functional_grad(f, y)
        op = NTKOperator(self._model, self.x, params=params, convention=self.convention)
        return op.rayleigh(g), loss
