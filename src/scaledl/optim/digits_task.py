"""A small real task for the optimizers: an MLP on scikit-learn's handwritten digits (offline,
bundled with scikit-learn), trained on N local ranks. Shared by ``scaledl optim bench``, the
demo and ``bench/optim_bytes_accuracy.py``.

Every rank samples its own minibatches (i.i.d. from the training split, keyed by rank and
step), steps on its own gradient, and evaluates the **averaged** model: training loss on the
whole training split, accuracy on the held-out split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from scaledl.datasets import load_digits_shuffled
from scaledl.optim._task import OPTIMIZERS, RunSpec, build_optimizer, launch_task, train_task
from scaledl.optim.names import PARTITIONS

__all__ = [
    "OPTIMIZERS",
    "PARTITIONS",
    "DigitsTask",
    "RunSpec",
    "build_optimizer",
    "load_digits_split",
    "run_local",
    "train_digits",
]


def load_digits_split(seed: int = 0, test_fraction: float = 0.2) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test): 8x8 images scaled to [0, 1], a seeded split."""
    x, y = load_digits_shuffled(seed)
    n_test = int(len(y) * test_fraction)
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def make_mlp(seed: int = 0, hidden: int = 128) -> nn.Module:
    """A two-hidden-layer MLP for 8x8 digits (~26k parameters): cheap enough for 8 ranks on
    2 cores."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


@dataclass
class DigitsTask:
    """The digits MLP as a :class:`scaledl.optim._task.Task`.

    ``partition="label-skew"`` gives rank r only the r-th slice of the training set sorted by
    label (about 10/n classes per rank), the heterogeneous case where local models drift.
    """

    data: tuple[torch.Tensor, ...]
    partition: str = "iid"
    _pool: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.partition not in PARTITIONS:
            raise ValueError(f"partition must be one of {PARTITIONS}, got {self.partition!r}")

    def make_model(self, seed: int) -> nn.Module:
        return make_mlp(seed)

    def batch(
        self, step: int, rank: int, world: int, seed: int, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x_tr, y_tr = self.data[0], self.data[1]
        if self._pool is None:
            self._pool = torch.arange(len(y_tr))
            if self.partition == "label-skew":
                order = torch.sort(y_tr, stable=True).indices
                self._pool = order.tensor_split(world)[rank]
        g = torch.Generator().manual_seed(seed * 1_000_003 + step * 4099 + rank)
        idx = self._pool[torch.randint(len(self._pool), (batch_size,), generator=g)]
        return x_tr[idx], y_tr[idx]

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(x), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        x_tr, y_tr, x_te, y_te = self.data
        train_loss = float(nn.functional.cross_entropy(model(x_tr), y_tr))
        accuracy = float((model(x_te).argmax(1) == y_te).float().mean())
        return {"loss": train_loss, "accuracy": accuracy}


def train_digits(
    specs: list[RunSpec],
    steps: int,
    batch_size: int = 16,
    eval_points: int = 8,
    seed: int = 0,
    data: tuple[torch.Tensor, ...] | None = None,
    verbose: bool = False,
    partition: str = "iid",
) -> list[dict[str, Any]]:
    """Train each spec on this rank (call on every rank of the default group); see
    :func:`scaledl.optim._task.train_task`. Records carry ``final_loss`` (training loss)
    and ``final_accuracy`` (held-out accuracy). ``data`` (from :func:`load_digits_split`)
    saves each rank the scikit-learn import."""
    task = DigitsTask(data if data is not None else load_digits_split(seed), partition)
    return train_task(task, specs, steps, batch_size, eval_points, seed, verbose)


def run_local(
    specs: list[RunSpec],
    world_size: int,
    steps: int,
    timeout_s: float = 900.0,
    data: tuple[torch.Tensor, ...] | None = None,
    partition: str = "iid",
    **kw: Any,
) -> list[dict[str, Any]]:
    """Train ``specs`` on ``world_size`` local gloo ranks; rank 0's records."""
    task = DigitsTask(data if data is not None else load_digits_split(kw.get("seed", 0)), partition)
    return launch_task(task, specs, world_size, steps, timeout_s, **kw)
