"""CSER: communication-efficient SGD with error reset (Xie et al., NeurIPS 2020, arXiv
2007.13221).

Each rank keeps a bifurcated model ``x_i = x̂ + e_i``: ``x̂`` is identical on every rank (never
stored) and ``e_i`` is the local residual. Every step the compressed part ``C1`` of the local
update is averaged and the rest stays local; every ``period`` steps the residuals are
partially averaged through ``C2`` (the error reset). Two forms:

- ``form="update"``: the update/residual form with any compressor (a
  :class:`scaledl.comm.Compressor` or :class:`~scaledl.optim.random_block.RandomBlock`);
- ``form="block"``: the official code's random-block partial model averaging, which averages
  random blocks of the model itself (``C1`` every step, the larger ``C2`` at the reset).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

from scaledl.comm.base import Compressor, IdentityCompressor, ZeroCompressor
from scaledl.optim._common import (
    SyncWrapper,
    check_period,
    check_phase,
    derive_key,
    is_sync_step,
)
from scaledl.optim.random_block import BlockExchange, RandomBlock, make_exchange

__all__ = ["CSER", "overall_ratio"]

_C1, _C2 = 1, 2


def overall_ratio(r1: float, r2: float, period: int) -> float:
    """Expected compression of CSER against a dense all-reduce every step:
    ``H / ((H-1)/R1 + 1/R2)`` (C1 on H-1 of every H steps, C2 on the reset step)."""
    return period / ((period - 1) / r1 + 1.0 / r2)


def _as_block(c: Compressor | RandomBlock, name: str) -> RandomBlock:
    if isinstance(c, RandomBlock):
        return c
    if isinstance(c, IdentityCompressor):
        return RandomBlock()
    if isinstance(c, ZeroCompressor):
        return RandomBlock(layer=0.0)
    raise ValueError(
        f'form="block" averages model blocks: {name} must be a RandomBlock (or identity/zero), '
        f"got {type(c).__name__}"
    )


class CSER(SyncWrapper):
    """CSER around a local optimizer (momentum SGD / Nesterov in the paper).

    Args:
        local_opt: the optimizer that takes the local step on this rank's own gradient.
        c1: compressor of the per-step update (``form="update"``) or the per-step block
            (``form="block"``).
        c2: compressor of the error reset every ``period`` steps.
        period: H, steps between error resets.
        form: ``"update"`` or ``"block"`` (see the module docstring).
        seed: key of the shared randomness (random blocks, random-k); all ranks must agree.
        group: process group (default: the world).
        sync_phase: ``"end"`` resets after steps H-1, 2H-1, ... (default of the update form),
            ``"start"`` after steps 0, H, 2H, ... (the official code; default of the block form).

    Start every rank from the same parameters (e.g. :func:`~scaledl.optim.broadcast_parameters`)
    and evaluate :func:`~scaledl.optim.averaged_model`.
    """

    def __init__(
        self,
        local_opt: Optimizer,
        c1: Compressor | RandomBlock,
        c2: Compressor | RandomBlock,
        period: int,
        *,
        form: str = "update",
        seed: int = 0,
        group: Any = None,
        sync_phase: str | None = None,
    ) -> None:
        super().__init__(local_opt, group=group, seed=seed)
        if form not in ("update", "block"):
            raise ValueError(f'form must be "update" or "block", got {form!r}')
        self.form = form
        self.period = check_period(period)
        self.sync_phase = check_phase(sync_phase or ("end" if form == "update" else "start"))
        self.needs_previous = form == "update"
        if form == "block":
            self.blocks = (
                BlockExchange(_as_block(c1, "c1"), group),
                BlockExchange(_as_block(c2, "c2"), group),
            )
        else:
            self.c1 = make_exchange(c1, group)
            self.c2 = make_exchange(c2, group)

    def is_reset_step(self, step: int) -> bool:
        return is_sync_step(step, self.period, self.sync_phase)

    @property
    def residuals(self) -> list[torch.Tensor]:
        """e_i per parameter (update form); x_i - e_i is identical on every rank."""
        return self._buffer("residual", torch.zeros_like)

    def _synchronize(self, step: int, previous: list[torch.Tensor] | None) -> dict[str, int]:
        reset = self.is_reset_step(step)
        if self.form == "block":
            exchange = self.blocks[1 if reset else 0]
            sent = exchange.average_in_place(self.params, derive_key(self.seed, step, _C1))
            return {"c2_block" if reset else "c1_block": sent}
        assert previous is not None
        residual = self.residuals
        delta = [prev - p for prev, p in zip(previous, self.params)]
        own, mean, sent1 = self.c1.exchange(delta, derive_key(self.seed, step, _C1))
        for p, e, d, o, m in zip(self.params, residual, delta, own, mean):
            # x_i <- x_i - c - r_i = x_after + C1(δ_i) - c ;  e_i <- e_i - r_i, r_i = δ_i - C1(δ_i)
            p.add_(o - m)
            e.sub_(d - o)
        sent = {"c1": sent1}
        if reset:
            own2, mean2, sent2 = self.c2.exchange(residual, derive_key(self.seed, step, _C2))
            for p, e, o, m in zip(self.params, residual, own2, mean2):
                # x_i <- x_i - e_i + ē + (e_i - C2(e_i)) ; e_i <- e_i - C2(e_i)
                p.add_(m - o)
                e.sub_(o)
            sent["c2"] = sent2
        return sent
