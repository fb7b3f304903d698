"""Error feedback (EF) and compressor-side Nesterov momentum for one flat buffer.

Error feedback keeps what compression dropped and adds it back next time::

    p = x + alpha * e          # alpha = 1 ("vanilla") or lr_{t-1} / lr_t ("lr_corrected")
    c = C(p) ; e = p - D(c)

so that ``sum_t D(c_t) + e_T == sum_t x_t`` (the error telescopes). ``"sparse"`` is the same
rule for shared-seed random-k without the dense decode: only the k sent positions of the error
are reset. Workers may add Nesterov momentum before EF (``m = mu*m + x ; p = mu*m + x``); set
the optimizer's own momentum to 0 then, or momentum is applied twice.

The same class serves the worker side (whole bucket, optional momentum) and the server side
(the shard a rank owns, no momentum) of the two-way scheme in :mod:`scaledl.comm.hooks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from scaledl.comm.base import Compressor
from scaledl.comm.compressors import RandomKCompressor

__all__ = ["EF_MODES", "ErrorFeedback", "compress_shards"]

#: accepted error-feedback modes
EF_MODES = ("none", "vanilla", "lr_corrected", "sparse")


def _check_mode(mode: str, compressor: Compressor | None) -> str:
    if mode not in EF_MODES:
        raise ValueError(f"unknown error-feedback mode {mode!r}; choose one of {EF_MODES}")
    bad = not isinstance(compressor, RandomKCompressor) or compressor.rescale
    if mode == "sparse" and compressor is not None and bad:
        raise ValueError("sparse error feedback needs a random-k compressor with rescale=False")
    return mode


class ErrorFeedback:
    """Error (and optional momentum) buffers of one flat fp32 tensor.

    Args:
        mode: one of :data:`EF_MODES`.
        momentum: compressor-side Nesterov momentum coefficient (0 disables it).
    """

    def __init__(self, mode: str = "vanilla", momentum: float = 0.0) -> None:
        self.mode = _check_mode(mode, None)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"compressor momentum must be in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.error: torch.Tensor | None = None
        self.momentum_buf: torch.Tensor | None = None
        self.last_lr: float | None = None

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def _alpha(self, lr: float | None) -> float:
        if self.mode != "lr_corrected":
            return 1.0
        if lr is None:
            raise ValueError("lr_corrected error feedback needs the learning rate of each step")
        if lr <= 0:
            raise ValueError(f"learning rate must be positive for lr_corrected EF, got {lr!r}")
        alpha = 1.0 if self.last_lr is None else self.last_lr / lr
        self.last_lr = float(lr)
        return alpha

    def _buffer(self, name: str, like: torch.Tensor) -> torch.Tensor:
        buf = getattr(self, name)
        if buf is None or buf.shape != like.shape or buf.device != like.device:
            if buf is not None and buf.numel() != like.numel():
                raise ValueError(
                    f"{name} buffer has {buf.numel()} elements, input has {like.numel()}"
                )
            buf = torch.zeros_like(like) if buf is None else buf.to(like.device)
            setattr(self, name, buf)
        return buf

    def prepare(
        self, x: torch.Tensor, lr: float | None = None, inplace: bool = False
    ) -> torch.Tensor:
        """Momentum and error correction: the tensor ``p`` that is compressed (fp32).

        ``p`` is a new tensor unless ``inplace`` (and ``x`` is fp32): then ``x`` is
        overwritten, which saves a copy when the caller owns ``x`` (the hooks do).
        """
        p = x.detach().to(torch.float32)
        if not (inplace and p.data_ptr() == x.data_ptr()):
            p = p.clone()
        if self.momentum:
            m = self._buffer("momentum_buf", p)
            m.mul_(self.momentum).add_(p)
            p.add_(m, alpha=self.momentum)
        if self.enabled:
            p.add_(self._buffer("error", p), alpha=self._alpha(lr))
        return p

    def update(self, p: torch.Tensor, decoded: torch.Tensor) -> None:
        """``e = p - decoded`` after compressing ``p``."""
        if self.enabled:
            torch.sub(p, decoded, out=self._buffer("error", p))

    def update_sparse(self, p: torch.Tensor, sent_indices: torch.Tensor) -> None:
        """Sparse EF for unscaled random-k: e = p, except 0 where values were sent exactly."""
        err = self._buffer("error", p)
        err.copy_(p)
        err.index_fill_(0, sent_indices, 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "momentum": self.momentum,
            "error": self.error,
            "momentum_buf": self.momentum_buf,
            "last_lr": self.last_lr,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["mode"] != self.mode:
            raise ValueError(f"checkpoint EF mode {state['mode']!r} != configured {self.mode!r}")
        self.momentum = float(state["momentum"])
        self.error = state["error"]
        self.momentum_buf = state["momentum_buf"]
        self.last_lr = state["last_lr"]


def compress_shards(
    compressor: Compressor,
    ef: ErrorFeedback,
    x: torch.Tensor,
    keys: Sequence[int],
    lr: float | None = None,
    inplace: bool = False,
    return_decoded: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Error-corrected compression of ``x`` split into ``len(keys)`` equal shards.

    ``x.numel()`` must be divisible by the number of shards. Returns the concatenated payloads
    (each ``payload_bytes(shard)`` long, shard ``j`` compressed with ``keys[j]``) and the
    decoded tensor ``D(C(p))`` that every receiver will see. All shards go through one
    batched compress and decode call. ``inplace=True`` lets the error correction overwrite
    ``x`` (an fp32 buffer the caller owns) instead of copying it. With
    ``return_decoded=False`` the decoded tensor is not built (``None`` is returned): the new
    error is computed in place by :meth:`Compressor.residual_batch_`, which for top-k,
    random-k and 1-bit skips the dense decode, and the buffer becomes the error buffer.
    """
    n = len(keys)
    if n == 0 or x.numel() % n:
        raise ValueError(f"{x.numel()} elements do not split into {n} equal shards")
    if ef.mode == "sparse":
        _check_mode("sparse", compressor)
    p = ef.prepare(x, lr, inplace=inplace)
    shards = p.view(n, -1)
    length = shards.shape[1]
    payloads = compressor.compress_batch(shards, keys)
    if not return_decoded:
        if ef.enabled:
            # prepare() returned a buffer this function owns (x itself only when the caller
            # allowed it): it becomes the error buffer, no copy.
            compressor.residual_batch_(shards, payloads, keys)
            ef.error = p
        return payloads.view(-1), None
    if ef.mode == "sparse":
        assert isinstance(compressor, RandomKCompressor)
        idx = compressor.indices_batch(length, keys, p.device)
        # unscaled random-k sends p exactly at the drawn positions: the error is p elsewhere
        decoded = torch.zeros_like(shards).scatter_(1, idx, shards.gather(1, idx)).view(-1)
        ef.update_sparse(p, (idx + length * torch.arange(n, device=p.device).view(n, 1)).view(-1))
    else:
        decoded = compressor.decompress_batch(payloads, length, keys).reshape(-1)
        ef.update(p, decoded)
    return payloads.view(-1), decoded
