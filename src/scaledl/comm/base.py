"""The compressor contract shared by the DDP hooks (:mod:`scaledl.comm`) and the
communication-efficient optimizers (:mod:`scaledl.optim`).

A compressor turns a flat fp32 tensor into a **fixed-size** ``uint8`` payload, so that every
rank's payload has the same length and one collective with equal splits moves them all.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import torch

__all__ = ["Compressor", "IdentityCompressor", "ZeroCompressor"]


class Compressor(abc.ABC):
    """Encode a 1-D float tensor into a fixed-size byte payload and back.

    ``key`` is an integer on which all ranks agree for the same logical tensor and step
    (derived from seed, step, bucket and shard). Compressors with shared randomness
    (random-k) draw from it, so their choices are identical on every rank and never sent.
    """

    #: registry name
    name: str = ""
    #: True when summing decoded payloads equals decoding a sum taken in the compressed
    #: domain, so one ``all_reduce`` can replace all-to-all + all-gather (casts, shared-seed
    #: random-k).
    allreduce_compatible: bool = False
    #: for ``allreduce_compatible`` compressors: the dtype in which payloads are summed
    wire_dtype: torch.dtype | None = None

    @abc.abstractmethod
    def payload_bytes(self, numel: int) -> int:
        """Exact size in bytes of the payload for ``numel`` elements."""

    @abc.abstractmethod
    def compress(self, x: torch.Tensor, key: int = 0) -> torch.Tensor:
        """Return a 1-D ``uint8`` tensor of ``payload_bytes(x.numel())`` bytes on ``x.device``."""

    @abc.abstractmethod
    def decompress(self, payload: torch.Tensor, numel: int, key: int = 0) -> torch.Tensor:
        """Decode a payload into a 1-D float32 tensor of ``numel`` elements."""

    def compress_batch(self, x: torch.Tensor, keys: Sequence[int]) -> torch.Tensor:
        """Compress each row of a 2-D ``x`` with its key: a ``(rows, payload_bytes)`` tensor.

        Row ``j`` equals ``compress(x[j], keys[j])``. Subclasses replace this loop with
        batched tensor ops (the hooks compress all shards of a bucket in one call).
        """
        _check_rows(x, keys)
        return torch.stack([self.compress(x[j], keys[j]) for j in range(x.shape[0])])

    def decompress_batch(
        self, payloads: torch.Tensor, numel: int, keys: Sequence[int]
    ) -> torch.Tensor:
        """Decode each row of a 2-D payload tensor: a ``(rows, numel)`` fp32 tensor."""
        _check_rows(payloads, keys)
        rows = [self.decompress(payloads[j], numel, keys[j]) for j in range(payloads.shape[0])]
        if not rows:
            return torch.empty(0, numel, dtype=torch.float32, device=payloads.device)
        return torch.stack(rows)

    def residual_batch_(
        self, p: torch.Tensor, payloads: torch.Tensor, keys: Sequence[int]
    ) -> torch.Tensor:
        """Overwrite the rows of ``p`` with ``p - D(C(p))`` (what error feedback keeps).

        ``payloads`` is ``compress_batch(p, keys)``. Subclasses that know the decoded values
        without decoding (exact values at sent indices, a scaled sign) override this to skip
        the dense decode.
        """
        return p.sub_(self.decompress_batch(payloads, p.shape[1], keys))

    def roundtrip(self, x: torch.Tensor, key: int = 0) -> torch.Tensor:
        """``decompress(compress(x))``: what the receiver sees (the error-feedback reference)."""
        return self.decompress(self.compress(x, key), x.numel(), key)

    def ratio(self, numel: int, baseline_bytes_per_element: int = 4) -> float:
        """Algorithmic compression ratio against a dense baseline (fp32 by default)."""
        payload = self.payload_bytes(numel)
        return float("inf") if payload == 0 else baseline_bytes_per_element * numel / payload

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _check_rows(x: torch.Tensor, keys: Sequence[int]) -> None:
    if x.dim() != 2 or x.shape[0] != len(keys):
        raise ValueError(f"batched input of shape {tuple(x.shape)} for {len(keys)} keys")


def _check_flat(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 1:
        raise ValueError(f"compressors take flat 1-D tensors, got shape {tuple(x.shape)}")
    return x


class IdentityCompressor(Compressor):
    """No compression: the fp32 bytes themselves (a test oracle and baseline)."""

    name = "identity"
    allreduce_compatible = True
    wire_dtype = torch.float32

    def payload_bytes(self, numel: int) -> int:
        return 4 * numel

    def compress(self, x: torch.Tensor, key: int = 0) -> torch.Tensor:
        return _check_flat(x).detach().to(torch.float32).contiguous().view(torch.uint8)

    def decompress(self, payload: torch.Tensor, numel: int, key: int = 0) -> torch.Tensor:
        if payload.numel() != 4 * numel:
            raise ValueError(f"identity payload of {payload.numel()} bytes for {numel} elements")
        # A slice of a received buffer may start at an offset not divisible by 4.
        return payload.clone().view(torch.float32)


class ZeroCompressor(Compressor):
    """Sends nothing and decodes zeros (CSER's C1 = 0 turns it into local SGD)."""

    name = "zero"
    allreduce_compatible = True
    wire_dtype = torch.float32

    def payload_bytes(self, numel: int) -> int:
        return 0

    def compress(self, x: torch.Tensor, key: int = 0) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8, device=_check_flat(x).device)

    def decompress(self, payload: torch.Tensor, numel: int, key: int = 0) -> torch.Tensor:
        return torch.zeros(numel, dtype=torch.float32, device=payload.device)
