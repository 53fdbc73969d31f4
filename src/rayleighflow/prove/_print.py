"""Printing a proof's numbers outward: an upper bound rounded up, a lower bound down, and an
inequality with the digits it needs to be true as printed (``0.0562341 < 0.05623`` is not)."""

from __future__ import annotations

import math
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal


def _rounded(x: float, digits: int, mode: str) -> str:
    if not math.isfinite(x) or x == 0:
        return f"{x:g}"
    d = Decimal(x)                       # the float's exact value
    q = Decimal(1).scaleb(d.adjusted() - digits + 1)
    r = d.quantize(q, rounding=mode)
    if -5 <= r.adjusted() < 6:
        text = format(r, "f")
        return text.rstrip("0").rstrip(".") if "." in text else text
    # a float nearest r prints back as r at up to 15 digits; past that keep the decimal
    return f"{float(r):.{digits}g}" if digits <= 15 else f"{r:e}"


def fmt_up(x: float, digits: int = 4) -> str:
    """``x`` rounded up to ``digits`` significant digits (an upper bound stays one).

    Example:
        >>> fmt_up(0.0562341), fmt_down(0.0562341), fmt_up(-0.0562341)
        ('0.05624', '0.05623', '-0.05623')
    """
    return _rounded(float(x), digits, ROUND_CEILING)


def fmt_down(x: float, digits: int = 4) -> str:
    """``x`` rounded down to ``digits`` significant digits (a lower bound stays one)."""
    return _rounded(float(x), digits, ROUND_FLOOR)


def fmt_below(a: float, b: float, digits: int = 4) -> tuple[str, str]:
    """(a rounded up, b rounded down) with the fewest digits ≥ ``digits`` that keep a < b true
    as printed (up to 17 digits: beyond that the two floats print as they are).

    Example:
        >>> fmt_below(0.0562341, 0.05623412)
        ('0.056234101', '0.056234119')
    """
    for n in range(digits, 18):
        sa, sb = fmt_up(a, n), fmt_down(b, n)
        if Decimal(sa) < Decimal(sb):
            return sa, sb
    return repr(float(a)), repr(float(b))
