"""Fused codec kernels for the compression hook: plain torch functions compiled on CUDA.

The unfused pipeline of :mod:`scaledl.comm.hooks` runs one kernel per torch operation
(pre-scale copy, error-feedback add, norm, sign test, pack, residual, unpack, sum, decode,
copy into the bucket), each a pass over device memory. The functions here express the same
algebra in a few element-wise steps; on CUDA :func:`torch.compile` (``dynamic=True``, so that
bucket sizes do not recompile) turns each into one or a few Triton kernels. They are ordinary
torch code, so on CPU (or where compilation fails) they run eagerly and give the same results.
Sparse decoding (:func:`scatter_decode_into`) is eager: it scatters straight into the bucket.

Exactness: values are computed with the same floating-point operations as the eager
compressors, in the same order, with two exceptions. The error-fed 1-bit steps
(:func:`onebit_encode_with_feedback`, :func:`onebit_server`) reduce their scales in the fused
kernel, in another summation order than ``torch.linalg.vector_norm`` (the scale differs by
rounding; signs and layout do not); :func:`onebit_encode` keeps the compressor's own norm and
is exact. And the server adds the ranks' decoded rows left to right, which is the eager sum
for two ranks only. The world-size pre-scale is a multiplication only where that is exact
(``n`` a power of two). On CUDA the functions are compiled with :func:`compile_options`, so
that a cast to fp16/bf16 rounds where eager rounds and no multiply-add is contracted.

:class:`Kernel` compiles lazily, on the first CUDA call; if compiling or running the compiled
kernel fails it warns once and runs the eager function from then on.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "Kernel",
    "cast_encode_with_feedback",
    "compile_available",
    "compile_options",
    "encode_rows",
    "exact_prescale",
    "onebit_decode_into",
    "onebit_encode",
    "onebit_encode_with_feedback",
    "onebit_server",
    "onebit_server_sum",
    "prepare",
    "scatter_decode_into",
    "sparse_rows",
]


def compile_available(device: torch.device) -> bool:
    """Whether :func:`torch.compile` can generate kernels for ``device`` (CUDA with Triton)."""
    if device.type != "cuda" or not hasattr(torch, "compile"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def compile_options() -> dict[str, Any]:
    """Inductor options that keep compiled element-wise code rounding as eager torch does.

    By default inductor keeps a value cast to fp16/bf16 in fp32 when the cast's consumer is in
    the same kernel (the cast encode's residual ``p - float(p.to(fp16))`` would then skip the
    rounding) and lets Triton contract a multiply and an add into one fused multiply-add.
    ``emulate_precision_casts`` keeps every cast's rounding and turns that contraction off
    (Triton's ``enable_fp_fusion=False``), so each operation rounds as its eager kernel does.
    """
    try:
        from torch._inductor import config
    except ImportError:
        return {}
    return {"emulate_precision_casts": True} if hasattr(config, "emulate_precision_casts") else {}


class Kernel:
    """A plain torch function, compiled with ``torch.compile(dynamic=True)`` on CUDA inputs
    (with :func:`compile_options`, so that it rounds as eager).

    CPU inputs (and every call after a failed compilation) run the function eagerly. The
    first failure warns once, naming the kernel and the error; it never raises.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.name = fn.__name__.lstrip("_")
        self._compiled: Callable[..., Any] | None = None
        self.failed: str | None = None

    def __call__(self, *args: Any, device: torch.device) -> Any:
        if self.failed is not None or not compile_available(device):
            return self.fn(*args)
        try:
            if self._compiled is None:
                self._compiled = torch.compile(self.fn, dynamic=True, options=compile_options())
            return self._compiled(*args)
        except Exception as exc:  # compiler or Triton missing/broken: stay correct, warn
            self.failed = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            warnings.warn(
                f"fused codec kernel {self.name!r} could not be compiled ({self.failed}); "
                "using the eager path",
                RuntimeWarning,
                stacklevel=2,
            )
            return self.fn(*args)


# ------------------------------------------------------------------------ element-wise
def _prepare(src: torch.Tensor, error: torch.Tensor, factor: float) -> torch.Tensor:
    # The hook's pre-scale copy into a zero-padded fp32 buffer plus the error-feedback add,
    # in one pass: p = pad(src * factor) + e.
    x = src.to(torch.float32) * factor
    return F.pad(x, (0, error.shape[0] - x.shape[0])) + error


def _shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(7, -1, -1, dtype=torch.int32, device=device)  # MSB first


def _pack(negative: torch.Tensor) -> torch.Tensor:
    """(rows, d) bool -> (rows, ceil(d/8)) uint8, most significant bit first (zero padded)."""
    rows, d = negative.shape
    nb = (d + 7) // 8
    bits = F.pad(negative.to(torch.int32), (0, 8 * nb - d)).reshape(rows, nb, 8)
    return (bits << _shifts(negative.device)).sum(-1, dtype=torch.int32).to(torch.uint8)


def _onebit_pack_residual(
    p: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, d = p.shape
    if d % 8 == 0:
        # Whole bytes: the residual is computed over the packing's (rows, d/8, 8) loop, so
        # that the compiler can emit one kernel for both (a guard picks this graph).
        p3 = p.view(rows, d // 8, 8)
        negative = p3 < 0
        s3 = scale.view(rows, 1, 1)
        packed = (negative.to(torch.int32) << _shifts(p.device)).sum(-1, dtype=torch.int32)
        return packed.to(torch.uint8), (p3 - torch.where(negative, -s3, s3)).view(rows, d)
    negative = p < 0
    return _pack(negative), p - torch.where(negative, -scale, scale)


def _onebit_pack(p: torch.Tensor) -> torch.Tensor:
    return _pack(p < 0)


def _onebit_signed(bits: torch.Tensor, scale_rows: torch.Tensor) -> torch.Tensor:
    """Decode packed signs: -scale where the bit is set, +scale elsewhere.

    ``scale_rows`` is the (rows, 1) scale expanded to (rows, d), which carries d.
    """
    rows, d = scale_rows.shape
    lanes = (bits.unsqueeze(-1).to(torch.int32) >> _shifts(bits.device)) & 1
    negative = lanes.reshape(rows, -1)[:, :d] == 1
    return torch.where(negative, -scale_rows, scale_rows)


def _onebit_server_sum(
    bits: torch.Tensor, scale_rows: torch.Tensor, error: torch.Tensor
) -> torch.Tensor:
    decoded = _onebit_signed(bits, scale_rows)
    acc = decoded[0]
    for j in range(1, decoded.shape[0]):  # left to right: for two rows, the eager sum
        acc = acc + decoded[j]
    return acc + error


# The error-fed paths recompute p = (what is compressed) in both of their passes instead of
# storing it: a reduction pass for the scale, then one pass that packs the signs and writes
# the residual. ``norm`` is 1 (mean |p|) or 2 (l2 norm).
_CHUNK = 4096


def _row_sums(p: torch.Tensor, norm: int) -> torch.Tensor:
    # Two explicit stages (chunks of 4096, then the chunks' sums): a bucket has only n rows,
    # and one block per row would leave the device idle whatever the compiler's heuristics.
    rows, d = p.shape
    nc = (d + _CHUNK - 1) // _CHUNK
    x = F.pad(p, (0, nc * _CHUNK - d)).reshape(rows, nc, _CHUNK)
    return (x.abs() if norm == 1 else x * x).sum(-1).sum(-1)


def _worker_p(src: torch.Tensor, error: torch.Tensor, factor: float, rows: int) -> torch.Tensor:
    return _prepare(src, error, factor).view(rows, -1)


def _onebit_worker_sums(
    src: torch.Tensor, error: torch.Tensor, factor: float, rows: int, norm: int
) -> torch.Tensor:
    return _row_sums(_worker_p(src, error, factor, rows), norm)


def _onebit_worker_pack(
    src: torch.Tensor, error: torch.Tensor, factor: float, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _onebit_pack_residual(_worker_p(src, error, factor, scale.shape[0]), scale)


def _server_p(
    bits: torch.Tensor, scale_rows: torch.Tensor, error: torch.Tensor, valid: int
) -> torch.Tensor:
    # the shard's padding (from ``valid`` on) sums to zero before the error is added
    s = _onebit_server_sum(bits, scale_rows, torch.zeros_like(error))
    keep = torch.arange(error.shape[0], device=error.device) < valid
    return (torch.where(keep, s, 0.0) + error).view(1, -1)


def _onebit_server_sums(
    bits: torch.Tensor, scale_rows: torch.Tensor, error: torch.Tensor, valid: int, norm: int
) -> torch.Tensor:
    return _row_sums(_server_p(bits, scale_rows, error, valid), norm)


def _onebit_server_pack(
    bits: torch.Tensor,
    scale_rows: torch.Tensor,
    error: torch.Tensor,
    valid: int,
    scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _onebit_pack_residual(_server_p(bits, scale_rows, error, valid), scale)


def _cast_encode(
    src: torch.Tensor, error: torch.Tensor, factor: float, wire: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    p = _prepare(src, error, factor)
    q = p.to(wire)
    return q, p - q.to(torch.float32)


def _onebit_decode_into(out: torch.Tensor, bits: torch.Tensor, scale_rows: torch.Tensor) -> None:
    out.copy_(_onebit_signed(bits, scale_rows).reshape(-1)[: out.shape[0]])


_PREPARE = Kernel(_prepare)
_PACK_RESIDUAL = Kernel(_onebit_pack_residual)
_PACK = Kernel(_onebit_pack)
_SERVER_SUM = Kernel(_onebit_server_sum)
_DECODE_INTO = Kernel(_onebit_decode_into)
_WORKER_SUMS = Kernel(_onebit_worker_sums)
_WORKER_PACK = Kernel(_onebit_worker_pack)
_SERVER_SUMS = Kernel(_onebit_server_sums)
_SERVER_PACK = Kernel(_onebit_server_pack)
_CAST = Kernel(_cast_encode)
#: every compiled kernel of this module (for tests and diagnostics)
KERNELS = (
    _PREPARE,
    _PACK_RESIDUAL,
    _PACK,
    _SERVER_SUM,
    _DECODE_INTO,
    _WORKER_SUMS,
    _WORKER_PACK,
    _SERVER_SUMS,
    _SERVER_PACK,
    _CAST,
)


# ------------------------------------------------------------------------------ public
def exact_prescale(n: int) -> float | None:
    """``1/n`` when multiplying by it equals dividing by ``n`` exactly (n a power of two)."""
    return 1.0 / n if n > 0 and n & (n - 1) == 0 else None


def prepare(src: torch.Tensor, error: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
    """``pad(src * factor, to error's length) + error`` in fp32, as one pass.

    Equal to the eager pre-scale (``src / n`` into a zero-padded fp32 buffer) followed by the
    error-feedback add whenever ``factor`` is :func:`exact_prescale` of ``n`` (or 1).
    """
    if src.dim() != 1 or error.dim() != 1 or src.numel() > error.numel():
        raise ValueError(
            f"prepare needs a 1-D source no longer than the 1-D error buffer, got "
            f"{tuple(src.shape)} and {tuple(error.shape)}"
        )
    return _PREPARE(src, error, float(factor), device=src.device)


def _scales_bytes(scale: torch.Tensor) -> torch.Tensor:
    return scale.reshape(-1, 1).contiguous().view(torch.uint8)


def onebit_encode(
    compressor: Any, p: torch.Tensor, residual: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """1-bit payloads of the rows of ``p`` and (optionally) the residuals ``p - D(C(p))``.

    ``compressor`` is a :class:`scaledl.comm.OneBitCompressor`: its own norm kernel gives the
    scales (so they are bit-identical to ``compress_batch``), then one fused pass packs the
    sign bits and writes the residual. Returns ``(payloads (rows, bytes), residual or None)``.
    """
    if p.dim() != 2 or p.dtype != torch.float32:
        raise ValueError(f"onebit_encode takes a 2-D fp32 tensor, got {p.dtype} {tuple(p.shape)}")
    scale = compressor._scale(p).view(p.shape[0], 1)
    if residual:
        packed, res = _PACK_RESIDUAL(p, scale, device=p.device)
    else:
        packed, res = _PACK(p, device=p.device), None
    return _payloads(scale, packed), res


def _norm(compressor: Any) -> int:
    return {"mean_abs": 1, "l2_sqrt_d": 2, "none": 0}[compressor.scale]


def _scale_from_sums(
    compressor: Any, sums: torch.Tensor | None, d: int, rows: int, device: torch.device
) -> torch.Tensor:
    """The compressor's scale formula applied to fused row sums (|p| or p^2)."""
    d = max(1, d)
    if sums is None:  # scale "none"
        return torch.ones(rows, 1, dtype=torch.float32, device=device)
    if compressor.scale == "mean_abs":
        return (sums / d).view(rows, 1)
    return (sums.sqrt() / math.sqrt(d)).view(rows, 1)


def _payloads(scale: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    rows = scale.shape[0]
    out = torch.empty(rows, 4 + packed.shape[1], dtype=torch.uint8, device=packed.device)
    out[:, :4] = _scales_bytes(scale)
    out[:, 4:] = packed
    return out


def onebit_encode_with_feedback(
    compressor: Any, src: torch.Tensor, error: torch.Tensor, factor: float, rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The worker's error-fed 1-bit step from the raw bucket, in two passes.

    ``p = (pad(src * factor) + error).view(rows, -1)`` is never stored: one pass reduces
    the row scales, one packs the signs of ``p`` and writes the residual ``p - D(C(p))``.
    Returns ``(payloads (rows, bytes), residual (rows, d))``. Signs, payload layout and the
    scale formula are the compressor's; the scale's sum runs in another order than
    ``compress_batch``'s norm (a relative difference of order 1e-7).
    """
    if src.dim() != 1 or error.dim() != 1 or src.numel() > error.numel() or error.numel() % rows:
        raise ValueError(
            f"a 1-D source of {src.numel()} elements and a 1-D error of {error.numel()} do "
            f"not make {rows} padded rows"
        )
    dev, d, norm = src.device, error.numel() // rows, _norm(compressor)
    sums = _WORKER_SUMS(src, error, float(factor), rows, norm, device=dev) if norm else None
    scale = _scale_from_sums(compressor, sums, d, rows, dev)
    packed, res = _WORKER_PACK(src, error, float(factor), scale, device=dev)
    return _payloads(scale, packed), res


def onebit_server(
    compressor: Any, payloads: torch.Tensor, length: int, error: torch.Tensor, valid: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two-way server's 1-bit step on the shard it owns, in two passes.

    ``p = sum of the decoded rows of payloads`` (left to right, zero from ``valid`` on, the
    shard's padding) ``+ error`` is never stored: one pass reduces the scale, one packs and
    writes the residual. Returns ``(payload (1, bytes), residual (length,))``.
    """
    bits, scale_rows = _split_onebit(payloads, length)
    if error.shape != (length,) or not 0 <= valid <= length:
        raise ValueError(f"server error of shape {tuple(error.shape)} for {length} elements")
    dev, norm = payloads.device, _norm(compressor)
    sums = None
    if norm:
        sums = _SERVER_SUMS(bits, scale_rows, error, int(valid), norm, device=dev)
    scale = _scale_from_sums(compressor, sums, length, 1, dev)
    packed, res = _SERVER_PACK(bits, scale_rows, error, int(valid), scale, device=dev)
    return _payloads(scale, packed), res.view(-1)


def cast_encode_with_feedback(
    compressor: Any, src: torch.Tensor, error: torch.Tensor, factor: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16/bf16 cast with error feedback in one pass: ``p = pad(src * factor) + error``,
    payload ``p.to(wire)`` (as flat bytes) and residual ``p - float(payload)``."""
    if src.dim() != 1 or error.dim() != 1 or src.numel() > error.numel():
        raise ValueError(
            f"cast encode needs a 1-D source no longer than the 1-D error buffer, got "
            f"{tuple(src.shape)} and {tuple(error.shape)}"
        )
    q, res = _CAST(src, error, float(factor), compressor.wire_dtype, device=src.device)
    return q.view(torch.uint8), res


def _split_onebit(payloads: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    from scaledl.comm.compressors import _view_as

    if payloads.dim() != 2 or payloads.shape[1] != 4 + (length + 7) // 8:
        raise ValueError(
            f"1-bit payloads of shape {tuple(payloads.shape)} do not hold {length} elements"
        )
    scale = _view_as(payloads[:, :4], torch.float32)  # (rows, 1)
    return payloads[:, 4:], scale.expand(payloads.shape[0], length)


def onebit_server_sum(payloads: torch.Tensor, length: int, error: torch.Tensor) -> torch.Tensor:
    """Decode the rows of 1-bit ``payloads``, add them up (left to right) and add ``error``.

    The two-way server's aggregation and error-feedback add in one pass; ``error`` has
    ``length`` elements.
    """
    bits, scale_rows = _split_onebit(payloads, length)
    if error.shape != (length,):
        raise ValueError(f"server error of shape {tuple(error.shape)} for {length} elements")
    return _SERVER_SUM(bits, scale_rows, error, device=payloads.device)


def onebit_decode_into(out: torch.Tensor, payloads: torch.Tensor, length: int) -> torch.Tensor:
    """Decode rows of ``length`` elements, concatenated and cut to ``out.numel()``, into ``out``.

    ``out`` (1-D, any float dtype, e.g. the DDP bucket) is written in place and returned.
    """
    bits, scale_rows = _split_onebit(payloads, length)
    if out.dim() != 1 or out.numel() > payloads.shape[0] * length:
        raise ValueError(f"output of shape {tuple(out.shape)} for {payloads.shape[0]} rows")
    _DECODE_INTO(out, bits, scale_rows, device=out.device)
    return out


def scatter_decode_into(
    out: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor, length: int, add: bool = False
) -> torch.Tensor:
    """Sparse rows (row ``j``: ``vals[j]`` at ``idx[j]`` in ``[0, length)``) into ``out``.

    ``out`` (1-D) is the concatenation of the dense rows cut to ``out.numel()``: it is zeroed
    and the values are scattered straight into it (``add=True`` sums repeated indices), so no
    dense (rows, length) tensor and no copy into the bucket are needed. A row cut by the end
    of ``out`` goes through a scratch row, so that its out-of-range indices are dropped.
    """
    rows = idx.shape[0]
    if out.dim() != 1 or not (rows - 1) * length <= out.numel() <= rows * length:
        raise ValueError(f"output of {out.numel()} elements for {rows} rows of {length}")
    vals = vals.to(out.dtype)
    out.zero_()
    full = out.numel() // length if length else rows  # rows that fit entirely
    if full:
        dense = out[: full * length].view(full, length)
        if add:
            dense.scatter_add_(1, idx[:full], vals[:full])
        else:
            dense.scatter_(1, idx[:full], vals[:full])
    if full < rows:  # the last row is cut: scatter it into a scratch row, copy what fits
        tail = torch.zeros(length, dtype=out.dtype, device=out.device)
        if add:
            tail.scatter_add_(0, idx[-1], vals[-1])
        else:
            tail.scatter_(0, idx[-1], vals[-1])
        out[full * length :] = tail[: out.numel() - full * length]
    return out


def encode_rows(comp: Any, ef: Any, p: torch.Tensor, keys: list[int]) -> torch.Tensor:
    """Flat payloads of the rows of an error-corrected fp32 ``p``; updates ``ef``'s error.

    ``ef`` is the :class:`scaledl.comm.ErrorFeedback` whose error was added into ``p``: where
    it is enabled, ``p - D(C(p))`` becomes its new error (for 1-bit from the fused pass, for
    other compressors by :meth:`Compressor.residual_batch_` in place, ``p`` itself).
    """
    from scaledl.comm.compressors import OneBitCompressor

    if isinstance(comp, OneBitCompressor):
        payloads, res = onebit_encode(comp, p, residual=ef.enabled)
        if res is not None:
            ef.error = res.view(-1)
        return payloads.view(-1)
    payloads = comp.compress_batch(p, keys)
    if ef.enabled:
        comp.residual_batch_(p, payloads, keys)
        ef.error = p.view(-1)
    return payloads.view(-1)


def sparse_rows(
    comp: Any, payloads: torch.Tensor, length: int, keys: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(int64 indices, fp32 values) of top-k or random-k payload rows, for
    :func:`scatter_decode_into`."""
    from scaledl.comm.compressors import RandomKCompressor, TopKCompressor, _view_as

    if isinstance(comp, TopKCompressor):
        k = comp.k(length)
        idx = _view_as(payloads[:, : 4 * k], torch.int32).to(torch.int64)
        return idx, _view_as(payloads[:, 4 * k :], torch.float32)
    if isinstance(comp, RandomKCompressor):
        vals = _view_as(payloads, torch.float32)
        return comp.indices_batch(length, keys, payloads.device), vals
    raise ValueError(f"sparse_rows needs a top-k or random-k compressor, got {comp!r}")
