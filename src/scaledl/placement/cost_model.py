"""Cost models: compute time (analytic roofline or measured) and communication per device pair.

- :class:`Roofline`: ``max(flops / peak_flops, bytes / bandwidth) + launch_overhead`` for
  CPU-only planning (spec §2.9 step 2); :meth:`Roofline.calibrate` measures a device.
- :func:`measure_seconds`: median time of a callable, CUDA events after warm-up on GPU.
- :class:`CommCost`: ``latency + bytes * seconds_per_byte`` (spec §2.7), fitted from a measured
  transfer sweep with :func:`transfer_sweep` and :func:`fit_comm_cost`.
- :class:`Cluster`: device memory limits, a :class:`CommCost` per device pair and the
  contention model used by the placers and the simulator.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

GIB = 1024**3
#: Contention models (spec §2.7): one shared send/receive timeline per device, one timeline
#: per ordered device pair (full duplex links), or none (every transfer starts immediately).
CONTENTION_MODELS = ("shared", "link", "none")


@dataclass(frozen=True)
class CommCost:
    """Transfer time of ``n`` bytes: ``latency_s + n * seconds_per_byte``."""

    latency_s: float
    seconds_per_byte: float

    def __call__(self, nbytes: float) -> float:
        return self.latency_s + nbytes * self.seconds_per_byte

    @property
    def bandwidth(self) -> float:
        """Bytes per second."""
        return 1.0 / self.seconds_per_byte if self.seconds_per_byte > 0 else float("inf")


#: The PyTorch reference's fit with its 1.2 comm factor: 1.2 * 1.788e-7 ms/B + 0.1 ms (PCIe).
PCIE_COMM = CommCost(latency_s=1e-4, seconds_per_byte=1.2 * 1.788e-10)
#: An H100 NVLink pair: about 20 µs per copy launch and sync, roughly 150 GB/s per direction.
NVLINK_COMM = CommCost(latency_s=2e-5, seconds_per_byte=1 / 150e9)


@dataclass
class Cluster:
    """Devices available for a placement: memory limits and pairwise communication costs."""

    memory: list[int]
    comm: CommCost | list[list[CommCost]] = PCIE_COMM
    contention: str = "shared"
    names: list[str] = field(default_factory=list)
    #: Compute on a device runs ``1 + copy_slowdown`` times slower while a copy it sends or
    #: receives moves bytes (the copy takes memory bandwidth of both ends); see
    #: :func:`copy_contention` and :func:`fit_copy_slowdown`. Used by the executor replay.
    copy_slowdown: float = 0.0

    def __post_init__(self) -> None:
        n = len(self.memory)
        if n < 1:
            raise ValueError("a cluster needs at least one device")
        if any(m <= 0 for m in self.memory):
            raise ValueError(f"device memory must be > 0 bytes, got {self.memory}")
        if not (self.copy_slowdown >= 0 and np.isfinite(self.copy_slowdown)):
            raise ValueError(f"copy_slowdown must be finite and >= 0, got {self.copy_slowdown}")
        if self.contention not in CONTENTION_MODELS:
            raise ValueError(
                f"unknown contention model {self.contention!r}; choose from {CONTENTION_MODELS}"
            )
        if isinstance(self.comm, CommCost):
            self.comm = [[self.comm] * n for _ in range(n)]
        if len(self.comm) != n or any(len(row) != n for row in self.comm):
            raise ValueError(f"comm must be one CommCost or an {n}x{n} matrix of them")
        self.memory = [int(m) for m in self.memory]
        if not self.names:
            self.names = [f"dev{i}" for i in range(n)]
        self.latency = [[c.latency_s for c in row] for row in self.comm]
        self.per_byte = [[c.seconds_per_byte for c in row] for row in self.comm]

    @classmethod
    def uniform(
        cls,
        n: int,
        memory_bytes: float,
        comm: CommCost = PCIE_COMM,
        contention: str = "shared",
    ) -> Cluster:
        """``n`` identical devices of ``memory_bytes`` each, all pairs costing ``comm``."""
        if n < 1:
            raise ValueError(f"--devices must be >= 1, got {n}")
        return cls([int(memory_bytes)] * n, comm, contention)

    def __len__(self) -> int:
        return len(self.memory)

    def transfer_s(self, src: int, dst: int, nbytes: float) -> float:
        if src == dst:
            return 0.0
        return self.latency[src][dst] + nbytes * self.per_byte[src][dst]

    def max_comm_s(self, nbytes: float) -> float:
        """The slowest pair's time for ``nbytes`` (used for bounds)."""
        n = len(self)
        if n == 1:
            return 0.0
        return max(self.transfer_s(a, b, nbytes) for a in range(n) for b in range(n) if a != b)


@dataclass
class Roofline:
    """Analytic op time: ``max(flops / peak_flops, bytes / bandwidth) + launch_overhead_s``."""

    peak_flops: float = 5e10
    bandwidth: float = 1e10
    launch_overhead_s: float = 5e-6

    def __call__(self, flops: float, nbytes: float) -> float:
        return max(flops / self.peak_flops, nbytes / self.bandwidth) + self.launch_overhead_s

    @classmethod
    def calibrate(cls, device: str = "cpu", size: int = 1024, repeats: int = 5) -> Roofline:
        """Measure matmul throughput, copy bandwidth and an empty-op overhead on ``device``."""
        import torch

        dev = torch.device(device)
        a = torch.randn(size, size, device=dev)
        b = torch.randn(size, size, device=dev)
        mm = measure_seconds(lambda: a @ b, device=dev, repeats=repeats)
        big = torch.empty(16 * 1024 * 1024 // 4, device=dev)
        out = torch.empty_like(big)
        cp = measure_seconds(lambda: out.copy_(big), device=dev, repeats=repeats)
        tiny = torch.zeros(1, device=dev)
        ov = measure_seconds(lambda: tiny.add_(1), device=dev, repeats=repeats)
        return cls(
            peak_flops=2 * size**3 / mm,
            bandwidth=2 * big.numel() * 4 / cp,
            launch_overhead_s=ov,
        )


#: Achievable (not peak datasheet) figures for planning without measurements: fp32 matmul
#: throughput, memory bandwidth and per-kernel launch overhead.
ROOFLINES = {
    "h100": Roofline(peak_flops=4.0e13, bandwidth=2.5e12, launch_overhead_s=8e-6),
    "a100": Roofline(peak_flops=1.6e13, bandwidth=1.5e12, launch_overhead_s=8e-6),
    "cpu": Roofline(),
}


def measure_seconds(
    fn: Callable[[], object], *, device=None, warmup: int = 2, repeats: int = 5
) -> float:
    """Median seconds of ``fn()``: CUDA events on a GPU (no host sync per call), else a clock.

    On a GPU the result is at least the host time per call: an op whose kernels are shorter
    than its Python/launch overhead costs the overhead in a real step.
    """
    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    for _ in range(warmup):
        fn()
    if dev.type == "cuda":
        with torch.cuda.device(dev):
            torch.cuda.synchronize(dev)
            events = []
            t0 = time.perf_counter()
            for _ in range(repeats):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                events.append((s, e))
            host = (time.perf_counter() - t0) / repeats
            events[-1][1].synchronize()
        return max(statistics.median(s.elapsed_time(e) / 1e3 for s, e in events), host)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def transfer_sweep(
    src: str,
    dst: str,
    *,
    max_log2_elements: int = 24,
    repeats: int = 20,
    strided: bool = False,
) -> list[tuple[int, float]]:
    """Median time to copy 2^0 .. 2^k float32 elements from ``src`` to ``dst`` (spec §2.1).

    ``strided=True`` copies every other row of a ``(rows, 2, cols)`` tensor instead (the
    layout of one input's slice of a channel-``cat`` gradient): between GPUs PyTorch moves
    such a tensor with an elementwise kernel, not ``cudaMemcpy``, and it costs more."""
    import torch

    samples = []
    # A GPU-to-GPU copy runs on the source device's current stream: time it there.
    dev = torch.device(src) if torch.device(src).type == "cuda" else torch.device(dst)
    for k in range(max_log2_elements + 1):
        x = _sweep_tensor(k, src, strided)
        t = measure_seconds(
            lambda x=x: x.to(dst, non_blocking=True, copy=True), device=dev, repeats=repeats
        )
        samples.append((x.numel() * 4, t))
    return samples


def copy_contention(
    src: str,
    dst: str,
    *,
    elements: int = 2**26,
    matmul_side: int = 2048,
    copy_elements: int = 2**28,
    repeats: int = 10,
) -> list[dict[str, object]]:
    """Compute timed alone and while a ``src`` -> ``dst`` copy moves bytes (the samples of
    :func:`fit_copy_slowdown`).

    For each side of the copy (``src``, ``dst``) and each op (``elementwise``: an in-place
    multiply of ``elements`` float32, memory-bound; ``matmul``: a ``matmul_side`` square
    float32 matmul, compute-bound; both much shorter than the copy): the op's median seconds
    on that device's stream, alone and right after a copy of ``copy_elements`` float32 was
    issued on side streams of both devices (as ``PlacedModule`` copies), so the copy covers
    the op. On CPU the copy finishes before the op starts (the path only)."""
    import torch

    big = torch.ones(copy_elements, device=src)
    buf = torch.empty(copy_elements, device=dst)
    on_gpu = torch.device(src).type == "cuda" and torch.device(dst).type == "cuda"
    streams = (torch.cuda.Stream(device=src), torch.cuda.Stream(device=dst)) if on_gpu else None
    out: list[dict[str, object]] = []
    for side, where in (("source", src), ("destination", dst)):
        dev = torch.device(where)
        x = torch.ones(elements, device=dev)
        a = torch.randn(matmul_side, matmul_side, device=dev)
        ops = {"elementwise": lambda x=x: x.mul_(1.0), "matmul": lambda a=a: a @ a}
        for name, fn in ops.items():
            alone, loaded = [], []
            for r in range(2 * (repeats + 1)):
                with_copy = r % 2 == 1
                _sync_all((src, dst))
                if with_copy and streams is not None:
                    with torch.cuda.stream(streams[0]), torch.cuda.stream(streams[1]):
                        buf.copy_(big, non_blocking=True)
                elif with_copy:
                    buf.copy_(big)
                t = _time_once(fn, dev)
                if r >= 2:  # the first pair warms up
                    (loaded if with_copy else alone).append(t)
            out.append(
                {
                    "device": str(dev),
                    "side": side,
                    "op": name,
                    "alone_s": statistics.median(alone),
                    "with_copy_s": statistics.median(loaded),
                }
            )
        del x, a
    _sync_all((src, dst))
    return out


def _sync_all(devices: Sequence[str]) -> None:
    import torch

    for d in devices:
        if torch.device(d).type == "cuda":
            torch.cuda.synchronize(d)


def _time_once(fn: Callable[[], object], dev) -> float:
    """Seconds of one ``fn()`` on ``dev``'s current stream (CUDA events), else a clock."""
    import torch

    if dev.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    with torch.cuda.device(dev):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        return s.elapsed_time(e) / 1e3


def fit_copy_slowdown(samples: Sequence[Mapping[str, float]]) -> float:
    """``Cluster.copy_slowdown`` from :func:`copy_contention` samples: the median over ops
    and sides of ``with_copy_s / alone_s - 1``, floored at 0 (a copy never speeds compute)."""
    if not samples:
        raise ValueError("fit_copy_slowdown needs at least one sample")
    ratios = []
    for s in samples:
        alone, loaded = float(s["alone_s"]), float(s["with_copy_s"])
        if not (alone > 0 and np.isfinite(alone) and np.isfinite(loaded)):
            raise ValueError(f"bad contention sample {dict(s)}: times must be finite, alone > 0")
        ratios.append(loaded / alone - 1.0)
    return max(0.0, float(np.median(ratios)))


def _sweep_tensor(log2_elements: int, device: str, strided: bool):
    """2^k float32 elements on ``device``: contiguous, or a strided ``[:, 0]`` slice of
    ``(rows, 2, cols)`` with up to 64 rows (a batch) of contiguous runs of ``cols``."""
    import torch

    n = 2**log2_elements
    if not strided:
        return torch.ones(n, device=device)
    rows = 2 ** min(log2_elements, 6)
    return torch.ones(rows, 2, n // rows, device=device)[:, 0]


def fit_comm_cost(samples: Sequence[tuple[int, float]]) -> CommCost:
    """Least-squares fit of ``latency + bytes * seconds_per_byte`` (both clamped to >= 0)."""
    if len(samples) < 2:
        raise ValueError("fit_comm_cost needs at least two (bytes, seconds) samples")
    x = np.asarray([s[0] for s in samples], dtype=np.float64)
    y = np.asarray([s[1] for s in samples], dtype=np.float64)
    # Relative errors: small transfers fix the latency, large ones the bandwidth.
    w = 1.0 / np.maximum(y, 1e-9)
    A = np.stack([np.ones_like(x), x], axis=1) * w[:, None]
    (lat, slope), *_ = np.linalg.lstsq(A, y * w, rcond=None)
    return CommCost(latency_s=max(float(lat), 0.0), seconds_per_byte=max(float(slope), 1e-15))
