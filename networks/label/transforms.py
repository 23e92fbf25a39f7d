"""Transforms that keep the bundles' configs usable by MONAI Label as well as by ``monai.bundle run``."""

from __future__ import annotations

from typing import Any, Dict, Hashable, Mapping

from monai.transforms import Spacingd as _Spacingd

__all__ = ["Spacingd"]


class Spacingd(_Spacingd):
    """MONAI's ``Spacingd``, except that entries ``<key>_*`` that are not dicts are left alone.

    MONAI 1.6's ``Spacingd`` updates every ``<key>_*`` entry of the data as a metadata dict when the image is
    a NIfTI file; MONAI Label puts the request's image path in ``image_path`` (a string), on which that fails
    with ``AttributeError: 'str' object has no attribute 'update'``. Those entries are set aside for the call.
    """

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> Dict[Hashable, Any]:
        d = dict(data)
        aside = {k: d.pop(k) for k in list(d) if isinstance(k, str) and not isinstance(d[k], dict)
                 and any(k.startswith(f"{key}_") for key in self.keys)}
        out = super().__call__(d, lazy=lazy)
        out.update(aside)
        return out
