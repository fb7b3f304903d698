"""Denoising-autoencoder anomaly evidence and its use by the match gate."""

from __future__ import annotations

import json
import math

import pytest
import torch

from scaledl.medical.anomaly import (
    DenoisingAutoencoder,
    coarse_noise,
    flat_blobs,
    train_denoising_autoencoder,
)
from scaledl.medical.segmentation_data import make_synthetic_cxr
from scaledl.medical.segmentation_train import TrainConfig, calibration_split, train_segmenter
from scaledl.medical.shape_prior import ShapePriorNet
from tests.medical.test_shape_prior import _one_thread  # noqa: F401  (autouse fixture)

SMALL_DAE = (4, 8, 16, 16, 32, 4)
TINY = (2, 4, 4, 8, 8)


@pytest.fixture(scope="module")
def trained():
    """A small autoencoder trained briefly on clean synthetic chest X-rays (64²)."""
    torch.manual_seed(0)
    data = make_synthetic_cxr(20, size=64, seed=0, lungs="parametric")
    images = torch.as_tensor(data.images)
    dae = DenoisingAutoencoder(1, SMALL_DAE)
    with torch.random.fork_rng():
        torch.set_num_threads(2)
        losses = train_denoising_autoencoder(
            dae, images[:16], iterations=250, lr=5e-3, noise_resolution=8, seed=0
        )
    return dae, images, data.labels, losses


def test_coarse_noise_is_smooth_and_seeded():
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = coarse_noise((2, 1, 64, 64), 8, 0.5, g())
    torch.testing.assert_close(a, coarse_noise((2, 1, 64, 64), 8, 0.5, g()))
    assert a.shape == (2, 1, 64, 64)
    # neighbouring pixels nearly agree (blobs about 8 px wide), unlike white noise
    step = (a[..., 1:] - a[..., :-1]).abs().mean()
    assert step < 0.3 * a.abs().mean()  # white noise: about 1.8 times its mean magnitude
    assert coarse_noise((1, 1, 16, 16), 4, 0.0).abs().max() == 0
    with pytest.raises(ValueError, match="resolution"):
        coarse_noise((1, 1, 16, 16), 0, 0.1)
    with pytest.raises(ValueError, match="shape"):
        coarse_noise((1, 16, 16), 4, 0.1)


def _pasted_box(clean: torch.Tensor, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """The images with a flat bright 12 x 12 box at the centre of the right lung, and the box
    (B, 1, H, W)."""
    lung = torch.as_tensor(labels == 1)
    box = torch.zeros_like(lung)
    for i in range(len(box)):
        ys, xs = torch.nonzero(lung[i], as_tuple=True)
        y, x = int(ys.float().mean()) - 6, int(xs.float().mean()) - 6
        box[i, y : y + 12, x : x + 12] = True
    boxed = clean.clone()
    boxed[box[:, None]] = 0.9
    return boxed, box[:, None]


def test_residual_is_high_on_a_pasted_flat_box_and_low_on_clean_images(trained):
    dae, images, labels, losses = trained
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])  # it learned to restore
    clean = images[16:]  # unseen clean images
    boxed, box = _pasted_box(clean, labels[16:])
    box = box[:, 0]
    ev_clean = dae.residual_evidence(clean, sigma=1.0, pool=4)
    ev_box = dae.residual_evidence(boxed, sigma=1.0, pool=4)
    assert ev_box.shape == (4, 1, 16, 16)
    inside = torch.nn.functional.avg_pool2d(box[:, None].float(), 4) > 0.5
    # standardised per image: the clean images' evidence is centred, the box stands out
    assert ev_clean.flatten(1).median(1).values.abs().max() < 1e-5
    assert ev_box[inside].mean() > 3 * ev_clean.flatten(1).amax(1).mean()
    assert ev_box[inside].mean() > 5 * ev_box[~inside].abs().mean()


def _gated_net(restore: int = 0) -> ShapePriorNet:
    """A small gated network whose anomaly evidence, once calibrated, flags a tenth of the
    positions; the gate is not grown or snapped to edges (exact expectations)."""
    return ShapePriorNet(
        3,
        features=TINY,
        match_gate=True,
        anomaly_features=SMALL_DAE,
        match_anomaly_quantile=0.9,
        match_grow_quantiles=None,
        match_edge_sigma=0.0,
        match_restore_iterations=restore,
    ).eval()


def test_calibrated_threshold_is_the_clean_quantile_and_closes_the_gate(trained, tmp_path):
    dae, images, _, _ = trained
    x = images[16:]
    net = _gated_net()
    assert not net.anomaly_active  # untrained: the evidence is off
    net.anomaly.load_state_dict(dae.state_dict())
    net.calibrate_match_gate(x, x.roll(1, 0), bank_images=images[:16])
    assert not net.anomaly_active  # not fitted by fit_anomaly: still off
    net.match_anomaly_trained.fill_(True)
    net.calibrate_match_gate(x, x.roll(1, 0), bank_images=images[:16])
    assert net.anomaly_active
    ev = net.anomaly_evidence(x, (16, 16))
    torch.testing.assert_close(ev, dae.residual_evidence(x, net.match_anomaly_sigma * 64, pool=4))
    thr = float(net.match_anomaly_threshold)
    assert thr == pytest.approx(float(torch.quantile(ev.flatten(), 0.9)))
    assert float((ev > thr).float().mean()) == pytest.approx(0.1, abs=0.01)
    # the gate is closed wherever the evidence exceeds the threshold, whatever the match says
    net.match_low.fill_(-3.0)
    net.match_high.fill_(-2.0)
    emb = net.prior_matcher(x)
    masks = torch.zeros(4, 3, 64, 64)
    with torch.no_grad():
        _, gate = net.label_prior_map(emb, x, masks, (64, 64), return_gate=True, image=x)
        _, open_ = net.label_prior_map(emb, x, masks, (64, 64), return_gate=True)
    assert torch.equal(open_, torch.ones_like(open_))  # without the image: match gate alone
    expected = torch.nn.functional.interpolate(
        (ev <= thr).float(), size=(64, 64), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(gate, expected)
    # saved and loaded with the weights
    net.save_pretrained(tmp_path / "m")
    again = ShapePriorNet.from_pretrained(tmp_path / "m").eval()
    assert again.anomaly_active and float(again.match_anomaly_threshold) == thr
    t = x.roll(1, 0)
    with torch.no_grad():
        torch.testing.assert_close(again(x, t, masks), net(x, t, masks))
    # weights saved before the anomaly evidence existed load with it off
    old = {k: v for k, v in net.state_dict().items() if "anomaly" not in k}
    before = ShapePriorNet(3, features=TINY, match_gate=True, anomaly_features=SMALL_DAE)
    before.load_state_dict(old)
    assert not before.anomaly_active and not bool(before.match_anomaly_trained)


def test_training_fits_the_autoencoder_on_the_bank_images_only():
    data = make_synthetic_cxr(6, size=32, seed=1, lungs="parametric")
    net = ShapePriorNet(
        data.num_classes,
        features=TINY,
        match_gate=True,
        anomaly_features=SMALL_DAE,
        match_restore_iterations=2,
    )
    init = {k: v.clone() for k, v in net.anomaly.state_dict().items()}
    cfg = TrainConfig(iterations=2, batch_size=2, anomaly_iterations=3)
    train_segmenter(net, data, cfg)
    assert net.anomaly_active and math.isfinite(float(net.match_anomaly_threshold))
    assert any(not torch.equal(v, init[k]) for k, v in net.anomaly.state_dict().items())
    # the restorer: the autoencoder fine-tuned further (to inpaint flat regions)
    assert net.restore_active
    restorer = net.restorer.state_dict()
    assert any(not torch.equal(v, restorer[k]) for k, v in net.anomaly.state_dict().items())
    bank, calib = calibration_split(len(data), seed=0)
    assert sorted(torch.cat([bank, calib]).tolist()) == list(range(6)) and len(calib) == 2
    # the threshold is the quantile over the held-out calibration images
    images = torch.as_tensor(data.images)
    ev = net.anomaly_evidence(images[calib], (8, 8))
    q = float(torch.quantile(ev.flatten(), net.match_anomaly_quantile))
    assert float(net.match_anomaly_threshold) == pytest.approx(q)
    off = ShapePriorNet(data.num_classes, features=TINY, match_gate=True)
    train_segmenter(off, data, TrainConfig(iterations=1, batch_size=2, anomaly_iterations=0))
    assert not off.anomaly_active  # 0 iterations leave the evidence off
    assert off.restorer is None and not off.restore_active  # the restoration is off by default


def test_bad_input_is_a_clear_error(trained):
    dae = trained[0]
    with pytest.raises(ValueError, match="multiples of 16"):
        dae(torch.zeros(1, 1, 40, 40))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        dae(torch.zeros(1, 2, 32, 32))
    with pytest.raises(ValueError, match="pool"):
        dae.residual_evidence(torch.zeros(1, 1, 32, 32), 1.0, pool=3)
    with pytest.raises(ValueError, match="6 widths"):
        DenoisingAutoencoder(1, (4, 8))
    with pytest.raises(ValueError, match="iterations"):
        train_denoising_autoencoder(dae, torch.zeros(2, 1, 32, 32), iterations=0)
    with pytest.raises(ValueError, match="match_anomaly_quantile"):
        ShapePriorNet(3, features=TINY, match_gate=True, match_anomaly_quantile=1.0)
    with pytest.raises(ValueError, match="fit_anomaly needs"):
        ShapePriorNet(3, features=TINY, match_gate=True, match_anomaly=False).fit_anomaly(
            torch.zeros(2, 1, 32, 32)
        )
    with pytest.raises(ValueError, match="anomaly_iterations"):
        TrainConfig(anomaly_iterations=-1)


def test_flat_blobs_replace_irregular_regions_by_one_value_per_image():
    x = torch.rand(3, 1, 128, 128)
    out = flat_blobs(x, 6, 0.9, torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, flat_blobs(x, 6, 0.9, torch.Generator().manual_seed(1)))
    changed = out != x
    share = changed.float().mean()
    assert 0.02 < share < 0.3  # about a tenth of the image
    for i in range(3):  # one flat intensity per image
        assert out[i][changed[i]].unique().numel() == 1
    assert torch.equal(flat_blobs(x, 6, 100.0), x)  # a threshold no noise reaches


def test_restore_keeps_the_open_region_and_replaces_a_pasted_box(trained):
    dae, images, labels, _ = trained
    clean = images[16:]
    boxed, box = _pasted_box(clean, labels[16:])
    gate = (~box).float()
    restored = dae.restore(boxed, gate, iterations=3)
    # the input where the gate is open, the autoencoder's anatomy where it is closed
    assert torch.equal(restored[~box], boxed[~box])
    err = lambda a: (a - clean)[box].abs().mean()  # noqa: E731
    assert err(restored) < 0.5 * err(boxed)
    # one pass is the blend with the autoencoder's output; an open gate changes nothing
    with torch.no_grad():
        torch.testing.assert_close(dae.restore(boxed, gate, 1), gate * boxed + box * dae(boxed))
    assert torch.equal(dae.restore(boxed, torch.ones_like(gate)), boxed)
    with pytest.raises(ValueError, match="gate must be"):
        dae.restore(boxed, gate[:, :, :32])
    with pytest.raises(ValueError, match="iterations"):
        dae.restore(boxed, gate, 0)


def test_the_closed_region_is_segmented_again_on_the_restored_image(trained, tmp_path):
    dae, images, _, _ = trained
    x = images[16:]
    assert ShapePriorNet(3, features=TINY, match_gate=True).restorer is None  # off by default
    net = _gated_net(restore=3)
    net.anomaly.load_state_dict(dae.state_dict())
    net.match_anomaly_trained.fill_(True)
    net.calibrate_match_gate(x, x.roll(1, 0), bank_images=images[:16])
    assert not net.restore_active  # its restorer is not trained yet
    net.restorer.load_state_dict(dae.state_dict())
    net.match_restore_trained.fill_(True)
    assert net.restore_active and net.match_restore_iterations == 3
    assert net.match_restore_weight == 0.5
    t, masks = x.roll(1, 0), torch.rand(4, 3, 64, 64).round()
    with torch.no_grad():
        emb = net.prior_matcher(x)
        prior, gate = net.label_prior_map(emb, t, masks, (64, 64), return_gate=True, image=x)
        tf = net.encode_template(t, masks)
        z = net.decode(net.image_encoder(x), tf, masks)
        restored = net.restorer.restore(x, gate, 3)
        z2 = net.decode(net.image_encoder(restored), tf, masks)
        c = net.logit_bound
        expected = (
            gate * c * torch.tanh(z / c)
            + (1 - gate) * 0.5 * c * torch.tanh(z2 / c)
            + net.prior_weight * torch.log(prior.clamp_min(net.prior_eps))
        )
        torch.testing.assert_close(net(x, t, masks), expected)
        p_on = net.predict_proba(x, t[:, None], masks[:, None])
        net.match_restore_iterations = 0  # off: the first prediction under the closed gate
        p_off = net.predict_proba(x, t[:, None], masks[:, None])
    assert (gate < 1).any()
    open_ = (gate == 1).expand_as(p_on)
    torch.testing.assert_close(p_on[open_], p_off[open_])
    assert (p_on - p_off).abs().amax() > 1e-3
    # saved with it; folders saved before it existed load with it off
    net.match_restore_iterations = 3
    net.save_pretrained(tmp_path / "m")
    again = ShapePriorNet.from_pretrained(tmp_path / "m")
    assert again.restore_active and again.match_restore_iterations == 3
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    del cfg["match_restore_iterations"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    state = torch.load(tmp_path / "m" / "model.pt")
    old = {k: v for k, v in state.items() if "restore" not in k}
    torch.save(old, tmp_path / "m" / "model.pt")
    before = ShapePriorNet.from_pretrained(tmp_path / "m")
    assert before.match_restore_iterations == 0 and not before.restore_active
    with pytest.raises(ValueError, match="match_restore_iterations"):
        ShapePriorNet(3, features=TINY, match_gate=True, match_restore_iterations=-1)
    with pytest.raises(ValueError, match="match_restore_weight"):
        ShapePriorNet(3, features=TINY, match_gate=True, match_restore_weight=-0.1)
