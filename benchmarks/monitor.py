"""Benchmark of rf.Monitor's per-step overhead and of the full-data estimate's cost.

For each case the same model trains in alternating blocks of 10 steps: steps with the monitor
(forward + loss + zero_grad + backward + ``monitor.step(out, y, loss)`` + optimizer step, as a
user would write them; the monitor is called at each of them) and steps without it. A step
with the monitor times the training step and the call separately (the periodic read-back,
every ``sync_every`` calls, falls inside the calls that do it); after warm-up, 200 such steps
give the median training step, the median and the mean call, and the median per-step ratio.
The marginal overhead compares the median full step with the call against the median step
without it: same model, optimizer and memory, so it also counts the cache effects the call has
on the rest of the step.
A second comparison (``marginal_arms``, mlp-digits and transformer-tokens, whose logits exceed
``max_stored_elements`` so cross-entropy sums run at each step) interleaves four arms of whole
steps: no call, the monitor, the cheapest gradient read (``torch._foreach_norm``) and the
monitor with ``every=8``; it is repeated over independent runs (``--arms-runs``, fresh seeds)
and gives per arm the median and the range over runs of the marginal cost.
The full-data estimate is timed against one pass of forward + backward over the same batches
(its cost in gradient-equivalents). Everything runs in one process. Writes JSON with the
environment::

    python benchmarks/monitor.py                      # CPU, all cases
    python benchmarks/monitor.py --device cuda
    python benchmarks/monitor.py --quick              # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _env import environment
from torch import nn

from rayleighflow.monitor import Monitor, full_data_estimate

ROOT = Path(__file__).resolve().parents[1]


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(c_out)
        self.c2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(c_out)
        self.skip = (nn.Identity() if stride == 1 and c_in == c_out else
                     nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                   nn.BatchNorm2d(c_out)))

    def forward(self, x):
        return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))) + self.skip(x))


def resnet() -> nn.Module:
    """ResNet-style CNN for 3×32×32 inputs: stem 32, stages 32-64-128 (one block each)."""
    return nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                         Block(32, 32, 1), Block(32, 64, 2), Block(64, 128, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


class Encoder(nn.Module):
    """2-layer transformer encoder over tokens, logits per token (B, T, V)."""

    def __init__(self, vocab: int = 1000, d: int = 128, heads: int = 4, seq: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):
        return self.head(self.enc(self.emb(tokens) + self.pos))


def case(name: str, device: str, gen: torch.Generator):
    """(model, make_batch() -> (x, y), loss_fn(out, y))."""
    if name == "mlp-digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x_all = torch.tensor(d.data / 16.0, dtype=torch.float32, device=device)
        y_all = torch.tensor(d.target, device=device)
        model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                              nn.Linear(512, 10))

        def batch():
            i = torch.randint(0, x_all.shape[0], (64,), generator=gen).to(device)
            return x_all[i], y_all[i]
        return model, batch, F.cross_entropy
    if name == "resnet-cifar":
        def batch():
            return (torch.randn(128, 3, 32, 32, generator=gen).to(device),
                    torch.randint(0, 10, (128,), generator=gen).to(device))
        return resnet(), batch, F.cross_entropy
    if name == "transformer-tokens":
        def batch():
            t = torch.randint(0, 1000, (32, 65), generator=gen).to(device)
            return t[:, :-1], t[:, 1:]

        def loss(out, y):
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        return Encoder(), batch, loss
    raise ValueError(name)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_case(name: str, device: str, steps: int, warmup: int, full_batches: int,
             plain_blocks: bool = True, block: int = 10) -> dict:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model, batch, loss_fn = case(name, device, gen)
    model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    monitor = Monitor(model, "cross-entropy", optimizer=opt, echo=None)
    train_t, mon_t, plain_t = [], [], []

    def plain_step(x, y):
        _sync(device)
        t0 = time.perf_counter()
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        _sync(device)
        return time.perf_counter() - t0

    for i in range(warmup + steps):
        if plain_blocks and i % block == 0:
            for _ in range(block):   # a block of the same model's steps without the monitor
                t = plain_step(*batch())
                if i >= warmup:
                    plain_t.append(t)
        x, y = batch()
        _sync(device)
        t0 = time.perf_counter()
        out = model(x)
        loss = loss_fn(out, y)
        opt.zero_grad()
        loss.backward()
        _sync(device)
        t1 = time.perf_counter()
        monitor.step(out, y, loss)
        _sync(device)
        t2 = time.perf_counter()
        opt.step()
        _sync(device)
        t3 = time.perf_counter()
        if i >= warmup:
            train_t.append((t1 - t0) + (t3 - t2))
            mon_t.append(t2 - t1)
    monitor.close()
    rows = list(monitor.rows)
    med_train = statistics.median(train_t)
    ratios = [m / t for m, t in zip(mon_t, train_t, strict=True)]
    rec = {
        "case": name, "n_params": sum(p.numel() for p in model.parameters()),
        "steps_timed": steps, "warmup": warmup, "sync_every": monitor.sync_every,
        "train_step_median_s": med_train,
        "monitor_call_median_s": statistics.median(mon_t),
        "monitor_call_mean_s": statistics.fmean(mon_t),
        "overhead_median_fraction": statistics.median(mon_t) / med_train,
        "overhead_mean_fraction": statistics.fmean(mon_t) / med_train,
        "overhead_per_step_ratio_median": statistics.median(ratios),
        "step_with_monitor_median_s": statistics.median(
            [a + b for a, b in zip(train_t, mon_t, strict=True)]),
        "stored_outputs": monitor.max_stored >= out.numel() * monitor.sync_every,
        "last_rayleigh": rows[-1]["rayleigh"], "mismatches": monitor._mismatches,
    }
    # Full-data estimate against one forward + backward pass over the same batches.
    data = [batch() for _ in range(full_batches)]
    grads_t, est_t = [], []
    for _ in range(2):
        _sync(device)
        t0 = time.perf_counter()
        for x, y in data:
            out = model(x)
            flat_y = y
            torch.autograd.grad(loss_fn(out, flat_y), list(model.parameters()))
        _sync(device)
        t1 = time.perf_counter()
        full_data_estimate(model, data, monitor.loss)
        _sync(device)
        t2 = time.perf_counter()
        grads_t.append(t1 - t0)
        est_t.append(t2 - t1)
    if plain_t:
        rec["steps_without_monitor"] = len(plain_t)
        rec["step_without_monitor_median_s"] = statistics.median(plain_t)
        rec["step_without_monitor_mean_s"] = statistics.fmean(plain_t)
        rec["marginal_overhead_median_fraction"] = (
            rec["step_with_monitor_median_s"] / rec["step_without_monitor_median_s"] - 1)
        rec["marginal_overhead_mean_fraction"] = (
            statistics.fmean([a + b for a, b in zip(train_t, mon_t, strict=True)])
            / rec["step_without_monitor_mean_s"] - 1)
    rec["full_data"] = {"batches": full_batches, "gradient_pass_s": min(grads_t),
                        "estimate_s": min(est_t),
                        "gradient_equivalents": min(est_t) / min(grads_t)}
    return rec


def marginal_arms(name: str, device: str, steps: int, every: int = 8, block: int = 10,
                  sync_every: int = 20, seed: int = 0) -> dict:
    """Whole training steps in four arms, blocks of ``block`` steps in rotating order, same
    model and optimizer: ``plain`` (no call), ``monitor`` (each step measured),
    ``gradient_read`` (the cheapest possible read of the gradients: ``torch._foreach_norm`` of
    every ``.grad``, the norms kept and read back every ``sync_every`` steps, as the monitor
    keeps them: the floor of any per-step gradient diagnostic) and ``monitor_every`` (one step
    in ``every`` measured, ``Monitor(every=...)``). Marginal cost of an arm = its median step
    over the plain arm's median step − 1 (the median skips the read-back every ``sync_every``
    steps; ``marginal_mean_fraction``, of mean steps, counts it)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model, batch, loss_fn = case(name, device, gen)
    model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    mon = Monitor(model, "cross-entropy", optimizer=opt, echo=None, sync_every=sync_every)
    mon_k = Monitor(model, "cross-entropy", optimizer=opt, echo=None, sync_every=sync_every,
                    every=every)
    params = [p for p in model.parameters() if p.requires_grad]
    kept: list = []

    def read(out, y, loss) -> None:
        kept.append(torch._foreach_norm([p.grad for p in params]))
        if len(kept) >= sync_every:
            torch.stack([torch.stack(n) for n in kept]).tolist()
            kept.clear()

    calls = {"plain": None, "monitor": mon.step, "gradient_read": read,
             "monitor_every": mon_k.step}
    times: dict[str, list[float]] = {a: [] for a in calls}
    order = list(calls)
    rounds = -(-steps // block)
    out_numel = 0
    for r in range(rounds + 2):   # two warm-up rounds
        for arm in order[r % 4:] + order[:r % 4]:
            call = calls[arm]
            for _ in range(block):
                x, y = batch()
                _sync(device)
                t0 = time.perf_counter()
                out = model(x)
                loss = loss_fn(out, y)
                opt.zero_grad()
                loss.backward()
                if call is not None:
                    call(out, y, loss)
                opt.step()
                _sync(device)
                if r >= 2:
                    times[arm].append(time.perf_counter() - t0)
                out_numel = out.numel()
    mon.close()
    summary_k = mon_k.close()
    med = {a: statistics.median(t) for a, t in times.items()}
    return {"case": name, "seed": seed, "steps_per_arm": len(times["plain"]), "block": block,
            "every": every, "sync_every": sync_every,
            "outputs_stored": mon.max_stored >= out_numel * sync_every,
            "step_median_s": med,
            "step_mean_s": {a: statistics.fmean(t) for a, t in times.items()},
            "marginal_median_fraction": {a: med[a] / med["plain"] - 1 for a in calls
                                         if a != "plain"},
            # the mean counts the read-back every sync_every steps, which the median skips
            "marginal_mean_fraction": {a: statistics.fmean(times[a])
                                       / statistics.fmean(times["plain"]) - 1
                                       for a in calls if a != "plain"},
            "monitor_every_steps_measured": summary_k["steps_measured"]}


def repeated_arms(name: str, device: str, steps: int, runs: int) -> dict:
    """``marginal_arms`` over ``runs`` independent runs (fresh model, data order and monitor,
    seeds 0, 1, …), as an independent trial would repeat it: per arm the median and the range
    (min, max) over runs of each run's marginal cost, of median steps and of mean steps."""
    per_run = [marginal_arms(name, device, steps, seed=s) for s in range(runs)]
    arms = list(per_run[0]["marginal_median_fraction"])
    fracs = {a: [r["marginal_median_fraction"][a] for r in per_run] for a in arms}
    means = {a: [r["marginal_mean_fraction"][a] for r in per_run] for a in arms}
    first = per_run[0]
    return {"case": name, "runs": runs, "steps_per_arm": first["steps_per_arm"],
            "block": first["block"], "every": first["every"],
            "sync_every": first["sync_every"], "outputs_stored": first["outputs_stored"],
            "plain_step_median_s": statistics.median(
                r["step_median_s"]["plain"] for r in per_run),
            "marginal_median_fraction": {a: statistics.median(v) for a, v in fracs.items()},
            "marginal_range_fraction": {a: [min(v), max(v)] for a, v in fracs.items()},
            "marginal_mean_median_fraction": {a: statistics.median(v) for a, v in means.items()},
            "marginal_mean_range_fraction": {a: [min(v), max(v)] for a, v in means.items()},
            "per_run": per_run}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="mlp-digits,resnet-cifar,transformer-tokens")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--full-batches", type=int, default=8)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-plain", action="store_true",
                    help="skip the blocks of steps without the monitor (marginal overhead)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--arms-steps", type=int, default=1000,
                    help="steps per arm and run of the marginal-cost comparison (mlp-digits)")
    ap.add_argument("--arms-steps-transformer", type=int, default=100,
                    help="the same for transformer-tokens (its logits exceed the storage bound)")
    ap.add_argument("--arms-runs", type=int, default=5,
                    help="independent runs of the marginal-cost comparison")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.warmup, args.full_batches = 30, 5, 2
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"monitor-{args.device}.json")
    report = {"environment": environment(args.device), "cases": []}
    # The marginal cost as an independent trial measures it: interleaved arms, repeated runs.
    report["marginal_arms"] = {}
    for name, steps in (("mlp-digits", args.arms_steps),
                        ("transformer-tokens", args.arms_steps_transformer)):
        if name not in args.cases.split(","):
            continue
        arms = repeated_arms(name, args.device, 50 if args.quick else steps,
                             2 if args.quick else args.arms_runs)
        report["marginal_arms"][name] = arms
        rng = arms["marginal_range_fraction"]
        print(f"{name} marginal cost over {arms['runs']} runs (median [min, max]): " + ", ".join(
            f"{a} {100 * v:.2g}% [{100 * rng[a][0]:.2g}, {100 * rng[a][1]:.2g}]"
            for a, v in arms["marginal_median_fraction"].items()), flush=True)
    for name in args.cases.split(","):
        rec = run_case(name, args.device, args.steps, args.warmup, args.full_batches,
                       not args.no_plain)
        report["cases"].append(rec)
        print(f"{name}: train step {rec['train_step_median_s'] * 1e3:.3g} ms, monitor "
              f"{rec['monitor_call_median_s'] * 1e3:.3g} ms median / "
              f"{rec['monitor_call_mean_s'] * 1e3:.3g} ms mean "
              f"({100 * rec['overhead_median_fraction']:.2g}% / "
              f"{100 * rec['overhead_mean_fraction']:.2g}%); marginal "
              f"{100 * rec.get('marginal_overhead_median_fraction', math.nan):.2g}% / "
              f"{100 * rec.get('marginal_overhead_mean_fraction', math.nan):.2g}%; "
              "full-data estimate "
              f"{rec['full_data']['gradient_equivalents']:.2f} gradient-equivalents", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str))
    report["environment"]["loadavg_end"] = os.getloadavg()
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
