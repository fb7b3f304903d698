"""scaledl: published systems for scaling deep learning, as installable software.

Capabilities live in sub-packages, each importable on its own so that ``import scaledl``
stays light (no transformers, MONAI or scikit-image at import time):

- :mod:`scaledl.expansion`  LEMON lossless model expansion and its LR schedule
- :mod:`scaledl.placement`  Baechi device placement (m-TOPO, m-ETF, m-SCT), simulator, executor
- :mod:`scaledl.comm`       compressed gradient communication (two-way compression, error feedback)
- :mod:`scaledl.optim`      CSER and (Local) AdaAlter communication-efficient optimizers
- :mod:`scaledl.medical`    shape-prior segmentation and RECIST-Net lesion detection
- :mod:`scaledl.distributed` torch.distributed set-up and local multi-rank launching
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
