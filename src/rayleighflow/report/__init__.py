"""The report layer: reads a run folder and renders its figures and report.html.

It never imports torch and never recomputes physics: everything shown comes from the files an
experiment saved (docs/RUN_FOLDER.md). Entry point: :func:`report_from_dir`.

Drawing and rendering need the ``[report]`` extra (matplotlib, jinja2): those names are
imported on first use, so the run-folder names re-exported here work without it, and a
rendering name used without it raises :class:`~rayleighflow._optional.MissingExtra`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..rundir import (  # the run folder's owner; re-exported for the report's callers
    REQUIRED_SUMMARY_KEYS,
    read_summary,
    recorded_summary,
    validate_summary,
    versions,
    write_summary,
)

if TYPE_CHECKING:
    from .figures import RenderedFigure, render_figures, validate_figures_spec
    from .html import format_number, render_report, report_from_dir, report_problems

#: the names that need the [report] extra -> their submodule
_RENDERING = {"RenderedFigure": "figures", "render_figures": "figures",
              "validate_figures_spec": "figures", "format_number": "html",
              "render_report": "html", "report_from_dir": "html", "report_problems": "html"}

__all__ = [
    "REQUIRED_SUMMARY_KEYS",
    "RenderedFigure",
    "format_number",
    "read_summary",
    "recorded_summary",
    "render_figures",
    "render_report",
    "report_from_dir",
    "report_problems",
    "validate_figures_spec",
    "validate_summary",
    "versions",
    "write_summary",
]


def __getattr__(name: str) -> Any:
    where = _RENDERING.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{where}"), name)
    globals()[name] = value
    return value
