"""The training loop shared by the small real tasks (digits MLP, character LM): run specs,
optimizer construction, learning-rate schedules and the per-rank loop that evaluates the
**averaged** model while counting the bytes each rank sends.

A task supplies the model, the minibatches and the evaluation (:class:`Task`); every rank
samples its own minibatches (keyed by seed, step and rank), steps on its own gradient, and
the averaged model is evaluated at a few points on rank 0.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from scaledl.comm.accounting import CommStats
from scaledl.optim._common import allreduce_mean_packed_, dense_model_bytes, group_size
from scaledl.optim.adaalter import AdaAlter, LocalAdaAlter
from scaledl.optim.averaging import averaged_model, broadcast_parameters
from scaledl.optim.cser import CSER, overall_ratio
from scaledl.optim.ef_sgd import EFSGD
from scaledl.optim.local_sgd import LocalSGD
from scaledl.optim.names import OPTIMIZERS
from scaledl.optim.qsparse import QSparseLocalSGD
from scaledl.optim.random_block import RandomBlock

__all__ = ["OPTIMIZERS", "RunSpec", "Task", "build_optimizer", "launch_task", "train_task"]

#: optimizers whose steps clip the (averaged) gradient themselves (``max_grad_norm``)
_SELF_CLIPPING = ("adaalter", "local-adaalter")


@dataclass(frozen=True)
class RunSpec:
    """One training configuration.

    ``period`` is H (CSER's reset period, the local-SGD / QSparse / Local AdaAlter period);
    ``r1``/``r2`` are CSER's per-step and reset block ratios; ``ratio`` is the compression of
    EF-SGD's per-step block and of QSparse's block at each sync. ``max_grad_norm`` clips the
    gradient a method steps on (the averaged one for synchronous methods, the local one
    otherwise) to that global L2 norm; None leaves it unclipped. ``update_clip`` is
    AdaAlter's and Local AdaAlter's denominator floor (None: the paper's unguarded rule).
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
    max_grad_norm: float | None = None
    update_clip: float | None = 1.0

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
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {self.max_grad_norm!r}")

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
    ada.update(max_grad_norm=spec.max_grad_norm, update_clip=spec.update_clip)
    if o == "adaalter":
        return AdaAlter(params, **ada), True
    return LocalAdaAlter(params, period=spec.period, warmup_steps=spec.warmup_steps, **ada), False


def lr_lambda(spec: RunSpec, steps: int) -> Callable[[int], float]:
    """SGD family: linear warm-up over ``warmup_steps``, cosine decay. Synchronous
    AdaGrad/AdaAlter: the linear warm-up built into Local AdaAlter, then constant."""
    if spec.optimizer in ("adagrad", "adaalter"):
        w = spec.warmup_steps
        return lambda t: min(1.0, (t + 1) / w) if w else 1.0
    if spec.optimizer == "local-adaalter":
        return lambda t: 1.0
    w = spec.warmup_steps
    return lambda t: min(1.0, (t + 1) / w if w else 1.0) * 0.5 * (1 + math.cos(math.pi * t / steps))


class Task(Protocol):
    """What :func:`train_task` needs from a task (its methods run on every rank)."""

    def make_model(self, seed: int) -> nn.Module:
        """The model, identical for a given seed."""

    def batch(
        self, step: int, rank: int, world: int, seed: int, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's minibatch (inputs, targets) at ``step``, a pure function of its args."""

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss of one minibatch."""

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Metrics of ``model``; must include ``"loss"``."""


def _line(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def train_task(
    task: Task,
    specs: list[RunSpec],
    steps: int,
    batch_size: int = 16,
    eval_points: int = 8,
    seed: int = 0,
    verbose: bool = False,
) -> list[dict[str, Any]]:
    """Train each spec on this rank (call on every rank of the default group).

    Returns one record per spec: the evaluation curve (bytes sent by this rank so far and
    the averaged model's metrics), ``final_<metric>`` for each metric of
    ``task.evaluate``, measured and expected compression, and wall time (evaluation
    excluded). Only rank 0 evaluates; the other ranks report NaN metrics. ``verbose`` makes
    rank 0 print one line per finished run to stderr.
    """
    torch.manual_seed(seed)
    rank, world = (dist.get_rank(), group_size()) if dist.is_initialized() else (0, 1)
    evals = sorted({max(1, round(steps * (i + 1) / eval_points)) for i in range(eval_points)})
    records = []
    for spec in specs:
        model = task.make_model(seed)
        broadcast_parameters(model)
        params = list(model.parameters())
        opt, sync_grads = build_optimizer(spec, model, seed)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(spec, steps))
        stats: CommStats = CommStats() if sync_grads else opt.stats  # type: ignore[attr-defined]
        dense = dense_model_bytes(params, world)
        clip = spec.max_grad_norm if spec.optimizer not in _SELF_CLIPPING else None
        curve, metrics = [], {}
        wall = 0.0
        for t in range(steps):
            start = time.perf_counter()
            x, y = task.batch(t, rank, world, seed, batch_size)
            model.zero_grad(set_to_none=True)
            task.loss(model, x, y).backward()
            if sync_grads:
                stats.record("grad", allreduce_mean_packed_([p.grad for p in params]), dense)
                stats.end_step()
            if clip is not None:
                nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            sched.step()
            wall += time.perf_counter() - start
            if t + 1 in evals:
                with averaged_model(model):
                    # Only rank 0 reports: the others just take part in the average.
                    metrics = task.evaluate(model) if rank == 0 else {"loss": math.nan}
                curve.append({"step": t + 1, "bytes": stats.total_sent, **metrics})
        if verbose and rank == 0:
            print(
                f"  [{len(records) + 1}/{len(specs)}] {spec.name}: {_line(metrics)}, {wall:.1f} s",
                file=sys.stderr,
                flush=True,
            )
        record = {
            "name": spec.name,
            "spec": asdict(spec),
            "world_size": world,
            "steps": steps,
            "batch_size": batch_size,
        }
        record.update({f"final_{k}": v for k, v in curve[-1].items() if k not in ("step", "bytes")})
        record.update(
            {
                "bytes_sent": stats.total_sent,
                "measured_ratio": stats.ratio_fp32,
                "expected_ratio": spec.expected_ratio,
                "wall_s": wall,
                "curve": curve,
                "comm": stats.as_dict(),
            }
        )
        records.append(record)
    return records


def launch_task(
    task: Task,
    specs: list[RunSpec],
    world_size: int,
    steps: int,
    timeout_s: float = 900.0,
    **kw: Any,
) -> list[dict[str, Any]]:
    """Run :func:`train_task` on ``world_size`` local gloo ranks; rank 0's records."""
    from scaledl.distributed import launch

    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world size must be a positive integer, got {world_size!r}")
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps!r}")
    return launch(train_task, world_size, task, specs, steps, timeout_s=timeout_s, **kw)[0]
