"""Synthetic CT lesion data and DICOM reading."""

from __future__ import annotations

import numpy as np
import pytest

from scaledl.medical import mask_to_recist
from scaledl.medical.lesion_data import (
    LesionDataset,
    _phantom,
    load_backgrounds,
    make_lesion_dataset,
    read_dicom_slice,
    resize_backgrounds,
    save_backgrounds,
    window_hu,
)


@pytest.fixture(scope="module")
def bgs():
    return resize_backgrounds({"phantom": _phantom(128)}, 96)


def test_labels_are_recist_of_masks_and_generation_is_seeded(bgs):
    ds = make_lesion_dataset(6, seed=4, backgrounds=bgs, keep_masks=True, empty_prob=0.0)
    again = make_lesion_dataset(6, seed=4, backgrounds=bgs, empty_prob=0.0)
    np.testing.assert_array_equal(ds.images, again.images)
    assert ds.images.dtype == np.int16 and ds.images.shape == (6, 96, 96)
    assert ds.n_lesions() >= 6 and all(len(p) >= 1 for p in ds.points)
    contrast = []
    for i in range(len(ds)):
        assert 0.66 <= ds.spacing[i, 0] == ds.spacing[i, 1] <= 0.8
        for j, m in enumerate(ds.masks[i]):
            r = mask_to_recist(m, ds.spacing[i])
            np.testing.assert_allclose(ds.points[i][j], r.points)
            assert ds.long_mm[i][j] == pytest.approx(r.long_mm)
            # lesions differ from their surroundings (20-80 HU before blur and noise)
            ring = np.zeros_like(m)
            ys, xs = np.nonzero(m)
            ring[max(ys.min() - 3, 0) : ys.max() + 4, max(xs.min() - 3, 0) : xs.max() + 4] = True
            ring &= ~m & (ds.images[i] > -400)  # tissue around the lesion, not air
            contrast.append(abs(ds.images[i][m].mean() - ds.images[i][ring].mean()))
    assert np.median(contrast) > 15
    # HU: air around the body and soft tissue inside it
    assert ds.images.min() < -900 and -100 < np.median(ds.images[ds.images > -500]) < 150
    boxes = ds.boxes()
    np.testing.assert_allclose(boxes[0][0, :2], ds.points[0][0].min(0) - 5)


def test_empty_images_missing_labels_and_hard_split(bgs):
    empty = make_lesion_dataset(3, seed=1, backgrounds=bgs, empty_prob=1.0)
    assert empty.n_lesions() == 0 and all(b.shape == (0, 4) for b in empty.boxes())
    ds = make_lesion_dataset(30, seed=2, backgrounds=bgs, missing_label_rate=0.5, empty_prob=0.0)
    kept = np.concatenate(ds.labelled)
    assert 0.25 < kept.mean() < 0.75  # about half of the lesions lose their training label
    assert sum(len(ds.train_points(i)) for i in range(len(ds))) == kept.sum()
    hard = make_lesion_dataset(30, seed=2, split="hard", backgrounds=bgs, empty_prob=0.0)
    easy = make_lesion_dataset(30, seed=2, split="easy", backgrounds=bgs, empty_prob=0.0)
    small = np.concatenate(hard.long_mm) < 7
    assert small.mean() > 0.3 and np.median(np.concatenate(hard.long_mm)) < np.median(
        np.concatenate(easy.long_mm)
    )
    both = LesionDataset.concat([hard, easy.subset([0, 1])])
    assert len(both) == 32 and both.points[31] is easy.points[1]


def test_dicom_reading_and_backgrounds(tmp_path, bgs):
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    hu, spacing = read_dicom_slice(path)
    raw = pydicom.dcmread(path)
    np.testing.assert_allclose(spacing, [0.661468, 0.661468])
    np.testing.assert_array_equal(hu, raw.pixel_array.astype(np.float32) - 1024)
    del raw.PixelSpacing
    raw.save_as(tmp_path / "nospacing.dcm")
    with pytest.raises(ValueError, match="PixelSpacing"):
        read_dicom_slice(tmp_path / "nospacing.dcm")
    save_backgrounds(tmp_path / "bg.npz", bgs)
    back = load_backgrounds(tmp_path / "bg.npz")
    np.testing.assert_allclose(back["phantom"][0], np.rint(bgs["phantom"][0]))
    np.testing.assert_array_equal(back["phantom"][1], bgs["phantom"][1])
    w = window_hu(np.array([-1000.0, -160, 40, 240, 3000]))
    np.testing.assert_allclose(w, [0, 0, 0.5, 1, 1])


def test_bad_inputs(bgs):
    with pytest.raises(ValueError, match="split"):
        make_lesion_dataset(2, split="medium", backgrounds=bgs)
    with pytest.raises(ValueError, match="missing_label_rate"):
        make_lesion_dataset(2, missing_label_rate=1.5, backgrounds=bgs)
    with pytest.raises(ValueError, match="n_images"):
        make_lesion_dataset(0, backgrounds=bgs)
    with pytest.raises(ValueError, match="window"):
        window_hu(np.zeros(3), (10, -10))
