"""ShapePriorNet: shapes and gradients of every variant, attention against hand computations."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from scaledl.medical.shape_prior import (
    ATTENTIONS,
    FUSIONS,
    PRIORS,
    ShapePriorNet,
    _pairwise_cosine,
    dense_attention,
    estimate_affine,
    evidence_gate,
    featureless_regions,
    fill_low_evidence,
    gaussian_blur,
    grow_closed_regions,
    joint_bilateral_filter,
    local_memory_evidence,
    match_displacement,
    match_evidence,
    max_attention,
    memory_evidence,
    pixel_centres,
    prototype_attention,
    reopen_explained,
    warp_by_displacement,
    warp_masks,
    with_background,
)

TINY = (2, 4, 4, 8, 8)


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny tensors: one thread avoids oversubscription on shared CPUs
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _inputs(b: int = 2, k: int = 3, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1, size, size, generator=g)
    t = torch.randn(b, 1, size, size, generator=g)
    lab = torch.randint(0, k + 1, (b, size, size), generator=g)
    m = torch.nn.functional.one_hot(lab, k + 1)[..., 1:].permute(0, 3, 1, 2).float()
    return x, t, m


# every attention x fusion pair; the four encoder-sharing options rotate through them
VARIANTS = [
    (a, f, *[(False, False), (True, False), (False, True), (True, True)][i % 4])
    for i, (a, f) in enumerate(itertools.product(ATTENTIONS, FUSIONS))
]


@pytest.mark.parametrize(("attention", "fusion", "share", "stream"), VARIANTS)
def test_every_variant_has_right_shape_and_gradients(attention, fusion, share, stream):
    net = ShapePriorNet(
        3,
        features=TINY,
        attention=attention,
        fusion=fusion,
        share_weights=share,
        mask_as_separate_stream=stream,
    )
    x, t, m = _inputs()
    out = net(x, t, m)
    assert out.shape == (2, 4, 32, 32)
    out.square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    # the template path is trained: its first stage gets a non-zero gradient
    first = net.template_encoder.stages[0]
    assert any(p.grad.abs().sum() > 0 for p in first.parameters())


def test_prototype_attention_equals_hand_computed_cosine():
    feat = torch.tensor([[[[1.0, 0.0], [2.0, -1.0]], [[0.0, 1.0], [1.0, 1.0]]]])  # (1,2,2,2)
    tfeat = torch.tensor([[[[3.0, 1.0], [0.0, 2.0]], [[1.0, 1.0], [4.0, 0.0]]]])
    mask = torch.tensor([[[[1.0, 0.5], [0.0, 0.0]]]])  # (1,1,2,2), soft at one pixel
    # prototype = (1*(3,1) + 0.5*(1,1)) / 1.5 = (3.5, 1.5) / 1.5
    p = (3.5 / 1.5, 1.5 / 1.5)
    expected = torch.empty(1, 1, 2, 2)
    for i, j in itertools.product(range(2), range(2)):
        f = (feat[0, 0, i, j].item(), feat[0, 1, i, j].item())
        dot = f[0] * p[0] + f[1] * p[1]
        expected[0, 0, i, j] = dot / (math.hypot(*f) * math.hypot(*p))
    got = prototype_attention(feat, tfeat, mask, eps=0.0)
    torch.testing.assert_close(got, expected)


def test_dense_attention_equals_hand_computed_softmax_transfer():
    g = torch.Generator().manual_seed(1)
    feat, tfeat = torch.randn(1, 3, 2, 2, generator=g), torch.randn(1, 3, 2, 2, generator=g)
    mask = torch.tensor([[[[1.0, 0.0], [0.25, 0.0]], [[0.0, 1.0], [0.0, 0.0]]]])  # K=2
    tau = 5.0
    f = feat.reshape(3, 4).T
    t = tfeat.reshape(3, 4).T
    expected = torch.empty(1, 2, 2, 2)
    for x in range(4):
        sims = [torch.dot(f[x], t[y]) / (f[x].norm() * t[y].norm()) for y in range(4)]
        w = torch.softmax(tau * torch.stack(sims), 0)
        for k in range(2):
            expected[0, k, x // 2, x % 2] = (w * mask[0, k].reshape(4)).sum()
    torch.testing.assert_close(dense_attention(feat, tfeat, mask, tau), expected)
    # max variant: the best cosine over template pixels inside the class mask
    sims = [
        [torch.dot(f[x], t[y]) / (f[x].norm() * t[y].norm()) for y in range(4)] for x in range(4)
    ]
    got = max_attention(feat, tfeat, mask)
    for x in range(4):
        assert got[0, 0, x // 2, x % 2].item() == pytest.approx(max(sims[x][0], sims[x][2]).item())
        assert got[0, 1, x // 2, x % 2].item() == pytest.approx(sims[x][1].item())


def test_max_attention_with_template_equal_to_target_is_one_inside_mask():
    net = ShapePriorNet(
        3, features=TINY, attention="max", share_weights=True, mask_as_separate_stream=True
    ).eval()
    x, _, m = _inputs(b=1)
    with torch.no_grad():
        feats = net.image_encoder(x)
        tfeats = net.encode_template(x, m)
        maps = net.attention_maps(feats, tfeats, m)
    for s in (3, 4):  # the dense_scales=2 coarsest scales use max attention
        assert net.scale_attention(s) == "max"
        inside = torch.nn.functional.adaptive_avg_pool2d(m, maps[s].shape[-2:]) > 0
        torch.testing.assert_close(maps[s][inside], torch.ones(int(inside.sum())))


def test_share_weights_shares_encoder_stages():
    shared = ShapePriorNet(3, features=TINY, share_weights=True)
    separate = ShapePriorNet(3, features=TINY)
    assert shared.template_encoder.stages[1] is shared.image_encoder.stages[1]
    assert shared.template_encoder.stages[0] is not shared.image_encoder.stages[0]
    n_shared = sum(p.numel() for p in shared.parameters())
    n_sep = sum(p.numel() for p in separate.parameters())
    stage_params = sum(
        p.numel() for s in list(separate.image_encoder.stages)[1:] for p in s.parameters()
    )
    assert n_sep - n_shared == stage_params
    full = ShapePriorNet(3, features=TINY, share_weights=True, mask_as_separate_stream=True)
    assert full.template_encoder.stages[0] is full.image_encoder.stages[0]


def test_concat_fusion_starts_as_identity_on_image_features():
    net = ShapePriorNet(3, features=TINY, fusion="concat")
    feat = torch.randn(2, 2, 8, 8)
    torch.testing.assert_close(net.fusions[0](feat, torch.zeros(2, 3, 8, 8)), feat)


def test_gate_fusion_formula():
    net = ShapePriorNet(2, features=TINY, fusion="gate")
    fusion = net.fusions[0]
    with torch.no_grad():
        fusion.gate_weight.copy_(torch.tensor([2.0, -1.0]))
    feat, attn = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    gate = torch.sigmoid(2.0 * attn[:, :1]) + torch.sigmoid(-1.0 * attn[:, 1:])
    torch.testing.assert_close(fusion(feat, attn), feat * (1 + gate))


def test_predict_proba_averages_templates():
    net = ShapePriorNet(3, features=TINY, attention="dense").eval()
    x, t, m = _inputs()
    x2, t2, m2 = _inputs(seed=5)
    with torch.no_grad():
        p1 = torch.softmax(net(x, t, m), 1)
        p2 = torch.softmax(net(x, t2, m2), 1)
        avg = net.predict_proba(x, torch.stack([t, t2], 1), torch.stack([m, m2], 1))
    torch.testing.assert_close(avg, (p1 + p2) / 2)
    assert x2.shape == x.shape


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attention": "cosine"}, "attention"),
        ({"fusion": "add"}, "fusion"),
        ({"features": (2, 4, 8)}, "features"),
        ({"dense_scales": 6}, "dense_scales"),
        ({"tau": 0.0}, "tau"),
        ({"prior_pool": 0}, "prior_pool"),
        ({"logit_bound": -1.0}, "logit_bound"),
        ({"prior_eps": 0.0}, "prior_eps"),
        ({"prior": "warp"}, "prior"),
        ({"prior": "affine", "align_tau": 0.0}, "align_tau"),
        ({"prior": "affine", "align_iterations": -1}, "align_iterations"),
        ({"prior": "both", "align_scale": 0.0}, "align_scale"),
        ({"prior": "affine", "align_blur": -0.1}, "align_blur"),
        ({"match_fill": -0.1}, "match_fill"),
        ({"match_tau": 0.0}, "match_tau"),
        ({"match_blur": 1.0}, "match_blur"),
        ({"match_smooth": -1.0}, "match_smooth"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShapePriorNet(3, **kwargs)


def test_wrong_mask_channels_raise():
    net = ShapePriorNet(3, features=TINY)
    x, t, m = _inputs()
    with pytest.raises(ValueError, match="template_masks must have 3 channels"):
        net(x, t, m[:, :2])


def test_tau_only_for_dense_attention():
    assert ShapePriorNet(3, features=TINY, attention="dense", tau=4.0).tau.item() == pytest.approx(
        4.0
    )
    with pytest.raises(ValueError, match="tau is defined only"):
        _ = ShapePriorNet(3, features=TINY).tau


def test_label_prior_is_a_distribution_and_transfers_matching_labels():
    net = ShapePriorNet(3, features=TINY, prior_pool=2).eval()
    x, t, m = _inputs()
    with torch.no_grad():
        emb = net.prior_matcher(x)
        prior = net.label_prior_map(emb, t, m, x.shape[-2:])
    assert prior.shape == (2, 4, 32, 32)
    torch.testing.assert_close(prior.sum(1), torch.ones(2, 32, 32))
    assert (prior >= 0).all()
    # a very sharp matching of the template with itself returns its own (pooled) labels
    with torch.no_grad():
        net.log_prior_tau.fill_(math.log(1e4))
        self_prior = net.label_prior_map(net.prior_matcher(t), t, m, (16, 16))
    pooled = with_background(torch.nn.functional.adaptive_avg_pool2d(m, (16, 16)))
    torch.testing.assert_close(self_prior, pooled, atol=1e-3, rtol=0)


def test_product_of_experts_combination():
    net = ShapePriorNet(2, features=TINY, logit_bound=2.0, prior_eps=0.01)
    with torch.no_grad():
        net.prior_weight.fill_(1.5)
    z = torch.randn(1, 3, 4, 4) * 10
    p = torch.softmax(torch.randn(1, 3, 4, 4), 1)
    p[0, 1, 0, 0] = 0.0  # below the floor
    expected = 2.0 * torch.tanh(z / 2.0) + 1.5 * torch.log(p.clamp_min(0.01))
    torch.testing.assert_close(net.combine(z, p), expected)
    assert net.combine(z, None) is z
    unbounded = ShapePriorNet(2, features=TINY, logit_bound=0.0)
    torch.testing.assert_close(unbounded.combine(z, p), z + torch.log(p.clamp_min(1e-3)))


def test_prediction_depends_on_the_template_with_label_prior():
    """The failure this guards against: a decoder that ignores the template."""
    x, t, m = _inputs(b=1)
    for prior in (True, False):
        net = ShapePriorNet(3, features=TINY, label_prior=prior).eval()
        with torch.no_grad():
            logits = net(x, t, m)
            blank = net(x, torch.zeros_like(t), torch.zeros_like(m))
            moved = net(x, t, torch.roll(m, 8, dims=-1))
        if prior:
            # a blank template transfers only background: every foreground class gets log ε
            fg = blank[:, 1:] - net.logit_bound
            assert (fg <= net.prior_weight * math.log(net.prior_eps) + 1e-4).all()
            assert (moved - logits).abs().max() > 0.1
        assert net.has_label_prior is prior


def test_label_prior_gradients_reach_the_matcher_and_weights():
    net = ShapePriorNet(3, features=TINY)
    x, t, m = _inputs()
    logits, prior = net.forward_with_prior(x, t, m)
    assert prior is not None and prior.shape == (2, 4, 32, 32)
    (logits.square().mean() + prior.square().mean()).backward()
    for p in (net.prior_weight, net.log_prior_tau, *net.prior_matcher.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert net.prior_weight.grad.abs() > 0 and net.log_prior_tau.grad.abs() > 0
    with pytest.raises(ValueError, match="prior_features"):
        ShapePriorNet(3, features=TINY, prior_features=(4, 8))


def test_from_pretrained_keeps_the_label_prior_setting(tmp_path):
    import json

    x, t, m = _inputs(b=1)
    for prior in (True, False):
        net = ShapePriorNet(3, features=TINY, label_prior=prior).eval()
        net.save_pretrained(tmp_path / str(prior))
        back = ShapePriorNet.from_pretrained(tmp_path / str(prior)).eval()
        assert back.has_label_prior is prior
        with torch.no_grad():
            torch.testing.assert_close(back(x, t, m), net(x, t, m))
    # a configuration written before the option existed means a network without the prior
    cfg_path = tmp_path / "False" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("label_prior", "prior_pool", "prior_features", "prior_dim", "prior_weight"):
        cfg.pop(key)
    cfg_path.write_text(json.dumps(cfg))
    assert not ShapePriorNet.from_pretrained(tmp_path / "False").has_label_prior


def _affine_pair(seed: int = 0, b: int = 2, c: int = 16, size: int = 16):
    """Smooth random template features and the image they give under a known affine map."""
    g = torch.Generator().manual_seed(seed)
    tfeat = torch.randn(b, c, size, size, generator=g)
    tfeat = torch.nn.functional.avg_pool2d(
        torch.nn.functional.pad(tfeat, (1, 1, 1, 1), mode="replicate"), 3, 1
    )
    ang = math.radians(8)
    theta = torch.tensor(
        [[1.1 * math.cos(ang), -math.sin(ang), 0.08], [math.sin(ang), 0.95 * math.cos(ang), -0.05]]
    ).expand(b, 2, 3)
    grid = torch.nn.functional.affine_grid(theta, [b, c, size, size], align_corners=False)
    feat = torch.nn.functional.grid_sample(tfeat, grid, padding_mode="border", align_corners=False)
    return feat, tfeat, theta


def test_pixel_centres_match_affine_grid():
    grid = torch.nn.functional.affine_grid(torch.eye(2, 3)[None], [1, 1, 3, 5], align_corners=False)
    torch.testing.assert_close(pixel_centres(3, 5, grid), grid.reshape(-1, 2))


def test_estimate_affine_recovers_a_known_transform():
    feat, tfeat, theta = _affine_pair()
    torch.testing.assert_close(estimate_affine(feat, tfeat), theta, atol=0.05, rtol=0)
    # identical inputs give the identity (up to the soft-argmax's pull towards the centre)
    ident = estimate_affine(tfeat, tfeat, tau=200.0)
    torch.testing.assert_close(ident, torch.eye(2, 3).expand(2, 2, 3), atol=0.02, rtol=0)


def test_estimate_affine_ignores_an_occluded_region():
    feat, tfeat, theta = _affine_pair()
    occluded = feat.clone()
    occluded[:, :, 2:9, 2:9] = torch.randn(2, 16, 7, 7, generator=torch.Generator().manual_seed(1))
    robust, weights = estimate_affine(occluded, tfeat, return_weights=True)
    plain = estimate_affine(occluded, tfeat, iterations=0)
    err_robust = (robust - theta).abs().max()
    assert err_robust < 0.05
    assert err_robust < 0.5 * (plain - theta).abs().max()  # reweighting removes the outliers
    assert weights.shape == (2, 16, 16)
    torch.testing.assert_close(weights.sum((1, 2)), torch.ones(2))
    assert weights[:, 3:8, 3:8].mean() < 0.2 * weights[:, 10:, 10:].mean()


def test_estimate_affine_gradients_and_bad_arguments():
    feat, tfeat, _ = _affine_pair()
    feat.requires_grad_(True)
    tfeat.requires_grad_(True)
    theta = estimate_affine(feat, tfeat)
    masks = torch.zeros(2, 1, 16, 16)
    masks[:, :, 4:12, 4:12] = 1
    warped = warp_masks(masks, theta, (32, 32))
    assert warped.shape == (2, 1, 32, 32)
    warped.sum().backward()
    for g in (feat.grad, tfeat.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    for kwargs, message in (
        ({"iterations": -1}, "iterations"),
        ({"scale": 0.0}, "scale"),
        ({"ridge": 0.0}, "ridge"),
    ):
        with pytest.raises(ValueError, match=message):
            estimate_affine(feat, tfeat, **kwargs)
    with pytest.raises(ValueError, match="feat and tfeat"):
        estimate_affine(feat, tfeat[:, :8])


def test_warp_masks_with_identity_and_shift():
    masks = torch.zeros(1, 2, 8, 8)
    masks[0, 0, 2:5, 1:4] = 1
    masks[0, 1, 5:7, 5:8] = 1
    ident = torch.eye(2, 3)[None]
    torch.testing.assert_close(warp_masks(masks, ident, (8, 8)), masks)
    shift = ident.clone()
    shift[0, 0, 2] = 2 / 8  # sample one pixel to the right: the masks move one pixel left
    torch.testing.assert_close(warp_masks(masks, shift, (8, 8))[..., :-1], masks[..., 1:])


@pytest.mark.parametrize("prior", PRIORS)
def test_every_label_prior_is_a_distribution_with_gradients(prior):
    net = ShapePriorNet(3, features=TINY, prior=prior)
    x, t, m = _inputs()
    logits, p = net.forward_with_prior(x, t, m)
    assert p.shape == (2, 4, 32, 32) and logits.shape == (2, 4, 32, 32)
    torch.testing.assert_close(p.sum(1), torch.ones(2, 32, 32))
    assert (p >= 0).all()
    (logits.square().mean() + p.square().mean()).backward()
    for name, param in net.named_parameters():
        assert param.grad is not None, name
    assert (net.log_prior_tau is None) is (prior == "affine")
    assert sum(q.grad.abs().sum() for q in net.prior_matcher.parameters()) > 0


def test_affine_prior_warps_the_full_resolution_masks():
    net = ShapePriorNet(3, features=TINY, prior="affine", prior_pool=2, align_blur=0.0).eval()
    x, t, m = _inputs(b=1)
    with torch.no_grad():
        emb, temb = net.prior_matcher(x), net.prior_matcher(t)
        theta = net.align(emb, temb)
        prior = net.label_prior_map(emb, t, m, x.shape[-2:])
        torch.testing.assert_close(prior, with_background(warp_masks(m, theta, (32, 32))))
        net.align_blur = 0.1  # σ = 3.2 px at 32²
        blurred = net.label_prior_map(emb, t, m, x.shape[-2:])
    expected = with_background(gaussian_blur(warp_masks(m, theta, (32, 32)), 3.2))
    torch.testing.assert_close(blurred, expected)
    torch.testing.assert_close(blurred.sum(1), torch.ones(1, 32, 32))
    # the template aligned with itself keeps (nearly) its own full-resolution labels
    with torch.no_grad():
        net.align_tau, net.align_blur = 1e4, 0.0
        self_prior = net.label_prior_map(temb, t, m, (32, 32))
    assert (self_prior.argmax(1) == with_background(m).argmax(1)).float().mean() > 0.95


def test_from_pretrained_keeps_the_prior_kind(tmp_path):
    x, t, m = _inputs(b=1)
    net = ShapePriorNet(3, features=TINY, prior="both", align_scale=0.2).eval()
    net.save_pretrained(tmp_path)
    back = ShapePriorNet.from_pretrained(tmp_path).eval()
    assert back.prior == "both" and back.align_scale == 0.2
    with torch.no_grad():
        torch.testing.assert_close(back(x, t, m), net(x, t, m))


def test_gaussian_blur_keeps_mass_and_matches_a_hand_kernel():
    x = torch.zeros(1, 2, 15, 15)
    x[0, 0, 7, 7] = 1.0
    x[0, 1, 3:12, 3:12] = 1.0
    y = gaussian_blur(x, 1.0)
    torch.testing.assert_close(y.sum((2, 3)), x.sum((2, 3)), atol=1e-4, rtol=0)
    k = torch.exp(-0.5 * torch.arange(-3.0, 4.0) ** 2)
    k = k / k.sum()
    torch.testing.assert_close(y[0, 0, 4:11, 4:11], k[:, None] * k[None, :])
    assert gaussian_blur(x, 0.0) is x
    with pytest.raises(ValueError, match="sigma"):
        gaussian_blur(x, -1.0)


def test_inlier_factor_flags_the_occluded_region():
    feat, tfeat, _ = _affine_pair()
    occluded = feat.clone()
    occluded[:, :, 2:9, 2:9] = torch.randn(2, 16, 7, 7, generator=torch.Generator().manual_seed(1))
    theta, inliers = estimate_affine(occluded, tfeat, return_inliers=True)
    assert inliers.shape == (2, 16, 16) and ((inliers > 0) & (inliers <= 1)).all()
    assert inliers[:, 3:8, 3:8].mean() < 0.5 * inliers[:, 10:, 10:].mean()
    theta2, weights, inliers2 = estimate_affine(
        occluded, tfeat, return_weights=True, return_inliers=True
    )
    torch.testing.assert_close(theta2, theta)
    torch.testing.assert_close(inliers2, inliers)
    assert weights.shape == inliers.shape


def test_evidence_gate_scales_the_decoder_logits():
    x, t, m = _inputs(b=1)
    net = ShapePriorNet(3, features=TINY, prior="affine", evidence_gate=True).eval()
    with torch.no_grad():
        emb = net.prior_matcher(x)
        prior, gate = net.label_prior_map(emb, t, m, x.shape[-2:], return_gate=True)
    assert gate.shape == (1, 1, 32, 32) and ((gate >= 0) & (gate <= 1)).all()
    z = torch.randn(1, 4, 32, 32)
    expected = gate * 3.0 * torch.tanh(z / 3.0) + torch.log(prior.clamp_min(1e-3))
    torch.testing.assert_close(net.combine(z, prior, gate), expected)
    logits, _ = net.forward_with_prior(x, t, m)
    logits.mean().backward()  # the gate is differentiable: the matcher gets gradients
    assert all(p.grad is not None for p in net.prior_matcher.parameters())
    plain = ShapePriorNet(3, features=TINY, prior="affine").eval()
    with torch.no_grad():
        assert plain.label_prior_map(emb, t, m, (32, 32), return_gate=True)[1] is None
    with pytest.raises(ValueError, match="evidence_gate"):
        ShapePriorNet(3, features=TINY, evidence_gate=True)


def test_match_evidence_gate_and_fill_on_a_hand_made_case():
    # template features: a smooth random field; image = template except a flat patch whose
    # feature vector matches no template position (orthogonal to all of them)
    g = torch.Generator().manual_seed(0)
    tfeat = torch.randn(1, 8, 12, 12, generator=g).abs()  # all features in the positive orthant
    feat = tfeat.clone()
    feat[:, :, 4:8, 4:8] = 0.0
    feat[:, 0, 4:8, 4:8] = -1.0  # flat patch, cosine <= 0 with every template position
    ev = match_evidence(feat, tfeat)
    assert ev.shape == (1, 12, 12)
    torch.testing.assert_close(match_evidence(tfeat, tfeat), torch.ones(1, 12, 12))
    assert (ev[:, 4:8, 4:8] <= 0).all()
    outside = torch.ones(12, 12, dtype=torch.bool)
    outside[4:8, 4:8] = False
    torch.testing.assert_close(ev[:, outside], torch.ones(1, int(outside.sum())))
    gate = evidence_gate(ev[:, None], 0.5, 0.9)
    assert (gate[:, :, 4:8, 4:8] == 0).all() and (gate[:, :, outside] == 1).all()
    torch.testing.assert_close(
        evidence_gate(torch.tensor([0.4, 0.7, 1.0]), 0.5, 0.9), torch.tensor([0.0, 0.5, 1.0])
    )
    with pytest.raises(ValueError, match="high > low"):
        evidence_gate(ev, 0.5, 0.5)
    # a prior that the occluder corrupted: class 1 everywhere but class 2 inside the patch;
    # filling from the trusted surroundings restores class 1 under the patch
    prior = torch.zeros(1, 3, 12, 12)
    prior[:, 1] = 1.0
    prior[:, 1, 4:8, 4:8], prior[:, 2, 4:8, 4:8] = 0.0, 1.0
    filled = fill_low_evidence(prior, gate, sigma=2.0)
    torch.testing.assert_close(filled.sum(1), torch.ones(1, 12, 12))
    assert (filled.argmax(1) == 1).all()
    torch.testing.assert_close(filled[:, :, outside], prior[:, :, outside])
    torch.testing.assert_close(fill_low_evidence(prior, torch.ones_like(gate), 2.0), prior)
    torch.testing.assert_close(fill_low_evidence(prior, gate, 0.0), prior)


def test_match_gate_calibration_identical_template_and_prior_decides():
    x, t, m = _inputs(b=2)
    net = ShapePriorNet(3, features=TINY, match_gate=True, match_fill=0.2).eval()
    plain = ShapePriorNet(3, features=TINY).eval()
    plain.load_state_dict(net.state_dict(), strict=False)
    with torch.no_grad():
        # before calibration the gate is open everywhere: the same output as without it
        torch.testing.assert_close(net(x, t, m), plain(x, t, m))
    lo, hi = net.calibrate_match_gate(torch.cat([x, t]), torch.cat([t, x]))
    ev = net.match_evidence(torch.cat([x, t]), torch.cat([t, x])).flatten()
    assert lo < hi <= 1.0
    assert abs(float((ev <= lo).float().mean()) - net.match_quantiles[0]) < 0.01
    assert abs(float((ev <= hi).float().mean()) - net.match_quantiles[1]) < 0.01
    with torch.no_grad():
        # template identical to the image: every position matches itself (cosine 1), the gate
        # stays open and the prior is the plain label transfer
        emb = net.prior_matcher(x)
        prior, gate = net.label_prior_map(emb, x, m, x.shape[-2:], return_gate=True)
        torch.testing.assert_close(gate, torch.ones_like(gate))
        ref = plain.label_prior_map(plain.prior_matcher(x), x, m, x.shape[-2:])
        torch.testing.assert_close(prior, ref)
        # a closed gate: the output is the prior's log-probability alone (the prior decides)
        net.match_low.fill_(2.0)
        net.match_high.fill_(3.0)
        prior, gate = net.label_prior_map(emb, t, m, x.shape[-2:], return_gate=True)
        assert (gate == 0).all()
        z = torch.randn(2, 4, 32, 32)
        torch.testing.assert_close(
            net.combine(z, prior, gate), net.prior_weight * torch.log(prior.clamp_min(1e-3))
        )
    # the thresholds travel with the weights
    state = net.state_dict()
    assert float(state["match_low"]) == 2.0 and float(state["match_high"]) == 3.0
    with pytest.raises(ValueError, match="match_gate"):
        ShapePriorNet(3, features=TINY, match_gate=True, prior="affine")
    with pytest.raises(ValueError, match="match_gate"):
        ShapePriorNet(3, features=TINY, match_gate=True, label_prior=False)
    with pytest.raises(ValueError, match="match_quantiles"):
        ShapePriorNet(3, features=TINY, match_quantiles=(0.1, 0.05))
    with pytest.raises(ValueError, match="calibrate_match_gate"):
        plain.calibrate_match_gate(x, t)


def test_memory_evidence_is_the_best_cosine_to_the_bank():
    g = torch.Generator().manual_seed(2)
    feat = torch.randn(2, 5, 3, 4, generator=g)
    bank = torch.randn(37, 5, generator=g)
    brute = torch.nn.functional.cosine_similarity(
        feat.permute(0, 2, 3, 1)[..., None, :], bank, dim=-1
    ).amax(-1)
    torch.testing.assert_close(memory_evidence(feat, bank), brute)
    torch.testing.assert_close(memory_evidence(feat, bank, chunk=4), brute)  # chunking
    with pytest.raises(ValueError, match="bank must be"):
        memory_evidence(feat, torch.randn(4, 6))


def test_match_displacement_and_warp():
    # one-hot features: every image position matches exactly one template position
    h = w = 4
    eye = torch.eye(h * w).reshape(1, h * w, h, w)
    sim = _pairwise_cosine(eye, eye)
    torch.testing.assert_close(
        match_displacement(sim, (h, w), (h, w), 200.0), torch.zeros(1, 2, h, w)
    )
    # the template shifted by one column: image x matches template x + 1 (2 / w normalised)
    shifted = torch.roll(eye, shifts=1, dims=3)
    disp = match_displacement(_pairwise_cosine(eye, shifted), (h, w), (h, w), 200.0)
    torch.testing.assert_close(disp[:, 0, :, :3], torch.full((1, h, 3), 2 / w))
    torch.testing.assert_close(disp[:, 1], torch.zeros(1, h, w))
    masks = torch.rand(1, 3, h, w)
    torch.testing.assert_close(warp_by_displacement(masks, torch.zeros(1, 2, h, w)), masks)
    one = torch.zeros(1, 2, h, w)
    one[:, 0] = 2 / w
    torch.testing.assert_close(warp_by_displacement(masks, one)[..., :3], masks[..., 1:])


def test_match_gate_memory_bank_calibration_and_persistence(tmp_path):
    x, t, m = _inputs(b=3)
    net = ShapePriorNet(
        3, features=TINY, match_gate=True, match_smooth=0.0, match_relative=False
    ).eval()
    lo, hi = net.calibrate_match_gate(x[:1], t[:1], bank_images=x[1:], bank_size=50)
    assert net.match_bank.shape == (50, net.config["prior_dim"]) and lo < hi
    # a bank image (or anything in the bank) matches itself: evidence 1
    ev = net.match_evidence(x[1:], t[1:])
    assert ev.shape == (2, 8, 8) and (ev <= 1 + 1e-5).all()
    net.calibrate_match_gate(x[:1], t[:1], bank_images=x[1:], bank_size=10**6)
    torch.testing.assert_close(net.match_evidence(x[1:], t[1:]), torch.ones(2, 8, 8))
    net.save_pretrained(tmp_path / "gated")
    again = ShapePriorNet.from_pretrained(tmp_path / "gated").eval()
    torch.testing.assert_close(again.match_bank, net.match_bank)
    assert float(again.match_low) == float(net.match_low)
    assert float(again.match_high) == float(net.match_high)
    with torch.no_grad():
        torch.testing.assert_close(again(x, t, m), net(x, t, m))
    with pytest.raises(ValueError, match="bank_size"):
        net.calibrate_match_gate(x, t, bank_images=x, bank_size=0)


def test_match_evidence_smoothing_and_relative_shift():
    x, t, _ = _inputs(b=2)
    raw = ShapePriorNet(3, features=TINY, match_gate=True, match_smooth=0.0, match_relative=False)
    raw.eval()
    kw = {"features": TINY, "match_gate": True}
    rel = ShapePriorNet(3, match_smooth=0.0, **kw).eval()
    smooth = ShapePriorNet(3, match_smooth=1.0, match_relative=False, **kw).eval()
    for net in (rel, smooth):
        net.load_state_dict(raw.state_dict())
    e = raw.match_evidence(x, t)
    med = e.flatten(1).median(1).values[:, None, None]
    torch.testing.assert_close(rel.match_evidence(x, t), e - med)
    # normalised smoothing: a constant evidence map stays constant, borders included
    blurred = gaussian_blur(e[:, None], 1.0) / gaussian_blur(torch.ones(1, 1, 8, 8), 1.0)
    torch.testing.assert_close(smooth.match_evidence(x, t), blurred[:, 0])
    const = gaussian_blur(torch.full((1, 1, 8, 8), 0.7), 1.0)
    torch.testing.assert_close(
        const / gaussian_blur(torch.ones(1, 1, 8, 8), 1.0), torch.full((1, 1, 8, 8), 0.7)
    )


def test_grow_closed_regions_follows_connected_low_evidence():
    gate = torch.ones(1, 1, 5, 5)
    gate[0, 0, 0, 0] = 0.2  # the only closed seed
    ev = torch.full((1, 1, 5, 5), 0.9)
    for y, x in ((0, 1), (0, 2), (1, 3), (4, 4)):  # (1, 3) touches (0, 2) diagonally
        ev[0, 0, y, x] = 0.1
    grown = grow_closed_regions(gate, ev, 0.5)
    expected = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    for y, x in ((0, 0), (0, 1), (0, 2), (1, 3)):
        expected[0, 0, y, x] = True
    assert torch.equal(grown, expected)  # (4, 4) is low but not connected to a seed
    assert not grow_closed_regions(torch.ones(1, 1, 5, 5), ev, 0.5).any()  # no seed, no growth
    with pytest.raises(ValueError, match="same"):
        grow_closed_regions(gate, ev[..., :4], 0.5)


def test_match_gate_hysteresis_thresholds_and_gate():
    x, t, m = _inputs(b=2)
    kw = {"features": TINY, "match_gate": True, "match_templates": 1}
    net = ShapePriorNet(3, match_quantiles=(0.05, 0.1), match_grow_quantiles=(0.2, 0.5), **kw)
    net.eval()
    lo, hi = net.calibrate_match_gate(torch.cat([x, t]), torch.cat([t, x]))
    ev = net.match_evidence(torch.cat([x, t]), torch.cat([t, x])).flatten()
    glo, ghi = float(net.match_grow_low), float(net.match_grow_high)
    assert lo < hi < glo < ghi
    assert abs(float((ev <= ghi).float().mean()) - 0.5) < 0.01
    assert abs(float((ev <= glo).float().mean()) - 0.2) < 0.01
    with torch.no_grad():
        emb, temb = net.prior_matcher(x), net.prior_matcher(t)
        sim = _pairwise_cosine(emb, temb)
        e = net._evidence(emb, sim)
        g, _ = net._match_gate_prior(e, sim, temb.shape[-2:], m, (8, 8), emb)
        plain = evidence_gate(e, lo, hi)
        grown = grow_closed_regions(plain, e, ghi)
        assert (grown & (plain >= 0.5)).any()  # closed regions grew into open positions
        ramp = evidence_gate(e, glo, ghi)
        # the seeds keep their value; the positions they grew into ramp to the grow thresholds
        grew = grown & (plain >= 0.5)
        torch.testing.assert_close(g, torch.where(grew, torch.minimum(plain, ramp), plain))
        assert (g[grew] < plain[grew]).any()
        net.match_grow_quantiles = None  # off: the plain gate
        g0, _ = net._match_gate_prior(e, sim, temb.shape[-2:], m, (8, 8), emb)
        torch.testing.assert_close(g0, plain)
    with pytest.raises(ValueError, match="match_grow_quantiles"):
        ShapePriorNet(3, match_grow_quantiles=(0.5, 0.2), **kw)
    with pytest.raises(ValueError, match="match_templates"):
        ShapePriorNet(3, features=TINY, match_templates=0)


def test_match_gate_atlas_picks_the_best_matching_templates(tmp_path):
    x, t, m = _inputs(b=2)
    _, _, other = _inputs(b=2, seed=5)
    kw = {"features": TINY, "match_gate": True, "match_grow_quantiles": None}
    net = ShapePriorNet(3, match_templates=2, **kw).eval()
    single = ShapePriorNet(3, match_templates=1, **kw).eval()
    single.load_state_dict(net.state_dict())
    # atlas: each image twice (with its masks) among unrelated images with other masks
    atlas = torch.cat([t, x[:1], x[1:], t, x[:1], x[1:]])
    masks = torch.cat([other, m[:1], m[1:], other, m[:1], m[1:]])
    net.calibrate_match_gate(x, t, atlas_images=atlas, atlas_masks=masks)
    assert net.match_atlas_labels.dtype == torch.uint8
    assert net.match_atlas_embeddings.shape == (8, net.config["prior_dim"], 8, 8)
    for n in (net, single):  # close the gate everywhere: the closed-gate prior decides
        n.match_low.fill_(2.0)
        n.match_high.fill_(3.0)
    with torch.no_grad():
        # every image matches itself best (cosine 1): the mean of its two identical copies is
        # the single-template prior with the image itself as template; the template given
        # (t) no longer matters under the closed gate
        got = net.label_prior_map(net.prior_matcher(x), t, other, (32, 32))
        ref = single.label_prior_map(single.prior_matcher(x), x, m, (32, 32))
        torch.testing.assert_close(got, ref)
        wrong = single.label_prior_map(single.prior_matcher(x), t, other, (32, 32))
        assert (got - wrong).abs().max() > 0.1
        # the atlas was built at 32 x 32: another size needs another calibration
        with pytest.raises(ValueError, match="calibrate the match gate at this size"):
            net(torch.randn(1, 1, 64, 64), torch.randn(1, 1, 64, 64), torch.zeros(1, 3, 64, 64))
    net.save_pretrained(tmp_path / "atlas")
    again = ShapePriorNet.from_pretrained(tmp_path / "atlas").eval()
    assert torch.equal(again.match_atlas_labels, net.match_atlas_labels)
    with torch.no_grad():
        torch.testing.assert_close(again(x, t, m), net(x, t, m))
    # weights saved before the atlas and the hysteresis existed load with both empty / off
    state = {
        k: v for k, v in net.state_dict().items() if not k.startswith(("match_atlas", "match_grow"))
    }
    old = ShapePriorNet(3, match_templates=2, **kw)
    old.load_state_dict(state)
    assert old.match_atlas_labels.shape[0] == 0 and float(old.match_grow_high) == -2.0
    with pytest.raises(ValueError, match="atlas_masks"):
        net.calibrate_match_gate(x, t, atlas_images=atlas, atlas_masks=masks[:2])
    with pytest.raises(ValueError, match="atlas_masks"):
        net.calibrate_match_gate(x, t, atlas_images=atlas, atlas_masks=masks[:, :2])


def test_local_memory_evidence_looks_only_near_the_same_position():
    g = torch.Generator().manual_seed(4)
    feat = torch.rand(2, 3, 5, 6, generator=g)  # positive: every cosine > 0 (padding gives 0)
    bank = torch.rand(4, 3, 5, 6, generator=g)
    r = 1
    cos = torch.nn.functional.cosine_similarity
    brute = torch.full((2, 5, 6), -1.0)
    for y, x in itertools.product(range(5), range(6)):
        win = bank[:, :, max(0, y - r) : y + r + 1, max(0, x - r) : x + r + 1]
        c = cos(feat[:, :, y, x][:, None, :, None, None], win[None], dim=2)
        brute[:, y, x] = c.flatten(1).amax(1)
    torch.testing.assert_close(local_memory_evidence(feat, bank, r), brute)
    # a window covering every position: the position-free memory evidence
    vectors = bank.permute(0, 2, 3, 1).reshape(-1, 3)
    torch.testing.assert_close(local_memory_evidence(feat, bank, 6), memory_evidence(feat, vectors))
    # radius 0: the same position only; a bank holding the image itself matches it exactly
    torch.testing.assert_close(local_memory_evidence(feat, feat, 0), torch.ones(2, 5, 6))
    with pytest.raises(ValueError, match="bank must be"):
        local_memory_evidence(feat, bank[:, :, :4], 1)
    with pytest.raises(ValueError, match="radius"):
        local_memory_evidence(feat, bank, -1)


def test_match_gate_positional_evidence_from_the_bank_maps(tmp_path):
    x, t, _ = _inputs(b=3)
    kw = {"features": TINY, "match_gate": True, "match_smooth": 0.0, "match_relative": False}
    net = ShapePriorNet(3, match_radius=2, **kw).eval()
    net.calibrate_match_gate(x[:1], t[:1], bank_images=x[1:])
    assert net.match_bank_maps.shape == (2, net.config["prior_dim"], 8, 8)
    with torch.no_grad():
        emb = net.prior_matcher(x)
        expected = local_memory_evidence(emb, net.match_bank_maps, 2)
        torch.testing.assert_close(net.match_evidence(x, t), expected)
        torch.testing.assert_close(net.match_evidence(x[1:], t[1:]), torch.ones(2, 8, 8))
    net.save_pretrained(tmp_path / "positional")
    again = ShapePriorNet.from_pretrained(tmp_path / "positional").eval()
    torch.testing.assert_close(again.match_bank_maps, net.match_bank_maps)
    torch.testing.assert_close(again.match_evidence(x, t), net.match_evidence(x, t))
    with pytest.raises(ValueError, match="calibrate the match gate at this size"):
        net.match_evidence(torch.randn(1, 1, 64, 64), torch.randn(1, 1, 64, 64))
    # radius 0 keeps the position-free evidence (template and bank vectors)
    free = ShapePriorNet(3, match_radius=0, **kw).eval()
    free.load_state_dict(net.state_dict())
    with torch.no_grad():
        e_t = _pairwise_cosine(emb, net.prior_matcher(t)).amax(-1).reshape(3, 8, 8)
        ref = torch.maximum(e_t, memory_evidence(emb, net.match_bank))
        torch.testing.assert_close(free.match_evidence(x, t), ref)
    with pytest.raises(ValueError, match="match_radius"):
        ShapePriorNet(3, match_radius=-1, **kw)


def test_joint_bilateral_filter_hand_computed_and_edge_snapping():
    # 1 x 3 image, radius 1: x = 0 sees itself and x = 1 (x = -1 is outside the image)
    maps = torch.tensor([[[[1.0, 0.0, 4.0]]]])
    guide = torch.tensor([[[[0.0, 0.0, 1.0]]]])
    out = joint_bilateral_filter(maps, guide, sigma_space=1.0, sigma_range=1.0, radius=1)
    ws, wr = math.exp(-0.5), math.exp(-0.5)  # one pixel away; one intensity unit apart
    expected = [
        (1.0 + ws * 0.0) / (1 + ws),
        (ws * 1.0 + 0.0 + ws * wr * 4.0) / (ws + 1 + ws * wr),
        (ws * wr * 0.0 + 4.0) / (ws * wr + 1),
    ]
    torch.testing.assert_close(out[0, 0, 0], torch.tensor(expected))
    # a constant map stays constant whatever the guide
    g = torch.Generator().manual_seed(0)
    guide = torch.rand(2, 3, 9, 7, generator=g)
    const = torch.full((2, 2, 9, 7), 0.3)
    torch.testing.assert_close(joint_bilateral_filter(const, guide, 2.0, 0.1), const)
    # a blurred step snaps back to the guide's edge: across the edge the weights vanish
    step = torch.zeros(1, 1, 12, 12)
    step[..., :, 6:] = 1.0
    blurred = gaussian_blur(step, 1.5)
    snapped = joint_bilateral_filter(blurred, step, sigma_space=3.0, sigma_range=0.01)
    # each side is a convex combination of its own side's values only
    assert (snapped[..., :6] <= blurred[..., :6].amax() + 1e-6).all()
    assert (snapped[..., 6:] >= blurred[..., 6:].amin() - 1e-6).all()
    jump = snapped[..., 6] - snapped[..., 5]
    assert (jump > 0.55).all() and (blurred[..., 6] - blurred[..., 5] < 0.3).all()
    with pytest.raises(ValueError, match="same B, H and W"):
        joint_bilateral_filter(maps, torch.zeros(1, 1, 2, 3), 1.0, 1.0)
    with pytest.raises(ValueError, match="positive"):
        joint_bilateral_filter(maps, maps, 0.0, 1.0)


def test_match_gate_follows_the_image_edges():
    x, t, m = _inputs(b=2)
    kw = {"features": TINY, "match_gate": True, "match_templates": 1}
    net = ShapePriorNet(3, match_quantiles=(0.2, 0.5), **kw).eval()
    net.calibrate_match_gate(torch.cat([x, t]), torch.cat([t, x]))
    with torch.no_grad():
        emb, temb = net.prior_matcher(x), net.prior_matcher(t)
        sim = _pairwise_cosine(emb, temb)
        e = net._evidence(emb, sim)
        coarse, w0 = net._match_gate_prior(e, sim, temb.shape[-2:], m, (32, 32), emb)
        g, w1 = net._match_gate_prior(e, sim, temb.shape[-2:], m, (32, 32), emb, x)
        assert (coarse < 1).any() and not torch.equal(g, coarse)
        sigma = net.match_edge_sigma * 32
        torch.testing.assert_close(g, joint_bilateral_filter(coarse, x, sigma, 0.05))
        torch.testing.assert_close(w0, w1)  # only the gate changes
        # the full forward pass hands the image over
        _, gate = net.label_prior_map(emb, t, m, (32, 32), return_gate=True, image=x)
        torch.testing.assert_close(gate, g)
        net.match_edge_sigma = 0.0  # off: the bilinearly upsampled coarse gate
        g_off, _ = net._match_gate_prior(e, sim, temb.shape[-2:], m, (32, 32), emb, x)
        torch.testing.assert_close(g_off, coarse)
    with pytest.raises(ValueError, match="match_edge_range"):
        ShapePriorNet(3, match_edge_range=0.0, **kw)


def _with_flat_patch(x: torch.Tensor) -> torch.Tensor:
    """``x`` with one featureless 8x8 patch (constant 0.5) in image 0 only."""
    x = x.clone()
    x[0, 0, 8:16, 8:16] = 0.5
    return x


def test_featureless_regions_find_a_pasted_patch_only():
    from scaledl.medical.restoration import flat_region_mask

    x, _, _ = _inputs(b=2)
    flat = featureless_regions(_with_flat_patch(x))
    assert flat.shape == (2, 1, 32, 32) and flat.dtype == x.dtype
    assert flat[0, 0, 8:16, 8:16].all()  # the patch, grown by at most 2 px for its rim
    assert flat[0, 0, 6:18, 6:18].sum() == flat[0, 0].sum() > 64
    assert not flat[1].any()  # noise everywhere: nothing is featureless
    ref = flat_region_mask(_with_flat_patch(x)[0, 0].double().numpy())
    assert torch.equal(flat[0, 0].bool(), torch.as_tensor(ref))


def test_reopen_explained_opens_only_the_regions_that_touch_the_cause():
    gate = torch.ones(2, 1, 6, 6)
    gate[0, 0, 0:2, 0:2] = 0.0  # a closed blob ...
    gate[0, 0, 2, 0:3] = 0.6  # ... and its partly closed rim, connected to it
    gate[0, 0, 4:6, 4:6] = 0.0  # a separate closed blob
    gate[1, 0, 0:2, 0:2] = 0.0  # image 1: the same blob, nothing explained there
    explained = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    explained[0, 0, 1, 1] = True
    out = reopen_explained(gate, explained)
    expected = gate.clone()
    expected[0, 0, :3, :3] = 1.0  # the blob and its rim open; the other blob stays closed
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="same"):
        reopen_explained(gate, explained[:, :, :5])


def test_match_flat_closes_the_gate_exactly_on_featureless_regions(tmp_path):
    x, t, m = _inputs(b=2)
    kw = {
        "features": TINY,
        "match_gate": True,
        "match_templates": 1,
        "match_grow_quantiles": None,
        "match_edge_sigma": 0.0,
    }
    net = ShapePriorNet(3, match_flat=True, **kw).eval()
    plain = ShapePriorNet(3, **kw).eval()
    plain.load_state_dict(net.state_dict())
    for n in (net, plain):
        n.match_low.fill_(0.0)
        n.match_high.fill_(0.5)
    xp = _with_flat_patch(x)
    with torch.no_grad():
        emb, temb = net.prior_matcher(xp), net.prior_matcher(t)
        sim = _pairwise_cosine(emb, temb)
        # coarse evidence (8x8 grid, 4 px per cell): open, except a blob over the patch's
        # cells (2..3) that reaches further down, and one far from it
        ev = torch.ones(2, 1, 8, 8)
        ev[:, :, 1:7, 1:5] = -1.0
        ev[:, :, 6:8, 6:8] = -1.0
        args = (ev, sim, temb.shape[-2:], m, (32, 32), emb, xp)
        g, _ = net._match_gate_prior(*args)
        g0, _ = plain._match_gate_prior(*args)
    flat = featureless_regions(xp)[:, 0] > 0
    assert (g[0, 0][flat[0]] == 0).all()  # closed exactly on the patch (and its rim)
    # the blob that touches the patch is explained by it: open again around the patch
    assert g[0, 0, 22, 10] == 1 and g0[0, 0, 22, 10] == 0
    assert g[0, 0, 30, 30] == 0 and g0[0, 0, 30, 30] == 0  # the far blob stays closed
    torch.testing.assert_close(g[1], g0[1])  # no featureless region: the gate is unchanged
    # a whole forward pass: an image without featureless regions gives the same output
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, m), plain(x, t, m))
        assert not torch.equal(net(xp, t, m)[0], plain(xp, t, m)[0])
    # several templates: the image's cues (featureless regions, anomaly evidence) are read
    # once per batch, and the ensemble is the mean of the single-template softmaxes
    import scaledl.medical.shape_prior as sp

    calls = []

    def counted(image):
        calls.append(image.shape[0])
        return featureless_regions(image)

    anomaly_calls = []
    evidence = net.anomaly_evidence

    def counted_anomaly(image, hw):
        anomaly_calls.append(image.shape[0])
        return evidence(image, hw)

    net.match_anomaly_threshold.fill_(1e9)  # active, but never above the threshold
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(sp, "featureless_regions", counted)
        mp.setattr(net, "anomaly_evidence", counted_anomaly)
        ts, ms = torch.stack([t, t.flip(-1)], 1), torch.stack([m, m.flip(-1)], 1)
        probs = net.predict_proba(xp, ts, ms)
        assert calls == [2] and anomaly_calls == [2]
        single = [torch.softmax(net(xp, ts[:, j], ms[:, j]), 1) for j in range(2)]
    torch.testing.assert_close(probs, (single[0] + single[1]) / 2)
    net.save_pretrained(tmp_path / "flat")
    loaded = ShapePriorNet.from_pretrained(tmp_path / "flat")
    assert loaded.match_flat and loaded.match_flat_fraction == net.match_flat_fraction
    with pytest.raises(ValueError, match="match_flat needs match_gate"):
        ShapePriorNet(3, features=TINY, match_flat=True)
    with pytest.raises(ValueError, match="match_flat_fraction"):
        ShapePriorNet(3, match_flat_fraction=0.0, **kw)


@pytest.mark.gpu
def test_match_flat_on_cuda_matches_the_cpu(monkeypatch):
    """The featureless-region detector runs on the CPU; the gate it closes lands on the
    network's device, closed on the same pixels, and the CUDA output equals the CPU one."""
    # TF32 convolutions alone move the logits by ~1e-3 on Hopper
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    x, t, m = _inputs(b=2)
    xp = _with_flat_patch(x)
    net = ShapePriorNet(3, features=TINY, match_gate=True, match_flat=True).eval()
    net.match_low.fill_(-0.5)
    net.match_high.fill_(0.0)
    flat = featureless_regions(xp) > 0
    with torch.no_grad():
        cpu = net(xp, t, m)
        net.cuda()
        xc, tc, mc = xp.cuda(), t.cuda(), m.cuda()
        gpu = net(xc, tc, mc)
        _, gate = net.label_prior_map(
            net.prior_matcher(xc), tc, mc, (32, 32), return_gate=True, image=xc
        )
    assert gpu.device.type == "cuda" and gate.device.type == "cuda"
    assert (gate.cpu()[flat] == 0).all()
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)
