"""Tables for notebooks: pandas DataFrames of trajectories and certificate sets, and the HTML
that Jupyter shows for a certificate or a flow result.

pandas is optional (``pip install pandas``): it is imported only when a DataFrame is asked for,
and its absence is one clear ImportError. The HTML needs nothing beyond the standard library.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

    from .certificate import Certificate
    from .flow import FlowResult
    from .trajectory import Trajectory

__all__ = ["trajectory_frame", "certificate_frame", "certificates_frame", "certificate_html",
           "flow_result_html"]


def _pandas():
    try:
        import pandas
    except ImportError:
        raise ImportError("DataFrames need pandas: pip install pandas (rayleighflow does not "
                          "require it otherwise)") from None
    return pandas


def trajectory_frame(traj: Trajectory, evaluations: bool = False) -> pd.DataFrame:
    """One row per record (``evaluations=True``: per logged gradient evaluation), one column
    per recorded quantity; the trajectory's header is in ``frame.attrs["meta"]``."""
    pd_ = _pandas()
    if evaluations:
        ev = traj.evaluations
        frame = pd_.DataFrame({k: np.asarray(v) for k, v in (ev or {}).items()})
    else:
        frame = pd_.DataFrame({c: traj[c] for c in traj.columns})
    frame.attrs["meta"] = dict(traj.meta)
    return frame


def certificate_frame(cert: Certificate) -> pd.DataFrame:
    """One row per checked point of ``cert``: t, the recorded loss, the bound and the KL
    ratio; the certificate's one-line summary in ``frame.attrs["describe"]``."""
    frame = _pandas().DataFrame({"t": cert.t, "loss": cert.loss, "bound": cert.bound,
                                 "kl_ratio": cert.kl_ratio})
    frame.attrs["describe"] = cert.describe()
    return frame


def _labelled(certs: Iterable[Any]) -> list[tuple[str | None, Certificate]]:
    out: list[tuple[str | None, Certificate]] = []
    for item in certs:
        if isinstance(item, tuple) and len(item) == 2:
            out.append((str(item[0]), item[1]))
        else:
            out.append((None, item))
    return out


def _short(cert: Certificate) -> dict[str, Any]:
    return {"desingularizer": cert.desingularizer.name, "mu": cert.mu,
            "mu_source": cert.mu_source, "status": cert.status.value,
            "scope": cert.scope.value, "loss_initial": cert.loss_initial,
            "bound_final": cert.bound_final,
            "reason": None if cert.reason is None else cert.reason.code,
            "n_records": cert.n_records, "n_grad_evals": cert.n_grad_evals}


def certificates_frame(certs: Sequence[Any]) -> pd.DataFrame:
    """One row per certificate: φ, μ and its source, status, scope, L₀, the bound at the end,
    the reason code and what was checked. ``certs``: certificates, or (label, certificate)
    pairs as the experiments make them (the label is the index).

    Example:
        >>> import numpy as np
        >>> import rayleighflow as rf
        >>> traj = rf.Trajectory()
        >>> for t in np.linspace(0.0, 2.0, 5):  # L = e^(−2t), ‖∇L‖² = 2L: PL with μ = 2
        ...     traj.append({"t": t, "loss": np.exp(-2 * t), "grad_sq": 2 * np.exp(-2 * t)})
        >>> table = rf.certificates_frame([("PL", rf.certify(traj, "log"))])
        >>> table.loc["PL", "status"], round(float(table.loc["PL", "mu"]), 12)
        ('holds', 2.0)
    """
    pd_ = _pandas()
    pairs = _labelled(certs)
    rows = [_short(c) for _, c in pairs]
    labels = [label if label is not None else c.desingularizer.name for label, c in pairs]
    return pd_.DataFrame(rows, index=pd_.Index(labels, name="certificate"))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "—" if not math.isfinite(value) else f"{value:.4g}"
    return html.escape(str(value))


def _table(rows: Sequence[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{_cell(v)}</td>"
                   "</tr>" for k, v in rows)
    return f"<table>{body}</table>"


def certificate_html(cert: Certificate) -> str:
    """A short table: status, scope, φ, μ, L₀ → bound at the end, reason; what was checked."""
    rows = [("status", cert.status.value), ("scope", cert.scope.value),
            ("φ", cert.desingularizer.name), ("μ", cert.mu), ("μ from", cert.mu_source),
            ("L₀ → bound at end", f"{_cell(cert.loss_initial)} → {_cell(cert.bound_final)}")]
    if cert.reason is not None:
        rows.append(("reason", cert.reason.cause))
    checked = html.escape(cert.describe())
    return (f"<div><b>Certificate</b>{_table(rows)}<details><summary>what was checked"
            f"</summary><p>{checked}</p></details></div>")


def flow_result_html(result: FlowResult) -> str:
    """Status, the flow time reached, gradient evaluations, wall time, L at start and end."""
    loss = result.trajectory["loss"] if len(result.trajectory) else np.array([math.nan])
    rows = [("status", result.status.value), ("message", result.message),
            ("integrator", result.trajectory.meta.get("integrator", "—")),
            ("t reached", result.t_final), ("gradient evaluations", result.n_grad_evals),
            ("records", len(result.trajectory)), ("wall time (s)", result.wall_time),
            ("L at start → end", f"{_cell(float(loss[0]))} → {_cell(float(loss[-1]))}")]
    return f"<div><b>Gradient flow</b>{_table(rows)}</div>"
