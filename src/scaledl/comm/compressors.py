"""Gradient compressors with fixed-size ``uint8`` payloads (BytePS-Compress, arXiv 2105.07829).

Every compressor implements :class:`scaledl.comm.base.Compressor`: ``compress(x, key)`` turns a
flat tensor into exactly ``payload_bytes(x.numel())`` bytes on ``x.device``, and
``decompress(payload, numel, key)`` returns fp32. All work is vectorised torch code, so the
same compressor runs on CPU and CUDA. Inputs of any float dtype are cast to fp32 first.

Payload layouts (little-endian, as torch stores them):

========== ======================================================= ==========================
name       layout                                                  bytes for ``d`` elements
========== ======================================================= ==========================
onebit     fp32 scale, sign bits packed 8 per byte (MSB first)     4 + ceil(d/8)
topk       k int32 indices, then k fp32 values                     8k
randomk    k fp32 values (indices regenerated from ``key``)        4k
dithering  fp32 norm, one int8 (int16 when levels > 127) per elem  4 + d (or 4 + 2d)
fp16/bf16  the cast values                                         2d
========== ======================================================= ==========================
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from scaledl.comm.base import Compressor, IdentityCompressor, ZeroCompressor

__all__ = [
    "CastCompressor",
    "DitheringCompressor",
    "OneBitCompressor",
    "RandomKCompressor",
    "TopKCompressor",
    "available_compressors",
    "derive_key",
    "get_compressor",
]

_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_key(*parts: int) -> int:
    """Mix integers (seed, step, bucket, shard, ...) into one 63-bit key, equal on all ranks."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h >> 1


def _flat_fp32(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 1:
        raise ValueError(f"compressors take flat 1-D tensors, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"compressors take floating-point tensors, got {x.dtype}")
    return x.detach().to(torch.float32)


def _check_payload(c: Compressor, payload: torch.Tensor, numel: int) -> None:
    if payload.dtype != torch.uint8 or payload.dim() != 1:
        raise ValueError(f"{c.name} payload must be a 1-D uint8 tensor, got {payload.dtype}")
    want = c.payload_bytes(numel)
    if payload.numel() != want:
        raise ValueError(
            f"{c.name} payload of {payload.numel()} bytes for {numel} elements (expected {want})"
        )


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _view_as(chunk: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret a byte slice as ``dtype``; slices of a received buffer may be misaligned."""
    size = torch.empty((), dtype=dtype).element_size()
    if chunk.storage_offset() % size:
        chunk = chunk.clone()
    return chunk.view(dtype)


def _count(spec: float | int, numel: int) -> int:
    """``spec`` < 1 is a fraction of ``numel`` (rounded up, at least one), else a count."""
    if numel == 0:
        return 0
    if spec < 1:
        return max(1, math.ceil(spec * numel))
    return min(int(spec), numel)


def _check_count_spec(spec: float | int, what: str) -> float | int:
    if isinstance(spec, bool) or not isinstance(spec, (int, float)) or not spec > 0:
        raise ValueError(f"{what} must be a fraction in (0, 1) or a positive count, got {spec!r}")
    if spec >= 1 and float(spec) != int(spec):
        raise ValueError(f"{what} >= 1 is an element count and must be whole, got {spec!r}")
    return spec


class _GeneratorCache:
    """One torch.Generator per device, re-seeded per call so results depend only on the key."""

    def __init__(self) -> None:
        self._gens: dict[torch.device, torch.Generator] = {}

    def __call__(self, device: torch.device, seed: int) -> torch.Generator:
        gen = self._gens.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            self._gens[device] = gen
        gen.manual_seed(seed)
        return gen

    def __getstate__(self) -> dict[str, Any]:
        return {}  # generators are re-created on use (and are not picklable on every device)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._gens = {}


# --------------------------------------------------------------------------------- 1-bit
_SHIFTS = (7, 6, 5, 4, 3, 2, 1, 0)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a 1-D bool/0-1 tensor into ``ceil(n/8)`` bytes, most significant bit first."""
    n = bits.numel()
    b = bits.to(torch.uint8)
    pad = (-n) % 8
    if pad:
        b = torch.cat([b, b.new_zeros(pad)])
    b = b.view(-1, 8)
    out = b[:, 0] << 7
    for col in range(1, 8):
        out |= b[:, col] << _SHIFTS[col]
    return out


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a ``uint8`` tensor of ``n`` zeros and ones."""
    shifts = torch.tensor(_SHIFTS, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(1) >> shifts) & 1).reshape(-1)[:n]


class OneBitCompressor(Compressor):
    """Scaled sign: one bit per element plus one fp32 scale.

    ``scale="mean_abs"`` (BytePS) keeps the l1 norm, ``"l2_sqrt_d"`` (DeepSpeed) the l2 norm,
    ``"none"`` sends plain signs. Zeros decode as ``+scale``: a sign cannot encode zero, so
    keep error feedback on (it carries the difference).
    """

    name = "onebit"
    _SCALES = ("mean_abs", "l2_sqrt_d", "none")

    def __init__(self, scale: str = "mean_abs") -> None:
        if scale not in self._SCALES:
            raise ValueError(f"unknown 1-bit scale {scale!r}; choose one of {self._SCALES}")
        self.scale = scale

    def payload_bytes(self, numel: int) -> int:
        return 4 + (numel + 7) // 8

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        d = max(1, x.numel())
        if self.scale == "mean_abs":
            return x.abs().sum().reshape(1) / d
        if self.scale == "l2_sqrt_d":
            return torch.linalg.vector_norm(x).reshape(1) / math.sqrt(d)
        return torch.ones(1, dtype=torch.float32, device=x.device)

    def compress(self, x: torch.Tensor, key: int = 0) -> torch.Tensor:
        x = _flat_fp32(x)
        return torch.cat([_bytes_of(self._scale(x)), pack_bits(x < 0)])

    def decompress(self, payload: torch.Tensor, numel: int, key: int = 0) -> torch.Tensor:
        _check_payload(self, payload, numel)
        scale = _view_as(payload[:4], torch.float32)
        bits = unpack_bits(payload[4:], numel)
        # 1 - 2*bit maps bit 0 -> +1, bit 1 -> -1
        return (1.0 - 2.0 * bits.to(torch.float32)) * scale

    def __repr__(self) -> str:
        return f"OneBitCompressor(scale={self.scale!r})"


# --------------------------------------------------------------------------------- top-k
class TopKCompressor(Compressor):
    """The ``k`` largest magnitudes, sent as (32-bit index, fp32 value) pairs.

    ``ratio`` below 1 is a fraction of the elements (k = ceil(ratio * d), at least 1), 1 or
    more an element count (capped at d).
    """

    name = "topk"

    def __init__(self, ratio: float | int = 0.01) -> None:
        self.keep = _check_count_spec(ratio, "top-k ratio")

    def k(self, numel: int) -> int:
        return _count(self.keep, numel)

    def payload_bytes(self, numel: int) -> int:
        return 8 * self.k(numel)

    def compress(self, x: torch.Tensor, key: int = 0) -> torch.Tensor:
        x = _flat_fp32(x)
        if x.numel() >= 2**31:
            raise ValueError("top-k indices are 32-bit: split tensors of 2**31 or more elements")
        k = self.k(x.numel())
        idx = torch.topk(x.abs(), k, sorted=False).indices
        return torch.cat([_bytes_of(idx.to(torch.int32)), _bytes_of(x[idx])])

    def decompress(self, payload: torch.Tensor, numel: int, key: int = 0) -> torch.Tensor:
        _check_payload(self, payload, numel)
        k = self.k(numel)
        idx = _view_as(payload[: 4 * k], torch.int32).to(torch.int64)
        vals = _view_as(payload[4 * k :], torch.float32)
        out = torch.zeros(numel, dtype=torch.float32, device=payload.device)
        return out.scatter_(0, idx, vals)

    def __repr__(self) -> str:
        return f"TopKCompressor(ratio={self.keep!r})"


# ------------------------------------------------------------------------------ random-k
class RandomKCompressor(Compressor):
    """``k`` values at indices drawn from ``key``: every rank picks the same ones, none are sent.

    With ``rescale=True`` the values are multiplied by d/k, which makes the compressor
    unbiased (use it without error feedback); with error feedback use ``rescale=False``.
    Because all ranks share the indices, payloads can be summed directly
    (``allreduce_compatible``).
    """

    name = "randomk"
    allreduce_compatible = True
    wire_dtype = torch.float32

    def __init__(self, ratio: float | int = 0.01, rescale: bool = False, seed: int = 0) -> None:
        self.keep = _check_count_spec(ratio, "random-k ratio")
        self.rescale = bool(rescale)
        self.seed = int(seed)
        self._gens = _GeneratorCache()

    def k(self, numel: int) -> int:
        return _count(self.keep, numel)

    def payload_bytes(self, numel: int) -> int:
        return 4 * self.k(numel)

    def indices(self, numel: int, key: int, device: torch.device | str) -> torch.Tensor:
        """The ``k`` distinct indices for ``key``, identical on every rank of one device kind.

        They are drawn on ``device`` (a CUDA and a CPU rank would draw different ones).
        """
        device = torch.device(device)
        gen = self._gens(device, derive_key(self.seed, key))
        return torch.randperm(numel, generator=gen, device=device)[: self.k(numel)]

    def compress(self, x: torch.Tensor, key: int = 0) -> torch.Tensor:
        x = _flat_fp32(x)
        vals = x[self.indices(x.numel(), key, x.device)]
        if self.rescale and vals.numel():
            vals = vals * (x.numel() / vals.numel())
        return _bytes_of(vals)

    def decompress(self, payload: torch.Tensor, numel: int, key: int = 0) -> torch.Tensor:
        _check_payload(self, payload, numel)
        vals = _view_as(payload, torch.float32)
        out = torch.zeros(numel, dtype=torch.float32, device=payload.device)
        return out.index_copy_(0, self.indices(numel, key, payload.device), vals)

    def __repr__(self) -> str:
        return f"RandomKCompressor(ratio={self.keep!r}, rescale={self.rescale})"


# ----------------------------------------------------------------------------- dithering
class DitheringCompressor(Compressor):
    """Stochastic rounding of ``|x| / norm`` onto ``levels`` levels, with a sign per element.

    ``kind="linear"`` uses the levels k/s (k = 0..s); ``"natural"`` uses 0 and the powers of
    two 2^(1-s) .. 1. ``norm`` is ``"max"`` (max |x|, BytePS's default) or ``"l2"``. Each
    element is an int8 level index (int16 for more than 127 levels), so the payload has a
    fixed size for both norms. Rounding is unbiased; its random bits come from ``key`` mixed
    with this rank's id, so ranks round independently.

    ``bits`` is a helper: ``bits=b`` means ``levels = 2**(b-1) - 1`` for linear levels (one
    bit for the sign, the rest for the level) and ``levels = b`` for natural levels.
    """

    name = "dithering"

    def __init__(
        self,
        levels: int | None = None,
        kind: str = "linear",
        norm: str = "max",
        bits: int | None = None,
        seed: int = 0,
    ) -> None:
        if kind not in ("linear", "natural"):
            raise ValueError(f"unknown dithering kind {kind!r}; choose 'linear' or 'natural'")
        if norm not in ("max", "l2"):
            raise ValueError(f"unknown dithering norm {norm!r}; choose 'max' or 'l2'")
        if levels is not None and bits is not None:
            raise ValueError("give dithering either levels or bits, not both")
        if bits is not None:
            if not isinstance(bits, int) or bits < 2:
                raise ValueError(f"dithering bits must be an integer >= 2, got {bits!r}")
            levels = 2 ** (bits - 1) - 1 if kind == "linear" else bits
        if levels is None:
            levels = 15
        if not isinstance(levels, int) or not 1 <= levels <= 32767:
            raise ValueError(f"dithering levels must be an integer in [1, 32767], got {levels!r}")
        if kind == "natural" and levels > 126:
            raise ValueError("natural dithering supports at most 126 levels (float32 exponents)")
        self.levels, self.kind, self.norm, self.seed = levels, kind, norm, int(seed)
        self.code_dtype = torch.int8 if levels <= 127 else torch.int16
        self._gens = _GeneratorCache()

    def payload_bytes(self, numel: int) -> int:
        return 4 + numel * (1 if self.code_dtype == torch.int8 else 2)

    def _rank(self) -> int:
        import torch.distributed as dist

        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def compress(self, x: torch.Tensor, key: int = 0) -> torch.Tensor:
        x = _flat_fp32(x)
        if self.norm == "max":
            nu = x.abs().amax() if x.numel() else x.new_zeros(())
        else:
            nu = torch.linalg.vector_norm(x)
        u = x.abs() / nu.clamp_min(torch.finfo(torch.float32).tiny)
        gen = self._gens(x.device, derive_key(self.seed, key, self._rank()))
        r = torch.rand(x.numel(), generator=gen, device=x.device)
        s = self.levels
        if self.kind == "linear":
            t = u * s
            q = t.floor()
            q += (r < t - q).to(q.dtype)
        else:
            smallest = 2.0 ** (1 - s)
            # frexp: u = m * 2**e with m in [0.5, 1), so floor(log2 u) = e - 1, exactly.
            _, e = torch.frexp(u)
            e = (e - 1).clamp(1 - s, 0).to(torch.float32)
            low = torch.where(u < smallest, torch.zeros_like(u), torch.exp2(e))
            width = torch.where(u < smallest, torch.full_like(u, smallest), low)
            # level index of `low`: 0 for zero, else e + s (2^(1-s) -> 1, ..., 1 -> s)
            q = torch.where(u < smallest, torch.zeros_like(u), e + s)
            q += (r * width < u - low).to(q.dtype)
        q = q.clamp_(max=s) * torch.where(x < 0, -1.0, 1.0)
        return torch.cat([_bytes_of(nu.reshape(1)), _bytes_of(q.to(self.code_dtype))])

    def decompress(self, payload: torch.Tensor, numel: int, key: int = 0) -> torch.Tensor:
        _check_payload(self, payload, numel)
        nu = _view_as(payload[:4], torch.float32)
        q = _view_as(payload[4:], self.code_dtype).to(torch.float32)
        if self.kind == "linear":
            level = q.abs() / self.levels
        else:
            level = torch.where(q == 0, torch.zeros_like(q), torch.exp2(q.abs() - self.levels))
        return torch.copysign(level, q) * nu

    def __repr__(self) -> str:
        return f"DitheringCompressor(levels={self.levels}, kind={self.kind!r}, norm={self.norm!r})"


# --------------------------------------------------------------------------------- casts
class CastCompressor(Compressor):
    """fp16 or bf16 cast. Sums of casts stay casts, so one all-reduce suffices.

    fp16 overflows above 65504: pre-scale (the hooks divide by the world size first).
    """

    allreduce_compatible = True

    def __init__(self, dtype: str | torch.dtype = "fp16") -> None:
        table = {"fp16": torch.float16, "bf16": torch.bfloat16}
        table.update({torch.float16: torch.float16, torch.bfloat16: torch.bfloat16})
        if dtype not in table:
            raise ValueError(f"cast compressor dtype must be 'fp16' or 'bf16', got {dtype!r}")
        self.wire_dtype = table[dtype]
        self.name = "fp16" if self.wire_dtype == torch.float16 else "bf16"

    def payload_bytes(self, numel: int) -> int:
        return 2 * numel

    def compress(self, x: torch.Tensor, key: int = 0) -> torch.Tensor:
        return _bytes_of(_flat_fp32(x).to(self.wire_dtype))

    def decompress(self, payload: torch.Tensor, numel: int, key: int = 0) -> torch.Tensor:
        _check_payload(self, payload, numel)
        return _view_as(payload, self.wire_dtype).to(torch.float32)

    def __repr__(self) -> str:
        return f"CastCompressor({self.name!r})"


# ------------------------------------------------------------------------------ registry
_REGISTRY: dict[str, Callable[..., Compressor]] = {
    "identity": IdentityCompressor,
    "zero": ZeroCompressor,
    "onebit": OneBitCompressor,
    "topk": TopKCompressor,
    "randomk": RandomKCompressor,
    "dithering": DitheringCompressor,
    "fp16": lambda: CastCompressor("fp16"),
    "bf16": lambda: CastCompressor("bf16"),
}


def available_compressors() -> list[str]:
    """Names accepted by :func:`get_compressor`."""
    return sorted(_REGISTRY)


def get_compressor(name: str, **kwargs: Any) -> Compressor:
    """Build a compressor by name, e.g. ``get_compressor("topk", ratio=0.001)``.

    A :class:`Compressor` instance passes through unchanged (kwargs must then be empty).
    """
    if isinstance(name, Compressor):
        if kwargs:
            raise ValueError("options given together with a ready compressor instance")
        return name
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ValueError(
            f"unknown compressor {name!r}; choose one of {', '.join(available_compressors())}"
        )
    try:
        return factory(**kwargs)
    except TypeError as exc:
        raise ValueError(f"bad options for compressor {name!r}: {exc}") from None
