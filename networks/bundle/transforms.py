"""Small MONAI-style transforms used by the bundle configs."""

from __future__ import annotations

from typing import Hashable, Mapping, Optional, Sequence, Union

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import ensure_tuple

__all__ = ["nonzero", "labels_to_regions", "LabelsToRegionsd"]


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
