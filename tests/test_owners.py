"""One owner per rule (issue 18): each rule below lives in one module, and the others use it."""

from __future__ import annotations

import ast
import hashlib
import math
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from torch import nn

from rayleighflow._io import atomic_write_text, finite_or_none
from rayleighflow._types import check_weights
from rayleighflow.activations import ACTIVATIONS, activation_spec, module_activation
from rayleighflow.seeding import generator, stream_seed

SRC = Path(__file__).resolve().parents[1] / "src" / "rayleighflow"


def test_seed_streams_keep_the_mappings_runs_were_recorded_with():
    assert stream_seed(5) == 5
    assert stream_seed(5, 3) == 5 * 1_000_003 + 3             # built-in experiments' offsets
    digest = hashlib.sha256(b"5:model").digest()                # TOML experiments' named streams
    assert stream_seed(5, "model") == int.from_bytes(digest[:8], "little") & (2**63 - 1)
    a = torch.rand(3, generator=generator(5, 3))
    assert torch.equal(a, torch.rand(3, generator=torch.Generator().manual_seed(5_000_018)))


def test_activation_registry_feeds_models_config_and_proofs():
    from rayleighflow.experiments.config import ACTIVATIONS as CONFIG_NAMES
    from rayleighflow.theorems.two_layer import TwoLayer

    assert CONFIG_NAMES == tuple(ACTIVATIONS)
    for name, spec in ACTIVATIONS.items():
        assert module_activation(spec.module) is spec
        net = TwoLayer(2, 3, activation=name, generator=torch.Generator().manual_seed(0))
        x = torch.randn(4, 2, dtype=torch.float64)
        expected = net.out(spec.function(net.hidden(x))) / math.sqrt(3)
        assert torch.equal(net(x), expected)
    assert module_activation(type("MyTanh", (nn.Tanh,), {})) is None   # exact types only
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        activation_spec("swish")


def test_proof_constants_cover_exactly_the_proven_activations():
    pytest.importorskip("flint")
    from rayleighflow.prove.activations import ACTIVATIONS as PROVEN

    assert set(PROVEN) == {n for n, s in ACTIVATIONS.items() if s.proven}
    assert all(ACTIVATIONS[n].reference is not None for n in PROVEN)


def test_one_weight_rule():
    check_weights([0.25, 0.75])
    check_weights(torch.full((3,), 1 / 3, dtype=torch.float32))      # float32 rounding passes
    for bad, match in [([0.5, 0.6], "sum to"), ([1.0, 0.0], "must be > 0"),
                       ([math.nan, 1.0], "finite"), ([], "non-empty")]:
        with pytest.raises(ValueError, match=match):
            check_weights(bad)


def test_builtin_config_text_writes_non_finite_floats_as_toml():
    from rayleighflow.experiments.registry import builtin_config_text

    text = builtin_config_text("demo", {"seed": 1}, {"a": math.inf, "b": math.nan, "c": 2.0})
    doc = tomllib.loads(text)
    assert doc["params"]["a"] == math.inf and math.isnan(doc["params"]["b"])
    assert doc["params"]["c"] == 2.0 and isinstance(doc["params"]["c"], float)


def test_helpers(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").read_text() == "x" and len(list(tmp_path.iterdir())) == 1
    assert [finite_or_none(v) for v in (None, math.inf, 1, True, "1")] == [None, None, 1.0,
                                                                          None, None]


def test_run_folder_owner_loads_no_report_layer():
    code = ("import sys, rayleighflow.rundir, rayleighflow.experiments.runner; "
            "print(sorted(m for m in ('matplotlib', 'jinja2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_user_experiments_do_not_import_the_registry():
    tree = ast.parse((SRC / "experiments" / "user.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "registry" not in imported


def test_no_second_toml_writer_or_atomic_rename():
    offenders = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        rel = path.relative_to(SRC).as_posix()
        if "def _toml_value" in text:
            offenders.append(f"{rel}: a TOML writer")
        if "os.replace(" in text and rel not in {"_io.py"}:
            offenders.append(f"{rel}: os.replace")
    # monitor/sinks.py is owned elsewhere and is switched to rayleighflow._io when merging
    assert [o for o in offenders if not o.startswith("monitor/")] == []
