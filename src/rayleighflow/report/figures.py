"""Draw the figures an experiment declared in figures.json to figures/NAME.png and .svg.

Drawing never fails a report: a series whose data is missing (an interrupted run) or whose spec
is wrong is skipped, a figure that cannot be drawn becomes a placeholder, and every such event
is a note on the :class:`RenderedFigure` that the HTML report shows next to the figure.

Conventions beyond docs/RUN_FOLDER.md (see also ``figspec``):

* colors: series without ``color`` take the next color of a colorblind-safe cycle (Okabe–Ito;
  ``"C0"``… name the same cycle), skipping colors the panel names explicitly; a panel with
  more auto-colored series than that cycle holds (e.g. one curve per layer) takes tab20's
  twenty colors instead, and past twenty the line style changes with each round; a ``band``
  without ``color`` takes the color of the series just before it in its panel, so
  ``[line, band]`` pairs match; ``hline`` defaults to gray. An invalid color is a note.
* ``style`` is a matplotlib line style (``"-"``, ``"--"``, ``":"``, ``"-."``) for line, hline
  and errorbar (default: none, markers only); ``marker`` sets scatter and errorbar markers.
* rows where x or y is NaN (a column recorded only at some records) are dropped, so sparse
  columns draw as connected curves; non-positive values on a log axis are masked (the curve
  breaks there) with a note; with the panel's ``zero_row``, values exactly 0 are drawn as
  markers on a row labelled "0" at the bottom of the panel instead (a dead layer's R = 0).
* ``events`` (panel): a dashed vertical line at each x with its label at the top; events at
  the same x share one line, and a label that would overprint the previous one is left out.
* a ``symlog`` x-axis over data that never goes below 0 starts at 0 (no negative ticks).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, final

import numpy as np

from .._io import atomic_write
from .._optional import REPORT_FEATURE, guard
from .figspec import (
    RunData,
    events_of,
    figure_problems,
    panel_problems,
    series_problems,
    validate_figures_spec,
)

# This module draws: it is imported only by the report (extra [report]), never by
# ``import rayleighflow`` or the monitor; without matplotlib the error names the extra.
with guard("report", REPORT_FEATURE):
    import matplotlib
    from matplotlib import colors as mcolors
    from matplotlib.axes import Axes
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.transforms import blended_transform_factory

__all__ = ["RenderedFigure", "render_figures", "validate_figures_spec", "PALETTE"]

#: Okabe–Ito, reordered so the first colors are the most distinct on white.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000",
           "#F0E442")
#: For panels with more auto-colored curves than PALETTE holds: matplotlib's tab20, dark
#: shades first so that up to ten curves stay far apart; past twenty the line style changes.
MANY = (*(f"tab20:{i}" for i in range(0, 20, 2)), *(f"tab20:{i}" for i in range(1, 20, 2)))
MANY_STYLES = ("-", "--", "-.", ":")
ZERO_ROW = 0.03  # axes fraction of the row where exact zeros sit on a log y-axis
DPI = 110
TINY = 1e-300  # values at or below it are masked on a log axis (zero or underflow)
PANEL_SIZE = (5.5, 4.0)  # inches per panel
LEGEND_INSIDE = 2  # legends with more entries go below the panel (never on data)
_STYLE = {
    "axes.prop_cycle": matplotlib.cycler(color=list(PALETTE)),
    "axes.grid": True, "grid.alpha": 0.3, "grid.linestyle": "-",
    "axes.spines.top": False, "axes.spines.right": False,
    "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9, "ytick.labelsize": 9,
    "legend.fontsize": 8.5, "legend.framealpha": 0.9, "legend.edgecolor": "0.85",
    "lines.linewidth": 1.8, "font.family": "DejaVu Sans",
    "svg.hashsalt": "rayleighflow",  # stable SVG ids: re-rendering gives the same file
}


@final
@dataclass(frozen=True)
class RenderedFigure:
    """One figure of figures.json after drawing; ``png``/``svg`` are None if it failed."""

    name: str
    title: str
    png: Path | None
    svg: Path | None
    alt: str
    caption: str = ""
    notes: tuple[str, ...] = field(default=())
    panels: int = 1

    @property
    def ok(self) -> bool:
        return self.png is not None


def render_figures(run_dir: str | Path,
                   adapt: Callable[[list[Any]], list[Any]] | None = None
                   ) -> list[RenderedFigure]:
    """Draw every figure of ``RUN_DIR/figures.json`` (none if the file is absent).

    ``adapt`` maps the parsed spec to the one drawn (the report uses it to add a monitored
    run's diagnoses and panels); figures.json itself is left as it is.
    """
    run_dir = Path(run_dir)
    path = run_dir / "figures.json"
    if not path.exists():
        return []
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return [_failed("figures.json", f"figures.json could not be read: {e}")]
    if not isinstance(spec, list):
        return [_failed("figures.json", "figures.json must be a list of figures")]
    if adapt is not None:
        spec = adapt(spec)
    out_dir = run_dir / "figures"
    out_dir.mkdir(exist_ok=True)
    data = RunData(run_dir)
    rendered: list[RenderedFigure] = []
    seen: set[str] = set()
    for i, fig_spec in enumerate(spec):
        problems = figure_problems(fig_spec)
        name = fig_spec.get("name") if isinstance(fig_spec, Mapping) else None
        label = name if isinstance(name, str) else f"figure {i}"
        if not problems and name in seen:
            problems = [f"duplicate figure name {name!r}"]
        if problems:
            rendered.append(_failed(label, *(f"{label}: {p}; not drawn" for p in problems)))
            continue
        seen.add(name)
        try:
            rendered.append(_render_one(fig_spec, data, out_dir))
        except Exception as e:  # one bad figure must not cost the whole report
            rendered.append(_failed(name, f"{name}: drawing failed ({type(e).__name__}: {e})",
                                    title=str(fig_spec.get("title", ""))))
    return rendered


def _failed(name: str, *notes: str, title: str = "") -> RenderedFigure:
    return RenderedFigure(name=name, title=title or name, png=None, svg=None,
                          alt=f"{title or name} (not drawn)", notes=tuple(notes))


def _render_one(spec: Mapping[str, Any], data: RunData, out_dir: Path) -> RenderedFigure:
    name, title = spec["name"], str(spec.get("title", ""))
    notes: list[str] = []
    try:
        fig = _draw(spec, data, notes, parse_math=True)
        files = _save(fig, out_dir, name)
    except ValueError as e:
        # Most likely a label with an unbalanced '$' that mathtext refuses; draw it literally.
        notes.clear()
        notes.append(f"{name}: labels drawn without math formatting ({e})".split("\n")[0])
        fig = _draw(spec, data, notes, parse_math=False)
        files = _save(fig, out_dir, name)
    return RenderedFigure(name=name, title=title or name, png=files[0], svg=files[1],
                          alt=_alt_text(spec), caption=str(spec.get("caption", "")),
                          notes=tuple(notes), panels=len(spec["panels"]))


def _save(fig: Figure, out_dir: Path, name: str) -> tuple[Path, Path]:
    paths = []
    for fmt in ("png", "svg"):
        path = out_dir / f"{name}.{fmt}"
        with matplotlib.rc_context(_STYLE):
            atomic_write(path, lambda fh, fmt=fmt: fig.savefig(
                fh, format=fmt, dpi=DPI, facecolor="white",
                metadata={"Date": None} if fmt == "svg" else None), binary=True)
        paths.append(path)
    return paths[0], paths[1]


def _has_data(panel: Any, data: RunData) -> bool:
    """Whether any data series of ``panel`` has a finite value to draw."""
    if not isinstance(panel, Mapping) or not isinstance(panel.get("series"), list):
        return False
    for s in panel["series"]:
        if not isinstance(s, Mapping) or s.get("kind") == "hline" or series_problems(s)[0]:
            continue
        values, _ = data.get(s.get("y"))
        if values is not None and np.isfinite(values).any():
            return True
    return False


def _draw(spec: Mapping[str, Any], data: RunData, notes: list[str], *,
          parse_math: bool) -> Figure:
    # No panel without data: panels with nothing recorded are left out (all of them empty:
    # the first one stays, saying so).
    panels = [p for p in spec["panels"] if _has_data(p, data)] or spec["panels"][:1]
    for j, p in enumerate(spec["panels"]):
        if p not in panels:
            title = p.get("title") if isinstance(p, Mapping) else None
            notes.append(f"{spec['name']}, panel {title or j!r}: no data recorded; panel "
                         "left out (not recorded in this run)")
    # rc_context restores every setting on exit: nothing leaks into the caller's matplotlib.
    with matplotlib.rc_context({**_STYLE, "text.parse_math": parse_math}):
        # A long legend goes below its panel (inside, it would hide the data): make room.
        rows = max((_legend_rows(p) for p in panels), default=0)
        height = PANEL_SIZE[1] + (0.2 + 0.18 * rows if rows else 0.0)
        fig = Figure(figsize=(PANEL_SIZE[0] * len(panels), height), dpi=DPI)
        FigureCanvasAgg(fig)  # explicit Agg canvas; no pyplot, no global backend switch
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for j, (ax, panel) in enumerate(zip(axes, panels, strict=True)):
            where = f"{spec['name']}, panel {j}"
            if isinstance(panel, Mapping) and panel.get("title"):
                where = f"{spec['name']}, panel {panel['title']!r}"
            _draw_panel(ax, panel, data, notes, where)
        # No suptitle: the report shows the figure title above the image, and the files are
        # meant to drop into a paper, where the caption carries it.
        fig.tight_layout()
    return fig


def _draw_panel(ax: Axes, panel: Any, data: RunData, notes: list[str], where: str) -> None:
    problems = panel_problems(panel)
    notes += [f"{where}: {p}" for p in problems]
    if not isinstance(panel, Mapping):
        panel = {}
    scales = {}
    for axis in ("x", "y"):
        scale = panel.get(f"{axis}scale", "linear")
        scales[axis] = scale if scale in ("linear", "log", "symlog") else "linear"
    ax.set_title(str(panel.get("title", "")))
    ax.set_xlabel(str(panel.get("xlabel", "")))
    ax.set_ylabel(str(panel.get("ylabel", "")))
    series = panel.get("series") if isinstance(panel.get("series"), list) else []
    drawn, labelled, last_color = 0, 0, None
    auto = _auto_styles(series)
    # exact zeros drawn on the zero row, counted per series (None: the panel masks them)
    zeros: list[int] | None = [] if panel.get("zero_row") is True and scales["y"] == "log" \
        else None
    extent: dict[str, list[float]] = {"x": [], "y": []}  # data series only, for the limits
    references = 0
    for k, s in enumerate(series):
        fatal, minor = series_problems(s)
        name = f"{where}, series {k}"
        if isinstance(s, Mapping) and isinstance(s.get("label"), str) and s["label"]:
            name = f"{where}, {s['label']!r}"
        notes += [f"{name}: {p}" for p in minor]
        if fatal:
            notes += [f"{name}: {p}; skipped" for p in fatal]
            continue
        color = s.get("color") if isinstance(s.get("color"), str) else None
        if color is not None and not mcolors.is_color_like(color):
            notes.append(f"{name}: {color!r} is not a matplotlib color; using the cycle")
            color = None
        if color is None and s["kind"] == "band" and last_color is not None:
            color = last_color
        elif color is None and s["kind"] == "hline":
            color = "0.35"
        elif color is None:
            color, restyle = next(auto)
            if restyle is not None and s["kind"] in ("line", "errorbar"):
                s = {**s, "style": restyle}
        reference = s.get("role") == "reference"
        why = _draw_series(ax, s, data, scales, color, notes, name,
                           None if reference else extent, zeros)
        if why is not None:
            notes.append(f"{name}: {why}; skipped")
            continue
        references += reference
        drawn += 1
        last_color = color
        labelled += bool(s.get("label"))
    for axis in ("x", "y"):
        if scales[axis] != "linear" and drawn:
            getattr(ax, f"set_{axis}scale")(scales[axis])
        if references and extent[axis] and f"{axis}lim" not in panel:
            # Reference curves (bounds, theory) may span decades beyond the data: the axes
            # follow the recorded data, and a curve leaving the range is clipped.
            getattr(ax, f"set_{axis}lim")(*_padded(extent[axis], scales[axis]))
        lim = panel.get(f"{axis}lim")
        if isinstance(lim, list | tuple) and len(lim) == 2 and drawn:
            getattr(ax, f"set_{axis}lim")(*lim)
    if scales["x"] == "symlog" and drawn and "xlim" not in panel and extent["x"] \
            and min(extent["x"]) >= 0:
        # symlog pads below the first record into negative values (ticks at −10⁰, −10¹);
        # time starts at 0, and so does the axis
        ax.set_xlim(left=0.0)
    if zeros:
        ax.set_ylim(*ax.get_ylim())  # the zero row sits in axes coordinates: freeze the data's
        ax.text(-0.01, ZERO_ROW, "0", transform=ax.transAxes, ha="right", va="center",
                fontsize=9, color="0.25")
    _draw_events(ax, panel, notes, where)
    if panel.get("equal_aspect") is True:
        ax.set_aspect("equal", adjustable="datalim")
    if labelled > LEGEND_INSIDE:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=_legend_cols(panel),
                  frameon=False)
    elif labelled:
        ax.legend(loc="best")
    if not drawn:
        ax.text(0.5, 0.5, "no data recorded", transform=ax.transAxes, ha="center",
                va="center", color="0.45", fontsize=11)


def _padded(values: list[float], scale: str) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if scale == "log" and lo > 0:
        span = max(np.log10(hi / lo), 1.0)
        return lo / 10 ** (0.06 * span), hi * 10 ** (0.06 * span)
    pad = 0.06 * (hi - lo) if hi > lo else max(abs(hi), 1.0) * 0.1
    return lo - pad, hi + pad


def _labels(panel: Any) -> list[str]:
    series = panel.get("series") if isinstance(panel, Mapping) else None
    return [str(s["label"]) for s in series or [] if isinstance(s, Mapping) and s.get("label")]


def _legend_cols(panel: Any) -> int:
    # Two columns only when the labels fit side by side under a 5.5-inch panel.
    return 2 if max(map(len, _labels(panel)), default=0) <= 30 else 1


def _legend_rows(panel: Any) -> int:
    """Rows of a below-the-panel legend, or 0 if the legend fits inside the panel."""
    n = len(_labels(panel))
    return -(-n // _legend_cols(panel)) if n > LEGEND_INSIDE else 0


def _auto_styles(series: list[Any]) -> Iterator[tuple[str, str | None]]:
    """(color, line style or None) for the series without a color: the palette minus colors
    the panel names explicitly, so "C0" and an auto color differ; when the panel has more such
    series than that, tab20's colors, with a new line style for each round past twenty."""
    named = [s for s in series if isinstance(s, Mapping)]
    used = {mcolors.to_hex(s["color"]) for s in named
            if isinstance(s.get("color"), str) and mcolors.is_color_like(s["color"])}
    wanting = sum(s.get("kind") not in ("band", "hline") and not isinstance(s.get("color"), str)
                  for s in named)
    palette = [c for c in PALETTE if c.lower() not in used] or list(PALETTE)
    if wanting <= len(palette):
        return ((c, None) for c in itertools.cycle(palette))
    many = [mcolors.to_hex(matplotlib.colormaps["tab20"](int(c.split(":")[1]))) for c in MANY]
    # a tab20 color close to one the panel names would look like it: left out
    near = [np.asarray(mcolors.to_rgb(u)) for u in used]
    many = [c for c in many
            if all(np.abs(np.asarray(mcolors.to_rgb(c)) - u).sum() > 0.3 for u in near)] or many
    return ((c, None if k < len(many) else MANY_STYLES[(k // len(many)) % len(MANY_STYLES)])
            for k, c in enumerate(itertools.cycle(many)))


def _draw_series(ax: Axes, s: Mapping[str, Any], data: RunData, scales: dict[str, str],
                 color: str, notes: list[str], name: str,
                 extent: dict[str, list[float]] | None = None,
                 zeros: list[int] | None = None) -> str | None:
    """Draw one series; return why it was skipped, or None when drawn. ``extent`` collects
    the finite x and y range of a data series; ``zeros`` (a log y-axis with a zero row)
    collects how many exact zeros of y were drawn on that row."""
    kind = s["kind"]
    label = s.get("label") or None
    alpha = float(s["alpha"]) if isinstance(s.get("alpha"), int | float) else None
    lw = float(s["linewidth"]) if isinstance(s.get("linewidth"), int | float) else None
    style = s.get("style") if isinstance(s.get("style"), str) else None
    marker = s.get("marker") if isinstance(s.get("marker"), str) else None
    if kind == "hline":
        value = float(s["value"])
        if not np.isfinite(value) or (scales["y"] == "log" and value <= 0):
            return f"value {value} cannot be drawn on a {scales['y']} y-axis"
        ax.axhline(value, color=color, linestyle=style or "--", linewidth=lw or 1.2,
                   alpha=alpha, label=label)
        return None
    keys = ("x", "y", {"band": "y2", "errorbar": "yerr"}.get(kind))
    cols = {}
    for key in filter(None, keys):
        values, why = data.get(s[key])
        if values is None:
            return why
        cols[key] = values
    n = min(len(v) for v in cols.values())
    if any(len(v) != n for v in cols.values()):
        sizes = ", ".join(f"{k}: {len(v)}" for k, v in cols.items())
        notes.append(f"{name}: lengths differ ({sizes}); drawn over the first {n}")
    cols = {k: v[:n] for k, v in cols.items()}
    keep = np.logical_and.reduce([np.isfinite(v) for v in cols.values()])
    if not keep.any():
        return "no finite values recorded"
    cols = {k: v[keep] for k, v in cols.items()}
    masked = 0
    zero_x = np.empty(0)
    if zeros is not None and kind in ("line", "scatter"):
        zero_x = cols["x"][cols["y"] == 0.0]
        cols["y"] = np.where(cols["y"] == 0.0, np.nan, cols["y"])  # not masked: on the row
    for key, axis in (("x", "x"), ("y", "y"), ("y2", "y")):
        if key in cols and scales[axis] == "log":
            # ≤ 0 cannot be drawn; below 1e-300 is underflow that would stretch the axis
            # over hundreds of decades with all the data in one corner
            bad = cols[key] <= TINY
            masked += int(bad.sum())
            cols[key] = np.where(bad, np.nan, cols[key])
    if zero_x.size:
        zeros.append(int(zero_x.size))  # type: ignore[union-attr]  # zero_x needs zeros
        ax.plot(zero_x, np.full(zero_x.size, ZERO_ROW), color=color, linestyle="none",
                marker="v", markersize=4.5, alpha=alpha, clip_on=False,
                transform=blended_transform_factory(ax.transData, ax.transAxes))
        notes.append(f"{name}: {zero_x.size} value(s) equal to 0 drawn on the row marked 0 "
                     "at the bottom (a log axis has no 0)")
    if masked or zero_x.size:
        if not zero_x.size and all(np.isnan(v).all() for k, v in cols.items() if k != "yerr"):
            return "no values above 1e-300 to draw on a log axis (masked on the log axis)"
        if masked:
            notes.append(f"{name}: {masked} value(s) ≤ {TINY:g} (zero or underflow) masked "
                         "on the log axis")
    x, y = cols["x"], cols["y"]
    if extent is not None:
        for axis, v in (("x", x), ("y", y)):
            v = v[np.isfinite(v)]
            if v.size:
                extent[axis] += [float(v.min()), float(v.max())]
    if kind == "line":
        ax.plot(x, y, color=color, linestyle=style or "-", marker=marker, markersize=3.5,
                linewidth=lw, alpha=alpha, label=label)
    elif kind == "scatter":
        ax.plot(x, y, color=color, linestyle="none", marker=marker or style or "o",
                markersize=4.5, alpha=0.85 if alpha is None else alpha, label=label)
    elif kind == "band":
        ax.fill_between(x, y, cols["y2"], color=color, alpha=0.2 if alpha is None else alpha,
                        linewidth=0, label=label)
    else:  # errorbar
        ax.errorbar(x, y, yerr=np.abs(cols["yerr"]), color=color, linestyle=style or "none",
                    marker=marker or "o", markersize=4, capsize=3, elinewidth=1,
                    linewidth=lw, alpha=alpha, label=label)
    return None


def _alt_text(spec: Mapping[str, Any]) -> str:
    """A sentence per panel: what is plotted against what, and which curves."""
    parts = [str(spec.get("title") or spec["name"])]
    for p in spec["panels"]:
        if not isinstance(p, Mapping):
            continue
        y, x = p.get("ylabel") or "value", p.get("xlabel") or "x"
        scale = " (log scale)" if p.get("yscale") == "log" else ""
        text = f"{p.get('title') or 'panel'}: {y}{scale} against {x}"
        labels = [s["label"] for s in p.get("series") or []
                  if isinstance(s, Mapping) and isinstance(s.get("label"), str) and s["label"]]
        if labels:
            text += "; curves: " + ", ".join(labels)
        parts.append(text)
    return ". ".join(parts) + "."


def _draw_events(ax: Axes, panel: Mapping[str, Any], notes: list[str], where: str) -> None:
    """The panel's events: a dashed line at each x, labelled at the top (one line per x)."""
    events = events_of(panel)
    if not events:
        return
    at: dict[float, list[str]] = {}
    for x, label in events:
        if not np.isfinite(x):
            notes.append(f"{where}: event {label!r} at x = {x} cannot be drawn; skipped")
            continue
        names = at.setdefault(x, [])
        if label not in names:
            names.append(label)
    top = blended_transform_factory(ax.transData, ax.transAxes)
    lo, hi = ax.get_xlim()
    gap = 0.025 * abs(hi - lo)   # labels closer than that would print over each other
    last: tuple[float, str] | None = None
    for x, labels in sorted(at.items()):
        ax.axvline(x, color="0.3", linestyle="--", linewidth=0.9, alpha=0.75, zorder=1.5)
        text = ", ".join(labels)
        if last is not None and x - last[0] < gap:
            continue   # the line is drawn; its label would overprint the previous one
        ax.text(x, 0.985, " " + text, transform=top, rotation=90, ha="right", va="top",
                fontsize=7.5, color="0.2", clip_on=False)
        last = (x, text)
