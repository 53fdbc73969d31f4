"""Watch your own training loop: R(K; ∇ℓ), per-layer quotients, KL ratios, forecasts and stall
diagnoses from the gradients a training step already computed (no second backward pass).

* :class:`Monitor` — call ``monitor.step(out, y, loss)`` after ``loss.backward()``.
* :func:`full_data_estimate` — exact full-data L, ‖∇L‖², ‖∇ℓ‖²_D, R by streaming a loader.
* sinks: :class:`RunFolder` (``rayleighflow report``), :class:`TensorBoard`, :class:`CSV`,
  :class:`RichTable`, :class:`Callback` (every scalar into your own logger's ``log(dict,
  step)``; the Lightning callback feeds every Lightning logger through it).
* :mod:`rayleighflow.monitor.lightning` — a Lightning callback (extra ``[lightning]``).
* :mod:`rayleighflow.monitor.huggingface` — a Hugging Face ``TrainerCallback`` (extra
  ``[huggingface]``).
* Under DistributedDataParallel the ranks' batches are combined (one all-gather per read-back).

Everything here is a diagnostic: certificates (CERTIFICATES.md) need full-batch gradient
descent or flow; forecasts are named "forecast (if the ratio stays ≥ μ)".
"""

from ._monitor import DEFAULT_DESINGULARIZERS, Monitor, MonitorError
from .diagnose import Diagnosis, Forecast, Thresholds
from .fulldata import FullDataEstimate, full_data_estimate
from .probe import ProbeSpectrum
from .sinks import CSV, Callback, RichTable, RunFolder, Sink, TensorBoard

__all__ = [
    "CSV",
    "Callback",
    "DEFAULT_DESINGULARIZERS",
    "Diagnosis",
    "Forecast",
    "FullDataEstimate",
    "Monitor",
    "MonitorError",
    "ProbeSpectrum",
    "RichTable",
    "RunFolder",
    "Sink",
    "TensorBoard",
    "Thresholds",
    "full_data_estimate",
]
