"""Hand-written Triton kernels for the error-fed 1-bit two-way exchange.

:mod:`scaledl.comm.fused` expresses the codec as plain torch functions and lets
``torch.compile`` generate kernels; each compiled call then pays Dynamo's guards and
inductor's wrapper on the host, which dominates when a step is host-bound. The kernels here
are launched directly (``kernel[grid](...)``), a few tens of microseconds of host time each,
and Triton compiles them once per specialisation on first use (no graph capture, no warm-up):

- worker: ``p = pad(src * factor) + error`` viewed as (rows, d) is never stored; a block
  pass writes per-(row, block) partial sums of ``|p|`` (or ``p**2``), a tiny pass sums each
  row's partials in a fixed order into the row scale, and a pack pass writes the payload
  rows (scale bytes then sign bytes) and the residual ``p - D(C(p))``;
- server: the same three passes on ``p = sum of the decoded received rows`` (left to
  right, zero from ``valid`` on) ``+ error``;
- decode: the all-gathered rows' ``+-scale`` straight into the (cut) bucket.

Payload layout, bit order (most significant bit first, 1 = negative) and the residual
algebra are those of :class:`scaledl.comm.OneBitCompressor`, so signs, payload bytes other
than the scales, and residuals equal the eager path's given the same scale. The scale is a
two-stage tree sum, deterministic (the same bits on every run) but in another order than
``torch.linalg.vector_norm``: it agrees with the eager scale within float reassociation
(relative 1e-6 at the tested sizes). Every rank sends its own scale in its payload, so the
ranks never need to reproduce each other's sums.

The functions return ``None`` where the kernels cannot run (no ``triton``, CPU tensors
outside Triton's interpreter, or a kernel that failed once: it warns once, naming the error);
the caller then uses :mod:`scaledl.comm.fused`.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import torch

__all__ = [
    "available",
    "decode_into",
    "encode_with_feedback",
    "server",
]

try:  # optional: the caller falls back to scaledl.comm.fused without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]

#: elements per program of the reduction pass (at least; see _partials) and the most
#: partial sums of a row; payload bytes (8 elements each) per program of the pack pass;
#: elements per program of the decode pass
SUM_BLOCK = 4096
MAX_PARTIALS = 8192
PACK_BYTES = 512
DECODE_BLOCK = 4096

#: the first kernel failure (type and message), after which the functions return None
failed: str | None = None


#: Triton's interpreter reads TRITON_INTERPRET when the kernels are defined (at import)
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(device: torch.device) -> bool:
    """Whether the kernels run for tensors on ``device``: CUDA (or CPU under Triton's
    interpreter, ``TRITON_INTERPRET=1`` set before import), ``triton`` importable, and no
    earlier failure."""
    if triton is None or failed is not None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and INTERPRETED)


def _norm(compressor: Any) -> int:
    return {"mean_abs": 1, "l2_sqrt_d": 2, "none": 0}[compressor.scale]


#: integer arguments that only index bytes or bound a mask: not specialised on (Triton
#: compiles a variant per divisibility by 16 of each specialised integer), fewer compiles
_SHARD_ARGS = ["row_bytes", "valid"]

if triton is not None:

    @triton.jit
    def _worker_p(src, err, offs, mask, numel, factor):
        # the hook's pre-scale into a zero-padded fp32 buffer plus the error-feedback add
        x = tl.load(src + offs, mask=mask & (offs < numel), other=0.0).to(tl.float32)
        return x * factor + tl.load(err + offs, mask=mask, other=0.0)

    @triton.jit
    def _row_scale(recv, j, row_bytes):
        # the fp32 scale in the first four (little-endian) bytes of payload row j
        base = recv + j * row_bytes
        word = tl.load(base).to(tl.int32)
        word = word | (tl.load(base + 1).to(tl.int32) << 8)
        word = word | (tl.load(base + 2).to(tl.int32) << 16)
        word = word | (tl.load(base + 3).to(tl.int32) << 24)
        return word.to(tl.float32, bitcast=True)

    @triton.jit
    def _signed(recv, j, row_bytes, offs, mask):
        # decoded element offs of payload row j: -scale where the bit is set, else +scale
        scale = _row_scale(recv, j, row_bytes)
        byte = tl.load(recv + j * row_bytes + 4 + offs // 8, mask=mask, other=0).to(tl.int32)
        bit = (byte >> (7 - offs % 8)) & 1
        return tl.where(bit == 1, -scale, scale)

    @triton.jit
    def _server_p(recv, N_ROWS: tl.constexpr, row_bytes, err, offs, mask, valid):
        acc = _signed(recv, 0, row_bytes, offs, mask)
        for j in tl.static_range(1, N_ROWS):  # left to right, as the eager sum of two rows
            acc = acc + _signed(recv, j, row_bytes, offs, mask)
        acc = tl.where(offs < valid, acc + 0.0, 0.0)  # the shard's padding sums to zero
        return acc + tl.load(err + offs, mask=mask, other=0.0)

    @triton.jit
    def _block_sum(p, mask, NORM: tl.constexpr):
        p = tl.where(mask, p, 0.0)
        if NORM == 1:
            return tl.sum(tl.abs(p), axis=0)
        return tl.sum(p * p, axis=0)

    @triton.jit
    def _worker_sums_kernel(src, err, partial, numel, d, factor, NORM: tl.constexpr,
                            BLOCK: tl.constexpr):  # fmt: skip
        row, blk = tl.program_id(0), tl.program_id(1)
        i = blk * BLOCK + tl.arange(0, BLOCK)
        mask = i < d
        p = _worker_p(src, err, row * d + i, mask, numel, factor)
        tl.store(partial + row * tl.num_programs(1) + blk, _block_sum(p, mask, NORM))

    @triton.jit(do_not_specialize=_SHARD_ARGS)
    def _server_sums_kernel(recv, N_ROWS: tl.constexpr, row_bytes, err, partial, d, valid,
                            NORM: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        blk = tl.program_id(1)
        i = blk * BLOCK + tl.arange(0, BLOCK)
        mask = i < d
        p = _server_p(recv, N_ROWS, row_bytes, err, i, mask, valid)
        tl.store(partial + blk, _block_sum(p, mask, NORM))

    @triton.jit(do_not_specialize=["n_partial"])
    def _finish_kernel(partial, scale, n_partial, d_f, sqrt_d,
                       NORM: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        # one program per row sums the row's partials (BLOCK >= their count) in a fixed
        # order: deterministic
        row = tl.program_id(0)
        k = tl.arange(0, BLOCK)
        acc = tl.load(partial + row * n_partial + k, mask=k < n_partial, other=0.0)
        total = tl.sum(acc, axis=0)
        if NORM == 1:  # noqa: SIM108 - constexpr branches, one compiled
            s = tl.div_rn(total, d_f)
        else:
            s = tl.div_rn(tl.sqrt_rn(total), sqrt_d)
        tl.store(scale + row, s)

    @triton.jit
    def _pack_store(p, scale_ptr, row, out, res, res_offs, res_limit, j, lane, mask, nb,
                    NORM: tl.constexpr, BYTES: tl.constexpr):  # fmt: skip
        # p: (BYTES, 8) elements of bytes j; writes the payload row (scale bytes by the
        # row's first program) and the residual p - (+-scale), zero from res_limit on
        if NORM == 0:  # noqa: SIM108 - constexpr branches, one compiled
            scale = 1.0
        else:
            scale = tl.load(scale_ptr + row)
        negative = p < 0.0
        bits = tl.sum(negative.to(tl.int32) << (7 - lane), axis=1)
        row_bytes = 4 + nb
        tl.store(out + row * row_bytes + 4 + j, bits.to(tl.uint8), mask=j < nb)
        r = p - tl.where(negative, -scale, scale)
        tl.store(res + res_offs, tl.where(res_offs < res_limit, r, 0.0), mask=mask)
        k = tl.arange(0, 4)
        word = (tl.zeros((4,), tl.float32) + scale).to(tl.int32, bitcast=True)
        head = ((word >> (8 * k)) & 255).to(tl.uint8)
        tl.store(out + row * row_bytes + k, head, mask=(k < 4) & (tl.program_id(1) == 0))

    @triton.jit
    def _worker_pack_kernel(src, err, scale, out, res, numel, d, nb, factor,
                            NORM: tl.constexpr, BYTES: tl.constexpr):  # fmt: skip
        row, blk = tl.program_id(0), tl.program_id(1)
        j = blk * BYTES + tl.arange(0, BYTES)
        lane = tl.arange(0, 8)
        i = j[:, None] * 8 + lane[None, :]
        mask = i < d
        offs = row * d + i
        p = _worker_p(src, err, offs, mask, numel, factor)
        # the bucket's padding keeps a zero error (as the hook's _zero_padding)
        _pack_store(p, scale, row, out, res, offs, numel, j, lane, mask, nb, NORM, BYTES)

    @triton.jit(do_not_specialize=_SHARD_ARGS)
    def _server_pack_kernel(recv, N_ROWS: tl.constexpr, row_bytes, err, scale, out, res, d,
                            nb, valid, NORM: tl.constexpr, BYTES: tl.constexpr):  # fmt: skip
        blk = tl.program_id(1)
        j = blk * BYTES + tl.arange(0, BYTES)
        lane = tl.arange(0, 8)
        i = j[:, None] * 8 + lane[None, :]
        mask = i < d
        p = _server_p(recv, N_ROWS, row_bytes, err, i, mask, valid)
        _pack_store(p, scale, 0, out, res, i, d, j, lane, mask, nb, NORM, BYTES)

    @triton.jit(do_not_specialize=["row_bytes"])
    def _decode_kernel(recv, row_bytes, out, numel, d, BLOCK: tl.constexpr):
        row, blk = tl.program_id(0), tl.program_id(1)
        i = blk * BLOCK + tl.arange(0, BLOCK)
        g = row * d + i
        mask = (i < d) & (g < numel)
        v = _signed(recv, row, row_bytes, i, mask)
        tl.store(out + g, v.to(out.dtype.element_ty), mask=mask)


#: ``x * factor + e`` must round as the eager ``x / n + e`` (two roundings): no fused
#: multiply-add (it differs where ``x * factor`` is subnormal)
_NO_FMA = {"enable_fp_fusion": False}


def _launch(fn: Any, *args: torch.Tensor | Any) -> Any:
    """Run ``fn`` on the device of its first argument (a tensor); on the first exception warn
    once and disable the kernels (return None)."""
    global failed
    dev = args[0].device
    try:
        if dev.type == "cuda" and dev.index != torch.cuda.current_device():
            # Triton launches on the current device (and its current stream)
            with torch.cuda.device(dev):
                return fn(*args)
        return fn(*args)
    except Exception as exc:  # Triton missing a backend, compile error: stay correct, warn
        failed = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        warnings.warn(
            f"Triton 1-bit codec kernels failed ({failed}); using scaledl.comm.fused instead",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def _partials(rows: int, d: int, device: torch.device) -> tuple[int, torch.Tensor]:
    """The reduction's block size and its (rows, blocks) partial-sum buffer.

    The block grows (by powers of two) until a row has at most ``MAX_PARTIALS`` blocks, so
    that one program finishes a row's sum without a loop (block sizes are compile-time
    constants: few distinct ones, however many bucket sizes)."""
    block = SUM_BLOCK
    while triton.cdiv(d, block) > MAX_PARTIALS:
        block *= 2
    return block, torch.empty(rows, triton.cdiv(d, block), dtype=torch.float32, device=device)


def _scale(partial: torch.Tensor, d: int, norm: int) -> torch.Tensor:
    rows, n_partial = partial.shape
    scale = torch.empty(rows, dtype=torch.float32, device=partial.device)
    d = max(1, d)
    block = max(16, triton.next_power_of_2(n_partial))
    _finish_kernel[(rows,)](
        partial, scale, n_partial, float(d), math.sqrt(d), NORM=norm, BLOCK=block
    )
    return scale


def _encode(
    src: torch.Tensor, error: torch.Tensor, factor: float, rows: int, norm: int
) -> tuple[torch.Tensor, torch.Tensor]:
    d = error.numel() // rows
    nb = (d + 7) // 8
    dev = src.device
    scale = error  # unused when norm == 0 (any fp32 pointer)
    if norm:
        block, partial = _partials(rows, d, dev)
        _worker_sums_kernel[partial.shape](
            src, error, partial, src.numel(), d, factor, NORM=norm, BLOCK=block, **_NO_FMA
        )
        scale = _scale(partial, d, norm)
    out = torch.empty(rows, 4 + nb, dtype=torch.uint8, device=dev)
    res = torch.empty(rows, d, dtype=torch.float32, device=dev)
    _worker_pack_kernel[(rows, triton.cdiv(nb, PACK_BYTES))](
        src, error, scale, out, res, src.numel(), d, nb, factor, NORM=norm, BYTES=PACK_BYTES,
        **_NO_FMA,
    )  # fmt: skip
    return out, res


def encode_with_feedback(
    compressor: Any, src: torch.Tensor, error: torch.Tensor, factor: float, rows: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The worker's error-fed 1-bit step, as :func:`scaledl.comm.fused.onebit_encode_with_feedback`.

    ``p = (pad(src * factor) + error).view(rows, -1)``; returns ``(payloads (rows, bytes),
    residual (rows, d))`` or ``None`` where the kernels cannot run (see :func:`available`).
    The residual is zero past ``src``'s end (the padding), as the hook keeps it.
    """
    if src.dim() != 1 or error.dim() != 1 or src.numel() > error.numel() or error.numel() % rows:
        raise ValueError(
            f"a 1-D source of {src.numel()} elements and a 1-D error of {error.numel()} do "
            f"not make {rows} padded rows"
        )
    if error.dtype != torch.float32 or not available(src.device):
        return None
    src, error = src.contiguous(), error.contiguous()
    return _launch(_encode, src, error, float(factor), rows, _norm(compressor))


def _server(
    recv: torch.Tensor, length: int, error: torch.Tensor, valid: int, norm: int
) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, row_bytes = recv.shape
    nb = (length + 7) // 8
    dev = recv.device
    scale = error
    if norm:
        block, partial = _partials(1, length, dev)
        _server_sums_kernel[partial.shape](
            recv, n_rows, row_bytes, error, partial, length, valid, NORM=norm, BLOCK=block
        )
        scale = _scale(partial, length, norm)
    out = torch.empty(1, 4 + nb, dtype=torch.uint8, device=dev)
    res = torch.empty(length, dtype=torch.float32, device=dev)
    _server_pack_kernel[(1, triton.cdiv(nb, PACK_BYTES))](
        recv, n_rows, row_bytes, error, scale, out, res, length, nb, valid,
        NORM=norm, BYTES=PACK_BYTES,
    )  # fmt: skip
    return out, res


def _check_payloads(payloads: torch.Tensor, length: int) -> None:
    if payloads.dim() != 2 or payloads.shape[1] != 4 + (length + 7) // 8:
        raise ValueError(
            f"1-bit payloads of shape {tuple(payloads.shape)} do not hold {length} elements"
        )


def server(
    compressor: Any, payloads: torch.Tensor, length: int, error: torch.Tensor, valid: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The two-way server's 1-bit step, as :func:`scaledl.comm.fused.onebit_server`.

    Returns ``(payload (1, bytes), residual (length,))`` or ``None`` (see :func:`available`).
    """
    _check_payloads(payloads, length)
    if error.shape != (length,) or not 0 <= valid <= length:
        raise ValueError(f"server error of shape {tuple(error.shape)} for {length} elements")
    if error.dtype != torch.float32 or not available(payloads.device):
        return None
    payloads, error = payloads.contiguous(), error.contiguous()
    return _launch(_server, payloads, length, error, int(valid), _norm(compressor))


def _decode(out: torch.Tensor, payloads: torch.Tensor, length: int) -> torch.Tensor:
    rows, row_bytes = payloads.shape
    grid = (rows, triton.cdiv(max(length, 1), DECODE_BLOCK))
    _decode_kernel[grid](payloads, row_bytes, out, out.numel(), length, BLOCK=DECODE_BLOCK)
    return out


def decode_into(out: torch.Tensor, payloads: torch.Tensor, length: int) -> torch.Tensor | None:
    """Decode 1-bit rows of ``length`` elements, concatenated and cut to ``out.numel()``,
    into the 1-D ``out`` (any float dtype), as :func:`scaledl.comm.fused.onebit_decode_into`.

    Returns ``out`` or ``None`` (see :func:`available`; ``out`` is then untouched).
    """
    _check_payloads(payloads, length)
    if out.dim() != 1 or out.numel() > payloads.shape[0] * length:
        raise ValueError(f"output of shape {tuple(out.shape)} for {payloads.shape[0]} rows")
    if not out.is_contiguous() or not available(out.device):
        return None
    return _launch(_decode, out, payloads.contiguous(), length)
