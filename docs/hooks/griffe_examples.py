"""A griffe extension for the API pages: the project's docstrings head their doctests with
``Example:`` (or the reST ``Example::``); griffe's Google parser knows only ``Examples:``, so
the heading is renamed before parsing and the doctests render as Python examples.
"""

from __future__ import annotations

import re

import griffe

_HEADING = re.compile(r"^(?P<indent>[ \t]*)Example::?[ \t]*$", flags=re.M)


class ExamplesSection(griffe.Extension):
    """``Example:`` / ``Example::`` → ``Examples:`` in every docstring that has doctests."""

    def on_instance(self, *, node, obj, agent, **kwargs) -> None:
        doc = obj.docstring
        if doc is not None and ">>>" in doc.value:
            doc.value = _HEADING.sub(r"\g<indent>Examples:", doc.value)
