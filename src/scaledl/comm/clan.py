"""CLAN: the LANS update without per-tensor gradient normalisation (arXiv 2105.07829).

LANS (arXiv 2006.13484) is a Nesterov-style, two-term LAMB. Per tensor, with decoupled weight
decay ``λ``::

    m = β1·m + (1−β1)·g ;  v = β2·v + (1−β2)·g²
    m̂ = m/(1−β1^t) ; v̂ = v/(1−β2^t) ; den = sqrt(v̂) + ε
    r_m = m̂/den + λx ;  r_g = g/den + λx
    x ← x − η·β1·(‖x‖/‖r_m‖)·r_m − η·(1−β1)·(‖x‖/‖r_g‖)·r_g

``LANS(normalize_grad=True)`` first divides ``g`` by its l2 norm (the original LANS). CLAN
keeps ``g`` as it is, so the optimizer consumes the (linear, error-compensated) compressed
mean gradient unchanged. A trust ratio whose ‖x‖ or ‖r‖ is zero is taken as 1.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["CLAN", "LANS", "lans_param_groups"]


def _trust(x_norm: torch.Tensor, r_norm: torch.Tensor) -> torch.Tensor:
    ok = (x_norm > 0) & (r_norm > 0)
    return torch.where(ok, x_norm / torch.where(ok, r_norm, torch.ones_like(r_norm)), 1.0)


class LANS(torch.optim.Optimizer):
    """LANS with an option to turn gradient normalisation off (that is :class:`CLAN`)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        normalize_grad: bool = True,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"learning rate must be positive, got {lr!r}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, normalize_grad=normalize_grad
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("LANS/CLAN does not support sparse gradients")
                g = p.grad.to(torch.float32)
                if group["normalize_grad"]:
                    g_norm = torch.linalg.vector_norm(g)
                    g = torch.where(g_norm > 0, g / g_norm.clamp_min(1e-38), g)
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(g)
                    st["exp_avg_sq"] = torch.zeros_like(g)
                st["step"] += 1
                t = st["step"]
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                den = (v / (1 - beta2**t)).sqrt_().add_(eps)
                x = p.to(torch.float32)
                r_m = m / (1 - beta1**t) / den
                r_g = g / den
                if wd:
                    r_m.add_(x, alpha=wd)
                    r_g.add_(x, alpha=wd)
                x_norm = torch.linalg.vector_norm(x)
                upd = r_m.mul_(beta1 * _trust(x_norm, torch.linalg.vector_norm(r_m)))
                upd.add_(r_g * ((1 - beta1) * _trust(x_norm, torch.linalg.vector_norm(r_g))))
                p.sub_((upd * lr).to(p.dtype))
        return loss


class CLAN(LANS):
    """LANS without gradient normalisation: the adaptive method of BytePS-Compress.

    Takes the arguments of :class:`LANS` except ``normalize_grad`` (always False).
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], **kwargs: Any):
        if "normalize_grad" in kwargs:
            raise ValueError("CLAN never normalises gradients; use LANS for normalize_grad")
        super().__init__(params, normalize_grad=False, **kwargs)


def lans_param_groups(model: nn.Module, weight_decay: float = 0.01) -> list[dict[str, Any]]:
    """Two groups: decay for weight matrices, none for biases and norm scales (1-D tensors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
