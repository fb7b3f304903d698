"""EF-SGD: error-feedback compressed SGD (Karimireddy et al., 2019), CSER's per-step baseline.

Every step each rank compresses its error-corrected update ``p_i = δ_i + e_i``, all ranks
apply the exact mean of the compressed updates (so models stay identical) and keep the
compression error ``e_i = p_i - C(p_i)`` for the next step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

from scaledl.comm.base import Compressor
from scaledl.optim._common import SyncWrapper, derive_key
from scaledl.optim.random_block import RandomBlock, make_exchange

__all__ = ["EFSGD"]


class EFSGD(SyncWrapper):
    """Error-feedback SGD around a local optimizer whose step defines the update δ_i.

    Args:
        local_opt: optimizer producing the local update (momentum SGD in CSER's baselines).
        compressor: a :class:`scaledl.comm.Compressor` or a
            :class:`~scaledl.optim.random_block.RandomBlock`.
        seed: key of shared randomness. group: process group.
    """

    needs_previous = True

    def __init__(
        self,
        local_opt: Optimizer,
        compressor: Compressor | RandomBlock,
        *,
        seed: int = 0,
        group: Any = None,
    ) -> None:
        super().__init__(local_opt, group=group, seed=seed)
        self.exchange = make_exchange(compressor, group)

    def _synchronize(self, step: int, previous: list[torch.Tensor] | None) -> dict[str, int]:
        assert previous is not None
        error = self._buffer("error", torch.zeros_like)
        corrected = [prev - p + e for prev, p, e in zip(previous, self.params, error)]
        own, mean, sent = self.exchange.exchange(corrected, derive_key(self.seed, step))
        for p, prev, e, c, o, m in zip(self.params, previous, error, corrected, own, mean):
            p.copy_(prev - m)
            e.copy_(c - o)
        return {"ef": sent}
