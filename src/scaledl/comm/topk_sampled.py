"""Sampled-threshold top-k selection: one pass over the tensor instead of ``torch.topk``.

``torch.topk`` of k = 1% of a 25 MB bucket is a multi-pass radix select, about ten times the
memory traffic of reading the bucket once. The selection here follows Deep Gradient
Compression (Lin et al., ICLR 2018): estimate the threshold from a random sample, keep the
elements above it, and run the exact top-k on those few candidates only:

1. draw ``s`` positions uniformly (with replacement); with ``mu = k * s / d`` sampled values
   expected above the true k-th largest magnitude, take the ``r = mu + Z * sqrt(mu)``-th
   largest sampled magnitude as the threshold ``t`` (one small ``torch.kthvalue``);
2. one Triton pass compacts the indices of the nonzero elements with ``|x| >= t`` into a
   buffer of ``cap`` slots (a block-local prefix sum plus one atomic add per block);
3. ``torch.topk`` over the candidates, then the indices are sorted so that the payload does
   not depend on the order in which blocks reserved their slots.

The result is the exact top-k (the same set as ``torch.topk`` up to ties) whenever the
number of candidates ``c`` satisfies ``k <= c <= cap``. The number of sampled values above
the true threshold is Binomial(s, k / d) whatever the data, so ``Z`` standard deviations of
margin bound both failures by the normal tail (``Z = 6``: about 1e-9 per call). Exact zeros
are never candidates (sending a zero changes nothing): a row with fewer than k nonzeros is
selected exactly, padded with (index 0, value 0) entries. On the rare failure the payload is
still valid (a subset of the large elements, padded; error feedback keeps the rest), and the
count of such selections is kept on the device (:func:`inexact_count`), so checking it
never synchronises the step.
"""

from __future__ import annotations

import math
import os
import warnings

import torch

__all__ = ["available", "inexact_count", "plan", "select"]

try:  # optional: TopKCompressor uses torch.topk without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]

#: expected sampled values above the true threshold, and the margin in standard deviations
SAMPLE_HITS = 1024
Z = 6.0
#: elements per program of the compaction pass
BLOCK = 4096

#: Triton's interpreter reads TRITON_INTERPRET when the kernels are defined (at import)
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

#: the first kernel failure, after which :func:`available` is False (the caller goes exact)
failed: str | None = None


def available(device: torch.device) -> bool:
    """Whether the compaction kernel runs for tensors on ``device`` (CUDA, or CPU under
    Triton's interpreter), ``triton`` importable, and no earlier failure."""
    if triton is None or failed is not None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and INTERPRETED)


def plan(d: int, k: int) -> tuple[int, int, int] | None:
    """``(sample size s, threshold rank r, candidate slots cap)`` for rows of ``d`` elements
    and ``k`` kept, or ``None`` where sampling would not save work (the sample would be a
    large part of the row): then ``torch.topk`` is used."""
    if k < 1 or d < 1:
        return None
    s = math.ceil(SAMPLE_HITS * d / k)
    if 4 * s > d:
        return None
    mu = k * s / d
    r = min(s, math.ceil(mu + Z * math.sqrt(mu)))
    # the candidates above the r-th sampled value number about d * r / s, relative std
    # 1 / sqrt(r); Z of those on top, plus one block of slack
    cap = min(d, max(k, math.ceil(d * (r + Z * math.sqrt(r)) / s) + BLOCK))
    return s, r, cap


if triton is not None:

    @triton.jit(do_not_specialize=["d", "cap"])
    def _compact_kernel(x, thr, count, out, d, cap, BLOCK: tl.constexpr):
        row, blk = tl.program_id(0), tl.program_id(1)
        i = blk * BLOCK + tl.arange(0, BLOCK)
        v = tl.abs(tl.load(x + row * d + i, mask=i < d, other=0.0))
        keep = (v >= tl.load(thr + row)) & (v > 0.0) & (i < d)
        n = tl.sum(keep.to(tl.int32), axis=0)
        base = tl.atomic_add(count + row, n)  # reserve n slots of the row's buffer
        pos = base + tl.cumsum(keep.to(tl.int32), axis=0) - 1
        tl.store(out + row * cap + pos, i, mask=keep & (pos < cap))


def select(
    x: torch.Tensor, k: int, generator: torch.Generator, inexact: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(int64 indices, values), each (rows, k), of the ``k`` largest magnitudes of each row
    of the contiguous fp32 ``x`` (rows, d), indices ascending; padded with (0, 0.0) entries
    where a row has fewer than ``k`` nonzeros (or on a failed selection, which adds one to
    ``inexact``).

    Returns ``None`` where :func:`plan` declines or the kernel cannot run (the caller then
    uses ``torch.topk``); a kernel failure warns once.
    """
    global failed
    rows, d = x.shape
    p = plan(d, k)
    if p is None or not available(x.device):
        return None
    s, r, cap = p
    dev = x.device
    pos = torch.randint(d, (rows, s), device=dev, generator=generator)
    samp = x.gather(1, pos).abs_()
    thr = torch.kthvalue(samp, s - r + 1, dim=1).values  # the r-th largest
    count = torch.zeros(rows, dtype=torch.int32, device=dev)
    cand = torch.empty(rows, cap, dtype=torch.int32, device=dev)
    try:
        _compact_kernel[(rows, triton.cdiv(d, BLOCK))](x, thr, count, cand, d, cap, BLOCK=BLOCK)
    except Exception as exc:  # any compile/launch error: fall back to torch.topk, once
        failed = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"sampled top-k kernel failed, using torch.topk: {failed}", stacklevel=2)
        return None
    valid = torch.arange(cap, device=dev) < count.unsqueeze(1)
    cand = torch.where(valid, cand, 0).long()
    mag = torch.where(valid, x.gather(1, cand).abs(), -1.0)  # unfilled slots never win
    top = torch.topk(mag, k, dim=1, sorted=False)
    filled = top.values >= 0
    idx, order = torch.sort(torch.where(filled, cand.gather(1, top.indices), 0), dim=1)
    vals = torch.where(filled.gather(1, order), x.gather(1, idx), 0.0)
    # c > cap dropped candidates; c < k with t > 0 may have missed elements below t
    inexact += ((count > cap) | ((count < k) & (thr > 0))).sum()
    return idx, vals


def inexact_count(inexact: torch.Tensor) -> int:
    """How many selections were not the exact top-k (reads the device counter: syncs)."""
    return int(inexact.item())
