"""Small MONAI-style transforms used by the bundle configs (nnU-Net's voxel order, nonzero mask, scored regions)."""

from __future__ import annotations

from typing import Hashable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform
from monai.transforms.spatial.functional import orientation
from monai.utils import ensure_tuple

__all__ = ["nonzero", "labels_to_regions", "LabelsToRegionsd", "nnunet_axes", "ToNNUNetAxes", "ToNNUNetAxesd"]


def nonzero(x):
    """``x != 0``: nnU-Net's crop-to-nonzero mask (MONAI's default ``x > 0`` would crop CT's negative HU).

    A named function rather than a config lambda so that transforms stay picklable (spawned workers)."""
    return x != 0


def labels_to_regions(label: torch.Tensor, regions: Sequence[Sequence[int]]) -> torch.Tensor:
    """(1, *spatial) label map -> (len(regions), *spatial) float tensor, channel r = label in regions[r].

    A region is a list of label values: a single organ ``[8]`` or a union such as BrainTumour's
    whole tumour ``[1, 2, 3]``. Metadata of a MetaTensor input is kept.
    """
    if label.shape[0] != 1:
        raise ValueError(f"expected a label map with one channel, got shape {tuple(label.shape)}")
    lab = label[0]
    plain = lab.as_tensor() if isinstance(lab, MetaTensor) else torch.as_tensor(lab)
    out = torch.stack([torch.isin(plain, torch.as_tensor(list(r), device=plain.device, dtype=plain.dtype))
                       for r in regions]).to(torch.float32)
    if isinstance(label, MetaTensor):
        out = MetaTensor(out, meta=dict(label.meta))
    return out


class LabelsToRegionsd(MapTransform):
    """Dictionary version of :func:`labels_to_regions` (e.g. for ``pred`` after argmax and ``label``).

    ``names``: output keys, one per key (default: replace in place). In an engine's postprocessing a NEW key
    lands in ``engine.state.output`` (where metrics look), a batch key stays in ``engine.state.batch``.
    """

    def __init__(self, keys: KeysCollection, regions: Union[Sequence[Sequence[int]], Mapping[str, Sequence[int]]],
                 names: Optional[KeysCollection] = None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.regions = [list(r) for r in (regions.values() if isinstance(regions, Mapping) else regions)]
        self.names = list(self.keys) if names is None else list(ensure_tuple(names))
        if len(self.names) != len(self.keys):
            raise ValueError(f"names {self.names} must match keys {list(self.keys)} one to one")

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key, name in self.key_iterator(d, self.names):
            d[name] = labels_to_regions(d[key], self.regions)
        return d


def nnunet_axes(transpose_forward: Sequence[int] = (0, 1, 2)) -> Tuple[int, ...]:
    """Spatial permutation taking MONAI's reader array (i, j, k) to the array nnU-Net's network sees.

    MONAI's readers (nibabel for NIfTI, ITK / pydicom for DICOM) return the file's voxel axes (i, j, k);
    nnU-Net v2's default reader (``SimpleITKIO``; its ``NibabelIO`` transposes to match) returns them reversed,
    (k, j, i), and its preprocessing then applies the plan's ``transpose_forward``. Output axis ``a`` is
    input axis ``perm[a]``. With the identity ``transpose_forward`` of the paper's three plans: (2, 1, 0).
    """
    tf = tuple(int(a) for a in transpose_forward)
    if sorted(tf) != list(range(len(tf))):
        raise ValueError(f"transpose_forward must be a permutation of {tuple(range(len(tf)))}, got {list(tf)}")
    reversed_axes = tuple(range(len(tf) - 1, -1, -1))
    return tuple(reversed_axes[a] for a in tf)


class ToNNUNetAxes(InvertibleTransform):
    """Permute the spatial axes of a channel-first image into nnU-Net's voxel order, affine updated, invertible.

    (C, i, j, k) as MONAI loads it -> (C, *nnU-Net's axes) (:func:`nnunet_axes`): SimpleITK's (k, j, i), then
    the plan's ``transpose_forward``. Only axes are permuted, none is flipped and nothing is resampled, so the
    voxel values and their directions are exactly the ones nnU-Net's preprocessing works on; the affine of a
    MetaTensor gets its columns permuted alike (the image stays where it is in world space), so that
    ``Spacingd`` and ``CropForegroundd`` afterwards work per nnU-Net axis, and ``Invertd`` permutes a
    prediction back to the file's voxel order. MONAI's ``Transpose`` neither updates the affine nor inverts;
    ``Orientation`` could express the permutation but chooses it from axis codes, i.e. from directions, which
    nnU-Net ignores. So the permutation is applied with MONAI's functional ``orientation`` (which records it).

    Args:
        transpose_forward: the nnU-Net plans' ``transpose_forward`` (identity for the paper's three datasets).
    """

    def __init__(self, transpose_forward: Sequence[int] = (0, 1, 2)) -> None:
        self.transpose_forward = [int(a) for a in transpose_forward]
        self.perm = nnunet_axes(self.transpose_forward)

    def _permute(self, img: torch.Tensor, perm: Sequence[int]) -> torch.Tensor:
        if img.ndim - 1 != len(perm):
            raise ValueError(f"expected a channel-first image with {len(perm)} spatial axes, got shape {tuple(img.shape)}")
        # nibabel orientation array: row i = (output axis of input axis i, no flip)
        ornt = np.array([[list(perm).index(i), 1] for i in range(len(perm))], dtype=float)
        img = img if isinstance(img, MetaTensor) else MetaTensor(img)
        # contiguous: later transforms and the channel-first Mamba layers then see a plain (C, *spatial) layout
        return orientation(img, img.affine, ornt, False, self.get_transform_info()).contiguous()

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return self._permute(img, self.perm)

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        self.pop_transform(data)
        inverse = [self.perm.index(a) for a in range(len(self.perm))]
        with self.trace_transform(False):
            return self._permute(data, inverse)


class ToNNUNetAxesd(MapTransform, InvertibleTransform):
    """Dictionary version of :class:`ToNNUNetAxes` (e.g. ``keys=["image", "label"]``)."""

    def __init__(self, keys: KeysCollection, transpose_forward: Sequence[int] = (0, 1, 2),
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = ToNNUNetAxes(transpose_forward)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform.inverse(d[key])
        return d
