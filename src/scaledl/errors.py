"""Exceptions shared by every capability."""

from __future__ import annotations


class ScaledlError(Exception):
    """Base class of scaledl's own errors; the CLI prints these as one line."""


class RankError(ScaledlError):
    """A rank launched by :func:`scaledl.distributed.launch` failed or timed out."""

    def __init__(self, rank: int, message: str, traceback_text: str = "") -> None:
        self.rank = rank
        self.message = message
        self.traceback_text = traceback_text
        detail = f"\n--- traceback of rank {rank} ---\n{traceback_text}" if traceback_text else ""
        super().__init__(f"rank {rank} failed: {message}{detail}")
