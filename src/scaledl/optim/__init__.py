"""Communication-efficient distributed optimizers: CSER (arXiv 2007.13221) with its baselines
EF-SGD, QSparse-local-SGD and local SGD, and AdaAlter / Local AdaAlter (arXiv 1911.09030).

All are ``torch.optim.Optimizer``s. The SGD-family classes wrap a local optimizer (momentum
SGD), run its step on this rank's own gradient and then synchronise; use them without DDP
(broadcast the initial parameters) or with DDP and ``opt.attach_ddp(ddp_model)``.
"""

from scaledl.optim.adaalter import AdaAlter, LocalAdaAlter
from scaledl.optim.averaging import averaged_model, broadcast_parameters
from scaledl.optim.cser import CSER, overall_ratio
from scaledl.optim.ef_sgd import EFSGD
from scaledl.optim.local_sgd import LocalSGD
from scaledl.optim.qsparse import QSparseLocalSGD
from scaledl.optim.random_block import RandomBlock

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
