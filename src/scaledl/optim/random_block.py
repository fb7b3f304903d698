"""The random-block compressor of CSER's official code, and the exchange operators that compute
``C(v_i)`` and the exact mean ``(1/n)·Σ_j C(v_j)`` for any compressor.

A random block is a dense slice of each tensor (a run of rows, and of columns for matrices),
drawn from a key shared by every rank, so a plain all-reduce of the packed slices moves it:
no indices travel.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from scaledl.comm.base import Compressor, IdentityCompressor, ZeroCompressor
from scaledl.optim._common import (
    allgather_wire_bytes,
    allreduce_mean_packed_,
    allreduce_wire_bytes,
    derive_key,
    group_size,
)

__all__ = ["BlockExchange", "CompressorExchange", "RandomBlock", "make_exchange"]

Selection = tuple[slice, ...] | None


@dataclass(frozen=True)
class RandomBlock:
    """Per-tensor random block: a fraction ``dim0`` of dim 0, ``dim1`` of dim 1 (matrices and
    convolution kernels; trailing dims whole), and the whole tensor skipped with probability
    ``1 - layer``. Expected element ratio ``1 / (dim0 · dim1 · layer)``."""

    dim0: float = 1.0
    dim1: float = 1.0
    layer: float = 1.0

    def __post_init__(self) -> None:
        for name in ("dim0", "dim1"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ValueError(f"RandomBlock {name} ratio must be in (0, 1], got {v!r}")
        if not 0.0 <= self.layer <= 1.0:
            raise ValueError(f"RandomBlock layer ratio must be in [0, 1], got {self.layer!r}")

    @classmethod
    def for_ratio(cls, ratio: float, max_dim0_ratio: float = 16.0) -> RandomBlock:
        """A block whose expected element ratio is ``ratio`` (>= 1): rows first, up to
        ``max_dim0_ratio``, then whole-tensor skipping for the rest."""
        if not ratio >= 1.0:
            raise ValueError(f"compression ratio must be >= 1, got {ratio!r}")
        r0 = min(ratio, max_dim0_ratio)
        return cls(dim0=1.0 / r0, dim1=1.0, layer=r0 / ratio)

    @property
    def expected_ratio(self) -> float:
        frac = self.dim0 * self.dim1 * self.layer
        return math.inf if frac == 0 else 1.0 / frac

    def select(self, shape: Sequence[int], key: int) -> Selection:
        """The block of a tensor of ``shape`` for ``key``; None when the tensor is skipped."""
        if self.layer == 0.0:
            return None
        rng = random.Random(key)
        if self.layer < 1.0 and rng.random() > self.layer:
            return None
        if len(shape) == 0:
            return ()
        out = []
        for d, ratio in ((0, self.dim0), (1, self.dim1))[: min(2, len(shape))]:
            size = int(shape[d])
            k = max(1, round(size * ratio))
            start = k * rng.randrange(math.ceil(size / k))
            out.append(slice(start, min(start + k, size)))  # the last block may be truncated
        return tuple(out)


def _selection_numel(shape: Sequence[int], sel: Selection) -> int:
    if sel is None:
        return 0
    n = 1
    for d, size in enumerate(shape):
        if d < len(sel):
            start, stop, _ = sel[d].indices(size)
            n *= max(0, stop - start)
        else:
            n *= size
    return n


class BlockExchange:
    """``C(v)`` = ``v`` on each tensor's random block, zero elsewhere; the mean over ranks
    needs one all-reduce of the packed blocks per dtype."""

    def __init__(self, block: RandomBlock, group: Any = None) -> None:
        self.block = block
        self.group = group

    def selections(self, tensors: Sequence[torch.Tensor], key: int) -> list[Selection]:
        return [self.block.select(t.shape, derive_key(key, i)) for i, t in enumerate(tensors)]

    def average_in_place(self, tensors: Sequence[torch.Tensor], key: int) -> int:
        """Replace each tensor's block by its mean over ranks (the block form's model sync)."""
        views = [t[s] for t, s in zip(tensors, self.selections(tensors, key)) if s is not None]
        return allreduce_mean_packed_([v for v in views if v.numel() > 0], self.group)

    def exchange(
        self, tensors: Sequence[torch.Tensor], key: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
        own = [torch.zeros_like(t) for t in tensors]
        mean = [torch.zeros_like(t) for t in tensors]
        views = []
        for t, o, m, sel in zip(tensors, own, mean, self.selections(tensors, key)):
            if sel is None:
                continue
            o[sel] = t[sel]
            m[sel] = t[sel]
            views.append(m[sel])
        sent = allreduce_mean_packed_([v for v in views if v.numel() > 0], self.group)
        return own, mean, sent

    def payload_numel(self, shapes: Sequence[Sequence[int]], key: int) -> int:
        """Elements this exchange moves for tensors of ``shapes`` under ``key``."""
        return sum(
            _selection_numel(s, self.block.select(s, derive_key(key, i)))
            for i, s in enumerate(shapes)
        )


class CompressorExchange:
    """``C(v)`` for a :class:`scaledl.comm.Compressor` applied to all tensors of a dtype
    flattened together; the exact mean of the decoded payloads.

    Identity moves fp32 with one all-reduce, zero moves nothing, all-reduce-compatible
    compressors (shared-index random-k, casts) sum their payloads in one all-reduce, and any
    other compressor all-gathers its fixed-size payloads (bytes grow with n): every rank
    decodes and sums them in rank order, so the mean is identical on every rank.
    """

    def __init__(self, compressor: Compressor, group: Any = None) -> None:
        if not isinstance(compressor, Compressor):
            raise ValueError(
                "expected a scaledl.comm Compressor or RandomBlock, "
                f"got {type(compressor).__name__}"
            )
        self.compressor = compressor
        self.group = group

    def exchange(
        self, tensors: Sequence[torch.Tensor], key: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
        world = group_size(self.group)
        own: list[torch.Tensor] = [torch.empty(0)] * len(tensors)
        mean: list[torch.Tensor] = [torch.empty(0)] * len(tensors)
        by_dtype: dict[torch.dtype, list[int]] = defaultdict(list)
        for i, t in enumerate(tensors):
            by_dtype[t.dtype].append(i)
        sent = 0
        exact = isinstance(self.compressor, (IdentityCompressor, ZeroCompressor))
        for d_index, idx in enumerate(by_dtype.values()):
            flat = torch.cat([tensors[i].reshape(-1) for i in idx])
            if not exact:  # identity and zero keep the dtype (fp64 stays exact); others see fp32
                flat = flat.float()
            o, m, nbytes = self._flat(flat, derive_key(key, d_index), world)
            sent += nbytes
            offset = 0
            for i in idx:
                t = tensors[i]
                own[i] = o[offset : offset + t.numel()].view_as(t).to(t.dtype)
                mean[i] = m[offset : offset + t.numel()].view_as(t).to(t.dtype)
                offset += t.numel()
        return own, mean, sent

    def _flat(
        self, flat: torch.Tensor, key: int, world: int
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        c = self.compressor
        n = flat.numel()
        if isinstance(c, ZeroCompressor):
            zeros = torch.zeros_like(flat)
            return zeros, zeros.clone(), 0
        if isinstance(c, IdentityCompressor):
            mean = flat.clone()
            if world > 1:
                dist.all_reduce(mean, group=self.group)
                mean.div_(world)
            return flat.clone(), mean, allreduce_wire_bytes(flat.element_size() * n, world)
        payload = c.compress(flat, key)
        own = c.decompress(payload, n, key).to(flat.device)
        if world <= 1:
            return own, own.clone(), 0
        wire = getattr(c, "wire_dtype", None)
        if c.allreduce_compatible and wire is not None and payload.numel() % _itemsize(wire) == 0:
            # Shared indices (random-k) or casts: payloads add up in the compressed domain.
            summed = payload.view(wire).clone()
            dist.all_reduce(summed, group=self.group)
            total = c.decompress(summed.view(torch.uint8), n, key).to(flat.device)
            return own, total.div_(world), allreduce_wire_bytes(payload.numel(), world)
        gathered = [torch.empty_like(payload) for _ in range(world)]
        dist.all_gather(gathered, payload, group=self.group)
        total = torch.zeros_like(flat)
        for p in gathered:
            total += c.decompress(p, n, key).to(flat.device)
        return own, total.div_(world), allgather_wire_bytes(payload.numel(), world)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


Exchange = BlockExchange | CompressorExchange


def make_exchange(compressor: Compressor | RandomBlock, group: Any = None) -> Exchange:
    """The exchange operator for a compressor or a random block."""
    if isinstance(compressor, RandomBlock):
        return BlockExchange(compressor, group)
    return CompressorExchange(compressor, group)
