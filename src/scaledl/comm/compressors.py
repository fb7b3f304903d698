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
from collections.abc import Callable, Sequence
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
    return _rows_fp32(x.view(1, -1))


def _rows_fp32(x: torch.Tensor) -> torch.Tensor:
    if not x.is_floating_point():
        raise ValueError(f"compressors take floating-point tensors, got {x.dtype}")
    return x.detach().to(torch.float32).contiguous()  # no copy for contiguous fp32 input


def _check_payload(c: Compressor, payload: torch.Tensor, numel: int) -> None:
    if payload.dtype != torch.uint8 or payload.dim() != 1:
        raise ValueError(f"{c.name} payload must be a 1-D uint8 tensor, got {payload.dtype}")
    want = c.payload_bytes(numel)
    if payload.numel() != want:
        raise ValueError(
            f"{c.name} payload of {payload.numel()} bytes for {numel} elements (expected {want})"
        )


def _check_batch(
    c: Compressor, payloads: torch.Tensor, numel: int, keys: Sequence[int]
) -> torch.Tensor:
    if payloads.dtype != torch.uint8 or payloads.dim() != 2 or payloads.shape[0] != len(keys):
        raise ValueError(
            f"{c.name} payloads must be a (rows, bytes) uint8 tensor with one row per key, "
            f"got {payloads.dtype} of shape {tuple(payloads.shape)} for {len(keys)} keys"
        )
    want = c.payload_bytes(numel)
    if payloads.shape[1] != want:
        raise ValueError(
            f"{c.name} payload of {payloads.shape[1]} bytes for {numel} elements (expected {want})"
        )
    return payloads


def _one(c: Compressor, payload: torch.Tensor, numel: int, key: int) -> torch.Tensor:
    """Single-payload decode through the batched path."""
    _check_payload(c, payload, numel)
    return c.decompress_batch(payload.view(1, -1), numel, [key]).reshape(-1)


def _view_as(chunk: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret bytes (1-D, or rows of a 2-D tensor) as ``dtype``.

    Slices of a received buffer may be misaligned; only those are copied.
    """
    size = torch.empty((), dtype=dtype).element_size()
    aligned = chunk.data_ptr() % size == 0 and chunk.stride(-1) == 1
    if not (aligned and all(st % size == 0 for st in chunk.stride()[:-1])):
        chunk = chunk.clone(memory_format=torch.contiguous_format)
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
        gen.manual_seed(seed)  # host-side only: no device synchronisation
        return gen

    def __getstate__(self) -> dict[str, Any]:
        return {}  # generators are re-created on use (and are not picklable on every device)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._gens = {}


class _BatchedCompressor(Compressor):
    """Compressors whose batched path is the implementation; single calls are one-row batches."""

    def compress(self, x: torch.Tensor, key: int = 0) -> torch.Tensor:
        return self.compress_batch(_flat_fp32(x), [key]).reshape(-1)

    def decompress(self, payload: torch.Tensor, numel: int, key: int = 0) -> torch.Tensor:
        return _one(self, payload, numel, key)


# --------------------------------------------------------------------------------- 1-bit
_SHIFTS = (7, 6, 5, 4, 3, 2, 1, 0)
# Multiplying 8 little-endian 0/1 bytes (one int64) by this constant gathers them, most
# significant first, into the top byte: one multiply packs 8 elements.
_PACK_MAGIC = 0x8040201008040201 - (1 << 64)


def _pack_rows(bits: torch.Tensor) -> torch.Tensor:
    """Pack each row of a 2-D bool/0-1 tensor into ``ceil(cols/8)`` bytes, MSB first."""
    rows, cols = bits.shape
    nb = (cols + 7) // 8
    plain = bits.dtype in (torch.bool, torch.uint8) and bits.is_contiguous()
    if cols % 8 or not plain or bits.data_ptr() % 8:  # int64 words need aligned, whole bytes
        padded = torch.zeros(rows, 8 * nb, dtype=torch.uint8, device=bits.device)
        padded[:, :cols] = bits
        bits = padded
    words = bits.view(torch.uint8).view(torch.int64)  # (rows, nb), a view: no copy
    packed = words * _PACK_MAGIC
    packed >>= 56  # arithmetic shift: the low byte is right, the cast to uint8 keeps only it
    return packed.to(torch.uint8)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a 1-D bool/0-1 tensor into ``ceil(n/8)`` bytes, most significant bit first."""
    return _pack_rows(bits.reshape(1, -1)).reshape(-1)


# Byte lane i of an int64 (little-endian) keeps bit 7 - i of the byte copied into every lane:
# lane order is element order, most significant bit first, as in _pack_rows.
_SPREAD = 0x0101010101010101
_LANE_BIT = 0x0102040810204080
_LOW7 = 0x7F7F7F7F7F7F7F7F
_HIGH = 0x8080808080808080 - (1 << 64)


def _unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """(rows, nb) packed bytes -> (rows, 8 nb) uint8 lanes, 0x80 where the bit is set.

    Integer multiply/and/add on int64 words (8 elements each), so that unpacking is a few
    element-wise passes rather than a gather.
    """
    w = packed.to(torch.int64)
    w *= _SPREAD  # the byte in all 8 lanes (products stay below 2**64: no carries)
    w &= _LANE_BIT
    w += _LOW7  # a non-zero lane (at most 0x80) reaches 0x80..0xFF: no carry into the next
    w &= _HIGH
    return w.view(torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a ``uint8`` tensor of ``n`` zeros and ones."""
    return (_unpack_rows(packed.reshape(1, -1)) >> 7).reshape(-1)[:n]


class OneBitCompressor(_BatchedCompressor):
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
        """One fp32 scale per row; fused norms read ``x`` once and allocate nothing."""
        d = max(1, x.shape[1])
        if self.scale == "mean_abs":
            return torch.linalg.vector_norm(x, 1, dim=1) / d
        if self.scale == "l2_sqrt_d":
            return torch.linalg.vector_norm(x, 2, dim=1) / math.sqrt(d)
        return torch.ones(x.shape[0], dtype=torch.float32, device=x.device)

    def compress_batch(self, x: torch.Tensor, keys: Sequence[int]) -> torch.Tensor:
        x = _rows_fp32(x)
        rows = x.shape[0]
        out = torch.empty(rows, self.payload_bytes(x.shape[1]), dtype=torch.uint8, device=x.device)
        out[:, :4] = self._scale(x).view(torch.uint8).view(rows, 4)
        out[:, 4:] = _pack_rows(x < 0)
        return out

    def decompress_batch(
        self, payloads: torch.Tensor, numel: int, keys: Sequence[int]
    ) -> torch.Tensor:
        payloads = _check_batch(self, payloads, numel, keys)
        scale = _view_as(payloads[:, :4], torch.float32)  # (rows, 1)
        negative = _unpack_rows(payloads[:, 4:]).view(torch.int8) < 0
        return torch.where(negative[:, :numel], -scale, scale)

    def residual_batch_(
        self, p: torch.Tensor, payloads: torch.Tensor, keys: Sequence[int]
    ) -> torch.Tensor:
        # D(C(p)) is -scale where p < 0 and +scale elsewhere: no need to unpack the bits.
        scale = _view_as(payloads[:, :4], torch.float32)
        return p.sub_(torch.where(p < 0, -scale, scale))

    def __repr__(self) -> str:
        return f"OneBitCompressor(scale={self.scale!r})"


def _scatter_rows(
    payload_idx: torch.Tensor, vals: torch.Tensor, numel: int, add: bool = False
) -> torch.Tensor:
    out = torch.zeros(vals.shape[0], numel, dtype=torch.float32, device=vals.device)
    if add:
        return out.scatter_add_(1, payload_idx, vals)
    return out.scatter_(1, payload_idx, vals)


# --------------------------------------------------------------------------------- top-k
class TopKCompressor(_BatchedCompressor):
    """The ``k`` largest magnitudes, sent as (32-bit index, fp32 value) pairs.

    ``ratio`` below 1 is a fraction of the elements (k = ceil(ratio * d), at least 1), 1 or
    more an element count (capped at d).

    ``chunk`` (optional, approximate): split each tensor into chunks of ``chunk`` elements
    (the last one zero-padded) and keep the ``ceil(ratio * chunk)`` largest magnitudes of
    each chunk instead of the global top-k: many small ``torch.topk`` calls, which the device
    runs in parallel, instead of one large selection. The payload layout is the same (k is
    the number of chunks times the per-chunk count); indices that fall into the padding
    carry 0 and point at the last element (decoding adds, so they change nothing).
    """

    name = "topk"

    def __init__(self, ratio: float | int = 0.01, chunk: int | None = None) -> None:
        self.keep = _check_count_spec(ratio, "top-k ratio")
        if chunk is not None:
            if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
                raise ValueError(f"top-k chunk must be a positive integer, got {chunk!r}")
            if self.keep >= 1:
                raise ValueError("chunked top-k needs a fractional ratio (below 1)")
        self.chunk = chunk

    def _chunks(self, numel: int) -> tuple[int, int, int]:
        """(chunk length, number of chunks, kept per chunk) of the chunked variant."""
        assert self.chunk is not None
        c = max(1, min(self.chunk, numel))
        return c, -(-numel // c), _count(self.keep, c)

    def k(self, numel: int) -> int:
        if self.chunk is None or numel == 0:
            return _count(self.keep, numel)
        _, chunks, per = self._chunks(numel)
        return chunks * per

    def payload_bytes(self, numel: int) -> int:
        return 8 * self.k(numel)

    def compress_batch(self, x: torch.Tensor, keys: Sequence[int]) -> torch.Tensor:
        x = _rows_fp32(x)
        if x.shape[1] >= 2**31:
            raise ValueError("top-k indices are 32-bit: split tensors of 2**31 or more elements")
        if self.chunk is not None and x.shape[1]:
            idx, vals = self._chunked_topk(x)
        else:
            k = self.k(x.shape[1])
            idx = torch.topk(x.abs(), k, dim=1, sorted=False).indices  # one topk for all rows
            vals = x.gather(1, idx)
        return torch.cat([idx.to(torch.int32).view(torch.uint8), vals.view(torch.uint8)], dim=1)

    def _chunked_topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, d = x.shape
        c, chunks, per = self._chunks(d)
        if chunks * c != d:
            x = torch.nn.functional.pad(x, (0, chunks * c - d))
        xc = x.view(rows, chunks, c)
        local = torch.topk(xc.abs(), per, dim=2, sorted=False).indices
        vals = xc.gather(2, local).view(rows, -1)
        offsets = torch.arange(0, chunks * c, c, device=x.device).view(1, chunks, 1)
        # padding positions (value 0) point at the last element: decoding adds them
        return (local + offsets).clamp_(max=d - 1).view(rows, -1), vals

    @property
    def decode_adds(self) -> bool:
        """Whether payload values at repeated indices are summed on decode (chunked)."""
        return self.chunk is not None

    def decompress_batch(
        self, payloads: torch.Tensor, numel: int, keys: Sequence[int]
    ) -> torch.Tensor:
        payloads = _check_batch(self, payloads, numel, keys)
        k = self.k(numel)
        idx = _view_as(payloads[:, : 4 * k], torch.int32).to(torch.int64)
        vals = _view_as(payloads[:, 4 * k :], torch.float32)
        return _scatter_rows(idx, vals, numel, add=self.decode_adds)

    def residual_batch_(
        self, p: torch.Tensor, payloads: torch.Tensor, keys: Sequence[int]
    ) -> torch.Tensor:
        # The k values are sent exactly: the residual is p with those positions zeroed.
        k = self.k(p.shape[1])
        idx = _view_as(payloads[:, : 4 * k], torch.int32).to(torch.int64)
        if self.decode_adds:  # p + (-p) = 0 where sent; padding entries add -0
            return p.scatter_add_(1, idx, _view_as(payloads[:, 4 * k :], torch.float32).neg())
        return p.scatter_(1, idx, 0.0)

    def __repr__(self) -> str:
        extra = "" if self.chunk is None else f", chunk={self.chunk}"
        return f"TopKCompressor(ratio={self.keep!r}{extra})"


# ------------------------------------------------------------------------------ random-k
class RandomKCompressor(_BatchedCompressor):
    """``k`` values at indices drawn from ``key``: every rank picks the same ones, none are sent.

    The ``k`` indices are drawn uniformly **with replacement** (``torch.randint`` on the
    tensor's device, from a generator seeded with ``(seed, key)``): O(k) work, whereas a
    distinct draw (a permutation) costs O(d). A repeated index carries the same value twice;
    about k^2/(2d) of the k slots repeat (0.5% of them at k = 1% of d), so slightly fewer
    than k distinct elements are sent.

    With ``rescale=True`` every draw is multiplied by d/k and repeated draws are *added* on
    decode, which makes the compressor exactly unbiased (use it without error feedback);
    with error feedback use ``rescale=False`` (drawn positions are then sent exactly, and
    the error there is zero). Because all ranks share the indices, payloads can be summed
    directly (``allreduce_compatible``).
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
        """The ``k`` indices in ``[0, numel)`` for ``key`` (with replacement), identical on
        every rank of one device kind (a CUDA and a CPU rank draw different ones)."""
        return self.indices_batch(numel, [key], device).reshape(-1)

    def indices_batch(
        self, numel: int, keys: Sequence[int], device: torch.device | str
    ) -> torch.Tensor:
        """A ``(len(keys), k)`` int64 tensor: row ``j`` is :meth:`indices` for ``keys[j]``."""
        device = torch.device(device)
        k = self.k(numel)
        out = torch.empty(len(keys), k, dtype=torch.int64, device=device)
        if k:
            for j, key in enumerate(keys):  # one O(k) draw per key, on the device
                gen = self._gens(device, derive_key(self.seed, key))
                torch.randint(0, numel, (k,), generator=gen, device=device, out=out[j])
        return out

    def compress_batch(self, x: torch.Tensor, keys: Sequence[int]) -> torch.Tensor:
        x = _rows_fp32(x)
        vals = x.gather(1, self.indices_batch(x.shape[1], keys, x.device))
        if self.rescale and vals.shape[1]:
            vals *= x.shape[1] / vals.shape[1]
        return vals.view(torch.uint8)

    def decompress_batch(
        self, payloads: torch.Tensor, numel: int, keys: Sequence[int]
    ) -> torch.Tensor:
        payloads = _check_batch(self, payloads, numel, keys)
        idx = self.indices_batch(numel, keys, payloads.device)
        vals = _view_as(payloads, torch.float32)
        # Repeated indices: unscaled draws carry equal values (set once); scaled draws are
        # separate unbiased estimates and must be summed.
        return _scatter_rows(idx, vals, numel, add=self.rescale)

    def residual_batch_(
        self, p: torch.Tensor, payloads: torch.Tensor, keys: Sequence[int]
    ) -> torch.Tensor:
        if self.rescale:  # scaled draws differ from p: decode
            return super().residual_batch_(p, payloads, keys)
        return p.scatter_(1, self.indices_batch(p.shape[1], keys, p.device), 0.0)

    def __repr__(self) -> str:
        return f"RandomKCompressor(ratio={self.keep!r}, rescale={self.rescale})"


# ----------------------------------------------------------------------------- dithering
class DitheringCompressor(_BatchedCompressor):
    """Stochastic rounding of ``|x| / norm`` onto ``levels`` levels, with a sign per element.

    ``kind="linear"`` uses the levels k/s (k = 0..s); ``"natural"`` uses 0 and the powers of
    two 2^(1-s) .. 1. ``norm`` is ``"max"`` (max |x|, BytePS's default) or ``"l2"``. Each
    element is an int8 level index (int16 for more than 127 levels), so the payload has a
    fixed size for both norms. Rounding is unbiased (``floor(t + r)`` with ``r`` uniform in
    [0, 1) rounds ``t`` up with probability ``frac(t)``); its random bits come from ``key``
    mixed with this rank's id, so ranks round independently.

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

    def _uniform(self, shape: torch.Size, keys: Sequence[int], device: torch.device):
        r = torch.empty(shape, dtype=torch.float32, device=device)
        rank = self._rank()
        for j, key in enumerate(keys):
            gen = self._gens(device, derive_key(self.seed, key, rank))
            torch.rand(shape[1], generator=gen, device=device, out=r[j])
        return r

    def compress_batch(self, x: torch.Tensor, keys: Sequence[int]) -> torch.Tensor:
        x = _rows_fp32(x)
        rows, d = x.shape
        if d == 0:
            nu = x.new_zeros(rows)
        else:  # fused norms: one read of x, no |x| temporary
            nu = torch.linalg.vector_norm(x, math.inf if self.norm == "max" else 2, dim=1)
        inv = nu.clamp_min(torch.finfo(torch.float32).tiny).reciprocal_().view(rows, 1)
        r = self._uniform(x.shape, keys, x.device)
        s = self.levels
        t = torch.mul(x, inv).abs_()  # u = |x| / nu in [0, 1]
        if self.kind == "linear":
            t.mul_(s).add_(r).floor_()  # level index floor(u*s + r)
        else:
            # Level boundaries are powers of two: with E = floor(log2 u) clamped to [1-s, 0]
            # (exactly, from frexp), u lies in [2^E, 2^(E+1)) (or below 2^(1-s), between the
            # levels 0 and 2^(1-s)), and the level index is E + s - 1 + floor(u / 2^E + r).
            e = torch.frexp(t).exponent
            e -= 1
            e.clamp_(1 - s, 0).masked_fill_(t < 2.0 ** (1 - s), 1 - s)
            t.mul_(torch.exp2(-e.to(torch.float32))).add_(r).floor_().add_(e).add_(s - 1)
        t.clamp_(0, s).copysign_(x)
        out = torch.empty(rows, self.payload_bytes(d), dtype=torch.uint8, device=x.device)
        out[:, :4] = nu.view(torch.uint8).view(rows, 4)
        out[:, 4:].view(self.code_dtype).copy_(t)  # exact: t holds small integers
        return out

    def decompress_batch(
        self, payloads: torch.Tensor, numel: int, keys: Sequence[int]
    ) -> torch.Tensor:
        payloads = _check_batch(self, payloads, numel, keys)
        rows = payloads.shape[0]
        nu = _view_as(payloads[:, :4], torch.float32)  # (rows, 1)
        q = _view_as(payloads[:, 4:], self.code_dtype)
        if self.kind == "linear":
            return q * (nu / self.levels)  # int codes times an fp32 column: one fp32 pass
        # natural: a 256-entry table per row (codes are int8), value = sign * 2^(|q|-s) * nu
        codes = torch.arange(-128, 128, dtype=torch.float32, device=payloads.device)
        levels = torch.exp2(codes.abs() - self.levels).copysign_(codes)
        levels[128] = 0.0
        table = (nu * levels).view(rows * 256, 1)
        idx = q.to(torch.int32) + 128
        idx += 256 * torch.arange(rows, dtype=torch.int32, device=idx.device).view(rows, 1)
        return torch.nn.functional.embedding(idx, table).view(rows, numel)

    def __repr__(self) -> str:
        return f"DitheringCompressor(levels={self.levels}, kind={self.kind!r}, norm={self.norm!r})"


# --------------------------------------------------------------------------------- casts
class CastCompressor(_BatchedCompressor):
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

    def compress_batch(self, x: torch.Tensor, keys: Sequence[int]) -> torch.Tensor:
        if not x.is_floating_point():
            raise ValueError(f"compressors take floating-point tensors, got {x.dtype}")
        # fp16/bf16 inputs are rounded through fp32 exactly, so cast directly
        return x.detach().to(self.wire_dtype).contiguous().view(torch.uint8)

    def decompress_batch(
        self, payloads: torch.Tensor, numel: int, keys: Sequence[int]
    ) -> torch.Tensor:
        payloads = _check_batch(self, payloads, numel, keys)
        return _view_as(payloads, self.wire_dtype).to(torch.float32)

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
