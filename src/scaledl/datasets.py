"""Small real data sets that ship inside installed packages (nothing is downloaded)."""

from __future__ import annotations

import torch

__all__ = ["load_digits_shuffled"]


def load_digits_shuffled(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits as ``(images, labels)``, shuffled by ``seed``.

    ``images`` is float32 of shape (1797, 1, 8, 8) scaled to [0, 1]; callers split and
    normalise it for their task, so every task draws the same permutation for a seed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # depends on the installation
        raise ValueError(
            "the digits data set needs scikit-learn (pip install scaledl[data])"
        ) from exc
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return x[perm], y[perm]
