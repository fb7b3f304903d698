"""SynthCXR generator, corruptions and the image/mask folder loader."""

from __future__ import annotations

import numpy as np
import pytest

from scaledl.medical.corruptions import (
    CORRUPTIONS,
    corrupt,
    corrupt_batch,
    corruption_target,
    corruption_targets,
)
from scaledl.medical.segmentation_data import (
    CLASS_NAMES,
    load_segmentation_folder,
    lung_source,
    make_synthetic_cxr,
    synthetic_cxr_splits,
    torchxrayvision_lung_zip,
)


@pytest.fixture(scope="module")
def cxr():
    return make_synthetic_cxr(6, size=64, seed=3)


def test_generator_is_deterministic_and_varies_between_subjects(cxr):
    again = make_synthetic_cxr(6, size=64, seed=3)
    np.testing.assert_array_equal(cxr.images, again.images)
    np.testing.assert_array_equal(cxr.labels, again.labels)
    assert cxr.images.shape == (6, 1, 64, 64) and cxr.labels.shape == (6, 64, 64)
    assert cxr.images.min() >= 0 and cxr.images.max() <= 1
    # inter-subject variation: no two label maps are identical
    flat = cxr.labels.reshape(6, -1)
    assert all((flat[i] != flat[j]).any() for i in range(6) for j in range(i))


@pytest.mark.parametrize("lungs", ["parametric", "auto"])
def test_consistent_anatomy(lungs):
    data = make_synthetic_cxr(4, size=64, seed=0, lungs=lungs)
    assert data.class_names == CLASS_NAMES
    for lab, img in zip(data.labels, data.images[:, 0]):
        assert set(np.unique(lab)) == {0, 1, 2, 3, 4}
        ys, xs = np.nonzero(lab == 1)
        _, xl = np.nonzero(lab == 2)
        assert xs.mean() < xl.mean()  # the patient's right lung is on the image's left
        yh, _ = np.nonzero(lab == 3)
        yc, _ = np.nonzero(lab == 4)
        assert yc.mean() < ys.mean() < yh.mean()  # clavicles above lungs, heart low
        assert img[lab == 1].mean() < img[lab == 3].mean() < img[lab == 4].mean()


def test_lung_source_resolution():
    assert lung_source("parametric") == "parametric"
    expected = "torchxrayvision" if torchxrayvision_lung_zip() else "parametric"
    assert lung_source("auto") == expected
    with pytest.raises(ValueError, match="lungs must be"):
        lung_source("ct")


def test_splits_are_disjoint_and_bad_sizes_raise():
    s = synthetic_cxr_splits(32, 3, 0, 2, seed=1)
    assert set(s) == {"train", "test"}
    assert not np.array_equal(s["train"].labels[:2], s["test"].labels)
    with pytest.raises(ValueError, match="multiple of 16"):
        make_synthetic_cxr(2, size=50)
    with pytest.raises(ValueError, match="n must be"):
        make_synthetic_cxr(0)


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corruptions_are_deterministic_per_seed_and_three_severities(cxr, kind):
    img, lab = cxr.images[0, 0], cxr.labels[0]
    outs = []
    for sev in (1, 2, 3):
        a = corrupt(img, kind, sev, seed=11, labels=lab)
        b = corrupt(img, kind, sev, seed=11, labels=lab)
        np.testing.assert_array_equal(a, b)
        assert a.shape == img.shape and a.dtype == np.float32
        assert a.min() >= 0 and a.max() <= 1
        assert not np.allclose(a, img)
        outs.append(np.abs(a - img).mean())
    if kind != "gamma":  # severities order the damage (gamma 0.5 and 1.5 bend opposite ways)
        assert outs[0] < outs[2]
    if kind in ("noise", "occlusion", "bias_field", "opacity", "gamma"):
        other = corrupt(img, kind, 2, seed=12, labels=lab)
        assert not np.array_equal(other, corrupt(img, kind, 2, seed=11, labels=lab))


def test_occlusion_hits_the_targeted_anatomy(cxr):
    img, lab = cxr.images[0, 0], cxr.labels[0]
    changed = corrupt(img, "occlusion", 3, seed=0, labels=lab) != img
    inside = [changed[lab == c].mean() for c in (1, 2, 3)]
    assert max(inside) > 0.1


def test_corruption_target_names_the_structure_hit(cxr):
    hit = set()
    for i in range(3):
        img, lab = cxr.images[i, 0], cxr.labels[i]
        for seed in range(12):
            # occlusion: 1-3 shapes centred in the target cover a large part of it
            target = corruption_target("occlusion", seed, lab)
            changed = corrupt(img, "occlusion", 3, seed, labels=lab) != img
            assert target in (1, 2, 3) and changed[lab == target].mean() > 0.1
            hit.add(target)
            # opacity: the blob is centred in the target lung, so it brightens it most
            target = corruption_target("opacity", seed, lab)
            diff = corrupt(img, "opacity", 3, seed, labels=lab) - img
            other = 3 - target
            assert target in (1, 2) and diff[lab == target].mean() > diff[lab == other].mean()
    assert hit == {1, 2, 3}  # the replay follows the seed, not a fixed choice
    labels = cxr.labels[:4]
    batch = corruption_targets("occlusion", labels, seed=5)
    expected = [corruption_target("occlusion", 5 * 100003 + i, labels[i]) for i in range(4)]
    np.testing.assert_array_equal(batch, expected)
    assert corruption_target("occlusion", 0, np.zeros((8, 8), dtype=int)) == 0  # nothing to hit
    with pytest.raises(ValueError, match="does not aim"):
        corruption_target("noise", 0, labels[0])
    with pytest.raises(ValueError, match="labels must be"):
        corruption_targets("occlusion", labels[0], 0)


def test_corrupt_batch_and_errors(cxr):
    out = corrupt_batch(cxr.images, "noise", 2, seed=1)
    assert out.shape == cxr.images.shape
    assert not np.array_equal(out[0], out[1] - cxr.images[1] + cxr.images[0])
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(cxr.images[0, 0], "rain", 1, 0)
    with pytest.raises(ValueError, match="severity"):
        corrupt(cxr.images[0, 0], "noise", 4, 0)


def test_folder_loader_reads_png_and_nifti(tmp_path, cxr):
    nib = pytest.importorskip("nibabel")
    from PIL import Image

    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    Image.fromarray((cxr.images[0, 0] * 255).astype(np.uint8)).save(tmp_path / "img" / "a.png")
    Image.fromarray(cxr.labels[0].astype(np.uint8)).save(tmp_path / "msk" / "a.png")
    vol = np.stack([cxr.images[1, 0], cxr.images[2, 0]], -1)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "img" / "b.nii.gz"))
    labs = np.stack([cxr.labels[1], cxr.labels[2]], -1).astype(np.int16)
    nib.save(nib.Nifti1Image(labs, np.eye(4)), str(tmp_path / "msk" / "b.nii.gz"))
    data = load_segmentation_folder(tmp_path / "img", tmp_path / "msk", size=32)
    assert len(data) == 3 and data.images.shape == (3, 1, 32, 32)
    assert data.num_classes == 4 and data.class_names[0] == "class_1"
    full = load_segmentation_folder(tmp_path / "img", tmp_path / "msk", size=None)
    np.testing.assert_array_equal(full.labels[0], cxr.labels[0])
    np.testing.assert_array_equal(full.labels[1:], np.moveaxis(labs, -1, 0))
    # a missing mask is named
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "img" / "c.png")
    with pytest.raises(ValueError, match=r"no mask for image c\.png"):
        load_segmentation_folder(tmp_path / "img", tmp_path / "msk")
    with pytest.raises(ValueError, match="does not exist"):
        load_segmentation_folder(tmp_path / "nope", tmp_path / "msk")
