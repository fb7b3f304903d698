"""Emulating a slower network on one host, shared by the communication benchmarks.

NCCL is forced onto TCP sockets over the loopback interface and ``lo`` is limited with a
token-bucket qdisc. One qdisc shapes ``lo`` for every rank, so the emulated network is one
shared link of the given rate (not one NIC per rank).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess

#: NCCL over TCP sockets on ``lo`` instead of NVLink / shared memory / InfiniBand.
NCCL_SOCKET_ENV: dict[str, str] = {
    "NCCL_P2P_DISABLE": "1",
    "NCCL_SHM_DISABLE": "1",
    "NCCL_IB_DISABLE": "1",
    "NCCL_SOCKET_IFNAME": "lo",
}


class LinkShaper:
    """The ``tc`` commands that shape and unshape ``lo``; checks once that they work.

    Shaping needs the ``tc`` binary and CAP_NET_ADMIN; when either is missing ``reason`` says
    why and the benchmark runs unshaped.
    """

    def __init__(self, tc: str | None) -> None:
        self.tc = shutil.which(tc) or tc if tc else shutil.which("tc")
        self.reason = None if self.tc else "tc not found"

    def commands(self, rate: str) -> tuple[list[str], list[str]]:
        """(shape, unshape) command lines for ``rate`` (e.g. ``10gbit``)."""
        assert self.tc is not None
        shape = [self.tc, "qdisc", "replace", "dev", "lo", "root", "tbf", "rate", rate]
        shape += ["burst", "4mb", "latency", "100ms", "mtu", "100000"]
        return shape, [self.tc, "qdisc", "del", "dev", "lo", "root"]

    def apply(self, rate: str) -> bool:
        """Shape ``lo`` to ``rate``; on failure record why and return False."""
        if self.tc is None:
            return False
        try:
            proc = subprocess.run(self.commands(rate)[0], capture_output=True, text=True)
            error = proc.stderr.strip() or str(proc.returncode) if proc.returncode else None
        except OSError as exc:  # a --tc path that does not exist or cannot run
            error = str(exc)
        if error:
            self.reason = f"tc failed: {error}"
            self.tc = None
            return False
        return True

    def usable(self, rate: str) -> bool:
        """Apply and remove the qdisc once (needs root); records why not."""
        ok = self.apply(rate)
        self.clear()
        return ok

    def clear(self) -> None:
        """Remove the qdisc (a no-op when none is installed)."""
        if self.tc:
            with contextlib.suppress(OSError):
                subprocess.run(self.commands("1gbit")[1], capture_output=True)
