"""The bundles feed the network the array nnU-Net's preprocessing would, and map predictions back exactly.

nnU-Net v2 (the authors' fork) reads a NIfTI with SimpleITK: the array is the file's voxel axes reversed, never
reoriented (its NibabelIO does ``get_fdata().transpose((2, 1, 0))`` to match), then ``transpose_forward``,
crop to the nonzero bounding box, normalization, resampling to the plan's spacing. That is emulated here with
nibabel and compared with the bundle's own ``preprocessing`` (synapse_segmamba's inference.json) on the real CT
of tests/data and on LPS and oblique versions of it written at test time.
"""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from monai.transforms import Invertd

from networks.bundle import ToNNUNetAxesd, nnunet_axes

REPO = Path(__file__).resolve().parent.parent
CT = REPO / "tests" / "data" / "abdomen_ct_example" / "abdomen_ct.nii.gz"
BUNDLE = REPO / "bundles" / "synapse_segmamba"
STATS = json.loads((REPO / "networks" / "bundle_gen" / "plans" / "synapse_intensity.json").read_text())
TRANSPOSE_FORWARD = json.loads((REPO / "networks" / "bundle_gen" / "datasets" / "synapse.json").read_text())[
    "transpose_forward"]


def nnunet_preprocess(path, target_spacing, out_shape=None):
    """nnU-Net's DefaultPreprocessor on one CT channel, reading as SimpleITKIO does; resampling linear onto
    ``out_shape`` with the corner voxels' centres kept (the grid MONAI's Spacingd makes; nnU-Net itself
    resamples with cubic splines)."""
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32).transpose(2, 1, 0)[None]  # SimpleITK's array
    spacing = np.sqrt((img.affine[:3, :3] ** 2).sum(0))[::-1]                  # SimpleITK's spacing, reversed
    data = data.transpose([0, *[a + 1 for a in TRANSPOSE_FORWARD]])
    spacing = spacing[TRANSPOSE_FORWARD]
    nz = np.nonzero(data[0] != 0)
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in nz)
    data = data[(slice(None), *box)]
    s = STATS["foreground_intensity_properties_per_channel"]["0"]
    data = (np.clip(data, s["percentile_00_5"], s["percentile_99_5"]) - s["mean"]) / s["std"]
    expected_shape = [int(round(n * a / b)) for n, a, b in zip(data.shape[1:], spacing, target_spacing)]
    if out_shape is not None and tuple(out_shape) != data.shape[1:]:
        data = F.interpolate(torch.from_numpy(data)[None], size=tuple(out_shape), mode="trilinear",
                             align_corners=True)[0].numpy()
    return data, expected_shape


def bundle_preprocessing(pixdim):
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser.update({"pixdim": list(pixdim)})
    return parser.get_parsed_content("preprocessing")


def _variant(kind, tmp_path):
    """The CT as stored (RAS), its LPS version (the same image, voxels stored in another order) or an oblique
    one (rotated grid, same voxels)."""
    img = nib.load(str(CT))
    data, affine = np.asarray(img.dataobj), img.affine.copy()
    if kind == "lps":
        data = data[::-1, ::-1]
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:2, 3] = [data.shape[0] - 1, data.shape[1] - 1]
        affine = affine @ flip
    elif kind == "oblique":
        t = 0.4
        rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
        affine[:3, :3] = rot @ affine[:3, :3]
    path = tmp_path / f"ct_{kind}.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), str(path))
    return path


def test_nnunet_axes():
    assert nnunet_axes([0, 1, 2]) == (2, 1, 0)  # SimpleITK's order
    assert nnunet_axes([2, 0, 1]) == (0, 2, 1)  # then transpose_forward
    with pytest.raises(ValueError, match="permutation"):
        nnunet_axes([0, 0, 1])
    with pytest.raises(ValueError, match="spatial axes"):
        ToNNUNetAxesd("image")({"image": torch.zeros(1, 4, 5)})


@pytest.mark.parametrize("kind", ["ras", "lps", "oblique"])
def test_network_input_is_nnunets_array(kind, tmp_path):
    """At the file's own spacing (no resampling) the bundle's array IS nnU-Net's, value for value."""
    path = _variant(kind, tmp_path)
    spacing = nib.load(str(path)).header.get_zooms()[:3][::-1]
    out = bundle_preprocessing(spacing)({"image": str(path)})["image"]
    want, _ = nnunet_preprocess(path, spacing)
    assert tuple(out.shape) == want.shape
    np.testing.assert_allclose(out.numpy(), want, atol=2e-5)
    if kind == "lps":  # no reorientation: the network sees the LPS file's voxel order, as nnU-Net does
        ras = nnunet_preprocess(CT, spacing)[0]
        assert not np.allclose(want, ras) and np.allclose(want, ras[:, :, ::-1, ::-1])


@pytest.mark.parametrize("kind", ["ras", "lps"])
def test_resampled_input_follows_nnunets_axes(kind, tmp_path):
    """Resampled to a plan-like anisotropic spacing (given in nnU-Net's order): each axis gets its own spacing."""
    path = _variant(kind, tmp_path)
    target = [3.0, 1.5, 1.0]  # axis 0 is the file's slice axis; integer zoom factors keep the grids aligned
    out = bundle_preprocessing(target)({"image": str(path)})["image"]
    want, nnunet_shape = nnunet_preprocess(path, target, out_shape=out.shape[1:])
    # nnU-Net resizes the extent n * spacing (round(n * zoom) voxels), MONAI keeps the corner voxels' centres
    # ((n - 1) * zoom + 1): the sizes differ by less than the zoom factor, on the same axes
    zoom = [3.0 / t for t in target]
    assert all(0 <= b - a < z for a, b, z in zip(out.shape[1:], nnunet_shape, zoom)), (out.shape, nnunet_shape)
    np.testing.assert_allclose(out.numpy(), want, atol=1e-4)
    spacing = np.sqrt((np.asarray(out.affine)[:3, :3] ** 2).sum(0))
    np.testing.assert_allclose(spacing, target, rtol=1e-6)


@pytest.mark.parametrize("kind", ["ras", "lps", "oblique"])
def test_prediction_returns_to_the_input_grid(kind, tmp_path):
    """A 'prediction' made in the network's space (here: a threshold of its input) comes back, by the bundle's
    Invertd, on the input file's exact grid and voxel order."""
    path = _variant(kind, tmp_path)
    img = nib.load(str(path))
    spacing = img.header.get_zooms()[:3][::-1]
    pre = bundle_preprocessing(spacing)
    d = pre({"image": str(path)})
    x = d["image"]
    d["pred"] = torch.cat([x <= 0, x > 0]).float()  # 2 "classes", in the network's voxel order
    d["pred"] = type(x)(d["pred"], meta=x.meta)
    back = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False)(d)["pred"]
    assert tuple(back.shape[1:]) == img.shape
    np.testing.assert_allclose(np.asarray(back.affine), img.affine, atol=1e-4)
    s = STATS["foreground_intensity_properties_per_channel"]["0"]
    data = np.asarray(img.dataobj, dtype=np.float32)
    inside = np.clip(data, s["percentile_00_5"], s["percentile_99_5"]) > s["mean"]
    nz = np.nonzero(data != 0)
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in nz)
    want = np.zeros_like(inside)
    want[box] = inside[box]
    assert np.array_equal(back.numpy().argmax(0).astype(bool), want)
