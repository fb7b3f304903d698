"""Communication-efficient distributed optimizers: CSER (arXiv 2007.13221) with its baselines
EF-SGD, QSparse-local-SGD and local SGD, and AdaAlter / Local AdaAlter (arXiv 1911.09030).

All are ``torch.optim.Optimizer``s. The SGD-family classes wrap a local optimizer (momentum
SGD), run its step on this rank's own gradient and then synchronise; use them without DDP
(broadcast the initial parameters) or with DDP and ``opt.attach_ddp(ddp_model)``.

Names are imported on first use, so ``scaledl --help`` does not pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scaledl._lazy import lazy_exports

_EXPORTS = {
    "AdaAlter": "scaledl.optim.adaalter",
    "LocalAdaAlter": "scaledl.optim.adaalter",
    "averaged_model": "scaledl.optim.averaging",
    "broadcast_parameters": "scaledl.optim.averaging",
    "CSER": "scaledl.optim.cser",
    "overall_ratio": "scaledl.optim.cser",
    "EFSGD": "scaledl.optim.ef_sgd",
    "LocalSGD": "scaledl.optim.local_sgd",
    "QSparseLocalSGD": "scaledl.optim.qsparse",
    "RandomBlock": "scaledl.optim.random_block",
}

__all__ = [
    "CSER",
    "EFSGD",
    "AdaAlter",
    "LocalAdaAlter",
    "LocalSGD",
    "QSparseLocalSGD",
    "RandomBlock",
    "averaged_model",
    "broadcast_parameters",
    "overall_ratio",
]

if TYPE_CHECKING:
    from scaledl.optim.adaalter import AdaAlter, LocalAdaAlter
    from scaledl.optim.averaging import averaged_model, broadcast_parameters
    from scaledl.optim.cser import CSER, overall_ratio
    from scaledl.optim.ef_sgd import EFSGD
    from scaledl.optim.local_sgd import LocalSGD
    from scaledl.optim.qsparse import QSparseLocalSGD
    from scaledl.optim.random_block import RandomBlock


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
