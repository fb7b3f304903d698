"""A small real task for the optimizers: an MLP on scikit-learn's handwritten digits (offline,
bundled with scikit-learn), trained on N local ranks. Shared by ``scaledl optim bench``, the
demo and ``bench/optim_bytes_accuracy.py``.

Every rank samples its own minibatches (i.i.d. from the training split, keyed by rank and
step), steps on its own gradient, and evaluates the **averaged** model on the held-out split.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from scaledl.comm.accounting import CommStats
from scaledl.datasets import load_digits_shuffled
from scaledl.optim._common import allreduce_mean_packed_, dense_model_bytes, group_size
from scaledl.optim.adaalter import AdaAlter, LocalAdaAlter
from scaledl.optim.averaging import averaged_model, broadcast_parameters
from scaledl.optim.cser import CSER, overall_ratio
from scaledl.optim.ef_sgd import EFSGD
from scaledl.optim.local_sgd import LocalSGD
from scaledl.optim.names import OPTIMIZERS, PARTITIONS
from scaledl.optim.qsparse import QSparseLocalSGD
from scaledl.optim.random_block import RandomBlock

__all__ = ["OPTIMIZERS", "RunSpec", "build_optimizer", "train_digits"]


@dataclass(frozen=True)
class RunSpec:
    """One training configuration.

    ``period`` is H (CSER's reset period, the local-SGD / QSparse / Local AdaAlter period);
    ``r1``/``r2`` are CSER's per-step and reset block ratios; ``ratio`` is the compression of
    EF-SGD's per-step block and of QSparse's block at each sync.
    """

    optimizer: str
    lr: float
    label: str = ""
    period: int = 1
    r1: float = 1.0
    r2: float = 1.0
    ratio: float = 1.0
    warmup_steps: int = 0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    initial_accumulator_value: float = 0.1

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}"
            )
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not isinstance(self.period, int) or self.period < 1:
            raise ValueError(f"period must be a positive integer, got {self.period!r}")
        for name in ("r1", "r2", "ratio"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")

    @property
    def name(self) -> str:
        return self.label or self.optimizer

    @property
    def expected_ratio(self) -> float:
        """Algorithmic compression against a dense fp32 all-reduce every step."""
        o = self.optimizer
        if o in ("cser", "cser-block"):
            return overall_ratio(self.r1, self.r2, self.period)
        if o == "ef-sgd":
            return self.ratio
        if o == "qsparse":
            return self.ratio * self.period
        if o == "local-sgd":
            return float(self.period)
        if o == "local-adaalter":
            return self.period / 2.0  # parameters + accumulator at each sync
        return 1.0


def build_optimizer(
    spec: RunSpec, model: nn.Module, seed: int = 0
) -> tuple[torch.optim.Optimizer, bool]:
    """The optimizer of ``spec`` and whether the training loop must all-reduce gradients."""
    params = list(model.parameters())
    o = spec.optimizer

    def sgd() -> torch.optim.SGD:
        return torch.optim.SGD(
            params,
            lr=spec.lr,
            momentum=spec.momentum,
            nesterov=spec.momentum > 0,
            weight_decay=spec.weight_decay,
        )

    if o == "sgd":
        return sgd(), True
    if o in ("cser", "cser-block"):
        form = "block" if o == "cser-block" else "update"
        c1, c2 = RandomBlock.for_ratio(spec.r1), RandomBlock.for_ratio(spec.r2)
        return CSER(sgd(), c1, c2, spec.period, form=form, seed=seed), False
    if o == "ef-sgd":
        return EFSGD(sgd(), RandomBlock.for_ratio(spec.ratio), seed=seed), False
    if o == "qsparse":
        block = RandomBlock.for_ratio(spec.ratio)
        return QSparseLocalSGD(sgd(), block, spec.period, seed=seed), False
    if o == "local-sgd":
        return LocalSGD(sgd(), spec.period), False
    ada = dict(lr=spec.lr, initial_accumulator_value=spec.initial_accumulator_value)
    if o == "adagrad":
        return torch.optim.Adagrad(params, eps=1e-7, **ada), True
    if o == "adaalter":
        return AdaAlter(params, **ada), True
    return LocalAdaAlter(params, period=spec.period, warmup_steps=spec.warmup_steps, **ada), False


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


@torch.no_grad()
def _evaluate(model: nn.Module, data: tuple[torch.Tensor, ...]) -> tuple[float, float]:
    x_tr, y_tr, x_te, y_te = data
    train_loss = float(nn.functional.cross_entropy(model(x_tr), y_tr))
    accuracy = float((model(x_te).argmax(1) == y_te).float().mean())
    return train_loss, accuracy


def _lr_lambda(spec: RunSpec, steps: int) -> Callable[[int], float]:
    """SGD family: linear warm-up over ``warmup_steps``, cosine decay. Synchronous
    AdaGrad/AdaAlter: the linear warm-up built into Local AdaAlter, then constant."""
    if spec.optimizer in ("adagrad", "adaalter"):
        w = spec.warmup_steps
        return lambda t: min(1.0, (t + 1) / w) if w else 1.0
    if spec.optimizer == "local-adaalter":
        return lambda t: 1.0
    w = spec.warmup_steps
    return lambda t: min(1.0, (t + 1) / w if w else 1.0) * 0.5 * (1 + math.cos(math.pi * t / steps))


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
    """Train each spec on this rank (call on every rank of the default group).

    Returns one record per spec: the evaluation curve (bytes sent by this rank so far,
    averaged model's train loss and test accuracy), the final figures, measured and expected
    compression, and wall time. ``data`` (from :func:`load_digits_split`) saves each rank the
    scikit-learn import; ``verbose`` makes rank 0 print one line per finished run to stderr.
    ``partition="label-skew"`` gives rank r only the r-th slice of the training set sorted by
    label (about 10/n classes per rank), the heterogeneous case where local models drift.
    """
    if partition not in PARTITIONS:
        raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")
    torch.manual_seed(seed)
    data = data if data is not None else load_digits_split(seed)
    x_tr, y_tr = data[0], data[1]
    rank, world = (dist.get_rank(), group_size()) if dist.is_initialized() else (0, 1)
    pool = torch.arange(len(y_tr))
    if partition == "label-skew":
        order = torch.sort(y_tr, stable=True).indices
        pool = order.tensor_split(world)[rank]
    evals = sorted({max(1, round(steps * (i + 1) / eval_points)) for i in range(eval_points)})
    records = []
    for spec in specs:
        model = make_mlp(seed)
        broadcast_parameters(model)
        opt, sync_grads = build_optimizer(spec, model, seed)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(spec, steps))
        stats: CommStats = CommStats() if sync_grads else opt.stats  # type: ignore[attr-defined]
        dense = dense_model_bytes(model.parameters(), world)
        curve = []
        start = time.perf_counter()
        for t in range(steps):
            g = torch.Generator().manual_seed(seed * 1_000_003 + t * 4099 + rank)
            idx = pool[torch.randint(len(pool), (batch_size,), generator=g)]
            model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
            if sync_grads:
                grads = [p.grad for p in model.parameters()]
                stats.record("grad", allreduce_mean_packed_(grads), dense)
                stats.end_step()
            opt.step()
            sched.step()
            if t + 1 in evals:
                with averaged_model(model):
                    # Only rank 0 reports: the others just take part in the average.
                    loss, acc = _evaluate(model, data) if rank == 0 else (math.nan, math.nan)
                curve.append(
                    {"step": t + 1, "bytes": stats.total_sent, "loss": loss, "accuracy": acc}
                )
        wall = time.perf_counter() - start
        if verbose and rank == 0:
            print(
                f"  [{len(records) + 1}/{len(specs)}] {spec.name}: loss {curve[-1]['loss']:.4f}, "
                f"accuracy {curve[-1]['accuracy']:.4f}, {wall:.1f} s",
                file=sys.stderr,
                flush=True,
            )
        records.append(
            {
                "name": spec.name,
                "spec": asdict(spec),
                "world_size": world,
                "steps": steps,
                "final_loss": curve[-1]["loss"],
                "final_accuracy": curve[-1]["accuracy"],
                "bytes_sent": stats.total_sent,
                "measured_ratio": stats.ratio_fp32,
                "expected_ratio": spec.expected_ratio,
                "wall_s": wall,
                "curve": curve,
                "comm": stats.as_dict(),
            }
        )
    return records


def run_local(
    specs: list[RunSpec], world_size: int, steps: int, timeout_s: float = 900.0, **kw: Any
) -> list[dict[str, Any]]:
    """Launch :func:`train_digits` on ``world_size`` local gloo ranks; rank 0's records."""
    from scaledl.distributed import launch

    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world size must be a positive integer, got {world_size!r}")
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps!r}")
    kw.setdefault("data", load_digits_split(kw.get("seed", 0)))
    return launch(train_digits, world_size, specs, steps, timeout_s=timeout_s, **kw)[0]
