"""Watch your own training loop: a small CNN on scikit-learn's digits, with SGD and then Adam.

    python examples/monitor_loop.py [--out runs/monitor-loop] [--epochs 3]
    rayleighflow report runs/monitor-loop/sgd        # figures + report.html from the log

Each run gets a run folder (per-step rows, full-data estimates every 25 steps, the NTK
spectrum of a 16-image probe set every 50 steps), a CSV file and TensorBoard scalars when the
tensorboard package is installed. The three monitor lines are marked with  # <-- monitor.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rayleighflow.monitor import CSV, Monitor


def digits(dtype=torch.float32) -> TensorDataset:
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=dtype).unsqueeze(1)   # (1797, 1, 8, 8)
    return TensorDataset(x, torch.tensor(d.target))


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(16 * 2 * 2, 10))


def sinks(out: Path) -> list:
    found = [CSV(out / "steps.csv")]
    try:
        from rayleighflow.monitor import TensorBoard
        found.append(TensorBoard(out / "tensorboard"))
    except ImportError:
        pass
    return found


def train(optimizer_name: str, out: Path, epochs: int, seed: int = 0,
          max_steps: int | None = None) -> dict:
    torch.manual_seed(seed)
    data = digits()
    loader = DataLoader(data, batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    full = DataLoader(data, batch_size=512)                       # streamed, never stored
    model = small_cnn()
    opt = (torch.optim.SGD(model.parameters(), lr=0.3) if optimizer_name == "sgd"
           else torch.optim.Adam(model.parameters(), lr=3e-3))
    monitor = Monitor(model, "cross-entropy", log=out, sinks=sinks(out),              # <-- monitor
                      optimizer=opt, full_data=full, full_every=25, probe=data.tensors[0][:16],
                      probe_every=50, target_loss=0.05, window=20, name=f"digits-{optimizer_name}")
    steps = 0
    for _ in range(epochs):
        for x, y in loader:
            if max_steps is not None and steps == max_steps:
                break
            steps += 1
            out_ = model(x)
            loss = F.cross_entropy(out_, y)
            opt.zero_grad()
            loss.backward()
            monitor.step(out_, y, loss)                                               # <-- monitor
            opt.step()
    summary = monitor.close()                                                         # <-- monitor
    f = monitor.last_forecast
    print(f"{optimizer_name}: {summary['steps']} steps, full-data loss "
          f"{summary['loss_initial']:.4g} → {summary['loss_final']:.4g}, smallest batch "
          f"R(K; ∇ℓ) = {summary['rayleigh_min']:.4g}; {f.text if f else 'no forecast'}")
    return summary


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/monitor-loop"))
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args(argv)
    return [train(name, args.out / name, args.epochs) for name in ("sgd", "adam")]


if __name__ == "__main__":
    main()
