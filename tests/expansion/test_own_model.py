"""LEMON on scaledl's own Pre-LN Transformer: exactness, negative controls, symmetry breaking."""

from __future__ import annotations

import pytest
import torch

from scaledl.expansion import PreLNTransformer, TransformerConfig, expand, max_logit_diff

FP64_TOL, FP32_TOL = 1e-9, 1e-4


def perturbed(cfg: TransformerConfig, seed: int = 0) -> PreLNTransformer:
    """A model with non-default LayerNorm weights/biases and non-zero biases, in float64."""
    torch.manual_seed(seed)
    model = PreLNTransformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or (".ln_" in name and name.endswith("weight")):
                p.copy_(1 + 0.5 * torch.randn_like(p))
            else:
                p.add_(0.2 * torch.randn_like(p))
    return model.double().eval()


def token_cfg(**kw) -> TransformerConfig:
    base = dict(
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=40,
        vocab_size=30,
        max_position_embeddings=16,
    )
    base.update(kw)
    return TransformerConfig(**base)


def assert_exact(src, tgt):
    d64 = max_logit_diff(src, tgt, dtype=torch.float64)
    d32 = max_logit_diff(src, tgt, dtype=torch.float32)
    assert d64 <= FP64_TOL, d64
    assert d32 <= FP32_TOL, d32
    return d64, d32


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "decoder"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize(
    "hidden,layers,inter",
    [(48, 4, 80), (40, 3, 64), (24, 4, None), (24, 2, 56)],
    ids=["2x", "indivisible", "depth", "mlp-only"],
)
def test_token_models_are_exact(causal, tied, hidden, layers, inter):
    src = perturbed(token_cfg(causal=causal, tie_word_embeddings=tied))
    before = {k: v.clone() for k, v in src.state_dict().items()}
    tgt = expand(src, hidden_size=hidden, num_layers=layers, intermediate_size=inter)
    assert isinstance(tgt, PreLNTransformer) and tgt is not src
    assert tgt.config.hidden_size == hidden and tgt.config.num_hidden_layers == layers
    assert tgt.config.head_dim == src.config.head_dim
    assert (tgt.head.weight is tgt.embed_tokens.weight) == tied
    assert all(torch.equal(before[k], v) for k, v in src.state_dict().items())  # untouched
    assert_exact(src, tgt)


@pytest.mark.parametrize("depth_init", ["cancel", "zero"])
@pytest.mark.parametrize("src_layers,tgt_layers", [(6, 12), (8, 12)])
def test_depth_6_to_12_and_8_to_12_with_width(depth_init, src_layers, tgt_layers):
    src = perturbed(token_cfg(hidden_size=12, num_hidden_layers=src_layers, intermediate_size=16))
    tgt = expand(src, hidden_size=20, num_layers=tgt_layers, depth_init=depth_init)
    assert_exact(src, tgt)
    # The new layers' output projections: canceling (non-zero) or zero.
    new = tgt.layers[2 * src_layers - tgt_layers + 1]
    norm = new.mlp.fc2.weight.abs().max()
    assert (norm > 0) if depth_init == "cancel" else (norm == 0)


def test_image_model_indivisible_width_and_depth():
    cfg = TransformerConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=8,
        patch_size=4,
        num_classes=5,
    )
    src = perturbed(cfg)
    tgt = expand(src, hidden_size=40, num_layers=3)
    assert_exact(src, tgt)
    assert tgt(torch.randn(2, 3, 8, 8, dtype=torch.float64)).shape == (2, 5)


def test_rand_scale_keeps_exactness_and_scales_the_noise():
    src = perturbed(token_cfg())
    a = expand(src, hidden_size=48, rand_scale=1.0)
    b = expand(src, hidden_size=48, rand_scale=0.1)
    assert max_logit_diff(src, b) <= FP64_TOL
    half = src.layers[0].mlp.fc2.weight / 2  # each of the 2 neuron copies carries w/2 + noise
    dev_a = (a.layers[0].mlp.fc2.weight[:24, :40] - half).abs().max()
    dev_b = (b.layers[0].mlp.fc2.weight[:24, :40] - half).abs().max()
    assert 0 < dev_b < 0.2 * dev_a


def test_negative_controls_are_lossy():
    src = perturbed(token_cfg())
    good = expand(src, hidden_size=40)
    assert max_logit_diff(src, good) < 1e-12
    # 1. Without eps *= c the LayerNorm variance correction is off.
    no_eps = expand(src, hidden_size=40)
    for m in no_eps.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = src.config.layer_norm_eps
    assert max_logit_diff(src, no_eps) > 1e-7
    # 2. Net2Net-style uneven duplication changes LayerNorm statistics at indivisible widths.
    assert max_logit_diff(src, expand(src, hidden_size=40, split="net2net")) > 1e-2
    # ... and is exact (but symmetric) at integer ratios.
    assert max_logit_diff(src, expand(src, hidden_size=48, split="net2net")) < 1e-12


def _neuron_outputs(model: PreLNTransformer, x: torch.Tensor, layer: int) -> torch.Tensor:
    seen = {}
    act = model.layers[layer].mlp.act
    handle = act.register_forward_hook(lambda m, i, o: seen.setdefault("h", o.detach()))
    model(x)
    handle.remove()
    return seen["h"]


def _one_step(model: PreLNTransformer, x: torch.Tensor, steps: int = 1) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        loss = model(x).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("depth_init", ["cancel", "zero"])
def test_symmetry_is_broken_after_one_step(depth_init):
    src = perturbed(token_cfg(num_hidden_layers=1, intermediate_size=16))
    x = torch.randint(0, 30, (4, 8))
    f_s = 16
    for split, should_differ in [("lemon", True), ("net2net", False)]:
        tgt = expand(src, hidden_size=48, num_layers=2, depth_init=depth_init, split=split).train()
        h = _neuron_outputs(tgt, x, 0)
        torch.testing.assert_close(h[..., :f_s], h[..., f_s:], rtol=0, atol=1e-12)  # copies
        _one_step(tgt, x)
        h = _neuron_outputs(tgt, x, 0)
        gap = float((h[..., :f_s] - h[..., f_s:]).abs().max())
        assert (gap > 1e-6) if should_differ else (gap < 1e-12), (split, gap)


@pytest.mark.parametrize("depth_init,first_step", [("cancel", 1), ("zero", 2)])
def test_new_layer_fan_in_gets_gradient(depth_init, first_step):
    src = perturbed(token_cfg(num_hidden_layers=1))
    tgt = expand(src, hidden_size=48, num_layers=2, depth_init=depth_init).train()
    x = torch.randint(0, 30, (4, 8))
    fc1 = tgt.layers[1].mlp.fc1.weight
    grads = []
    opt = torch.optim.AdamW(tgt.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        tgt(x).logsumexp(-1).mean().backward()
        grads.append(float(fc1.grad.abs().max()))
        opt.step()
    assert grads[first_step - 1] > 1e-8
    if first_step == 2:
        assert grads[0] == 0.0


def test_bad_input_errors():
    src = perturbed(token_cfg())
    with pytest.raises(ValueError, match="smaller than the source"):
        expand(src, hidden_size=16)
    with pytest.raises(ValueError, match="more than 2x"):
        expand(src, num_layers=5)
    with pytest.raises(ValueError, match="head dimension 8"):
        expand(src, hidden_size=36)
    with pytest.raises(ValueError, match="intermediate_size=20 is smaller"):
        expand(src, intermediate_size=20)
    with pytest.raises(ValueError, match="depth_init"):
        expand(src, num_layers=3, depth_init="random")
    with pytest.raises(ValueError, match="rand_scale"):
        expand(src, hidden_size=48, rand_scale=0.0)
    with pytest.raises(ValueError, match="unsupported model class Linear"):
        expand(torch.nn.Linear(2, 2), hidden_size=4)
