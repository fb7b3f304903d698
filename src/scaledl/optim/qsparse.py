"""QSparse-local-SGD (Basu et al., NeurIPS 2019): local steps, then every ``period`` steps an
error-feedback compressed exchange of the model change accumulated since the last sync."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

from scaledl.comm.base import Compressor
from scaledl.optim._common import (
    SyncWrapper,
    check_period,
    check_phase,
    derive_key,
    is_sync_step,
)
from scaledl.optim.random_block import RandomBlock, make_exchange

__all__ = ["QSparseLocalSGD"]


class QSparseLocalSGD(SyncWrapper):
    """Every H steps: ``Δ_i = x̄ - x_i + e_i``; ``x̄ ← x̄ - mean_j C(Δ_j)``; ``e_i ← Δ_i - C(Δ_i)``;
    ``x_i ← x̄``. ``x̄`` (the last synchronised model) and ``e_i`` are checkpointed.

    Args:
        local_opt: local optimizer. compressor: compressor of the accumulated change.
        period: H. seed, group: as in :class:`~scaledl.optim.CSER`.
        sync_phase: ``"end"`` (after steps H-1, 2H-1, ...) or ``"start"``.
    """

    def __init__(
        self,
        local_opt: Optimizer,
        compressor: Compressor | RandomBlock,
        period: int,
        *,
        seed: int = 0,
        group: Any = None,
        sync_phase: str = "end",
    ) -> None:
        super().__init__(local_opt, group=group, seed=seed)
        self.period = check_period(period)
        self.sync_phase = check_phase(sync_phase)
        self.exchange = make_exchange(compressor, group)
        # The anchor must be the starting model: create it before the first local step.
        self._buffer("anchor", torch.clone)

    def _synchronize(self, step: int, previous: list[torch.Tensor] | None) -> dict[str, int]:
        if not is_sync_step(step, self.period, self.sync_phase):
            return {}
        anchor = self._buffer("anchor", torch.clone)
        error = self._buffer("error", torch.zeros_like)
        change = [a - p + e for a, p, e in zip(anchor, self.params, error)]
        own, mean, sent = self.exchange.exchange(change, derive_key(self.seed, step))
        for p, a, e, c, o, m in zip(self.params, anchor, error, change, own, mean):
            a.sub_(m)
            e.copy_(c - o)
            p.copy_(a)
        return {"qsparse": sent}
