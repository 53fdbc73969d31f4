"""Shared registry of test models for kernel computations (float64 unless a test casts).

Each case builds a fresh, seeded :class:`Model` and its inputs. ``structured`` lists the layer
paths the structured path must accept; ``rejected`` those it must refuse (falling back to
Jacobian contraction for their parameters). Tolerances live in ``TOL`` (one place).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rayleighflow.problem import Model

TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
"""Relative tolerance (to the largest entry) for kernels computed in each dtype."""


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype = torch.float64,
                 what: str = "kernel") -> None:
    """Max entry difference ≤ TOL[dtype] · max |expected|; prints the worst entries if not."""
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = float(expected.abs().max()) or 1.0
    diff = (actual - expected).abs()
    err = float(diff.max()) / scale
    if err > TOL[dtype]:
        flat = diff.reshape(-1)
        worst = torch.topk(flat, min(5, flat.numel())).indices
        idx = [tuple(int(v) for v in torch.unravel_index(i, diff.shape)) for i in worst]
        rows = "\n".join(f"  {i}: got {float(actual[i]):.12g}, want {float(expected[i]):.12g}"
                         for i in idx)
        raise AssertionError(f"{what}: relative error {err:.3g} > {TOL[dtype]:g}\n{rows}")


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], Model]
    inputs: Callable[[torch.Generator, int], Tensor]
    structured: tuple[str, ...] = ()
    rejected: tuple[str, ...] = ()


def _gauss(*shape: int) -> Callable[[torch.Generator, int], Tensor]:
    return lambda g, n: torch.randn(n, *shape, generator=g, dtype=torch.float64)


def _module(factory: Callable[[], nn.Module]) -> Callable[[], Model]:
    def build() -> Model:
        torch.manual_seed(0)
        return Model(factory().double())

    return build


class SmallCNN(nn.Module):
    """Conv2d (same padding) + max-pool + Conv2d (stride 2, dilation) + avg-pool + Linear."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding="same")
        self.c2 = nn.Conv2d(4, 5, 2, stride=2, dilation=1, padding=1)
        self.fc = nn.Linear(5 * 2 * 2, k)

    def forward(self, x: Tensor) -> Tensor:
        h = F.max_pool2d(torch.relu(self.c1(x)), 2)
        h = F.adaptive_avg_pool2d(torch.tanh(self.c2(h)), 2)
        return self.fc(h.flatten(1))


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv1d(3, 4, 3, padding="same", dilation=2)
        self.c2 = nn.Conv1d(4, 2, 2, stride=2, bias=False)
        self.fc = nn.Linear(2 * 4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.avg_pool1d(F.gelu(self.c(x)), 1)
        return self.fc(torch.tanh(self.c2(h)).flatten(1))


class GroupedConvNet(nn.Module):
    """Conv2d, a depthwise Conv2d (groups = channels), a grouped 1×1 Conv2d, then Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(2, 4, 3, padding=1)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.pw = nn.Conv2d(4, 6, 1, groups=2, bias=False)
        self.fc = nn.Linear(6 * 2 * 2, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.dw(torch.tanh(self.c(x))))
        return self.fc(F.avg_pool2d(torch.tanh(self.pw(h)), 3).flatten(1))


class ResidualNet(nn.Module):
    """A stem Conv2d, a residual block h + c2(relu(c1(h))), one conv applied twice, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.c1 = nn.Conv2d(3, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 3, 3, padding=1)
        self.twice = nn.Conv2d(3, 3, 1)
        self.fc = nn.Linear(3 * 3 * 3, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.stem(x))
        h = torch.relu(h + self.c2(torch.relu(self.c1(h))))
        h = torch.tanh(self.twice(torch.tanh(self.twice(h))))
        return self.fc(F.max_pool2d(h, 2).flatten(1))


class TokenNet(nn.Module):
    """Embedding + Linear over a sequence (positions) + LayerNorm: exercises the fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 5)
        self.proj = nn.Linear(5, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.norm(torch.tanh(self.proj(self.emb(tokens))))
        return self.head(h.mean(1))


class TiedNet(nn.Module):
    """Two Linear layers sharing one weight: neither may be contracted layerwise."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight
        self.out = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))))


class DirectUseNet(nn.Module):
    """A Linear whose weight is also used through F.linear outside its own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.fc(x)) + 0.5 * F.linear(x, self.fc.weight)
        return self.out(h)


class SeqFirstNet(nn.Module):
    """Applies a Linear with the sequence, not the batch, in dimension 0."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 3)
        self.out = nn.Linear(9, 2)

    def forward(self, x: Tensor) -> Tensor:  # x: (b, 3, 2)
        h = torch.tanh(self.fc(x.transpose(0, 1))).transpose(0, 1)
        return self.out(h.reshape(x.shape[0], -1))


class AttentionNet(nn.Module):
    """nn.MultiheadAttention never calls out_proj's forward: out_proj must be refused."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.att = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:  # x: (b, T, 3)
        h = torch.tanh(self.inp(x))
        h, _ = self.att(h, h, h, need_weights=False)
        return self.head(h.mean(1))


def _callable_model() -> Model:
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(3, 4, generator=g, dtype=torch.float64),
              "v": torch.randn(4, 2, generator=g, dtype=torch.float64)}

    def f(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return torch.sin(x @ p["w"]) @ p["v"]

    return Model(f, params)


CASES: dict[str, Case] = {c.name: c for c in [
    Case("mlp_tanh", _module(lambda: nn.Sequential(
        nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3))), _gauss(4),
        structured=("0", "2", "4")),
    Case("mlp_relu", _module(lambda: nn.Sequential(
        nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))), _gauss(4), structured=("0", "2")),
    Case("mlp_gelu_single", _module(lambda: nn.Sequential(
        nn.Linear(5, 6), nn.GELU(), nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 1))), _gauss(5),
        structured=("0", "2", "4")),
    Case("cnn", _module(SmallCNN), _gauss(2, 8, 8), structured=("c1", "c2", "fc")),
    Case("conv1d", _module(Conv1dNet), _gauss(3, 8), structured=("c", "c2", "fc")),
    Case("grouped_conv", _module(GroupedConvNet), _gauss(2, 6, 6),
         structured=("c", "dw", "pw", "fc")),
    Case("residual", _module(ResidualNet), _gauss(2, 6, 6),
         structured=("stem", "c1", "c2", "twice", "fc")),
    Case("tokens_layernorm", _module(TokenNet),
         lambda g, n: torch.randint(0, 7, (n, 3), generator=g), structured=("proj", "head")),
    Case("linear", _module(lambda: nn.Linear(5, 3)), _gauss(5), structured=("",)),
    Case("tied", _module(TiedNet), _gauss(4), structured=("out",)),
    Case("direct_use", _module(DirectUseNet), _gauss(4), structured=("out",),
         rejected=("fc",)),
    Case("seq_first", _module(SeqFirstNet), _gauss(3, 2), structured=("out",),
         rejected=("fc",)),
    Case("attention", _module(AttentionNet), _gauss(3, 3), structured=("inp", "head"),
         rejected=("att.out_proj",)),
    Case("callable", _callable_model, _gauss(3)),
]}


def inputs(case: Case, n: int, seed: int = 0) -> Tensor:
    return case.inputs(torch.Generator().manual_seed(seed), n)


# -- full problems: model × loss × data × convention ---------------------------------------

@dataclass(frozen=True)
class ProblemCase:
    """A full problem of the shared registry: a model case, a loss, the data size, the
    convention and whether the data weights are uniform."""

    name: str
    model: str          # a key of CASES
    loss: str           # "square", "cross-entropy" or "logistic"
    n: int = 6
    convention: str = "mean"
    uniform: bool = True

    def build(self, seed: int = 0):
        """A fresh :class:`rayleighflow.Problem` (float64, seeded)."""
        from rayleighflow.data import Dataset
        from rayleighflow.problem import Problem

        case = CASES[self.model]
        model = case.build()
        x = inputs(case, self.n, seed)
        with torch.no_grad():
            k = model(model.params, x).shape[1]
        g = torch.Generator().manual_seed(100 + seed)
        if self.loss == "square":
            y = torch.randn(self.n, k, generator=g, dtype=torch.float64)
        else:
            y = torch.randint(0, 2 if self.loss == "logistic" else k, (self.n,), generator=g)
        w = None if self.uniform else torch.rand(self.n, generator=g, dtype=torch.float64) + 0.2
        data = Dataset.from_arrays(x, y, weights=None if w is None else w / w.sum(),
                                   index_inputs=not x.is_floating_point())
        return Problem(model, data, self.loss, self.convention)


PROBLEMS: dict[str, ProblemCase] = {p.name: p for p in [
    ProblemCase("mlp-square-mean", "mlp_tanh", "square"),
    ProblemCase("mlp-ce-sum-weighted", "mlp_tanh", "cross-entropy", convention="sum",
                uniform=False),
    ProblemCase("cnn-ce-mean", "cnn", "cross-entropy", n=5),
    ProblemCase("gelu-logistic-mean", "mlp_gelu_single", "logistic", n=7),
    ProblemCase("linear-square-sum", "linear", "square", convention="sum"),
    ProblemCase("tokens-ce-weighted", "tokens_layernorm", "cross-entropy", uniform=False),
    ProblemCase("callable-square-mean", "callable", "square", n=5),
]}
