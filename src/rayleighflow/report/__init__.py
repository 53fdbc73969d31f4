"""The report layer: reads a run folder and renders its figures and report.html.

It never imports torch and never recomputes physics: everything shown comes from the files an
experiment saved (docs/RUN_FOLDER.md). Entry point: :func:`report_from_dir`.
"""

from ..rundir import (  # the run folder's owner; re-exported for the report's callers
    REQUIRED_SUMMARY_KEYS,
    read_summary,
    recorded_summary,
    validate_summary,
    versions,
    write_summary,
)
from .figures import RenderedFigure, render_figures, validate_figures_spec
from .html import format_number, render_report, report_from_dir, report_problems

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
