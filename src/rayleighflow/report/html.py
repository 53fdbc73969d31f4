"""report.html: one self-contained page per run (figures embedded, CSS inline, no network).

:func:`report_from_dir` is the entry point of ``rayleighflow report RUN_DIR``: it draws the
figures, reads summary.json (or, for a run that never wrote one, the trajectories) and renders
``templates/report.html`` with autoescaping on, so no string from the run folder can inject
markup. The page references nothing outside itself but the SVG files it links to.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from importlib import resources
from numbers import Integral, Real
from pathlib import Path
from typing import Any

from .._io import atomic_write_text, finite_or_none
from .._optional import REPORT_FEATURE, guard
from ..rundir import REQUIRED_SUMMARY_KEYS, RunContents, check_run_dir, load_run, versions
from .figures import RenderedFigure, render_figures
from .monitored import adapt_monitor_figures, diagnosis_events, is_monitored

# The page's template and escaping: imported only by the report (extra [report]); without
# jinja2 (which brings markupsafe) the error names the extra.
with guard("report", REPORT_FEATURE):
    import jinja2
    from markupsafe import Markup, escape

__all__ = ["render_report", "report_from_dir", "report_problems", "format_number",
           "certified_reduction", "VACUOUS_FRACTION"]

#: A holding certificate whose bound at the end is above (1 − this)·L₀ certifies almost no
#: decrease: it is marked "vacuous".
VACUOUS_FRACTION = 0.1

REPORT_FILE = "report.html"
EMPIRICAL = ("For a discretized flow, certificates are empirical: they hold at the recorded "
             "points.")
_KNOWN_KEYS = {*REQUIRED_SUMMARY_KEYS, "description", "notes", "rank_threshold",
               "max_bound_violation", "error", "traceback", "stopped_early", "recorded_flow"}
_BANNERS = {
    "complete": ("Complete", "The run finished and wrote every result; the values below are "
                             "final."),
    "interrupted": ("Interrupted", "The run stopped before its end. This report shows what "
                                   "was recorded{until}."),
    "failed": ("Failed", "The run failed. This report shows what was recorded{until} before "
                         "the failure."),
}
_CONVENTIONS = {"mean": "mean — L²(D) inner product", "sum": "sum — Euclidean inner product"}


def format_number(v: Any, digits: int = 4) -> Markup | str:
    """A value for display: ``{:.4g}`` floats with ×10ⁿ exponents, null and NaN as "—"."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, Integral):
        return f"{int(v):,}"
    if isinstance(v, Real):
        f = float(v)
        if math.isnan(f):
            return "—"
        if math.isinf(f):
            return "∞" if f > 0 else "−∞"
        text = f"{f:.{digits}g}"
        if "e" not in text:
            return text
        mantissa, exponent = text.split("e")
        power = Markup("10<sup>{}</sup>").format(str(int(exponent)).replace("-", "−"))
        return power if mantissa == "1" else Markup("{}×{}").format(mantissa, power)
    if isinstance(v, str):
        return v
    if isinstance(v, Sequence):
        return Markup(", ").join(format_number(x, digits) for x in v)
    return str(v)


def format_duration(seconds: Any) -> str:
    """Run time as "0.84 s", "3 min 12 s" or "2 h 05 min"."""
    if not isinstance(seconds, Real) or isinstance(seconds, bool) or not math.isfinite(seconds):
        return "—"
    s = float(seconds)
    if s < 60:
        return f"{s:.3g} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def certified_reduction(c: Mapping[str, Any], summary: Mapping[str, Any] | None = None
                        ) -> dict[str, Any]:
    """L₀, the bound at the end, their ratio and whether a holding certificate is vacuous
    (its bound reduces L₀ by less than :data:`VACUOUS_FRACTION`).

    L₀ is the certificate's ``loss_initial``; a run folder that predates that key falls back
    to the summary's, for a single-flow summary only (one with ``flow_status``).
    """
    l0 = finite_or_none(c.get("loss_initial"))
    if l0 is None and "loss_initial" not in c and summary is not None \
            and "flow_status" in summary:
        l0 = finite_or_none(summary.get("loss_initial"))
    bound = finite_or_none(c.get("bound_final"))
    ratio = bound / l0 if l0 and bound is not None else None
    vacuous = (c.get("status") == "holds" and ratio is not None
               and ratio > 1.0 - VACUOUS_FRACTION)
    return {"l0": l0, "bound": bound, "ratio": ratio, "vacuous": vacuous}


def _loss_ratios(trajs: Sequence[Any]) -> list[float]:
    return [t.loss_last / t.loss_first for t in trajs
            if t.loss_first and t.loss_last is not None and t.loss_first > 0]


def _highlights(s: Mapping[str, Any], certs: list[dict[str, Any]],
                trajs: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """The few numbers a reader looks for first, as cards; a multi-flow run gets cards for
    the whole set of flows."""
    l0, l1 = finite_or_none(s.get("loss_initial")), finite_or_none(s.get("loss_final"))
    ratio = l1 / l0 if l0 and l1 is not None else None
    held = [c["label"] or c["desingularizer"] for c in certs
            if c["status"] == "holds" and not c["vacuous"]]
    vacuous = [c for c in certs if c["vacuous"]]
    tone = ("good" if certs and len(held) == len(certs)
            else "bad" if any(c["status"] == "violated" for c in certs) else "neutral")
    rank, nk = s.get("rank"), s.get("nk")
    rank_text = (Markup("rank {} of nk = {}").format(format_number(rank), format_number(nk))
                 if rank is not None else "rank not measured")
    lmax = s.get("lambda_max")
    lmax_text = (Markup("λ<sub>max</sub> = {}").format(format_number(lmax)) if lmax is not None
                 else Markup("λ<sub>max</sub> not measured"))
    cert_sub = ("; ".join(held) or "no certificate holds") if certs else \
        "no certificate was issued"
    if vacuous:
        cert_sub += f" ({len(vacuous)} more hold but are vacuous)"
    cards = [
        {"label": "Loss, final ÷ initial", "value": format_number(ratio, 3),
         "sub": Markup("{} → {}").format(format_number(l0), format_number(l1)),
         "tone": "good" if ratio is not None and ratio < 1 else "neutral"},
        {"label": "Certificates holding (not vacuous)",
         "value": f"{len(held)} of {len(certs)}" if certs else "none",
         "sub": cert_sub, "tone": tone},
        {"label": "min R(K; ∇ℓ)", "value": format_number(s.get("rayleigh_min")),
         "sub": "smallest recorded Rayleigh quotient", "tone": "neutral"},
        {"label": Markup("λ<sub>min</sub>(K)"), "value": _lambda_min(s),
         "sub": Markup("{} · {}").format(lmax_text, rank_text),
         "tone": "neutral"},
        {"label": "Flow time reached", "value": format_number(s.get("t_final")),
         "sub": f"in {format_duration(s.get('run_time_s'))} of run time", "tone": "neutral"},
    ]
    if len(trajs) > 1:
        cards = _set_cards(s, cards, trajs)
    return cards


def _lambda_min(s: Mapping[str, Any]) -> Any:
    """λ_min, shown as 0 when it is below the rank threshold (e.g. −3.9e−17: rounding)."""
    lam, thr = finite_or_none(s.get("lambda_min")), finite_or_none(s.get("rank_threshold"))
    if lam is not None and thr is not None and abs(lam) <= thr:
        return Markup("0 <span class=\"hint\">({} is below the rank threshold {})</span>"
                      ).format(format_number(lam, 2), format_number(thr, 2))
    return format_number(lam)


def _set_cards(s: Mapping[str, Any], cards: list[dict[str, Any]],
               trajs: Sequence[Any]) -> list[dict[str, Any]]:
    """Cards for a run of many flows: each value over the whole set, from the recordings."""
    n = len(trajs)
    ended = sum(t.status not in (None, "interrupted", "failed") for t in trajs)
    ratios = _loss_ratios(trajs)
    if ratios:
        lo, hi, med = min(ratios), max(ratios), float(sorted(ratios)[len(ratios) // 2])
        cards[0] = {"label": f"Loss, final ÷ initial ({len(ratios)} flows)",
                    "value": format_number(med, 3),
                    "sub": Markup("median; from {} to {}").format(format_number(lo, 3),
                                                                 format_number(hi, 3)),
                    "tone": "good" if hi < 1 else "neutral"}
    rmins = [t.rayleigh_min for t in trajs if t.rayleigh_min is not None]
    if s.get("rayleigh_min") is None and rmins:
        cards[2] = {"label": "min R(K; ∇ℓ)", "value": format_number(min(rmins)),
                    "sub": f"smallest over the {len(rmins)} flows' records", "tone": "neutral"}
    t_last = [t.t_last for t in trajs if t.t_last is not None]
    cards[4] = {"label": "Flows finished", "value": f"{ended} of {n}",
                "sub": Markup("up to t = {} · {} of run time").format(
                    format_number(max(t_last) if t_last else None),
                    format_duration(s.get("run_time_s"))),
                "tone": "good" if ended == n else "neutral"}
    return cards


def _traj(run: RunContents, name: str) -> Any:
    return next((t for t in run.trajectories if t.name == name), None)


def _monitor_counts(run: RunContents) -> tuple[int, int, int, int]:
    """(steps recorded, full-data evaluations, diagnoses marked, set-up notes) of a
    monitored run, from its trajectories and summary."""
    main, full = _traj(run, "main"), _traj(run, "full")
    events = diagnosis_events(run.summary)
    diagnoses = [d for d in run.summary.get("diagnoses") or [] if isinstance(d, Mapping)]
    return (main.records if main else 0, full.records if full else 0, len(events),
            len(diagnoses) - len(events))


def _monitor_cards(s: Mapping[str, Any], run: RunContents) -> list[dict[str, Any]]:
    """The cards of a monitored run: steps, not flow time; diagnoses, not certificates."""
    steps, fulls, marked, setup = _monitor_counts(run)
    main = _traj(run, "main")
    l0, l1 = finite_or_none(s.get("loss_initial")), finite_or_none(s.get("loss_final"))
    ratio = l1 / l0 if l0 and l1 is not None else None
    cards = [
        {"label": "Loss, final ÷ initial", "value": format_number(ratio, 3),
         "sub": Markup("{} → {}").format(format_number(l0), format_number(l1)),
         "tone": "good" if ratio is not None and ratio < 1 else "neutral"},
        {"label": "Steps recorded", "value": format_number(steps),
         "sub": Markup("steps {} → {} · {} of run time").format(
             format_number(main.t_first if main else None),
             format_number(main.t_last if main else None),
             format_duration(s.get("run_time_s"))), "tone": "neutral"},
        {"label": "Full-data evaluations", "value": format_number(fulls),
         "sub": "exact loss and R(K; ∇ℓ) on all the data" if fulls else
                "no full_data loader was given", "tone": "neutral"},
        {"label": "Diagnoses", "value": format_number(marked),
         "sub": ("marked on the plots at their steps" if marked else "none during the run")
                + (f"; {setup} set-up note{'s' if setup != 1 else ''}" if setup else ""),
         "tone": "bad" if marked else "good"} if "diagnoses" in s else
        {"label": "Diagnoses", "value": "not saved",
         "sub": "they are written to summary.json at close, which this run never reached",
         "tone": "neutral"},
        {"label": "min R(K; ∇ℓ)", "value": format_number(s.get("rayleigh_min")),
         "sub": "smallest batch Rayleigh quotient recorded", "tone": "neutral"},
    ]
    if s.get("lambda_max") is not None:
        cards.append({"label": Markup("λ<sub>min</sub>(K), probe set"),
                      "value": _lambda_min(s),
                      "sub": Markup("λ<sub>max</sub> = {}").format(
                          format_number(s.get("lambda_max"))), "tone": "neutral"})
    return cards


def _summary_rows(s: Mapping[str, Any], monitored: bool = False
                  ) -> list[tuple[Any, Any, Any, str]]:
    """(label, value, hint, tone) rows; tone is "good", "bad" or "" (a CSS class)."""
    rank_hint = (Markup("threshold {}").format(format_number(s["rank_threshold"]))
                 if s.get("rank_threshold") is not None else Markup(""))
    if s.get("rank") is not None and s.get("rank") == s.get("nk"):
        rank_hint = Markup("full rank; ") + rank_hint if rank_hint else Markup("full rank")
    l0, l1 = finite_or_none(s.get("loss_initial")), finite_or_none(s.get("loss_final"))
    rows = [
        ("Parameters P", format_number(s.get("P")), "", ""),
        ("Outputs nk", format_number(s.get("nk")), "samples × outputs", ""),
        ("NTK rank", format_number(s.get("rank")), rank_hint, ""),
        (Markup("λ<sub>min</sub>(K)"), _lambda_min(s),
         "smallest NTK eigenvalue", ""),
        (Markup("λ<sub>max</sub>(K)"), format_number(s.get("lambda_max")),
         "largest NTK eigenvalue", ""),
        ("min R(K; ∇ℓ)", format_number(s.get("rayleigh_min")), "over the recorded points", ""),
        ("Loss final / initial",
         Markup("{} / {}").format(format_number(l1), format_number(l0)),
         Markup("ratio {}").format(format_number(l1 / l0, 3)) if l0 and l1 is not None else "",
         ""),
        (("Last step", format_number(s.get("t_final")), "the optimizer step of the last record",
          "") if monitored else
         (Markup("Flow time t<sub>final</sub>"), format_number(s.get("t_final")), "", "")),
        ("Run time", format_duration(s.get("run_time_s")), "", ""),
        ("Convention", _CONVENTIONS.get(s.get("convention"), format_number(s.get("convention"))),
         "constants are stated in this convention", ""),
    ]
    if monitored and s.get("lambda_max") is None and s.get("rank") is None:
        # no probe set: the spectrum was not measured, and five "—" rows would not say so
        rows = [r for r in rows if r[0] not in ("NTK rank",) and "λ<sub>" not in str(r[0])]
        rows.insert(2, ("NTK spectrum", "not measured", "give the Monitor a probe set", ""))
    if "max_bound_violation" in s:
        v = finite_or_none(s["max_bound_violation"])
        held = None if v is None else v <= 0
        rows.append(("Max bound violation", format_number(s["max_bound_violation"]),
                     {True: "≤ 0: every bound held", False: "> 0: a bound failed somewhere",
                      None: ""}[held], {True: "good", False: "bad", None: ""}[held]))
    return rows


def _certificates(s: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for c in s.get("certificates") or []:
        if not isinstance(c, Mapping):
            continue
        status = str(c.get("status", "unknown"))
        assumptions = []
        for a in c.get("assumptions") or []:
            if isinstance(a, Mapping):
                assumptions.append({"name": str(a.get("name", "?")),
                                    "holds": a.get("holds") is True,
                                    "detail": str(a.get("detail") or "")})
        slack = c.get("slack") if isinstance(c.get("slack"), Mapping) else {}
        violation = c.get("first_violation")
        violation_text = ""
        if isinstance(violation, Sequence) and not isinstance(violation, str) and violation:
            violation_text = Markup("first violation at t = {}").format(
                format_number(violation[0]))
            if len(violation) > 1:
                violation_text += Markup(": {}").format(violation[1])
        mbv = finite_or_none(c.get("max_bound_violation"))
        mu_hint = ""
        if c.get("mu_source") != "observed" and finite_or_none(c.get("mu_star")) is not None:
            mu_hint = Markup("observed μ* = {}").format(format_number(c["mu_star"]))
            if finite_or_none(c.get("t_at_mu_star")) is not None:
                mu_hint += Markup(" at t = {}").format(format_number(c["t_at_mu_star"]))
        red = certified_reduction(c, s)
        reduction = ""
        if red["l0"] is not None and red["bound"] is not None:
            reduction = Markup("{} → {} (×{})").format(
                format_number(red["l0"]), format_number(red["bound"]),
                format_number(red["ratio"], 3))
        reason = c.get("reason") if isinstance(c.get("reason"), Mapping) else None
        times = []
        for key, what in (("horizon", "checked up to t = {}"),
                          ("certified_time_to", "certified time to target {}"),
                          ("forecast_time_to", "forecast time to target {}"),
                          ("n_records", "{} records"),
                          ("n_grad_evals_checked", "{} gradient evaluations checked")):
            if finite_or_none(c.get(key)) is not None:
                times.append(Markup(what).format(format_number(c[key])))
        out.append({
            "scope": str(c.get("scope")) if c.get("scope") else "",
            "reduction": reduction, "vacuous": red["vacuous"],
            "reason": ({"code": str(reason.get("code") or ""),
                        "cause": str(reason.get("cause") or ""),
                        "remedy": str(reason.get("remedy") or "")} if reason else None),
            "checked": Markup(" · ").join(times),
            "desingularizer": str(c.get("desingularizer", "?")),
            "label": str(c["label"]) if isinstance(c.get("label"), str) else "",
            "mu": format_number(c.get("mu")),
            "mu_source": str(c.get("mu_source") or "—"),
            "status": status,
            "status_class": status if status in ("holds", "violated", "unavailable") else "other",
            "bound_final": format_number(c.get("bound_final")),
            "max_bound_violation": format_number(c.get("max_bound_violation")),
            "violation_ok": None if mbv is None else mbv <= 0,
            "slack": Markup(", ").join(Markup("{} = {}").format(k, format_number(v))
                                       for k, v in slack.items()),
            "first_violation": violation_text,
            "assumptions": assumptions, "mu_hint": mu_hint,
            "notes": [str(n) for n in c.get("notes") or [] if isinstance(n, str)],
        })
    return out


def _extras(s: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Experiment-specific top-level values: scalars and short lists of scalars."""
    rows = []
    for key, v in s.items():
        if key in _KNOWN_KEYS:
            continue
        if v is None or isinstance(v, str | Real):
            rows.append((key, format_number(v)))
        elif (isinstance(v, list) and len(v) <= 32
              and all(x is None or isinstance(x, str | Real) for x in v)):
            rows.append((key, format_number(v)))
    return rows


def _figure(f: RenderedFigure) -> dict[str, Any]:
    data_uri = None
    if f.png is not None:
        data_uri = "data:image/png;base64," + base64.b64encode(f.png.read_bytes()).decode()
    # Masked values and series with nothing recorded are facts about the data, not errors:
    # they go in a footnote; only real problems keep the note box.
    footnotes = [n for n in f.notes if _is_footnote(n)]
    notes = [n for n in f.notes if not _is_footnote(n)]
    return {"name": f.name, "title": f.title, "alt": f.alt, "caption": f.caption,
            "notes": notes, "footnotes": footnotes, "data_uri": data_uri,
            "wide": f.panels > 1,
            "svg": f"figures/{f.svg.name}" if f.svg is not None else None}


def _banner(s: Mapping[str, Any], run: RunContents, monitored: bool = False
            ) -> tuple[str, Any]:
    status = str(s.get("status") or "unknown")
    headline, text = _BANNERS.get(status, (status.capitalize(), "Unknown run status{until}."))
    t_final = finite_or_none(s.get("t_final"))
    trajs = run.trajectories
    if monitored:   # one loop, counted in steps; its records are not flows
        until = (Markup(" up to step {}").format(format_number(t_final))
                 if t_final is not None else "")
        steps, fulls, marked, _ = _monitor_counts(run)
        said = marked if "diagnoses" in s else "not saved (no summary.json)"
        text += f" Steps recorded {steps}; full-data evaluations {fulls}; diagnoses {said}."
    elif len(trajs) > 1 and status != "complete":
        done = sum(t.status not in (None, "interrupted", "failed") for t in trajs)
        running = s.get("recorded_flow")
        until = Markup(": {} of {} flows had finished").format(done, len(trajs))
        if isinstance(running, str) and t_final is not None:
            until += Markup("; flow {} stopped at t = {}").format(running,
                                                                  format_number(t_final))
    else:
        until = (Markup(" up to t = {}").format(format_number(t_final))
                 if t_final is not None else "")
    body = Markup(escape(text)).replace("{until}", until)
    if status == "failed" and isinstance(s.get("error"), str):
        body += Markup(" <span class=\"error\">Error: {}</span>").format(s["error"])
    if status == "interrupted" and not monitored:   # a user's loop has no --resume
        body += Markup(" Continue it with <code>rayleighflow run --resume {}</code>.").format(
            run.run_dir)
    for stop in s.get("stopped_early") or []:
        if isinstance(stop, Mapping):
            body += Markup(" <span class=\"stopped\">Flow <code>{}</code> stopped early "
                           "(<b>{}</b>): {}</span>").format(stop.get("flow"), stop.get("status"),
                                                           stop.get("message"))
    return headline, body


_MONITOR_UNCLOSED = ("summary.json was not written: the training loop stopped before "
                     "monitor.close() (killed?). The values here are read from the recorded "
                     "rows of trajectories/main.jsonl; the diagnoses, written at close, were "
                     "not saved.")

_FOOTNOTE_MARKS = ("masked on the log axis", "no finite values recorded",
                   "not recorded in this run", "outside the plotted range",
                   "drawn on the row marked 0")


def _is_footnote(note: str) -> bool:
    return any(mark in note for mark in _FOOTNOTE_MARKS)


def _diagnoses(s: Mapping[str, Any]) -> list[dict[str, str]]:
    return [{"step": format_number(d.get("step")), "kind": str(d.get("kind") or "?"),
             "message": str(d.get("message") or "")}
            for d in s.get("diagnoses") or [] if isinstance(d, Mapping)]


def _context(run: RunContents, figures: list[RenderedFigure],
             monitored: bool = False) -> dict[str, Any]:
    s = run.summary
    status = str(s.get("status") or "unknown")
    headline, banner_text = _banner(s, run, monitored)
    certs = _certificates(s)
    notes = [str(n) for n in s.get("notes") or [] if n is not None]
    if monitored:   # the diagnoses have their own table: not twice
        said = {d["message"] for d in _diagnoses(s)}
        notes = [n for n in notes if n not in said]
    if monitored and run.from_trajectories:   # the generic note speaks of flows and --resume
        notes = [_MONITOR_UNCLOSED if n.startswith("summary.json was not written") else n
                 for n in notes]
    run_versions = s.get("versions") if isinstance(s.get("versions"), Mapping) else {}
    return {
        "title": str(s.get("experiment") or run.run_dir.name),
        "description": s.get("description") if isinstance(s.get("description"), str) else "",
        "created": s.get("created"), "run_dir": run.run_dir.name,
        "status": status, "status_class": status if status in _BANNERS else "other",
        "banner_headline": headline, "banner_text": banner_text,
        "early_stop": bool(s.get("stopped_early")),
        "traceback": s.get("traceback") if isinstance(s.get("traceback"), str) else None,
        "from_trajectories": run.from_trajectories,
        "monitored": monitored, "diagnoses": _diagnoses(s) if monitored else [],
        "highlights": (_monitor_cards(s, run) if monitored
                       else _highlights(s, certs, run.trajectories)),
        "summary_rows": _summary_rows(s, monitored),
        "vacuous_fraction": f"{VACUOUS_FRACTION:.0%}",
        "certificates": certs, "empirical": EMPIRICAL, "extras": _extras(s),
        "notes": notes, "problems": list(run.problems),
        "figures": [_figure(f) for f in figures],
        "figure_notes": sum(not _is_footnote(n) for f in figures for n in f.notes),
        "collapse_trajectories": len(run.trajectories) > 8,
        "trajectories": [{"name": t.name, "records": format_number(t.records),
                          "reduction": (Markup("{} → {}").format(format_number(t.loss_first),
                                                                  format_number(t.loss_last))
                                        if t.loss_first is not None else "—"),
                          "t_first": format_number(t.t_first), "t_last": format_number(t.t_last),
                          "status": t.status or "no end record", "detail": t.detail or "",
                          "columns": ", ".join(t.columns)} for t in run.trajectories],
        "config_text": run.config_text,
        "versions": [(k, str(v)) for k, v in run_versions.items()],
        "renderer": versions()["rayleighflow"],
        "rendered_at": datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def _template() -> jinja2.Template:
    source = resources.files(__package__).joinpath("templates", "report.html").read_text(
        encoding="utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    return env.from_string(source)


def render_report(run_dir: str | Path) -> Path:
    """Draw the figures, then write ``RUN_DIR/report.html``; return its path."""
    run_dir = check_run_dir(run_dir)
    run = load_run(run_dir)
    monitored = is_monitored(run_dir, run.summary)
    main = _traj(run, "main")
    columns = main.columns if main is not None else ()
    figures = render_figures(run_dir, (lambda spec: adapt_monitor_figures(
        spec, run.summary, columns)) if monitored else None)
    html = _template().render(**_context(run, figures, monitored))
    path = run_dir / REPORT_FILE
    atomic_write_text(path, html)
    return path


def report_problems(run_dir: str | Path) -> tuple[str, ...]:
    """The ways the saved files of ``run_dir`` break the run-folder contract (empty when none):
    an unreadable or invalid summary.json, an unreadable, missing or truncated trajectory."""
    return load_run(run_dir).problems


def report_from_dir(run_dir: str | Path) -> Path:
    """Entry point of ``rayleighflow report RUN_DIR``: render the report, return its path.

    Raises FileNotFoundError when the folder does not exist or holds neither summary.json nor
    trajectories, ValueError when it is not a folder or nothing in it can be read. A run with
    trajectories but no summary.json (interrupted) gets a partial report.
    """
    return render_report(run_dir)
