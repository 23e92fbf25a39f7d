"""Synthetic demo data and the overlay picture."""

import os

import nibabel as nib
import numpy as np
import pytest

from networks.data import load_fold, load_test
from networks.demo.figure import save_overlay
from networks.demo.synthetic import DATASETS, make_dataset

CT = os.path.join(os.path.dirname(__file__), "data", "abdomen_ct_example")


@pytest.mark.parametrize("dataset,channels,labels", [("synapse", 1, {0, 1, 2, 3, 4, 6, 7, 8, 11}), ("acdc", 1, {0, 1, 2, 3}), ("brats", 4, {0, 1, 2, 3})])
def test_synthetic_dataset_layout(tmp_path, dataset, channels, labels):
    path = make_dataset(dataset, str(tmp_path), n_cases=5, n_test=2, seed=1, shape=(32, 32, 16))
    train, val = load_fold(path, 0)
    assert len(train) == 4 and len(val) == 1 and len(load_test(path)) == 2
    img = nib.load(val[0]["image"])
    lab = nib.load(val[0]["label"])
    assert img.shape[:3] == lab.shape == (32, 32, 16)
    assert (img.shape[3] if img.ndim == 4 else 1) == channels
    np.testing.assert_allclose(img.affine, lab.affine)
    np.testing.assert_allclose(lab.header.get_zooms()[:3], DATASETS[dataset]["spacing"])
    assert set(np.unique(np.asarray(lab.dataobj)).tolist()) <= labels
    assert len(set(np.unique(np.asarray(lab.dataobj)).tolist())) >= len(labels) - 1


def test_synthetic_dataset_is_deterministic_and_varied(tmp_path):
    a = make_dataset("synapse", str(tmp_path / "a"), n_cases=5, n_test=1, seed=3)
    b = make_dataset("synapse", str(tmp_path / "b"), n_cases=5, n_test=1, seed=3)
    la = [np.asarray(nib.load(it["label"]).dataobj) for it in load_fold(a, 0)[0]]
    lb = [np.asarray(nib.load(it["label"]).dataobj) for it in load_fold(b, 0)[0]]
    assert all((x == y).all() for x, y in zip(la, lb))
    assert not (la[0] == la[1]).all()  # cases differ


def test_synthetic_rejects_unknown_dataset(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'kidney'"):
        make_dataset("kidney", str(tmp_path))


def test_overlay_png(tmp_path):
    image, label = os.path.join(CT, "abdomen_ct.nii.gz"), os.path.join(CT, "abdomen_ct_label.nii.gz")
    out = save_overlay(image, label, label, str(tmp_path / "overlay.png"), {6: "liver"})
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in os.listdir(tmp_path) if ".part" in p]


def test_overlay_rejects_label_off_grid(tmp_path):
    image = os.path.join(CT, "abdomen_ct.nii.gz")
    bad = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), str(bad))
    with pytest.raises(ValueError, match="not on the image's grid"):
        save_overlay(image, str(bad), None, str(tmp_path / "o.png"))
    assert not os.path.exists(tmp_path / "o.png")
