"""Monitor sinks and integrations: run folder → `rayleighflow report`, CSV, TensorBoard read
back by its own event reader, a rich table, the Lightning callback, and the two examples."""

import csv
import importlib.util
import json
import math
import sys
from io import StringIO
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rayleighflow.cli import main as cli_main
from rayleighflow.monitor import CSV, Monitor, RichTable
from rayleighflow.report import validate_summary
from rayleighflow.trajectory import Trajectory

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _train(mon_kwargs, steps=12, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))
    x = torch.randn(60, 6)
    y = torch.randint(0, 3, (60,))
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    mon = Monitor(net, "cross-entropy", optimizer=opt, echo=None,
                  full_data=[(x[:30], y[:30]), (x[30:], y[30:])], full_every=4,
                  probe=(x[:8], y[:8]), probe_every=6, target_loss=0.5, window=4, **mon_kwargs)
    for i in range(steps):
        xb, yb = x[(5 * i) % 60:(5 * i) % 60 + 10], y[(5 * i) % 60:(5 * i) % 60 + 10]
        out = net(xb)
        loss = F.cross_entropy(out, yb)
        opt.zero_grad()
        loss.backward()
        mon.step(out, yb, loss)
        opt.step()
    summary = mon.close()
    return mon, summary


def test_run_folder_renders_with_rayleighflow_report(tmp_path, capsys):
    run = tmp_path / "run"
    mon, summary = _train({"log": run})
    assert validate_summary(json.loads((run / "summary.json").read_text())) == []
    assert summary["certificates"] == []
    assert "not certificates" in summary["notes"][0]
    assert summary["forecast"]["kind"] == "forecast (if the ratio stays ≥ μ)"
    main = Trajectory.load(run / "trajectories" / "main.jsonl")
    assert main.status == "complete" and len(main) == 12
    assert list(main["rayleigh"]) == pytest.approx([r["rayleigh"] for r in mon.rows], rel=1e-15)
    assert len(Trajectory.load(run / "trajectories" / "full.jsonl")) == 3
    assert len(Trajectory.load(run / "trajectories" / "probe.jsonl")) == 2
    assert cli_main(["report", str(run)]) == 0
    for name in ("loss", "kernel", "kl", "norms"):
        assert (run / "figures" / f"{name}.png").stat().st_size > 1000
    html = (run / "report.html").read_text()
    assert "not drawn" not in html and "diagnostics, not certificates" in html


def test_interrupted_run_folder_still_renders(tmp_path):
    run = tmp_path / "run"
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    mon = Monitor(net, "cross-entropy", log=run, sync_every=1, echo=None)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    for _ in range(3):
        out = net(x)
        F.cross_entropy(out, y).backward()
        mon.step(out, y)
        net.zero_grad()
    # killed here: no close(), so no summary.json; the report reads the rows
    assert not (run / "summary.json").exists()
    assert cli_main(["report", str(run)]) == 0
    assert (run / "figures" / "loss.png").exists()


def test_csv_sink_reads_back(tmp_path):
    mon, _ = _train({"sinks": [CSV(tmp_path / "m.csv")]})
    with open(tmp_path / "m.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["rayleigh"]) for r in rows] == pytest.approx(
        [r["rayleigh"] for r in mon.rows], rel=1e-15)
    assert "rayleigh[0]" in rows[0] and "kl[cross-entropy]" in rows[0]
    with open(tmp_path / "m.full.csv") as fh:
        full = list(csv.DictReader(fh))
    assert [float(r["loss"]) for r in full] == pytest.approx(
        [r["loss"] for r in mon.full_rows], rel=1e-15)


def test_rich_table_sink():
    from rich.console import Console

    buf = StringIO()
    _train({"sinks": [RichTable(Console(file=buf, width=120, force_terminal=False))]})
    text = buf.getvalue()
    assert "R(K; ∇ℓ)" in text and "full data" in text and "probe set" in text


def test_tensorboard_scalars_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rayleighflow.monitor import TensorBoard

    mon, _ = _train({"sinks": [TensorBoard(tmp_path / "tb")]})
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"rayleigh/R", "rayleigh/layer/0", "rayleigh/layer/2", "rayleigh/kl/cross-entropy",
            "rayleigh/full/R", "rayleigh/probe/lambda_max"} <= set(tags)
    got = [(e.step, e.value) for e in acc.Scalars("rayleigh/R")]
    assert [s for s, _ in got] == list(range(12))
    assert [v for _, v in got] == pytest.approx([r["rayleigh"] for r in mon.rows], rel=1e-6)
    full = [e.value for e in acc.Scalars("rayleigh/full/loss")]
    assert full == pytest.approx([r["loss"] for r in mon.full_rows], rel=1e-6)


def _load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_example_monitor_loop(tmp_path, capsys):
    ex = _load_example("monitor_loop")
    for name in ("sgd", "adam"):
        summary = ex.train(name, tmp_path / name, epochs=1, max_steps=10)
        assert summary["steps"] == 10 and validate_summary(summary) == []
        assert cli_main(["report", str(tmp_path / name)]) == 0
        assert (tmp_path / name / "steps.csv").exists()
    out = capsys.readouterr().out
    assert "sgd: 10 steps" in out and "adam: 10 steps" in out


def test_lightning_callback_two_epochs_then_report(tmp_path):
    pytest.importorskip("lightning")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rayleighflow.monitor import TensorBoard

    ex = _load_example("monitor_lightning")
    cb = ex.main(["--out", str(tmp_path / "lit"), "--epochs", "2"],
                 extra_sinks=[TensorBoard(tmp_path / "tb")])
    mon = cb.monitor
    steps = math.ceil(1797 / 64) * 2
    assert mon._step == steps and len(mon.rows) == steps
    assert all(math.isfinite(r["rayleigh"]) and r["rayleigh"] > 0 for r in mon.rows)
    summary = json.loads((tmp_path / "lit" / "summary.json").read_text())
    assert validate_summary(summary) == [] and summary["status"] == "complete"
    assert "momentum = 0.9" in summary["update_rule"]
    assert cli_main(["report", str(tmp_path / "lit")]) == 0
    assert (tmp_path / "lit" / "figures" / "kernel.png").exists()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert len(acc.Scalars("rayleigh/R")) == steps


def _tiny_lightning_module(L, smoothing: float = 0.0, dtype: torch.dtype = torch.float64):
    """A LightningModule: a 5-6-3 tanh MLP (``dtype``, seed 1) trained by SGD on cross-entropy
    with the given label smoothing."""

    class Mod(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            return F.cross_entropy(self(batch[0]), batch[1], label_smoothing=smoothing)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Mod


@pytest.mark.parametrize("smoothing", [0.02, 0.1])
def test_lightning_label_smoothing_voids_the_quotient_with_a_message(smoothing):
    """Issue 22: the callback hands Lightning's loss to the monitor, so a label-smoothed loss
    (not the declared cross-entropy) gives no quotient, with the cause named."""
    L = pytest.importorskip("lightning")
    from torch.utils.data import DataLoader, TensorDataset

    from rayleighflow.monitor.lightning import RayleighMonitor

    torch.manual_seed(0)
    x, y = torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 3, (32,))

    said: list[str] = []
    cb = RayleighMonitor("cross-entropy", echo=said.append)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", callbacks=[cb], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(_tiny_lightning_module(L, smoothing)(),
                DataLoader(TensorDataset(x, y), batch_size=8))
    rows = cb.monitor.rows
    assert len(rows) == 4 and all(math.isnan(r["rayleigh"]) for r in rows)
    assert any("label smoothing" in m for m in said)


def test_lightning_callback_matches_a_plain_loop_with_accumulation(tmp_path):
    """The callback's rows equal a hand-written loop's on the same data, with two micro-batches
    per step (Lightning divides each micro-batch loss by 2)."""
    L = pytest.importorskip("lightning")
    from torch.utils.data import DataLoader, TensorDataset

    from rayleighflow.monitor.lightning import RayleighMonitor

    torch.manual_seed(0)
    x, y = torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 3, (32,))

    Mod = _tiny_lightning_module(L)

    cb = RayleighMonitor("cross-entropy", echo=None)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", callbacks=[cb], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accumulate_grad_batches=2)
    trainer.fit(Mod(), DataLoader(TensorDataset(x, y), batch_size=4))
    ref_net = Mod().net
    opt = torch.optim.SGD(ref_net.parameters(), lr=0.1)
    ref = Monitor(ref_net, "cross-entropy", echo=None)
    for s in range(4):
        xb, yb = x[8 * s:8 * s + 8], y[8 * s:8 * s + 8]
        out = ref_net(xb)
        F.cross_entropy(out, yb).backward()
        ref.step(out, yb)
        opt.step()
        opt.zero_grad()
    ref.close()
    got = [r["rayleigh"] for r in cb.monitor.rows]
    assert got == pytest.approx([r["rayleigh"] for r in ref.rows], rel=1e-10)
    assert [r["n"] for r in cb.monitor.rows] == [8.0] * 4


def test_lightning_loggers_get_the_monitors_own_rows(tmp_path):
    """Issue 21: every Lightning logger gets rayleigh/R (CSVLogger here), equal to the
    monitor's own run-folder JSONL, at the optimizer step each row is about."""
    L = pytest.importorskip("lightning")
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    from rayleighflow.monitor.lightning import RayleighMonitor

    torch.manual_seed(0)
    x, y = torch.randn(48, 5, dtype=torch.float64), torch.randint(0, 3, (48,))
    cb = RayleighMonitor("cross-entropy", tmp_path / "run", echo=None, sync_every=4)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", callbacks=[cb],
                        logger=CSVLogger(tmp_path / "csv", name="", version=""),
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(_tiny_lightning_module(L)(), DataLoader(TensorDataset(x, y), batch_size=8))
    with open(tmp_path / "csv" / "metrics.csv") as fh:
        logged = {int(r["step"]): float(r["rayleigh/R"]) for r in csv.DictReader(fh)
                  if r.get("rayleigh/R")}
    own = Trajectory.load(tmp_path / "run" / "trajectories" / "main.jsonl")
    assert len(own) == 6 and sorted(logged) == [int(s) for s in own["step"]]
    for step, r in zip(own["step"], own["rayleigh"], strict=True):
        assert logged[int(step)] == pytest.approx(r, rel=1e-12)


def test_the_callback_sink_names_and_steps():
    from rayleighflow.monitor import Callback

    got: list = []
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    mon = Monitor(net, "cross-entropy", sinks=[Callback(lambda m, s: got.append((s, m)))],
                  echo=None, sync_every=3)
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        out = net(x)
        F.cross_entropy(out, y).backward()
        mon.step(out, y)
        opt.step()
    mon.close()
    assert [s for s, _ in got] == [int(r["step"]) for r in mon.rows]
    for (_, m), row in zip(got, mon.rows, strict=True):
        assert m["rayleigh/R"] == row["rayleigh"] and m["rayleigh/loss"] == row["loss"]
        assert any(k.startswith("rayleigh/layer/") for k in m)
        assert any(k.startswith("rayleigh/kl/") for k in m)
    with pytest.raises(TypeError, match="callable"):
        Callback("wandb")
