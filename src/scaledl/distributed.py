"""torch.distributed set-up shared by every capability.

Two entry points:

- :func:`init_from_env` for real jobs started by ``torchrun`` (or any launcher that sets
  ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``), so the same script runs on one
  host or many;
- :func:`launch` for tests, demos and benchmarks: it spawns ``world_size`` local ranks, picks
  a free port, returns each rank's result, and when a rank fails raises :class:`RankError`
  in the parent with that rank's id and traceback within a bounded time (it never hangs).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import multiprocessing as _mp
import os
import pickle
import queue as _queue
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from scaledl.errors import RankError

__all__ = [
    "DistInfo",
    "RankError",
    "all_reduce_mean_",
    "barrier",
    "default_backend",
    "find_free_port",
    "get_rank",
    "get_world_size",
    "init_from_env",
    "launch",
]

_BACKENDS = ("gloo", "nccl")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device


def default_backend(device: str | torch.device | None = None) -> str:
    """NCCL when the ranks compute on CUDA and NCCL is built in, gloo otherwise."""
    use_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    return "nccl" if use_cuda and dist.is_nccl_available() else "gloo"


def _check_backend(backend: str) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(_BACKENDS)}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend 'nccl' needs CUDA GPUs; use 'gloo' on CPU")
    return backend


def get_rank() -> int:
    """This process's rank, 0 when torch.distributed is not initialised."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of ranks, 1 when torch.distributed is not initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    """A barrier that is a no-op without torch.distributed."""
    if get_world_size() > 1:
        dist.barrier()


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks (a no-op on a single process)."""
    world = get_world_size()
    if world > 1:
        dist.all_reduce(tensor)
        tensor.div_(world)
    return tensor


def init_from_env(backend: str | None = None, timeout_s: float = 600.0) -> DistInfo:
    """Initialise the default process group from ``torchrun``-style environment variables.

    Without ``WORLD_SIZE`` in the environment this is a single-process run and no process
    group is created. With NCCL each rank binds to GPU ``LOCAL_RANK``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if backend is None:
        backend = default_backend()
    _check_backend(backend)
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} but only "
                f"{torch.cuda.device_count()} CUDA devices are visible"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ValueError(
                f"WORLD_SIZE={world_size} but {', '.join(missing)} unset; start with torchrun"
            )
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=_dt.timedelta(seconds=timeout_s),
            **({"device_id": device} if backend == "nccl" else {}),
        )
    return DistInfo(rank, world_size, local_rank, backend, device)


def find_free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    timeout_s: float,
    threads: int,
    env: dict[str, str],
    args: tuple,
    kwargs: dict,
    results: Any,
) -> None:
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    # Many ranks share few cores in tests: oversubscribed intra-op threads make gloo crawl.
    torch.set_num_threads(threads)
    try:
        init_from_env(backend, timeout_s=timeout_s)
        out = fn(*args, **kwargs)
        # Plain pickle: tensors travel as bytes, not as shared-memory handles that die with us.
        results.put(("ok", rank, pickle.dumps(out)))
    except BaseException as exc:  # report everything, KeyboardInterrupt included
        results.put(("error", rank, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def launch(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = 300.0,
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` local ranks and return their results.

    ``fn`` must be picklable (defined at module level). Each rank has the default process
    group initialised (``backend`` gloo on CPU, nccl with one GPU per rank). The results are
    returned in rank order. If a rank raises, the other ranks are stopped and a
    :class:`RankError` carrying that rank's id and traceback is raised here; if the job
    does not finish within ``timeout_s`` seconds, the ranks are killed and a
    :class:`RankError` names the first rank that did not report.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    _check_backend(backend)
    if backend == "nccl" and world_size > torch.cuda.device_count():
        raise ValueError(
            f"world_size={world_size} with nccl needs {world_size} GPUs, "
            f"{torch.cuda.device_count()} visible"
        )
    ctx = _mp.get_context("spawn")
    results = ctx.Queue()
    port = find_free_port()
    threads = max(1, (os.cpu_count() or 1) // world_size)
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(
                fn,
                r,
                world_size,
                port,
                backend,
                timeout_s,
                threads,
                dict(env or {}),
                args,
                kwargs,
                results,
            ),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(outputs) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = min(set(range(world_size)) - set(outputs))
                raise RankError(missing, f"did not finish within {timeout_s:.0f} s")
            try:
                msg = results.get(timeout=min(remaining, 0.5))
            except _queue.Empty:
                for r, p in enumerate(procs):
                    if r not in outputs and not p.is_alive() and p.exitcode not in (0, None):
                        # Give a message sent just before death a moment to arrive.
                        try:
                            msg = results.get(timeout=1.0)
                            break
                        except _queue.Empty:
                            raise RankError(r, f"exited with code {p.exitcode}") from None
                else:
                    continue
            if msg[0] == "error":
                raise RankError(msg[1], msg[2], msg[3])
            outputs[msg[1]] = pickle.loads(msg[2])
    finally:
        for p in procs:
            p.join(timeout=5 if len(outputs) == world_size else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        results.close()
    return [outputs[r] for r in range(world_size)]
