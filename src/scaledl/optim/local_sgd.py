"""Local SGD: every rank steps on its own gradient and the models are averaged every
``period`` steps in one flat all-reduce per dtype (optimizer state stays local, as in
PyTorch's ``PostLocalSGDOptimizer``)."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

from scaledl.optim._common import (
    SyncWrapper,
    allreduce_mean_packed_,
    check_period,
    check_phase,
    is_sync_step,
)

__all__ = ["LocalSGD"]


class LocalSGD(SyncWrapper):
    """Periodic model averaging around a local optimizer.

    Args:
        local_opt: local optimizer. period: H (1 gives synchronous model averaging).
        group: process group. sync_phase: ``"end"`` averages after steps H-1, 2H-1, ...;
            ``"start"`` after steps 0, H, 2H, ... like ``PeriodicModelAverager``.
    """

    def __init__(
        self,
        local_opt: Optimizer,
        period: int,
        *,
        group: Any = None,
        sync_phase: str = "end",
    ) -> None:
        super().__init__(local_opt, group=group)
        self.period = check_period(period)
        self.sync_phase = check_phase(sync_phase)

    def _synchronize(self, step: int, previous: list[torch.Tensor] | None) -> dict[str, int]:
        if not is_sync_step(step, self.period, self.sync_phase):
            return {}
        return {"model": allreduce_mean_packed_([p.detach() for p in self.params], self.group)}
