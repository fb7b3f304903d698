"""Model averaging helpers: start every rank from the same model, and evaluate the averaged
model without disturbing the local ones (the official code's evaluate-then-restore)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from scaledl.optim._common import allreduce_mean_packed_, group_size

__all__ = ["averaged_model", "broadcast_parameters"]


def _tensors(module: torch.nn.Module, buffers: bool) -> list[torch.Tensor]:
    out = [p.detach() for p in module.parameters()]
    if buffers:
        out += [b.detach() for b in module.buffers() if b.is_floating_point()]
    return out


@torch.no_grad()
def broadcast_parameters(module: torch.nn.Module, src: int = 0, group: Any = None) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (what DDP does at wrap time)."""
    if group_size(group) <= 1:
        return
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.detach(), src=src, group=group)


@contextlib.contextmanager
def averaged_model(
    module: torch.nn.Module, group: Any = None, buffers: bool = True
) -> Iterator[torch.nn.Module]:
    """Within the block, ``module`` holds the mean over ranks of its parameters (and floating
    buffers such as BatchNorm statistics); on exit the local values are restored exactly.

    Every rank of ``group`` must enter together (it is a collective)::

        with averaged_model(model):
            accuracy = evaluate(model)
    """
    tensors = _tensors(module, buffers)
    with torch.no_grad():
        saved = [t.clone() for t in tensors]
        allreduce_mean_packed_(tensors, group)
    try:
        yield module
    finally:
        with torch.no_grad():
            for t, s in zip(tensors, saved):
                t.copy_(s)
