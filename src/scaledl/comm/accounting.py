"""Bytes-on-the-wire accounting shared by the compression hooks and the optimizers."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CommStats", "interface_bytes"]


@dataclass
class CommStats:
    """Per-rank counters of what this rank put on the wire.

    ``record(kind, sent, dense_fp32)`` is called once per collective with the bytes this rank
    sent and the bytes an uncompressed fp32 exchange of the same tensor would have sent;
    ``end_step()`` closes a step. Ratios are algorithmic (payload sizes), not measured.
    """

    steps: int = 0
    total_sent: int = 0
    total_dense_fp32: int = 0
    uncompressed_sent: int = 0
    step_sent: int = 0
    step_dense_fp32: int = 0
    by_kind: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    history: list[int] = field(default_factory=list)

    def record(self, kind: str, sent: int, dense_fp32: int, *, uncompressed: bool = False) -> None:
        self.step_sent += sent
        self.step_dense_fp32 += dense_fp32
        self.by_kind[kind] += sent
        if uncompressed:
            self.uncompressed_sent += sent

    def record_baseline(self, dense_fp32: int) -> None:
        """Count what an fp32 exchange would send, for an exchange recorded piecewise."""
        self.step_dense_fp32 += dense_fp32

    def end_step(self) -> None:
        self.steps += 1
        self.total_sent += self.step_sent
        self.total_dense_fp32 += self.step_dense_fp32
        self.history.append(self.step_sent)
        self.step_sent = 0
        self.step_dense_fp32 = 0

    @property
    def ratio_fp32(self) -> float:
        """Bytes an fp32 exchange would send / bytes sent, over all closed steps."""
        return float("inf") if self.total_sent == 0 else self.total_dense_fp32 / self.total_sent

    @property
    def ratio_fp16(self) -> float:
        return self.ratio_fp32 / 2

    def as_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "total_bytes_sent": self.total_sent,
            "bytes_per_step": self.total_sent / self.steps if self.steps else 0.0,
            "uncompressed_bytes_sent": self.uncompressed_sent,
            "ratio_vs_fp32": self.ratio_fp32,
            "ratio_vs_fp16": self.ratio_fp16,
            "by_kind": dict(self.by_kind),
        }


def interface_bytes(iface: str = "lo") -> tuple[int, int] | None:
    """(received, transmitted) byte counters of a network interface from /proc/net/dev.

    The measured counterpart of the algorithmic counts (they include protocol overhead and
    all other traffic on the interface). None where the counters cannot be read.
    """
    try:
        with open("/proc/net/dev") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name.strip() == iface:
                    fields = rest.split()
                    return int(fields[0]), int(fields[8])
    except OSError:
        return None
    return None
