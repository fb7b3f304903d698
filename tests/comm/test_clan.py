"""CLAN / LANS against a float64 transcription of the update rule."""

import pytest
import torch
from torch import nn

from scaledl.comm import CLAN, LANS, lans_param_groups


def _reference(x, grads, lr, b1, b2, eps, wd, normalize):
    x = x.double().clone()
    m = torch.zeros_like(x)
    v = torch.zeros_like(x)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        if normalize:
            g = g / g.norm()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        den = (v / (1 - b2**t)).sqrt() + eps
        r_m = m / (1 - b1**t) / den + wd * x
        r_g = g / den + wd * x
        xn = x.norm()
        x = x - lr * b1 * (xn / r_m.norm()) * r_m - lr * (1 - b1) * (xn / r_g.norm()) * r_g
    return x


@pytest.mark.parametrize("normalize", [False, True])
def test_matches_float64_reference(normalize):
    torch.manual_seed(0)
    x0 = torch.randn(30)
    grads = [torch.randn(30) * (t + 1) for t in range(6)]
    p = nn.Parameter(x0.clone())
    opt = LANS(
        [p], lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01, normalize_grad=normalize
    )
    for g in grads:
        p.grad = g.clone()
        opt.step()
    ref = _reference(x0, grads, 0.01, 0.9, 0.99, 1e-6, 0.01, normalize)
    assert torch.allclose(p.detach().double(), ref, atol=1e-6)


def test_clan_is_lans_without_normalisation_and_differs_from_it():
    torch.manual_seed(1)
    x0 = torch.randn(10)
    a, b = nn.Parameter(x0.clone()), nn.Parameter(x0.clone())
    clan, lans = CLAN([a], lr=0.1), LANS([b], lr=0.1)
    assert clan.defaults["normalize_grad"] is False
    for _ in range(3):
        g = torch.randn(10) * 5
        a.grad, b.grad = g.clone(), g.clone()
        clan.step()
        lans.step()
    assert not torch.allclose(a, b)


def test_zero_parameters_skip_the_trust_ratio():
    p = nn.Parameter(torch.zeros(4))
    opt = CLAN([p], lr=0.1, weight_decay=0.0)
    p.grad = torch.ones(4)
    opt.step()
    # ||x|| = 0: the ratio is 1, so the step is the plain adaptive step (finite, non-zero)
    assert torch.isfinite(p).all() and (p < 0).all()


def test_param_groups_and_validation():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    groups = lans_param_groups(model, weight_decay=0.1)
    assert [len(g["params"]) for g in groups] == [1, 3]
    assert groups[1]["weight_decay"] == 0.0
    opt = CLAN(groups, lr=1e-3)
    loss = model(torch.randn(2, 3)).sum()
    loss.backward()
    opt.step()
    with pytest.raises(ValueError, match="learning rate"):
        CLAN(model.parameters(), lr=0)
    with pytest.raises(ValueError, match="betas"):
        CLAN(model.parameters(), betas=(1.0, 0.9))
