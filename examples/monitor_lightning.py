"""The monitor in a Lightning Trainer: one line in the callbacks (needs the [lightning] extra).

    python examples/monitor_lightning.py [--out runs/monitor-lightning] [--epochs 2]
    rayleighflow report runs/monitor-lightning
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rayleighflow.monitor.lightning import RayleighMonitor


class DigitsMLP(L.LightningModule):
    def __init__(self, width: int = 64, lr: float = 0.2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, 10))
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def digits() -> TensorDataset:
    d = load_digits()
    return TensorDataset(torch.tensor(d.data / 16.0, dtype=torch.float32),
                         torch.tensor(d.target))


def main(argv=None, extra_sinks=()) -> RayleighMonitor:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/monitor-lightning"))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=-1)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    data = digits()
    loader = DataLoader(data, batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    monitor = RayleighMonitor("cross-entropy", log=args.out, sinks=list(extra_sinks),
                              full_data=DataLoader(data, batch_size=600), full_every=10,
                              probe=data.tensors[0][:16], probe_every=20, target_loss=0.1,
                              window=10, name="digits-lightning")
    trainer = L.Trainer(max_epochs=args.epochs, max_steps=args.max_steps, accelerator="cpu",
                        callbacks=[monitor],                                   # the one line
                        logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(DigitsMLP(), loader)
    f = monitor.monitor.last_forecast
    print(f"{monitor.monitor._step} steps; {f.text if f else 'no forecast'}")
    return monitor


if __name__ == "__main__":
    main()
