"""Training, template selection, HD95 worst-case rule, persistence and the segment CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from scaledl.cli import main as cli_main
from scaledl.medical.segmentation_data import SegmentationData, make_synthetic_cxr
from scaledl.medical.segmentation_train import (
    TemplateBank,
    TrainConfig,
    calibrate_match_gate,
    evaluate,
    load_segmenter,
    mask_dice_matrix,
    medoid_index,
    one_hot_foreground,
    predict_proba,
    save_segmenter,
    segmentation_metrics,
    summarize,
    train_segmenter,
)
from scaledl.medical.shape_prior import ShapePriorNet
from tests.medical.test_shape_prior import _one_thread  # noqa: F401  (autouse fixture)

TINY = (4, 8, 8, 16, 16)


@pytest.fixture(scope="module")
def data():
    return make_synthetic_cxr(10, size=32, seed=0, lungs="parametric")


def _square(size: int, y0: int, x0: int, w: int) -> np.ndarray:
    lab = np.zeros((size, size), np.int64)
    lab[y0 : y0 + w, x0 : x0 + w] = 1
    return lab


def test_hd95_worst_case_rule_for_missed_and_hallucinated_structures():
    truth = np.stack([_square(16, 2, 2, 4), _square(16, 2, 2, 4), np.zeros((16, 16), np.int64)])
    pred = np.stack([_square(16, 2, 3, 4), np.zeros((16, 16), np.int64), _square(16, 8, 8, 3)])
    worst = math.hypot(16, 16)
    m = segmentation_metrics(pred, truth, num_classes=1)
    # image 0: shifted by one pixel -> HD95 1, Dice 2*12/32
    assert m["hd95"][0, 0] == pytest.approx(1.0)
    assert m["dice"][0, 0] == pytest.approx(24 / 32)
    # image 1: missed -> worst case instead of NaN; image 2: hallucinated -> worst case too
    assert m["hd95"][1, 0] == pytest.approx(worst) and m["dice"][1, 0] == 0.0
    assert m["hd95"][2, 0] == pytest.approx(worst) and m["dice"][2, 0] == 0.0
    # MONAI's own behaviour keeps NaN, which the mean would silently drop
    raw = segmentation_metrics(pred, truth, num_classes=1, missed="nan")
    assert math.isnan(raw["hd95"][1, 0])
    # absent from both: a perfect score; spacing scales the distances
    empty = np.zeros((1, 16, 16), np.int64)
    both = segmentation_metrics(empty, empty, num_classes=1)
    assert both["dice"][0, 0] == 1.0 and both["hd95"][0, 0] == 0.0
    mm = segmentation_metrics(pred, truth, num_classes=1, spacing=0.5)
    assert mm["hd95"][1, 0] == pytest.approx(worst * 0.5)
    s = summarize(m, ["box"])
    assert s["hd95_box"] == pytest.approx((1 + 2 * worst) / 3)
    with pytest.raises(ValueError, match="missed"):
        segmentation_metrics(pred, truth, 1, missed="skip")
    # Dice alone: the same Dice under the same rule, no HD95
    fast = segmentation_metrics(
        np.concatenate([pred, empty]), np.concatenate([truth, empty]), 1, hd95=False
    )
    assert set(fast) == {"dice"}
    np.testing.assert_array_equal(fast["dice"], np.concatenate([m["dice"], both["dice"]]))


def test_medoid_has_highest_mean_mask_dice():
    labels = np.stack([_square(16, 4, 4, 6), _square(16, 5, 5, 6), _square(16, 4, 5, 6)])
    labels = np.concatenate([labels, _square(16, 10, 10, 5)[None]])
    d = mask_dice_matrix(labels, 1)
    np.testing.assert_allclose(np.diag(d), 1.0)
    np.testing.assert_allclose(d, d.T)
    scores = [(d[i].sum() - 1) / 3 for i in range(4)]
    assert medoid_index(labels, 1) == int(np.argmax(scores))


def test_template_modes(data):
    net = ShapePriorNet(4, features=TINY).eval()
    bank = TemplateBank(data)
    x = torch.as_tensor(data.images[:3])
    fixed = bank.select(net, x, "fixed")
    assert fixed.shape == (3, 1) and (fixed == bank.medoid).all()
    # a query that is itself a template retrieves itself
    nearest = bank.select(net, x, "nearest")
    assert nearest[:, 0].tolist() == [0, 1, 2]
    ens = bank.select(net, x, "ensemble", k=4)
    assert ens.shape == (3, 4) and ens[:, 0].tolist() == [0, 1, 2]
    assert all(len(set(r.tolist())) == 4 for r in ens)
    # ensemble probabilities equal the mean of the single-template softmaxes
    p = predict_proba(net, x, bank, "ensemble", k=4)
    with torch.no_grad():
        manual = torch.stack(
            [
                torch.softmax(net(x, bank.images[ens[:, j]], bank.masks[ens[:, j]]), 1)
                for j in range(4)
            ]
        ).mean(0)
    torch.testing.assert_close(p, manual)
    with pytest.raises(ValueError, match="template mode"):
        bank.select(net, x, "random")
    with pytest.raises(ValueError, match="TemplateBank"):
        predict_proba(net, x, None)


def test_short_training_lowers_the_loss(data):
    torch.manual_seed(0)
    net = ShapePriorNet(4, features=TINY, attention="dense")
    losses = train_segmenter(net, data, TrainConfig(iterations=40, batch_size=4, lr=5e-3))
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-8:]) < 0.85 * np.mean(losses[:8])
    # the trained model relies on its template: a blank one (nothing to transfer) breaks it
    blank = SegmentationData(np.zeros_like(data.images[:1]), np.zeros_like(data.labels[:1]))
    real = evaluate(net, data, TemplateBank(data), "fixed")["dice_mean"]
    assert real > evaluate(net, data, TemplateBank(blank), "fixed")["dice_mean"] + 20


def test_prior_loss_adds_the_label_prior_dice_ce(data):
    """The first step's loss grows by exactly the weighted Dice + CE of the label prior."""
    from monai.losses import DiceCELoss

    first = {}
    for w in (0.0, 2.0):
        torch.manual_seed(0)
        net = ShapePriorNet(4, features=TINY)
        cfg = TrainConfig(iterations=1, batch_size=2, prior_loss_weight=w, augment=False)
        first[w] = train_segmenter(net, data, cfg)[0]
    # replay the first batch: same generator draws as train_segmenter
    torch.manual_seed(0)
    net = ShapePriorNet(4, features=TINY)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(len(data), (2,), generator=gen)
    tidx = (idx + torch.randint(1, len(data), (2,), generator=gen)) % len(data)
    x, y = torch.as_tensor(data.images)[idx], torch.as_tensor(data.labels)[idx]
    t, tl = torch.as_tensor(data.images)[tidx], torch.as_tensor(data.labels)[tidx]
    _, prior = net.forward_with_prior(x, t, one_hot_foreground(tl, 4))
    loss_fn = DiceCELoss(
        include_background=False, to_onehot_y=True, softmax=True, smooth_nr=1e-5, smooth_dr=1e-5
    )
    prior_loss = float(loss_fn(torch.log(prior.clamp_min(1e-6)), y[:, None]).detach())
    assert first[2.0] - first[0.0] == pytest.approx(2.0 * prior_loss, rel=1e-4)


def test_template_free_baseline_trains_with_the_same_loop(data):
    from monai.networks.nets import BasicUNet

    torch.manual_seed(0)
    net = BasicUNet(2, 1, 5, features=(4, 8, 8, 16, 16, 4))
    losses = train_segmenter(net, data, TrainConfig(iterations=3, batch_size=2))
    assert len(losses) == 3
    assert predict_proba(net, data.images[:2]).shape == (2, 5, 32, 32)


def test_training_config_errors(data):
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lamb")
    with pytest.raises(ValueError, match="prior_loss_weight"):
        TrainConfig(prior_loss_weight=-1.0)
    with pytest.raises(ValueError, match="at least 2"):
        one = SegmentationData(data.images[:1], data.labels[:1])
        train_segmenter(ShapePriorNet(4, features=TINY), one, TrainConfig(iterations=1))


def test_save_and_load_round_trip(tmp_path, data):
    net = ShapePriorNet(4, features=TINY, attention="dense", fusion="gate").eval()
    save_segmenter(tmp_path / "m", net, data)
    loaded, bank = load_segmenter(tmp_path / "m")
    x = torch.as_tensor(data.images[:2])
    m = bank.masks[:2]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, x, m), net(x, x, m))
    assert bank.medoid == TemplateBank(data).medoid
    with pytest.raises(ValueError, match=r"templates\.npz"):
        load_segmenter(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"model folder .* does not exist.*segment train"):
        load_segmenter(tmp_path / "missing")


def test_segment_cli_missing_files_are_one_line_errors(tmp_path, capsys):
    missing = str(tmp_path / "missing")
    assert cli_main(["segment", "eval", "--model", missing]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"scaledl: error: model folder {missing} does not exist: train one with 'scaledl "
        f"segment train --out {missing}' (or save_segmenter) (use --debug for the traceback)"
    ]
    # a missing input is named before any model is loaded
    code = cli_main(["segment", "predict", str(tmp_path / "x.png"), "--model", missing])
    assert code == 2
    assert f"input {tmp_path / 'x.png'} does not exist (1 missing)" in capsys.readouterr().err


def test_segment_cli_train_eval_predict(tmp_path, capsys):
    model = str(tmp_path / "model")
    common = ["--size", "32", "--lungs", "parametric", "--json"]
    assert (
        cli_main(
            [
                "segment",
                "train",
                "--n",
                "6",
                "--iters",
                "3",
                "--batch",
                "2",
                "--features",
                *map(str, TINY),
                "--out",
                model,
                "--match-gate",
                "--anomaly-iters",
                "2",
                "--restore-iters",
                "2",
                *common,
            ]
        )
        == 0
    )
    trained = json.loads(capsys.readouterr().out)
    assert trained["train_images"] == 6 and trained["iterations"] == 3
    # the calibrated match gate travels with the model (eval and predict below load it)
    saved = ShapePriorNet.from_pretrained(model)
    assert saved.match_gate and saved.match_bank.shape[0] > 0
    assert float(saved.match_low) < float(saved.match_high) < 1
    assert saved.restore_active and saved.match_restore_iterations == 2
    overlays = tmp_path / "ov"
    assert (
        cli_main(
            [
                "segment",
                "eval",
                "--model",
                model,
                "--n",
                "2",
                "--corruptions",
                "noise",
                "occlusion",
                "--severities",
                "3",
                "--overlays",
                str(overlays),
                "--n-overlays",
                "1",
                "--mode",
                "nearest",
                *common,
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert set(res["conditions"]) == {"clean", "noise-3", "occlusion-3"}
    assert {"dice_lung_right", "hd95_heart", "dice_mean"} <= set(res["conditions"]["clean"])
    assert (overlays / "occlusion-3_000.png").is_file()
    # --restore: the front end (fitted on the model's templates) runs before the model and
    # reports what it did per condition: nothing on clean images.
    restore_args = ["segment", "eval", "--model", model, "--n", "2", "--restore"]
    restore_args += ["--corruptions", "noise", "occlusion", "--severities", "3", *common]
    assert cli_main(restore_args) == 0
    restored = json.loads(capsys.readouterr().out)
    assert restored["restore"] is True
    cond = restored["conditions"]
    assert cond["clean"]["restore_filled_images"] == cond["clean"]["restore_denoised_images"] == 0
    assert cond["noise-3"]["restore_denoised_images"] == 2
    assert cond["occlusion-3"]["restore_filled_images"] >= 1  # at 32² one occluder may be < 3x3
    assert cond["clean"]["dice_mean"] == res["conditions"]["clean"]["dice_mean"] or (
        res["mode"] != restored["mode"]
    )
    # --flat: featureless regions close the match gate; an image without any is unchanged
    flat_args = ["segment", "eval", "--model", model, "--n", "2", "--flat", "--mode", "nearest"]
    assert cli_main([*flat_args, "--corruptions", "occlusion", "--severities", "3", *common]) == 0
    flat = json.loads(capsys.readouterr().out)
    assert flat["flat"] is True and res["flat"] is False
    assert flat["conditions"]["clean"]["dice_mean"] == res["conditions"]["clean"]["dice_mean"]
    assert (
        cli_main(
            [
                "segment",
                "predict",
                str(overlays / "clean_000.png"),
                "--model",
                model,
                "--out",
                str(tmp_path / "pred"),
                "--restore",
                "--json",
            ]
        )
        == 0
    )
    pred = json.loads(capsys.readouterr().out)
    assert len(pred["masks"]) == 1
    from PIL import Image

    assert np.asarray(Image.open(pred["masks"][0])).shape == (32, 32)
    # bad input is one clear error line and exit code 2
    assert cli_main(["segment", "eval", "--model", model, "--corruptions", "rain"]) == 2
    assert "unknown corruption 'rain'" in capsys.readouterr().err


def test_training_calibrates_the_match_gate_on_held_out_clean_images(data):
    net = ShapePriorNet(data.num_classes, features=(2, 4, 4, 8, 8), match_gate=True)
    train_segmenter(net, data, TrainConfig(iterations=2, batch_size=2, anomaly_iterations=2))
    # 2/3 of the images fill the bank (one embedding per coarse position), the rest calibrate
    n_bank = round(2 / 3 * len(data))
    h = data.images.shape[-1] // net.config["prior_pool"]
    assert net.match_bank.shape == (n_bank * h * h, net.config["prior_dim"])
    lo, hi = float(net.match_low), float(net.match_high)
    assert -1 <= lo < hi <= 1
    images = torch.as_tensor(data.images)
    ev = net.match_evidence(images, images.roll(1, 0))
    # by construction the gate is fully open on most clean positions
    assert float((ev >= hi).float().mean()) > 1 - 2 * net.match_quantiles[1]
    assert calibrate_match_gate(net, data, seed=3) != (lo, hi)  # another split, other values
    with pytest.raises(ValueError, match="bank_fraction"):
        calibrate_match_gate(net, data, bank_fraction=1.0)


def test_calibration_stores_the_training_atlas_without_changing_the_thresholds(data):
    kw = {"features": (2, 4, 4, 8, 8), "match_gate": True}
    net = ShapePriorNet(data.num_classes, match_templates=3, **kw).eval()
    single = ShapePriorNet(data.num_classes, match_templates=1, **kw).eval()
    single.load_state_dict(net.state_dict())
    thresholds = calibrate_match_gate(net, data)
    assert thresholds == calibrate_match_gate(single, data)  # the atlas has its own generator
    assert single.match_atlas_labels.shape[0] == 0
    # every training image (fewer than atlas_size) with its label map, in some order
    labels = torch.as_tensor(data.labels).to(torch.uint8)
    assert net.match_atlas_labels.shape == labels.shape
    stored = sorted(tuple(lab.flatten().tolist()) for lab in net.match_atlas_labels)
    assert stored == sorted(tuple(lab.flatten().tolist()) for lab in labels)
    calibrate_match_gate(net, data, atlas_size=4)
    assert net.match_atlas_labels.shape[0] == 4
    with pytest.raises(ValueError, match="atlas_size"):
        calibrate_match_gate(net, data, atlas_size=0)


def test_segment_cli_flat_needs_a_match_gate_model(tmp_path, capsys):
    model = str(tmp_path / "model")
    common = ["--size", "32", "--lungs", "parametric", "--json"]
    train = ["segment", "train", "--n", "4", "--iters", "1", "--batch", "2", "--out", model]
    assert cli_main([*train, "--features", *map(str, TINY), *common]) == 0
    capsys.readouterr()
    assert cli_main(["segment", "eval", "--model", model, "--flat", *common]) == 2
    assert "--flat needs a model with the match gate" in capsys.readouterr().err
