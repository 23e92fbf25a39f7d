"""nnU-Net plans -> constructor arguments of the networks in `networks.nets`.

`PLANS` holds the three "3d_fullres" plans of the paper (copied from the authors' release), so code
and tests need no file; `from_nnunet_plans` reads any nnU-Net v2 plans json (plus, optionally, its
dataset.json for the channel and class counts).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Union

__all__ = ["PLANS", "plan_kwargs", "from_nnunet_plans"]

PathLike = Union[str, "os.PathLike[str]"]

_S = [3, 3, 3]
PLANS: Dict[str, Dict[str, Any]] = {
    "synapse": {
        "in_channels": 1,
        "out_channels": 14,
        "patch_size": [48, 192, 192],
        "kernel_size": [[1, 3, 3], _S, _S, _S, _S, _S],
        "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
    },
    "acdc": {
        "in_channels": 1,
        "out_channels": 4,
        "patch_size": [14, 256, 224],
        "kernel_size": [[1, 3, 3], [1, 3, 3], _S, _S, _S, _S],
        "strides": [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 2]],
    },
    "brain_tumour": {
        "in_channels": 4,
        "out_channels": 4,
        "patch_size": [128, 128, 128],
        "kernel_size": [_S] * 6,
        "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5,
    },
}


def plan_kwargs(name: str) -> Dict[str, Any]:
    """Constructor keyword arguments (spatial_dims, in/out_channels, kernel_size, strides) of a stored plan."""
    if name not in PLANS:
        raise KeyError(f"unknown plan {name!r}; choose one of {sorted(PLANS)}")
    plan = PLANS[name]
    return {"spatial_dims": 3, **{k: plan[k] for k in ("in_channels", "out_channels", "kernel_size", "strides")}}


def from_nnunet_plans(
    plans_json: PathLike, dataset_json: Optional[PathLike] = None, configuration: str = "3d_fullres"
) -> Dict[str, Any]:
    """Read an nnU-Net v2 plans file into constructor kwargs plus ``patch_size``.

    Accepts a full ``nnUNetPlans.json`` (the ``configuration`` entry is used) or a single
    configuration dict as in the paper's release. ``filters`` follows UNet_base_num_features and
    unet_max_num_features. With ``dataset_json``, ``in_channels`` (len(channel_names)) and
    ``out_channels`` (len(labels)) are added.
    """
    with open(plans_json) as f:
        plans = json.load(f)
    cfg = plans.get("configurations", {}).get(configuration, plans)
    kernels, strides = cfg["conv_kernel_sizes"], cfg["pool_op_kernel_sizes"]
    base = cfg.get("UNet_base_num_features", 32)
    cap = cfg.get("unet_max_num_features", 320)
    out: Dict[str, Any] = {
        "spatial_dims": len(cfg["patch_size"]),
        "kernel_size": kernels,
        "strides": strides,
        "filters": [min(base * 2**s, cap) for s in range(len(kernels))],
        "patch_size": list(cfg["patch_size"]),
    }
    if dataset_json is not None:
        with open(dataset_json) as f:
            ds = json.load(f)
        out["in_channels"] = len(ds.get("channel_names", ds.get("modality", {})))
        out["out_channels"] = len(ds["labels"])
    return out
