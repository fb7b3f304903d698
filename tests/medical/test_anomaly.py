"""Denoising-autoencoder anomaly evidence and its use by the match gate."""

from __future__ import annotations

import math

import pytest
import torch

from scaledl.medical.anomaly import DenoisingAutoencoder, coarse_noise, train_denoising_autoencoder
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


def test_residual_is_high_on_a_pasted_flat_box_and_low_on_clean_images(trained):
    dae, images, labels, losses = trained
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])  # it learned to restore
    clean = images[16:]  # unseen clean images
    boxed = clean.clone()
    lung = torch.as_tensor(labels[16:] == 1)
    box = torch.zeros_like(lung)
    for i in range(len(box)):  # a flat bright 12 x 12 box at the centre of the right lung
        ys, xs = torch.nonzero(lung[i], as_tuple=True)
        y, x = int(ys.float().mean()) - 6, int(xs.float().mean()) - 6
        box[i, y : y + 12, x : x + 12] = True
    boxed[box[:, None]] = 0.9
    ev_clean = dae.residual_evidence(clean, sigma=1.0, pool=4)
    ev_box = dae.residual_evidence(boxed, sigma=1.0, pool=4)
    assert ev_box.shape == (4, 1, 16, 16)
    inside = torch.nn.functional.avg_pool2d(box[:, None].float(), 4) > 0.5
    # standardised per image: the clean images' evidence is centred, the box stands out
    assert ev_clean.flatten(1).median(1).values.abs().max() < 1e-5
    assert ev_box[inside].mean() > 3 * ev_clean.flatten(1).amax(1).mean()
    assert ev_box[inside].mean() > 5 * ev_box[~inside].abs().mean()


def test_calibrated_threshold_is_the_clean_quantile_and_closes_the_gate(trained, tmp_path):
    dae, images, _, _ = trained
    x = images[16:]
    net = ShapePriorNet(
        3,
        features=TINY,
        match_gate=True,
        anomaly_features=SMALL_DAE,
        match_anomaly_quantile=0.9,
        match_grow_quantiles=None,
        match_edge_sigma=0.0,
    ).eval()
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
        data.num_classes, features=TINY, match_gate=True, anomaly_features=SMALL_DAE
    )
    init = {k: v.clone() for k, v in net.anomaly.state_dict().items()}
    cfg = TrainConfig(iterations=2, batch_size=2, anomaly_iterations=3)
    train_segmenter(net, data, cfg)
    assert net.anomaly_active and math.isfinite(float(net.match_anomaly_threshold))
    assert any(not torch.equal(v, init[k]) for k, v in net.anomaly.state_dict().items())
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
