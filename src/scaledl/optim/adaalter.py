"""AdaAlter and Local AdaAlter (Xie et al., arXiv 1911.09030).

AdaAlter is AdaGrad whose denominator uses the accumulator from *before* the current
gradient. Local AdaAlter runs it locally between synchronisations with the denominator frozen
at its last synchronised value, and every ``period`` steps averages the parameters and the
local accumulators together in one flat all-reduce per dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from scaledl.comm.accounting import CommStats
from scaledl.optim._common import (
    allreduce_mean_packed_,
    check_period,
    dense_model_bytes,
    group_size,
)

__all__ = ["AdaAlter", "LocalAdaAlter"]

_CLIP_MODES = ("global_norm", "value")
_DENOMINATORS = ("frozen", "frozen_plus_eps")


def _clip_scale(grads: list[torch.Tensor], max_norm: float | None, mode: str) -> list[torch.Tensor]:
    """Clip like ``clip_grad_norm_`` (global L2 norm) or ``clamp`` (per element); copies."""
    if max_norm is None:
        return grads
    if mode == "value":
        return [g.clamp(-max_norm, max_norm) for g in grads]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return [g * scale.to(g.dtype) for g in grads]


def _warmup_only_hook(opt, bucket):  # no annotations: DDP checks them against its own types
    """DDP comm hook: average while ``opt`` is in its warm-up, the local gradient afterwards."""
    buf = bucket.buffer()
    if opt.in_warmup:
        import torch.distributed as dist

        buf.div_(opt.world)
        work = dist.all_reduce(buf, group=opt.group, async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(buf)
    return fut


class AdaAlter(Optimizer):
    """Synchronous AdaAlter: ``x ← x - lr·(g / sqrt(B + eps) + wd·x)``, then ``B ← B + g²``.

    ``B`` starts at ``initial_accumulator_value``; adding ``eps`` inside the root is the same
    as starting ``B`` at ``eps``. ``max_grad_norm`` clips the gradient first (``clip_mode``
    ``"global_norm"`` over the parameters being stepped, or ``"value"``). With DDP it is an
    ordinary optimizer: DDP averages the gradients.

    ``update_clip`` (default 1.0) clamps each coordinate of ``g / sqrt(B + eps)`` to
    ``[-update_clip, update_clip]``, i.e. floors the denominator at ``|g| / update_clip``.
    AdaGrad's ratio ``g / sqrt(B + g²)`` never exceeds 1, but AdaAlter's ``B`` excludes ``g``:
    with a zero (or tiny) accumulator, or a denominator frozen while a coordinate's early
    gradients were tiny, the ratio is unbounded (``|g| / sqrt(eps)`` ≈ 3162·|g| at the default
    eps) and training can diverge. The clamp restores AdaGrad's bound and is inactive whenever
    ``g² <= update_clip²·(B + eps)``; ``None`` gives the paper's unguarded rule.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 0.01,
        eps: float = 1e-7,
        initial_accumulator_value: float = 0.0,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = None,
        clip_mode: str = "global_norm",
        update_clip: float | None = 1.0,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        if not initial_accumulator_value >= 0:
            raise ValueError(
                f"initial_accumulator_value must be >= 0, got {initial_accumulator_value!r}"
            )
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm!r}")
        if clip_mode not in _CLIP_MODES:
            raise ValueError(f"clip_mode must be one of {_CLIP_MODES}, got {clip_mode!r}")
        if update_clip is not None and not update_clip > 0:
            raise ValueError(f"update_clip must be positive or None, got {update_clip!r}")
        defaults = dict(
            lr=lr,
            eps=eps,
            initial_accumulator_value=initial_accumulator_value,
            weight_decay=weight_decay,
        )
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm
        self.clip_mode = clip_mode
        self.update_clip = update_clip

    def _with_grads(self) -> list[tuple[dict, torch.Tensor]]:
        return [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]

    def _accumulator(self, p: torch.Tensor, group: dict, name: str = "sum") -> torch.Tensor:
        state = self.state[p]
        if name not in state:
            state[name] = torch.full_like(
                p, group["initial_accumulator_value"], memory_format=torch.preserve_format
            )
            state["step"] = torch.zeros((), dtype=torch.int64)
        return state[name]

    def _apply(
        self, p: torch.Tensor, g: torch.Tensor, denom_sq: torch.Tensor, lr: float, group: dict
    ) -> None:
        # x ← x - lr·(g / sqrt(B + eps) + wd·x), with B the accumulator before g.
        update = g / torch.sqrt(denom_sq + group["eps"])
        if self.update_clip is not None:
            # Denominator floor |g|/c: AdaGrad's per-coordinate bound, lost when B excludes g.
            update = update.clamp(-self.update_clip, self.update_clip)
        if group["weight_decay"]:
            update = update + group["weight_decay"] * p
        p.sub_(lr * update)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pairs = self._with_grads()
        grads = _clip_scale([p.grad for _, p in pairs], self.max_grad_norm, self.clip_mode)
        for (group, p), g in zip(pairs, grads):
            acc = self._accumulator(p, group)
            self._apply(p, g, acc, group["lr"], group)
            acc.addcmul_(g, g)
            self.state[p]["step"] += 1
        return loss


class LocalAdaAlter(AdaAlter):
    """Local AdaAlter: synchronous warm-up, then local steps with the frozen denominator.

    - Steps 1..``warmup_steps``: gradients are averaged over ranks every step (by this
      optimizer, or by DDP with :meth:`attach_ddp`) and AdaAlter steps with the learning rate
      ramped linearly, ``lr·t/W``.
    - Then each rank steps on its own gradient with the last synchronised accumulator ``B``
      in the denominator while its local accumulator ``B_i`` (copied from ``B`` at the switch)
      gains ``g_i²``; every ``period`` local steps ``x`` and ``B_i`` are averaged together
      (one flat all-reduce per dtype) and ``B ← B_i``.

    ``denominator="frozen_plus_eps"`` adds ``k·eps²`` inside the root after ``k`` local steps
    (a variant from the paper's analysis, not in the official dense code). ``update_clip`` is
    :class:`AdaAlter`'s denominator floor; it matters most here, where ``B`` stays frozen for
    ``period`` steps. The step counter lives in each parameter's state, so ``state_dict`` holds
    ``B``, ``B_i``, the phase and the step; a resumed run follows the same trajectory.
    ``stats`` counts bytes on the wire.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 0.01,
        period: int = 8,
        warmup_steps: int = 0,
        eps: float = 1e-7,
        initial_accumulator_value: float = 0.0,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = None,
        clip_mode: str = "global_norm",
        denominator: str = "frozen",
        group: Any = None,
        update_clip: float | None = 1.0,
    ) -> None:
        super().__init__(
            params,
            lr,
            eps,
            initial_accumulator_value,
            weight_decay,
            max_grad_norm,
            clip_mode,
            update_clip,
        )
        self.period = check_period(period)
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative integer, got {warmup_steps!r}")
        if denominator not in _DENOMINATORS:
            raise ValueError(f"denominator must be one of {_DENOMINATORS}, got {denominator!r}")
        self.warmup_steps = warmup_steps
        self.denominator = denominator
        self.group = group
        self.world = group_size(group)
        self.stats = CommStats()
        self.grads_averaged_by_ddp = False
        self._params = [p for g in self.param_groups for p in g["params"]]

    @property
    def steps_done(self) -> int:
        """Completed steps (read from the parameters' state, so it survives a checkpoint)."""
        for p in self._params:
            if "step" in self.state[p]:
                return int(self.state[p]["step"])
        return 0

    @property
    def in_warmup(self) -> bool:
        """Whether the next step is a synchronous warm-up step."""
        return self.steps_done < self.warmup_steps

    def attach_ddp(self, ddp_model: torch.nn.Module) -> None:
        """Register a warm-up-only comm hook on ``ddp_model``: DDP averages gradients during
        the warm-up and hands each rank its own gradient afterwards."""
        ddp_model.register_comm_hook(self, _warmup_only_hook)
        self.grads_averaged_by_ddp = True

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        t = self.steps_done + 1  # 1-based index of this step
        dense = dense_model_bytes(self._params, self.world)
        pairs = [(g, p) for g in self.param_groups for p in g["params"]]
        for _, p in pairs:
            if p.grad is None:  # every rank must take part in the same collectives
                p.grad = torch.zeros_like(p)
        if t <= self.warmup_steps:
            sent = 0
            if not self.grads_averaged_by_ddp:
                sent = allreduce_mean_packed_([p.grad for _, p in pairs], self.group)
            self.stats.record("warmup_grad", sent, dense)
            grads = _clip_scale([p.grad for _, p in pairs], self.max_grad_norm, self.clip_mode)
            for (group, p), g in zip(pairs, grads):
                acc = self._accumulator(p, group)
                self._apply(p, g, acc, group["lr"] * t / self.warmup_steps, group)
                acc.addcmul_(g, g)
        else:
            local_step = t - self.warmup_steps  # 1-based since the switch
            since_sync = (local_step - 1) % self.period  # local steps since the last sync
            grads = _clip_scale([p.grad for _, p in pairs], self.max_grad_norm, self.clip_mode)
            for (group, p), g in zip(pairs, grads):
                acc = self._accumulator(p, group)
                state = self.state[p]
                if "local_sum" not in state:
                    # A copy, not an alias: aliasing would un-freeze the denominator.
                    state["local_sum"] = acc.clone()
                denom_sq = acc
                if self.denominator == "frozen_plus_eps" and since_sync:
                    denom_sq = acc + since_sync * group["eps"] ** 2
                self._apply(p, g, denom_sq, group["lr"], group)
                state["local_sum"].addcmul_(g, g)
            if local_step % self.period == 0:
                local = [self.state[p]["local_sum"] for _, p in pairs]
                sent = allreduce_mean_packed_([p for _, p in pairs] + local, self.group)
                for _, p in pairs:
                    self.state[p]["sum"].copy_(self.state[p]["local_sum"])
                self.stats.record("sync", sent, dense)
            else:
                self.stats.record("local", 0, dense)
        for _, p in pairs:
            self.state[p]["step"] += 1
        self.stats.end_step()
        return loss
