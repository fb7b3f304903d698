"""Plumbing shared by the communication-efficient optimizers: process-group helpers, packed
all-reduces, wire-byte formulas, counter-based keys and the wrapper base class."""

from __future__ import annotations

import abc
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from scaledl.comm.accounting import CommStats

__all__ = [
    "SyncWrapper",
    "allgather_wire_bytes",
    "allreduce_mean_packed_",
    "allreduce_wire_bytes",
    "derive_key",
    "group_size",
    "is_sync_step",
]

_MASK64 = (1 << 64) - 1
SYNC_PHASES = ("end", "start")


def derive_key(*parts: int) -> int:
    """A 63-bit key mixed from integers (splitmix64), identical on every rank.

    Draws keyed by (seed, step, tensor index, purpose) need no generator state: every rank
    computes the same key without communication, and a resumed run needs only the step.
    """
    z = 0x9E3779B97F4A7C15
    for part in parts:
        z = (z + (int(part) & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
    return z >> 1


def group_size(group: Any = None) -> int:
    """Ranks in ``group`` (the default group when None); 1 without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def allreduce_wire_bytes(nbytes: int, world: int) -> int:
    """Bytes one rank sends in a ring all-reduce of ``nbytes``: 2(n-1)/n of the buffer."""
    return 0 if world <= 1 else (2 * (world - 1) * nbytes) // world


def allgather_wire_bytes(nbytes: int, world: int) -> int:
    """Bytes one rank sends in a ring all-gather of an ``nbytes`` payload: (n-1) times it."""
    return 0 if world <= 1 else (world - 1) * nbytes


def is_sync_step(step: int, period: int, phase: str) -> bool:
    """Whether 0-based ``step`` ends with a synchronisation of period ``period``.

    ``"end"``: after steps H-1, 2H-1, ... (every H local steps); ``"start"``: after steps
    0, H, 2H, ... (the official CSER code and PyTorch's ``PeriodicModelAverager``).
    """
    return (step + 1) % period == 0 if phase == "end" else step % period == 0


def check_period(period: int, name: str = "period") -> int:
    if not isinstance(period, int) or isinstance(period, bool) or period < 1:
        raise ValueError(f"{name} must be a positive integer, got {period!r}")
    return period


def check_phase(phase: str) -> str:
    if phase not in SYNC_PHASES:
        raise ValueError(f"sync_phase must be one of {SYNC_PHASES}, got {phase!r}")
    return phase


def allreduce_mean_packed_(tensors: Sequence[torch.Tensor], group: Any = None) -> int:
    """Average ``tensors`` over ranks in place with one flat all-reduce per dtype.

    Returns the bytes this rank put on the wire (ring model). Summing then dividing by n
    keeps the result identical on every rank.
    """
    world = group_size(group)
    if world <= 1 or not tensors:
        return 0
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        by_dtype[t.dtype].append(t)
    sent = 0
    for ts in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        offset = 0
        for t in ts:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        sent += allreduce_wire_bytes(flat.numel() * flat.element_size(), world)
    return sent


def dense_model_bytes(params: Iterable[torch.Tensor], world: int) -> int:
    """Wire bytes of one dense fp32 all-reduce of all ``params``: the per-step baseline."""
    return allreduce_wire_bytes(4 * sum(p.numel() for p in params), world)


class SyncWrapper(Optimizer, abc.ABC):
    """Base of the wrappers that run a local optimizer, then synchronise (or not).

    It shares ``param_groups`` with the wrapped optimizer, so learning-rate schedulers work
    unchanged, and keeps its own per-parameter buffers (residuals, anchors) in
    ``self.buffers[name][i]`` in parameter order; ``state_dict`` carries them together with
    the local optimizer's state, the step counter, the seed and the byte counters.
    Subclasses implement :meth:`_synchronize`.
    """

    #: subclasses set True when :meth:`_synchronize` needs the parameters before the local step
    needs_previous: bool = False

    def __init__(self, local_opt: Optimizer, *, group: Any = None, seed: int = 0) -> None:
        if not isinstance(local_opt, Optimizer):
            raise ValueError(
                f"local_opt must be a torch.optim.Optimizer, got {type(local_opt).__name__}"
            )
        if isinstance(local_opt, SyncWrapper):
            raise ValueError("local_opt is already a communication wrapper; wrap a plain optimizer")
        self.local_opt = local_opt
        # What Optimizer.__init__ would set, so step/state-dict hooks can be registered; the
        # parameter groups themselves are shared with the local optimizer (as PyTorch's
        # PostLocalSGDOptimizer does), so LR schedulers act on both.
        for name in (
            "_optimizer_step_pre_hooks",
            "_optimizer_step_post_hooks",
            "_optimizer_state_dict_pre_hooks",
            "_optimizer_state_dict_post_hooks",
            "_optimizer_load_state_dict_pre_hooks",
            "_optimizer_load_state_dict_post_hooks",
        ):
            setattr(self, name, OrderedDict())
        self._patch_step_function()
        self.param_groups = local_opt.param_groups
        self.defaults = local_opt.defaults
        self.state = local_opt.state
        self.group = group
        self.seed = int(seed)
        self.steps_done = 0
        self.stats = CommStats()
        self.params: list[torch.Tensor] = [p for g in self.param_groups for p in g["params"]]
        self.buffers: dict[str, list[torch.Tensor]] = {}
        self.world = group_size(group)

    # -- buffers -------------------------------------------------------------------------
    def _buffer(self, name: str, init: Callable[[torch.Tensor], torch.Tensor]) -> list:
        if name not in self.buffers:
            self.buffers[name] = [init(p.detach()) for p in self.params]
        return self.buffers[name]

    # -- the step ------------------------------------------------------------------------
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One local step on this rank's own gradient, then this method's synchronisation."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            previous = [p.detach().clone() for p in self.params] if self.needs_previous else None
        self.local_opt.step()
        with torch.no_grad():
            sent = self._synchronize(self.steps_done, previous)
        dense = dense_model_bytes(self.params, self.world)
        kinds = sent or {"local": 0}
        for i, (kind, nbytes) in enumerate(kinds.items()):
            self.stats.record(kind, nbytes, dense if i == 0 else 0)
        self.stats.end_step()
        self.steps_done += 1
        return loss

    @abc.abstractmethod
    def _synchronize(self, step: int, previous: list[torch.Tensor] | None) -> dict[str, int]:
        """Synchronise after local step ``step``; return bytes sent per collective kind."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.local_opt.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise ValueError(
            f"{type(self).__name__} cannot grow: add every parameter group to the local "
            "optimizer before wrapping it"
        )

    def attach_ddp(self, ddp_model: torch.nn.Module) -> None:
        """Use with ``DistributedDataParallel``: register a no-op comm hook, so each rank
        steps on its own gradient and this optimizer does all the communication."""
        from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook

        ddp_model.register_comm_hook(None, noop_hook)

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {
            "local": self.local_opt.state_dict(),
            "steps_done": self.steps_done,
            "seed": self.seed,
            "buffers": {k: [t.clone() for t in v] for k, v in self.buffers.items()},
            "stats": self.stats.as_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        missing = {"local", "steps_done", "seed", "buffers"} - set(state_dict)
        if missing:
            raise ValueError(f"{type(self).__name__} state_dict lacks {sorted(missing)}")
        self.local_opt.load_state_dict(state_dict["local"])
        self.steps_done = int(state_dict["steps_done"])
        self.seed = int(state_dict["seed"])
        self.buffers = {}
        for name, tensors in state_dict["buffers"].items():
            if len(tensors) != len(self.params):
                raise ValueError(
                    f"buffer {name!r} has {len(tensors)} tensors for {len(self.params)} parameters"
                )
            self.buffers[name] = [
                t.detach().clone().to(device=p.device, dtype=p.dtype)
                for t, p in zip(tensors, self.params)
            ]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.local_opt!r})"
