"""A small real training task for compressed DDP: scikit-learn's bundled 8x8 digits.

:func:`train_digits` runs on every rank of an initialised process group (start it with
:func:`scaledl.distributed.launch`). Each rank trains on its own slice of the training set with
DDP and :func:`scaledl.comm.compression_hook`, and reports loss, test accuracy, the bytes it
sent and the largest parameter difference between ranks seen after any step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from scaledl.comm.hooks import CompressionState, compression_hook, replica_divergence
from scaledl.datasets import load_digits_shuffled

__all__ = ["digits_mlp", "load_digits_split", "train_digits", "train_digits_many"]


def load_digits_split(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test): standardised features, a fixed 75/25 split."""
    x, y = load_digits_shuffled(seed)
    x = x.flatten(1)
    cut = int(0.75 * len(x))
    mean, std = x[:cut].mean(0), x[:cut].std(0).clamp_min(1e-3)
    x = (x - mean) / std
    return x[:cut], y[:cut], x[cut:], y[cut:]


def digits_mlp(hidden: int = 128, seed: int = 0) -> nn.Module:
    """A two-layer MLP (64 -> hidden -> 10), identically initialised for a given seed."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def train_digits(
    compressor: str | None = "onebit",
    *,
    compressor_kwargs: dict[str, Any] | None = None,
    mode: str = "two_way",
    ef: str = "vanilla",
    steps: int = 300,
    batch: int = 32,
    lr: float = 0.1,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    compressor_momentum: float = 0.0,
    start_iter: int = 2,
    check_every: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Train the digits MLP with DDP on this rank; ``compressor=None`` is plain DDP (fp32).

    ``optimizer`` is ``"sgd"`` (with ``momentum``) or ``"clan"`` (:class:`scaledl.comm.CLAN`).
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    from scaledl.comm.clan import CLAN

    rank, n = dist.get_rank(), dist.get_world_size()
    x_tr, y_tr, x_te, y_te = load_digits_split(seed)
    x_tr, y_tr = x_tr[rank::n], y_tr[rank::n]  # each rank its own slice
    model = DDP(digits_mlp(seed=seed))
    state = None
    if compressor is not None:
        state = CompressionState(
            compressor,
            compressor_kwargs=compressor_kwargs,
            mode=mode,
            ef=ef,
            momentum=compressor_momentum,
            start_iter=start_iter,
            min_compress_bytes=0,
            seed=seed,
        )
        model.register_comm_hook(state, compression_hook)
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    elif optimizer == "clan":
        opt = CLAN(model.parameters(), lr=lr)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose 'sgd' or 'clan'")
    if state is not None:
        state.attach_optimizer(opt)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(seed + 1000 * rank)
    loss_fn = nn.CrossEntropyLoss()
    max_diff, losses = 0.0, []
    for step in range(steps):
        idx = torch.randint(len(x_tr), (batch,), generator=gen)
        loss = loss_fn(model(x_tr[idx]), y_tr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if check_every and (step + 1) % check_every == 0:
            max_diff = max(max_diff, replica_divergence(model))
    with torch.no_grad():
        logits = model.module(x_te)
        acc = float((logits.argmax(1) == y_te).float().mean())
        test_loss = float(loss_fn(logits, y_te))
    tail = losses[-20:]
    out: dict[str, Any] = {
        "rank": rank,
        "accuracy": acc,
        "test_loss": test_loss,
        "train_loss": sum(tail) / len(tail),
        "max_rank_param_diff": max_diff,
        "params": sum(p.numel() for p in model.parameters()),
    }
    if state is not None:
        out["stats"] = state.summary()
    return out


def train_digits_many(configs: list[dict[str, Any]], **common: Any) -> list[dict[str, Any]]:
    """:func:`train_digits` for each config in turn, in one process group (saves start-ups)."""
    return [train_digits(**{**common, **cfg}) for cfg in configs]
