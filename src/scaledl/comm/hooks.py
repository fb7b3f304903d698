"""DDP communication hooks for compressed gradient exchange (BytePS-Compress, two-way).

Usage on an existing DDP script::

    from scaledl.comm import CompressionState, compression_hook
    state = CompressionState("onebit")              # two-way, worker + server error feedback
    ddp_model.register_comm_hook(state, compression_hook)

Three exchange modes, all ending with the same decoded mean gradient on every rank (so the
replicas stay bit-identical):

- ``"two_way"`` (BytePS-Compress): each rank compresses its bucket shard by shard with error
  feedback; ``all_to_all`` sends shard j to rank j, which acts as the "server" of shard j:
  it decodes and sums the n payloads, adds its server error, re-compresses and keeps the new
  server error; ``all_gather`` returns every compressed shard to everyone. Per-rank traffic
  is about 2(n-1)/n times the compressed bucket, independent of n.
- ``"one_way"``: ``all_gather`` of each rank's compressed bucket, decoded and summed locally
  (traffic (n-1) times the compressed bucket: it grows with n).
- ``"allreduce"``: for compressors whose payloads can be summed as they are (casts,
  shared-seed random-k): one ``all_reduce``; aggregation is exact, no server error needed.

Gradients are divided by the world size before compression, so the result is the mean.
Compression starts at iteration ``start_iter`` (DDP rebuilds its buckets after the first
iteration); before that, and for buckets smaller than ``min_compress_bytes``, a dense
all-reduce runs and is counted. Bytes each collective puts on the wire are recorded in
``state.stats`` (:class:`scaledl.comm.CommStats`).
"""

# No `from __future__ import annotations`: DDP inspects the hook's annotations at runtime.
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from scaledl.comm import fused as fk
from scaledl.comm import onebit_triton as ot
from scaledl.comm.accounting import CommStats
from scaledl.comm.base import Compressor
from scaledl.comm.compressors import (
    CastCompressor,
    OneBitCompressor,
    RandomKCompressor,
    TopKCompressor,
    derive_key,
    get_compressor,
)
from scaledl.comm.error_feedback import EF_MODES, ErrorFeedback, _check_mode, compress_shards

__all__ = [
    "CODEC_RANGE",
    "MODES",
    "CompressionState",
    "compression_hook",
    "register_compression",
    "replica_divergence",
]

#: exchange modes of :class:`CompressionState`
MODES = ("two_way", "one_way", "allreduce", "auto")
#: name of the profiler ranges (``torch.profiler.record_function``) around the hook's encode
#: and decode work; the collectives are outside them
CODEC_RANGE = "scaledl.comm.codec"


class _BucketState:
    """Worker and server error feedback of one DDP bucket."""

    def __init__(
        self,
        numel: int,
        padded: int,
        params: tuple[tuple[int, int], ...] | None,
        worker: ErrorFeedback,
        server: ErrorFeedback,
    ) -> None:
        self.numel = numel
        self.padded = padded
        self.params = params  # (position in the model, numel) of each parameter, bucket order
        self.worker = worker
        self.server = server


class CompressionState:
    """Configuration and state of :func:`compression_hook` (pass it to ``register_comm_hook``).

    Args:
        compressor: a registry name (see :func:`scaledl.comm.available_compressors`) or a
            :class:`Compressor`.
        compressor_kwargs: options for a named compressor (e.g. ``{"ratio": 0.001}``).
        mode: ``"two_way"``, ``"one_way"``, ``"allreduce"`` or ``"auto"`` (all-reduce when
            the compressor allows it, else two-way).
        ef: worker error feedback, one of ``none | vanilla | lr_corrected | sparse``.
        server_ef: server error feedback (defaults to ``ef``).
        server_compressor: the server's compressor (defaults to the workers').
        momentum: compressor-side Nesterov momentum on the workers (0 = off). Set the
            optimizer's momentum to 0 when using it.
        start_iter: first iteration that is compressed (dense all-reduce before).
        min_compress_bytes: buckets whose fp32 size is below this go dense (and are counted).
        seed: shared seed of the keys (random-k indices); must be equal on all ranks.
        process_group: the group to communicate in (default: the world).
        lr: learning rate for ``lr_corrected`` EF; or call :meth:`attach_optimizer`.
        time_phases: measure compress/communicate/decompress seconds (synchronises CUDA).
        cuda_stream: on CUDA, run the exchange on a side stream so that it overlaps with
            the rest of the backward pass.
        fused: fused codec kernels for 1-bit and top-k two-way and random-k and fp16/bf16
            all-reduce. ``None`` (default) uses them on CUDA (with Triton): hand-written
            Triton kernels (:mod:`scaledl.comm.onebit_triton`) for error-fed 1-bit, plain
            torch functions compiled with ``torch.compile`` (:mod:`scaledl.comm.fused`) for
            the rest. ``True`` does the same and also runs them on CPU (the torch functions
            eagerly); ``"compile"`` uses the compiled functions for 1-bit too; ``"triton"``
            is ``True`` by name; ``False`` never fuses. Results equal the eager path (see
            docs/comm.md for where they differ by rounding).
    """

    def __init__(
        self,
        compressor: str | Compressor = "onebit",
        *,
        compressor_kwargs: dict[str, Any] | None = None,
        mode: str = "two_way",
        ef: str = "vanilla",
        server_ef: str | None = None,
        server_compressor: str | Compressor | None = None,
        momentum: float = 0.0,
        start_iter: int = 2,
        min_compress_bytes: int = 4096,
        seed: int = 0,
        process_group: dist.ProcessGroup | None = None,
        lr: float | None = None,
        time_phases: bool = False,
        cuda_stream: bool = True,
        fused: bool | None = None,
    ) -> None:
        self.compressor = get_compressor(compressor, **(compressor_kwargs or {}))
        self.server_compressor = (
            self.compressor if server_compressor is None else get_compressor(server_compressor)
        )
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
        if mode == "auto":
            mode = "allreduce" if self.compressor.allreduce_compatible else "two_way"
        if mode == "allreduce" and not self.compressor.allreduce_compatible:
            raise ValueError(
                f"compressor {self.compressor.name!r} cannot be summed compressed; "
                "use mode='two_way' or 'one_way'"
            )
        self.mode = mode
        for label, value in (("ef", ef), ("server_ef", server_ef)):
            if value is not None and value not in EF_MODES:
                raise ValueError(f"unknown {label} {value!r}; choose one of {EF_MODES}")
        self.ef = ef
        self.server_ef = ef if server_ef is None else server_ef
        ErrorFeedback(ef, momentum)  # validates momentum
        self.momentum = float(momentum)
        if not isinstance(start_iter, int) or start_iter < 0:
            raise ValueError(f"start_iter must be a non-negative integer, got {start_iter!r}")
        if min_compress_bytes < 0:
            raise ValueError(f"min_compress_bytes must be >= 0, got {min_compress_bytes!r}")
        self.start_iter = start_iter
        self.min_compress_bytes = int(min_compress_bytes)
        self.seed = int(seed)
        self.process_group = process_group
        self.lr = lr
        self.time_phases = time_phases
        self.cuda_stream = cuda_stream
        if not (fused is None or isinstance(fused, bool) or fused in ("triton", "compile")):
            raise ValueError(
                f"fused must be True, False, None (auto), 'triton' or 'compile', got {fused!r}"
            )
        self.fused = fused
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.iteration = 0
        self.buckets: dict[int, _BucketState] = {}
        self.bucket_resets = 0
        self._positions: dict[int, int] | None = None
        self._pending: dict[int, dict[str, torch.Tensor | None]] = {}
        self._pending_lr: tuple[float | None, float | None] = (None, None)
        self.stats = CommStats()
        self.phase_seconds: dict[str, float] = {"compress": 0.0, "communicate": 0.0}
        self._a2a_ok: bool | None = None

    # ----------------------------------------------------------------- user-facing helpers
    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Read the learning rate (of the first param group) from ``optimizer`` every step."""
        self.optimizer = optimizer

    def current_lr(self) -> float | None:
        if self.optimizer is not None:
            return float(self.optimizer.param_groups[0]["lr"])
        return self.lr

    def algorithmic_ratio(self, numel: int) -> dict[str, float]:
        """Dense fp32 and 2-byte sizes over the payload of ``numel`` elements (one direction)."""
        payload = self.compressor.payload_bytes(numel)
        inf = float("inf")
        return {
            "vs_fp32": inf if payload == 0 else 4 * numel / payload,
            "vs_fp16": inf if payload == 0 else 2 * numel / payload,
        }

    def summary(self) -> dict[str, Any]:
        """Counters and configuration, JSON-friendly."""
        return {
            "compressor": repr(self.compressor),
            "mode": self.mode,
            "ef": self.ef,
            "server_ef": self.server_ef,
            "iteration": self.iteration,
            "phase_seconds": dict(self.phase_seconds),
            **self.stats.as_dict(),
        }

    def bind(self, model: torch.nn.Module) -> None:
        """Know ``model``'s parameters, so that error buffers are kept per parameter.

        Needed for :meth:`state_dict`, and lets the state survive a change of DDP's bucket
        layout (DDP re-forms buckets after the first iteration, also after a resume).
        :func:`register_compression` calls it.
        """
        self._positions = {id(p): i for i, p in enumerate(model.parameters())}

    def state_dict(self) -> dict[str, Any]:
        """This rank's error and momentum buffers per parameter, iteration and lr.

        Error feedback is per rank: save and load it on every rank (e.g. one file per rank).
        """
        if self._positions is None:
            raise ValueError("call state.bind(model) (or use register_compression) first")
        return {
            "iteration": self.iteration,
            "lr": self.lr,
            "params": {**self._pending, **self._export_params()},
            "last_lr": self._last_lr(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; buffers are re-assembled when each bucket next runs."""
        self.iteration = int(state["iteration"])
        self.lr = state["lr"]
        self.buckets = {}
        self._pending = dict(state["params"])
        self._pending_lr = tuple(state["last_lr"])

    # ----------------------------------------------------------------------- internals
    def _last_lr(self) -> tuple[float | None, float | None]:
        for b in self.buckets.values():
            return (b.worker.last_lr, b.server.last_lr)
        return self._pending_lr

    def _export_params(self) -> dict[int, dict[str, torch.Tensor | None]]:
        """Split every bucket's buffers by parameter; server shards go to full length."""
        n, rank = self._world()
        out: dict[int, dict[str, torch.Tensor | None]] = {}
        for b in self.buckets.values():
            if b.params is None:
                raise ValueError("call state.bind(model) (or use register_compression) first")
            server = None
            if b.server.error is not None:
                length = b.padded // n
                server = torch.zeros(b.padded, device=b.server.error.device)
                server[rank * length : (rank + 1) * length] = b.server.error
            off = 0
            for pos, size in b.params:
                out[pos] = {
                    name: None if buf is None else buf[off : off + size].clone()
                    for name, buf in (
                        ("error", b.worker.error),
                        ("momentum", b.worker.momentum_buf),
                        ("server_error", server),
                    )
                }
                off += size
        return out

    def _assemble(self, bs: _BucketState, device: torch.device) -> None:
        """Fill a new bucket's buffers from per-parameter state (checkpoint or old layout)."""
        assert bs.params is not None
        n, rank = self._world()
        for field in ("error", "momentum", "server_error"):
            parts = [self._pending.get(pos, {}).get(field) for pos, _ in bs.params]
            if all(p is None for p in parts):
                continue
            flat = torch.zeros(bs.padded, device=device)
            flat[: bs.numel] = torch.cat(
                [
                    torch.zeros(size) if p is None else p.cpu()
                    for p, (_, size) in zip(parts, bs.params)
                ]
            ).to(device)
            if field == "error":
                bs.worker.error = flat
            elif field == "momentum":
                bs.worker.momentum_buf = flat
            else:
                # Each rank holds the server error of the shards it owned: the sum is all of it.
                if n > 1:
                    dist.all_reduce(flat, group=self.process_group)
                length = bs.padded // n
                bs.server.error = flat[rank * length : (rank + 1) * length].clone()
        bs.worker.last_lr, bs.server.last_lr = self._pending_lr
        for pos, _ in bs.params:
            self._pending.pop(pos, None)

    def _world(self) -> tuple[int, int]:
        if not dist.is_initialized():
            return 1, 0
        return dist.get_world_size(self.process_group), dist.get_rank(self.process_group)

    def _bucket(self, bucket: dist.GradBucket, padded: int) -> _BucketState:
        index, numel = bucket.index(), bucket.buffer().numel()
        params = None
        if self._positions is not None:
            params = tuple((self._positions[id(p)], p.numel()) for p in bucket.parameters())
        bs = self.buckets.get(index)
        if bs is not None and (bs.numel, bs.padded, bs.params) == (numel, padded, params):
            return bs
        owned = {pos for b in self.buckets.values() if b.params for pos, _ in b.params}
        if bs is not None or (params and owned & {pos for pos, _ in params}):
            # DDP re-formed its buckets (it does once after the first iteration).
            self.bucket_resets += 1
            if params is not None:
                self._pending_lr = self._last_lr()
                self._pending.update(self._export_params())
            self.buckets = {}
        bs = _BucketState(
            numel,
            padded,
            params,
            ErrorFeedback(self.ef, self.momentum),
            ErrorFeedback(self.server_ef, 0.0),
        )
        if params is not None and self._pending:
            self._assemble(bs, bucket.buffer().device)
        self.buckets[index] = bs
        return bs

    def _fused_fn(self, device: torch.device) -> Callable[..., torch.Tensor] | None:
        """The fused exchange for this configuration on ``device``, or None (eager)."""
        if self.fused is False or (self.fused is None and not fk.compile_available(device)):
            return None
        kind = type(self.compressor)
        if self.mode == "two_way" and type(self.server_compressor) is not kind:
            return None
        return _FUSED_MODE_FN.get((kind, self.mode))

    def _triton(self) -> bool:
        """Whether 1-bit steps try the Triton kernels first (they fall back by themselves)."""
        return self.fused != "compile"

    def _tick(self, phase: str, t0: float, device: torch.device) -> float:
        if not self.time_phases:
            return t0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        self.phase_seconds[phase] += now - t0
        return now


# ------------------------------------------------------------------------- collectives
def _ring_allreduce_bytes(nbytes: int, n: int) -> int:
    return 2 * (n - 1) * nbytes // n


def _all_to_all(state: CompressionState, send: torch.Tensor, n: int) -> torch.Tensor:
    """Equal-split all-to-all; falls back to all-gather-and-slice where unsupported."""
    if n == 1:
        return send
    chunk = send.numel() // n
    group = state.process_group
    if state._a2a_ok is not False:
        out = torch.empty_like(send)
        try:
            dist.all_to_all_single(out, send, group=group)
            state._a2a_ok = True
            state.stats.record("all_to_all", (n - 1) * chunk, 0)
            return out
        except (RuntimeError, NotImplementedError):
            if state._a2a_ok:
                raise
            state._a2a_ok = False
    gathered = _all_gather(state, send, n, kind="all_to_all_fallback")
    rank = dist.get_rank(group)
    return gathered.view(n, n, chunk)[:, rank].reshape(-1)


def _all_gather(
    state: CompressionState, t: torch.Tensor, n: int, kind: str = "all_gather"
) -> torch.Tensor:
    if n == 1:
        return t
    out = torch.empty(n * t.numel(), dtype=t.dtype, device=t.device)
    if t.is_cuda:  # straight into ``out``: NCCL's list form gathers into a copy, then splits
        _all_gather_single(out, t, group=state.process_group)
    elif t.numel():  # gloo hangs on empty tensors
        dist.all_gather(list(out.view(n, -1).unbind(0)), t, group=state.process_group)
    state.stats.record(kind, (n - 1) * t.numel() * t.element_size(), 0)
    return out


#: the single-tensor all-gather (renamed in newer torch versions)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _rows(buf: torch.Tensor, n: int) -> torch.Tensor:
    """A flat buffer of ``n`` equal payloads as an ``(n, bytes)`` view (no copy)."""
    return buf.view(n, -1)


# ----------------------------------------------------------------------------- modes
def _two_way(state: CompressionState, bs: _BucketState, g: torch.Tensor, n: int, it: int, bi: int):
    rank = dist.get_rank(state.process_group) if n > 1 else 0
    numel = bs.numel
    length = g.numel() // n
    keys = [derive_key(state.seed, it, bi, j) for j in range(n)]
    lr = state.current_lr()
    t0 = time.perf_counter()
    with _codec():
        send, _ = compress_shards(
            state.compressor, bs.worker, g, keys, lr, inplace=True, return_decoded=False
        )
        _zero_padding(bs.worker.error, numel)
    t0 = state._tick("compress", t0, g.device)
    recv = _all_to_all(state, send, n)
    t0 = state._tick("communicate", t0, g.device)
    with _codec():
        # The server step on the shard this rank owns: all n payloads decode in one batched
        # call; the sum over ranks runs in a fixed order.
        s = state.compressor.decompress_batch(_rows(recv, n), length, [keys[rank]] * n).sum(0)
        s[_valid(numel, rank, length) :] = 0.0
        server_payload, _ = compress_shards(
            state.server_compressor,
            bs.server,
            s,
            [keys[rank]],
            lr,
            inplace=True,
            return_decoded=False,
        )
    t0 = state._tick("compress", t0, g.device)
    allc = _all_gather(state, server_payload, n)
    t0 = state._tick("communicate", t0, g.device)
    with _codec():
        out = state.server_compressor.decompress_batch(_rows(allc, n), length, keys).reshape(-1)
    state._tick("compress", t0, g.device)
    state.stats.record_baseline(_ring_allreduce_bytes(4 * numel, n))
    return out


def _one_way(state: CompressionState, bs: _BucketState, g: torch.Tensor, n: int, it: int, bi: int):
    key = derive_key(state.seed, it, bi, 0)
    t0 = time.perf_counter()
    with _codec():
        payload, _ = compress_shards(
            state.compressor,
            bs.worker,
            g,
            [key],
            state.current_lr(),
            inplace=True,
            return_decoded=False,
        )
    t0 = state._tick("compress", t0, g.device)
    allp = _all_gather(state, payload, n)
    t0 = state._tick("communicate", t0, g.device)
    with _codec():
        out = state.compressor.decompress_batch(_rows(allp, n), g.numel(), [key] * n).sum(0)
    state._tick("compress", t0, g.device)
    state.stats.record_baseline(_ring_allreduce_bytes(4 * bs.numel, n))
    return out


def _allreduce(
    state: CompressionState, bs: _BucketState, g: torch.Tensor, n: int, it: int, bi: int
):
    # Same shards and keys as two-way, so shared-seed random-k picks the same indices in both.
    keys = [derive_key(state.seed, it, bi, j) for j in range(n)]
    length = g.numel() // n
    t0 = time.perf_counter()
    with _codec():
        payload, _ = compress_shards(
            state.compressor,
            bs.worker,
            g,
            keys,
            state.current_lr(),
            inplace=True,
            return_decoded=False,
        )
        _zero_padding(bs.worker.error, bs.numel)
    t0 = state._tick("compress", t0, g.device)
    payload = _allreduce_payload(state, payload, n)
    t0 = state._tick("communicate", t0, g.device)
    with _codec():
        out = state.compressor.decompress_batch(_rows(payload, n), length, keys).reshape(-1)
    state._tick("compress", t0, g.device)
    state.stats.record_baseline(_ring_allreduce_bytes(4 * bs.numel, n))
    return out


def _allreduce_payload(state: CompressionState, payload: torch.Tensor, n: int) -> torch.Tensor:
    if n > 1 and payload.numel():
        values = payload.view(state.compressor.wire_dtype or torch.float32)
        dist.all_reduce(values, group=state.process_group)
        payload = values.view(torch.uint8)
        state.stats.record("all_reduce", _ring_allreduce_bytes(payload.numel(), n), 0)
    return payload


def _valid(numel: int, rank: int, length: int) -> int:
    """How many elements of the shard ``rank`` owns are real (the rest is padding)."""
    return min(max(numel - rank * length, 0), length)


def _codec() -> Any:
    return torch.profiler.record_function(CODEC_RANGE)


def _zero_padding(error: torch.Tensor | None, numel: int) -> None:
    # Padding elements carry no gradient; keep their error at zero so it never leaks into
    # a shard's scale (e.g. the mean |x| of 1-bit).
    if error is not None:
        error[numel:] = 0.0


_MODE_FN: dict[str, Callable[..., torch.Tensor]] = {
    "two_way": _two_way,
    "one_way": _one_way,
    "allreduce": _allreduce,
}


def _prescaled(buffer: torch.Tensor, n: int, padded: int) -> torch.Tensor:
    """``buffer / n`` in a zero-padded fp32 buffer the hook owns (one pass): the sum over
    ranks is then the mean."""
    numel = buffer.numel()
    g = torch.empty(padded, dtype=torch.float32, device=buffer.device)
    if buffer.dtype == torch.float32:
        torch.div(buffer, n, out=g[:numel])
    else:  # divide in fp32, not in the bucket's half precision
        g[:numel].copy_(buffer).div_(n)
    g[numel:] = 0.0
    return g


# ------------------------------------------------------------------------ fused modes
# The same exchanges with the codec work fused (scaledl.comm.fused): the pre-scale copy and
# the error-feedback add are one pass reading the bucket, 1-bit packing and its residual are
# one pass, the server decodes and sums in one pass, and the final decode writes straight
# into the bucket (which is returned, so DDP copies nothing).
def _simple(ef: ErrorFeedback) -> bool:
    """Plain error feedback (p = x + e): the case the one-pass kernels implement."""
    return ef.mode in ("vanilla", "sparse") and not ef.momentum


def _check_sparse(state: CompressionState, bs: _BucketState) -> None:
    for ef in (bs.worker, bs.server):
        if ef.mode == "sparse":
            _check_mode("sparse", state.compressor)


def _fused_prepare(
    state: CompressionState, bs: _BucketState, buffer: torch.Tensor, n: int, lr: float | None
) -> torch.Tensor:
    """The worker's error-corrected fp32 buffer ``p`` (padded), in one pass where exact."""
    ef = bs.worker
    factor = fk.exact_prescale(n)
    if _simple(ef) and factor is not None:
        return fk.prepare(buffer, _error_buffer(ef, bs.padded, buffer.device), factor)
    # momentum, lr-corrected EF, no EF or a world size that is not a power of two: eager
    return ef.prepare(_prescaled(buffer, n, bs.padded), lr, inplace=True)


def _error_buffer(ef: ErrorFeedback, length: int, device: torch.device) -> torch.Tensor:
    error = ef.error
    if error is None or error.shape != (length,) or error.device != device:
        error = ef._buffer("error", torch.empty(length, device=device))
    return error


def _two_way_fused(
    state: CompressionState, bs: _BucketState, buffer: torch.Tensor, n: int, it: int, bi: int
) -> torch.Tensor:
    rank = dist.get_rank(state.process_group) if n > 1 else 0
    numel, length = bs.numel, bs.padded // n
    keys = [derive_key(state.seed, it, bi, j) for j in range(n)]
    lr = state.current_lr()
    comp, worker, server = state.compressor, bs.worker, bs.server
    onebit = isinstance(comp, OneBitCompressor)
    device = buffer.device
    _check_sparse(state, bs)
    t0 = time.perf_counter()
    with _codec():
        factor = fk.exact_prescale(n)
        if onebit and _simple(worker) and factor is not None:
            # scale pass + pack/residual pass, both reading the bucket and the error
            error = _error_buffer(worker, bs.padded, device)
            args = (comp, buffer, error, factor, n)
            out = ot.encode_with_feedback(*args) if state._triton() else None
            send, res = out if out is not None else fk.onebit_encode_with_feedback(*args)
            worker.error = res.view(-1)
            send = send.view(-1)
        else:
            p = _fused_prepare(state, bs, buffer, n, lr)
            send, out = fk.encode_rows(comp, worker, p.view(n, length), keys), None
        if out is None:  # the Triton kernel zeroes the padding's error itself
            _zero_padding(worker.error, numel)
    t0 = state._tick("compress", t0, device)
    recv = _rows(_all_to_all(state, send, n), n)
    t0 = state._tick("communicate", t0, device)
    with _codec():
        valid = _valid(numel, rank, length)
        if onebit and _simple(server):  # decode + sum + error: recomputed in both passes
            error = _error_buffer(server, length, device)
            args = (state.server_compressor, recv, length, error, valid)
            out = ot.server(*args) if state._triton() else None
            payload, server.error = out if out is not None else fk.onebit_server(*args)
            payload = payload.view(-1)
        else:
            if onebit:
                s = fk.onebit_server_sum(recv, length, torch.zeros(length, device=device))
            else:  # rows scattered one after the other: for two rows, the eager sum
                s = torch.zeros(length, device=device)
                for idx, vals in zip(*fk.sparse_rows(comp, recv, length, [keys[rank]] * n)):
                    s.scatter_add_(0, idx, vals)
            s[valid:] = 0.0
            p = server.prepare(s, lr, inplace=True)
            payload = fk.encode_rows(state.server_compressor, server, p.view(1, -1), [keys[rank]])
    t0 = state._tick("compress", t0, device)
    allc = _rows(_all_gather(state, payload, n), n)
    t0 = state._tick("communicate", t0, device)
    with _codec():
        if onebit:
            if not (state._triton() and ot.decode_into(buffer, allc, length) is not None):
                fk.onebit_decode_into(buffer, allc, length)
        else:
            server_comp = state.server_compressor
            rows = fk.sparse_rows(server_comp, allc, length, keys)
            fk.scatter_decode_into(buffer, *rows, length, add=server_comp.decode_adds)
    state._tick("compress", t0, device)
    state.stats.record_baseline(_ring_allreduce_bytes(4 * numel, n))
    return buffer


def _allreduce_fused(
    state: CompressionState, bs: _BucketState, buffer: torch.Tensor, n: int, it: int, bi: int
) -> torch.Tensor:
    keys = [derive_key(state.seed, it, bi, j) for j in range(n)]
    length = bs.padded // n
    comp, worker = state.compressor, bs.worker
    cast = isinstance(comp, CastCompressor)
    _check_sparse(state, bs)
    t0 = time.perf_counter()
    with _codec():
        factor = fk.exact_prescale(n)
        if cast and _simple(worker) and factor is not None:  # one pass: p, cast, residual
            error = _error_buffer(worker, bs.padded, buffer.device)
            payload, worker.error = fk.cast_encode_with_feedback(comp, buffer, error, factor)
        else:
            p = _fused_prepare(state, bs, buffer, n, state.current_lr())
            payload = fk.encode_rows(comp, worker, p.view(n, length), keys)
        _zero_padding(worker.error, bs.numel)
    t0 = state._tick("compress", t0, buffer.device)
    payload = _allreduce_payload(state, payload, n)
    t0 = state._tick("communicate", t0, buffer.device)
    with _codec():
        if cast:  # the summed casts, widened straight into the bucket
            buffer.copy_(payload.view(comp.wire_dtype)[: bs.numel])
        else:
            idx, vals = fk.sparse_rows(comp, _rows(payload, n), length, keys)
            fk.scatter_decode_into(buffer, idx, vals, length, add=comp.rescale)
    state._tick("compress", t0, buffer.device)
    state.stats.record_baseline(_ring_allreduce_bytes(4 * bs.numel, n))
    return buffer


#: (compressor type, mode) -> fused exchange
_FUSED_MODE_FN: dict[tuple[type, str], Callable[..., torch.Tensor]] = {
    (OneBitCompressor, "two_way"): _two_way_fused,
    (TopKCompressor, "two_way"): _two_way_fused,
    (RandomKCompressor, "allreduce"): _allreduce_fused,
    (CastCompressor, "allreduce"): _allreduce_fused,
}


def _dense(state: CompressionState, buffer: torch.Tensor, n: int, kind: str) -> torch.Tensor:
    out = buffer.div(n)
    if n > 1:
        dist.all_reduce(out, group=state.process_group)
    nbytes = _ring_allreduce_bytes(buffer.numel() * buffer.element_size(), n)
    state.stats.record(
        kind, nbytes, _ring_allreduce_bytes(4 * buffer.numel(), n), uncompressed=True
    )
    return out


def compression_hook(
    state: CompressionState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: compressed exchange of one gradient bucket (see the module docstring)."""
    buffer = bucket.buffer()
    if buffer.is_cuda and state.cuda_stream:
        # Work on a side stream (after the gradients are ready) so that the backward pass of
        # the remaining layers overlaps with this bucket's compression and collectives. The
        # future records an event there; DDP's wait makes its stream wait for it.
        device = buffer.device
        stream = state._streams.get(device)
        if stream is None:
            stream = state._streams[device] = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            result = _exchange(state, bucket, buffer)
            fut: torch.futures.Future[torch.Tensor] = torch.futures.Future(devices=[device])
            fut.set_result(result)
        return fut
    fut = torch.futures.Future()
    fut.set_result(_exchange(state, bucket, buffer))
    return fut


def _exchange(
    state: CompressionState, bucket: dist.GradBucket, buffer: torch.Tensor
) -> torch.Tensor:
    group = state.process_group
    n = dist.get_world_size(group) if dist.is_initialized() else 1
    it, bi = state.iteration, bucket.index()
    numel = buffer.numel()
    if it < state.start_iter:
        result = _dense(state, buffer, n, "dense_warmup")
    elif 4 * numel < state.min_compress_bytes:
        result = _dense(state, buffer, n, "dense_small")
    else:
        shards = 1 if state.mode == "one_way" else n
        padded = -(-numel // shards) * shards
        bs = state._bucket(bucket, padded)
        fused = state._fused_fn(buffer.device)
        if fused is not None:
            result = fused(state, bs, buffer, n, it, bi)
        else:
            with _codec():
                g = _prescaled(buffer, n, padded)
            out = _MODE_FN[state.mode](state, bs, g, n, it, bi)
            with _codec():  # the copy DDP would make, counted as the hook's own work
                result = buffer.copy_(out[:numel])
    if bucket.is_last():
        state.iteration += 1
        state.stats.end_step()
    return result


def register_compression(
    model: torch.nn.parallel.DistributedDataParallel,
    compressor: str | Compressor = "onebit",
    optimizer: torch.optim.Optimizer | None = None,
    **kwargs: Any,
) -> CompressionState:
    """One line on an existing DDP script: build a :class:`CompressionState`, register it."""
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise ValueError(
            f"register_compression needs a DistributedDataParallel model, got {type(model)}"
        )
    state = CompressionState(compressor, **kwargs)
    if optimizer is not None:
        state.attach_optimizer(optimizer)
    state.bind(model)
    model.register_comm_hook(state, compression_hook)
    return state


def replica_divergence(module: torch.nn.Module, group: dist.ProcessGroup | None = None) -> float:
    """Largest absolute difference of any parameter between ranks (0.0 when in sync).

    A collective: call it on every rank. Compressed exchanges must keep replicas
    bit-identical (every rank decodes the same payloads); check it every few hundred steps.
    """
    flat = torch.cat([p.detach().reshape(-1).float() for p in module.parameters()])
    n = dist.get_world_size(group) if dist.is_initialized() else 1
    if n == 1:
        return 0.0
    out = [torch.empty_like(flat) for _ in range(n)]
    dist.all_gather(out, flat, group=group)
    return max(float((o - out[0]).abs().max()) for o in out)
