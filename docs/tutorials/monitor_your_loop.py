"""Watch your own training loop with rf.Monitor.

A plain PyTorch loop (an MLP on scikit-learn's digits, SGD, mini-batches) with the monitor's
three lines. Each step records the batch loss, ‖∇L_B‖² from the gradients already in
``.grad``, ‖∇ℓ‖²_D from the detached outputs and their quotient R(K; ∇ℓ), with per-layer
quotients; every few steps a full-data estimate streams the data, and a fixed probe set gets
its NTK spectrum. The monitor's numbers are diagnostics, not certificates (those need
full-batch gradient descent or flow).
"""

import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import rayleighflow as rf  # noqa: E402

OUT = Path(os.environ.get("RAYLEIGHFLOW_TUTORIAL_OUT", "."))
BUILD = os.environ.get("RAYLEIGHFLOW_DOCS_BUILD", "")


def save(fig, name: str, caption: str) -> None:
    """Write a PNG figure; its caption and the docs build id go into the PNG metadata."""
    fig.savefig(OUT / name, dpi=80, bbox_inches="tight",
                metadata={"Title": caption, "Description": BUILD})
    plt.close(fig)
    print(f"[figure] {name}: {caption}")


torch.manual_seed(0)
digits = load_digits()
x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
y = torch.tensor(digits.target)
data = TensorDataset(x, y)
loader = DataLoader(data, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
full = DataLoader(data, batch_size=512)                     # streamed for the full-data estimate
model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.5)

log = Path(tempfile.mkdtemp()) / "run"
monitor = rf.Monitor(model, "cross-entropy", log=log, optimizer=opt,        # 1
                     full_data=full, full_every=10, probe=x[:16], probe_every=20,
                     target_loss=0.1)
for _epoch in range(2):
    for xb, yb in loader:
        out = model(xb)
        loss = F.cross_entropy(out, yb)
        opt.zero_grad()
        loss.backward()
        monitor.step(out, yb, loss)                                          # 2
        opt.step()
summary = monitor.close()                                                    # 3

steps = rf.Trajectory.load(log / "trajectories" / "main.jsonl")
fulls = rf.Trajectory.load(log / "trajectories" / "full.jsonl")
probe = rf.Trajectory.load(log / "trajectories" / "probe.jsonl")
print(f"{len(steps)} steps recorded; full-data estimates at {len(fulls)} steps, probe spectra "
      f"at {len(probe)}")
print(f"full-data loss {fulls['loss'][0]:.4g} → {fulls['loss'][-1]:.4g}; batch R(K; ∇ℓ) from "
      f"{np.nanmin(steps['rayleigh']):.4g} to {np.nanmax(steps['rayleigh']):.4g}")
print("summary keys:", ", ".join(sorted(summary)))
forecast = monitor.last_forecast
print("forecast:", forecast.text if forecast is not None else "none")
for diagnosis in summary.get("diagnoses", [])[:5]:
    print(f"diagnosis at step {diagnosis['step']} ({diagnosis['kind']}): {diagnosis['message']}")

layers = [c for c in steps.columns if c.startswith("rayleigh[")]
fig, axes = plt.subplots(1, 2, figsize=(8.6, 3.4))
axes[0].semilogy(steps.t, steps["loss"], ".", ms=3, color="0.6", label="batch loss L_B")
axes[0].semilogy(fulls.t, fulls["loss"], "k-o", ms=4, label="full-data loss L")
axes[0].set_xlabel("optimizer step")
axes[0].legend(fontsize=8)
axes[0].set_title(f"SGD, lr = 0.5: L {fulls['loss'][0]:.3g} → {fulls['loss'][-1]:.3g}")
axes[1].plot(steps.t, steps["rayleigh"], "k-", lw=1.5, label="R(K; ∇ℓ) (batch)")
for col in layers:
    axes[1].plot(steps.t, steps[col], lw=1, label=f"layer {col[9:-1]}")
axes[1].set_xlabel("optimizer step")
axes[1].legend(fontsize=8)
axes[1].set_title(f"min batch R(K; ∇ℓ) = {np.nanmin(steps['rayleigh']):.3g}")
fig.tight_layout()
save(fig, "monitor.png",
     f"What the monitor recorded over {len(steps)} SGD steps: the batch and full-data losses "
     f"({len(fulls)} full-data estimates) and the batch R(K; ∇ℓ) with its {len(layers)} "
     f"per-layer quotients (min {np.nanmin(steps['rayleigh']):.3g}).")

if len(probe) and "lambda_max" in probe.columns:
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ax.semilogy(probe.t, probe["lambda_max"], "o-", label="λ_max(K) on the probe set")
    if "lambda_min" in probe.columns:
        lam_min = np.clip(probe["lambda_min"], 1e-12, None)
        ax.semilogy(probe.t, lam_min, "s-", label="λ_min(K) (clipped at 1e-12)")
    ax.set_xlabel("optimizer step")
    ax.legend(fontsize=8)
    ax.set_title(f"probe spectra at {len(probe)} steps")
    save(fig, "probe.png",
         f"NTK spectrum ends of the 16-image probe set at {len(probe)} steps: λ_max from "
         f"{probe['lambda_max'][0]:.3g} to {probe['lambda_max'][-1]:.3g}.")
