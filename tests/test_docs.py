"""The documentation contract (issue 12): every public name has a docstring with a runnable
example, the examples pass as doctests, and every public name has an entry in the API reference
pages of the documentation site (docs/api/*.md, rendered by mkdocstrings).

Examples run as ``doctest`` runs them (in a copy of the defining module's globals), in float64
at small sizes. Exempt from the example rule, with the reason:

* ``rayleighflow.__version__``: a version string, not an object with behaviour;
* ``rayleighflow.Params``: the type alias ``dict[str, Tensor]``; Python attaches no docstring
  to an alias (it is documented in the API page by its definition in ``_types.py``).
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch

import rayleighflow
import rayleighflow.ntk

ROOT = Path(__file__).resolve().parents[1]
API_DIR = ROOT / "docs" / "api"
EXEMPT_EXAMPLE = {
    "rayleighflow.__version__": "a version string",
    "rayleighflow.Params": "a type alias (dict[str, Tensor]) without a docstring of its own",
}
EXEMPT_PAGE = {"rayleighflow.__version__": "a version string (shown on the API index page)"}


def _public() -> list[tuple[str, object]]:
    out = []
    for mod in (rayleighflow, rayleighflow.ntk):
        for name in mod.__all__:
            out.append((f"{mod.__name__}.{name}", getattr(mod, name)))
    return out


PUBLIC = _public()
WITH_EXAMPLE = [(q, o) for q, o in PUBLIC if q not in EXEMPT_EXAMPLE]


def _own_doc(obj: object) -> str | None:
    """The object's own docstring (a class's, not one inherited from Enum or Exception)."""
    if inspect.isclass(obj):
        return obj.__dict__.get("__doc__")
    return getattr(obj, "__doc__", None)


def _examples(qualname: str, obj: object) -> list[doctest.DocTest]:
    doc = _own_doc(obj)
    if not doc:
        return []
    module = inspect.getmodule(obj)
    globs = dict(vars(module)) if module is not None else {}
    parser = doctest.DocTestParser()
    return [parser.get_doctest(doc, globs, qualname, getattr(module, "__file__", None), 0)]


def _not_skipped(test: doctest.DocTest) -> int:
    return sum(1 for ex in test.examples if not ex.options.get(doctest.SKIP, False))


def test_public_names_are_listed_and_exemptions_exist():
    names = {q for q, _ in PUBLIC}
    assert set(EXEMPT_EXAMPLE) <= names and set(EXEMPT_PAGE) <= names
    assert len(WITH_EXAMPLE) >= 60  # rayleighflow.__all__ and rayleighflow.ntk.__all__


@pytest.mark.parametrize("qualname,obj", WITH_EXAMPLE, ids=[q for q, _ in WITH_EXAMPLE])
def test_docstring_has_a_runnable_example_that_passes(qualname, obj):
    doc = _own_doc(obj)
    assert doc and doc.strip(), f"{qualname} has no docstring"
    tests = _examples(qualname, obj)
    runnable = sum(_not_skipped(t) for t in tests)
    assert runnable > 0, (f"{qualname}: its docstring has no '>>>' example that runs (none, or "
                          "every one marked +SKIP)")
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    messages: list[str] = []
    default_dtype = torch.get_default_dtype()
    try:
        for t in tests:
            runner.run(t, out=messages.append)
    finally:
        torch.set_default_dtype(default_dtype)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{qualname}: doctest failed\n" + "".join(messages)
    assert result.attempted >= runnable


def _api_entries() -> dict[str, list[str]]:
    """``::: dotted.path`` directives in the API pages, by page."""
    pages = sorted(API_DIR.glob("*.md"))
    assert pages, f"no API pages in {API_DIR}"
    return {p.name: re.findall(r"^:::\s*([\w.]+)\s*$", p.read_text(), flags=re.M)
            for p in pages}


def _resolve(path: str) -> object:
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


def test_every_public_name_has_an_api_page_entry():
    entries = _api_entries()
    resolved = []
    for page, paths in entries.items():
        for path in paths:
            try:
                resolved.append(_resolve(path))
            except (ImportError, AttributeError) as err:
                pytest.fail(f"{page}: '::: {path}' does not resolve ({err})")
    missing = [q for q, o in PUBLIC
               if q not in EXEMPT_PAGE and not any(o is r for r in resolved)]
    assert not missing, f"public names without an API page entry: {missing}"
