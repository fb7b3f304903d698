import torch

from scaledl.datasets import load_digits_shuffled


def test_digits_are_scaled_shuffled_and_seeded():
    x, y = load_digits_shuffled(0)
    assert x.shape == (1797, 1, 8, 8) and y.shape == (1797,)
    assert x.min() == 0.0 and x.max() == 1.0
    assert sorted(y.unique().tolist()) == list(range(10))
    x2, y2 = load_digits_shuffled(0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    _, y3 = load_digits_shuffled(1)
    assert not torch.equal(y, y3)
