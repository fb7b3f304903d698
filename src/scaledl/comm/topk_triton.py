"""Exact top-k by magnitude as a Triton radix select: six passes over the row, no sort.

``torch.topk`` of k = 1% of a 25 MB bucket takes about 200 us on an H200, mostly fixed
multi-kernel costs of its radix select and gather; reading the bucket once takes about 10.
Here a magnitude ``|x|`` is its 31-bit IEEE pattern (sign cleared), which orders non-negative
floats like their values, and the k-th largest pattern ``T`` is found digit by digit,
7 + 6 + 6 + 6 + 6 bits, with one histogram pass per digit:

1. ``_hist_kernel`` (five launches): each program histograms its block's digits of the
   elements whose higher bits equal the prefix found so far (elements above that range, and
   padding, go to two extra bins), and adds its histogram into the row's global one with
   integer atomics (exact, so the result does not depend on their order). Every program
   first re-derives the prefix from the previous levels' global histograms (a few KB from
   L2), which saves a launch per level.
2. ``_count_kernel``: per block, how many elements are above ``T`` and how many equal it
   (from the block's own last-level histogram).
3. ``_write_kernel``: every element above ``T``, plus the first ``need`` elements equal to
   ``T`` (ties go to the lowest indices), written in ascending index order straight into
   the payload rows: block offsets are prefix sums of the counts, positions within a block
   a running cumulative sum. The order and the payload bytes are deterministic.

The selected set is ``torch.topk``'s up to ties at the k-th magnitude (which ``torch.topk``
breaks arbitrarily); values are copied bit for bit. NaN patterns sort above infinity, as in
``torch.topk``. 8 launches per call (one of them a ``torch.zeros``). Short digits keep
``tl.histogram`` cheap: with 11-bit digits (4096 bins) a pass took 0.57 ms on an H200.
"""

from __future__ import annotations

import os
import warnings

import torch

__all__ = ["available", "blocks", "topk_payload"]

try:  # optional: TopKCompressor uses torch.topk without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]

#: elements per inner step of a program; a program walks its block in such chunks
CHUNK = 4096
#: at most this many programs per row, so the counts fit one vector in the write pass
MAX_BLOCKS = 256
#: rows shorter than this go to torch.topk (fixed costs dominate either way)
MIN_ELEMENTS = 1 << 16
#: int32 slots of a row's five global histograms (7, 6, 6, 6 and 6 bits, doubled for the
#: "above" and "padding" bins); Triton's histogram costs grow with the bin count, so the
#: digits are short
HIST_SLOTS = 256 + 4 * 128
#: bins of the last level (its per-block histograms feed the counts)
LAST_BINS = 128

#: Triton's interpreter reads TRITON_INTERPRET when the kernels are defined (at import)
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

#: the first kernel failure, after which :func:`available` is False (the caller goes exact)
failed: str | None = None


def available(device: torch.device) -> bool:
    """Whether the kernels run for tensors on ``device`` (CUDA, or CPU under Triton's
    interpreter), ``triton`` importable, and no earlier failure."""
    if triton is None or failed is not None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and INTERPRETED)


def blocks(d: int) -> tuple[int, int]:
    """(elements per program, programs per row) for rows of ``d`` elements: a power of two
    of at least :data:`CHUNK` elements, and at most :data:`MAX_BLOCKS` programs."""
    per = CHUNK
    while per * MAX_BLOCKS < d:
        per *= 2
    return per, -(-d // per)


if triton is not None:
    _RUNTIME = ["d", "k", "nblk"]  # not specialised on: one compile serves every size

    @triton.jit
    def _level(hist_row, prefix, need, BITS: tl.constexpr, NB: tl.constexpr):
        # the digit of the k-th largest pattern at this level, from the level's global
        # histogram: the highest bin b whose count of elements in bins >= b reaches `need`
        b = tl.arange(0, NB)
        inside = b < (NB // 2)
        h = tl.where(inside, tl.load(hist_row + b), 0)
        c = tl.cumsum(h, axis=0, reverse=True)
        digit = tl.sum((inside & (c >= need)).to(tl.int32), axis=0) - 1
        above = tl.sum(tl.where(b == digit, c - h, 0), axis=0)
        return (prefix << BITS) | digit, need - above

    @triton.jit
    def _resolve(hist_row, k, LEVELS: tl.constexpr):
        # (prefix of the k-th largest pattern, elements still needed inside that prefix)
        prefix = k * 0
        need = k
        if LEVELS >= 1:
            prefix, need = _level(hist_row, prefix, need, 7, 256)
        if LEVELS >= 2:
            prefix, need = _level(hist_row + 256, prefix, need, 6, 128)
        if LEVELS >= 3:
            prefix, need = _level(hist_row + 384, prefix, need, 6, 128)
        if LEVELS >= 4:
            prefix, need = _level(hist_row + 512, prefix, need, 6, 128)
        if LEVELS >= 5:
            prefix, need = _level(hist_row + 640, prefix, need, 6, 128)
        return prefix, need

    @triton.jit
    def _pattern(x, row, i, d):
        # the 31-bit magnitude pattern of elements i of the row (0 for padding) and the mask
        m = i < d
        v = tl.load(x + row.to(tl.int64) * d + i, mask=m, other=0.0)
        return v.to(tl.int32, bitcast=True) & 0x7FFFFFFF, m

    @triton.jit(do_not_specialize=_RUNTIME)
    def _hist_kernel(x, hist, part, d, k, nblk, LEVEL: tl.constexpr, BLOCK: tl.constexpr,
                     CHUNK: tl.constexpr):  # fmt: skip
        row, blk = tl.program_id(0), tl.program_id(1)
        hist_row = hist + row * 768  # HIST_SLOTS
        prefix, _ = _resolve(hist_row, k, LEVEL - 1)
        BITS: tl.constexpr = 7 if LEVEL == 1 else 6
        SHIFT: tl.constexpr = 30 - 6 * LEVEL
        NB: tl.constexpr = 2 << BITS
        OFF: tl.constexpr = 0 if LEVEL == 1 else 128 * LEVEL
        acc = tl.zeros((NB,), tl.int32)
        for c in tl.range(0, BLOCK, CHUNK):
            key, m = _pattern(x, row, blk * BLOCK + c + tl.arange(0, CHUNK), d)
            hi = key >> (SHIFT + BITS)
            digit = (key >> SHIFT) & ((1 << BITS) - 1)
            b = tl.where(hi == prefix, digit, tl.where(hi > prefix, NB // 2, NB // 2 + 1))
            acc += tl.histogram(tl.where(m, b, NB // 2 + 1), NB)
        tl.atomic_add(hist_row + OFF + tl.arange(0, NB), acc)
        if LEVEL == 5:
            tl.store(part + (row * nblk + blk) * NB + tl.arange(0, NB), acc)

    @triton.jit(do_not_specialize=_RUNTIME)
    def _count_kernel(hist, part, counts, k, nblk):
        row, blk = tl.program_id(0), tl.program_id(1)
        t, _ = _resolve(hist + row * 768, k, 5)
        b = tl.arange(0, 128)
        h = tl.load(part + (row * nblk + blk) * 128 + b)
        digit = t & 63
        above = tl.sum(tl.where(((b > digit) & (b < 64)) | (b == 64), h, 0), axis=0)
        tl.store(counts + (row * nblk + blk) * 2, above)
        tl.store(counts + (row * nblk + blk) * 2 + 1, tl.sum(tl.where(b == digit, h, 0), axis=0))

    @triton.jit(do_not_specialize=_RUNTIME)
    def _write_kernel(x, hist, counts, out, d, k, nblk, NBLK: tl.constexpr,
                      BLOCK: tl.constexpr, CHUNK: tl.constexpr):  # fmt: skip
        row, blk = tl.program_id(0), tl.program_id(1)
        t, need = _resolve(hist + row * 768, k, 5)
        j = tl.arange(0, NBLK)
        base = counts + (row * nblk + j) * 2
        gt = tl.load(base, mask=j < nblk, other=0)
        eq = tl.load(base + 1, mask=j < nblk, other=0)
        eq_before = tl.cumsum(eq, axis=0) - eq
        sel = gt + tl.minimum(tl.maximum(need - eq_before, 0), eq)
        pos = tl.sum(tl.where(j == blk, tl.cumsum(sel, axis=0) - sel, 0), axis=0)
        tie = tl.sum(tl.where(j == blk, eq_before, 0), axis=0)
        out_row = out + row.to(tl.int64) * 2 * k
        for c in tl.range(0, BLOCK, CHUNK):
            i = blk * BLOCK + c + tl.arange(0, CHUNK)
            key, m = _pattern(x, row, i, d)
            is_eq = (key == t) & m
            rank = tie + tl.cumsum(is_eq.to(tl.int32), axis=0) - 1
            take = ((key > t) & m) | (is_eq & (rank < need))
            slot = pos + tl.cumsum(take.to(tl.int32), axis=0) - 1
            bits = tl.load(x + row.to(tl.int64) * d + i, mask=take, other=0.0)
            tl.store(out_row + slot, i, mask=take)
            tl.store(out_row + k + slot, bits.to(tl.int32, bitcast=True), mask=take)
            pos += tl.sum(take.to(tl.int32), axis=0)
            tie += tl.sum(is_eq.to(tl.int32), axis=0)


def topk_payload(x: torch.Tensor, k: int) -> torch.Tensor | None:
    """Top-k payload rows of the contiguous fp32 ``x`` (rows, d): uint8 (rows, 8k), the k
    int32 indices (ascending) then their fp32 values, i.e. ``TopKCompressor``'s layout.

    Returns ``None`` where the kernels cannot run or the row is too short to gain (the
    caller then uses ``torch.topk``); a kernel failure warns once.
    """
    global failed
    rows, d = x.shape
    if not (available(x.device) and d >= MIN_ELEMENTS and 0 < k < d and d < 2**31):
        return None
    per, nblk = blocks(d)
    nblk_p2 = triton.next_power_of_2(nblk)
    # one zeroed allocation (one launch): the rows' five global histograms, then the
    # blocks' (above, equal) counts and last-level histograms, both fully overwritten
    n_hist, n_counts = rows * HIST_SLOTS, rows * nblk * 2
    n_part = rows * nblk * LAST_BINS
    buf = torch.zeros(n_hist + n_counts + n_part, dtype=torch.int32, device=x.device)
    hist, counts, part = buf[:n_hist], buf[n_hist : n_hist + n_counts], buf[n_hist + n_counts :]
    out = torch.empty(rows, 2 * k, dtype=torch.int32, device=x.device)
    grid = (rows, nblk)
    try:
        for level in (1, 2, 3, 4, 5):
            _hist_kernel[grid](x, hist, part, d, k, nblk, LEVEL=level, BLOCK=per, CHUNK=CHUNK)
        _count_kernel[grid](hist, part, counts, k, nblk)
        _write_kernel[grid](x, hist, counts, out, d, k, nblk, NBLK=nblk_p2, BLOCK=per, CHUNK=CHUNK)
    except Exception as exc:  # any compile/launch error: fall back to torch.topk, once
        failed = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"Triton top-k failed, using torch.topk: {failed}", stacklevel=2)
        return None
    return out.view(torch.uint8)
