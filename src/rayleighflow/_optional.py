"""The optional extras: which packages each one brings, and the one error for a missing one.

``pip install rayleighflow`` gives the numerical core and the monitor. The rest comes with an
extra (pyproject.toml's ``[project.optional-dependencies]``, kept equal to :data:`EXTRAS`)::

    report  matplotlib, jinja2     figures and report.html (`rayleighflow report`, `run`)
    prove   python-flint, mpmath   rf.prove (outward-rounded ball arithmetic; its reference)
    data    scikit-learn           the bundled real datasets (load_sklearn: iris, wine, ...)

A feature used without its extra raises :class:`MissingExtra` (an ImportError) naming the
extra, e.g. ``rayleighflow report needs matplotlib and jinja2: pip install
'rayleighflow[report]'``; the CLI prints that line and exits 2.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

__all__ = ["EXTRAS", "REPORT_FEATURE", "MissingExtra", "guard", "require", "require_extra"]

#: extra -> the modules it provides (import names), in the order the message names them
EXTRAS: dict[str, tuple[str, ...]] = {
    "report": ("matplotlib", "jinja2"),
    "prove": ("flint", "mpmath"),
    "data": ("sklearn",),
}
#: import name -> distribution name, where they differ
DISTRIBUTIONS = {"flint": "python-flint", "sklearn": "scikit-learn"}
#: what the [report] extra is for, as its errors say it
REPORT_FEATURE = "rayleighflow report (figures and report.html)"


class MissingExtra(ImportError):
    """An optional feature was used without its extra. ``extra`` names it; the message says
    which packages it brings and the install command."""

    def __init__(self, extra: str, feature: str, missing: str | None = None) -> None:
        packages = " and ".join(DISTRIBUTIONS.get(m, m) for m in EXTRAS[extra])
        super().__init__(f"{feature} needs {packages}: pip install 'rayleighflow[{extra}]'",
                         name=missing)
        self.extra = extra
        self.feature = feature


def _top(name: str | None) -> str:
    return (name or "").partition(".")[0]


@contextmanager
def guard(extra: str, feature: str) -> Iterator[None]:
    """Turn the absence of one of ``extra``'s packages, inside the block, into
    :class:`MissingExtra`; any other import failure (a broken install) propagates as it is::

        with guard("prove", "rf.prove"):
            from flint import arb
    """
    try:
        yield
    except ModuleNotFoundError as e:
        if _top(e.name) in EXTRAS[extra]:
            raise MissingExtra(extra, feature, e.name) from e
        raise


def require(module: str, extra: str, feature: str) -> ModuleType:
    """``module`` imported, or :class:`MissingExtra` for ``extra`` when it is not installed."""
    if _top(module) not in EXTRAS[extra]:
        raise ValueError(f"{module!r} is not a package of the extra {extra!r}")
    with guard(extra, feature):
        return importlib.import_module(module)


def require_extra(extra: str, feature: str) -> None:
    """Every package of ``extra`` importable, or :class:`MissingExtra` (checked up front, so a
    run does not fail at its end)."""
    for module in EXTRAS[extra]:
        require(module, extra, feature)
