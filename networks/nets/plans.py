"""nnU-Net plans -> constructor arguments of the networks in `networks.nets`.

`PLANS` holds the three "3d_fullres" plans of the paper, read from the copies of the authors' release
packaged in ``networks/bundle_gen/plans/`` (the bundles are generated from the same files); `from_nnunet_plans` reads any nnU-Net v2 plans json (plus, optionally, its
dataset.json for the channel and class counts).

Axis order: every per-axis list (``kernel_size``, ``strides``, ``patch_size``) is the plan's own, nnU-Net's
order (the file's voxel axes reversed, then ``transpose_forward``); the bundles present the volume to the
network in that same order (``networks.bundle.ToNNUNetAxesd``), so these kwargs and the bundle configs agree.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Union

__all__ = ["PLANS", "plan_kwargs", "from_nnunet_plans"]

PathLike = Union[str, "os.PathLike[str]"]

# The paper's plans, as packaged with the bundle generator (copies of the authors' release).
PLANS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle_gen", "plans")
PLAN_NAMES = ("synapse", "acdc", "brain_tumour")


def _stored_plan(name: str) -> Dict[str, Any]:
    kw = from_nnunet_plans(os.path.join(PLANS_DIR, f"{name}.json"), os.path.join(PLANS_DIR, f"{name}_dataset.json"))
    return {k: kw[k] for k in ("in_channels", "out_channels", "patch_size", "kernel_size", "strides")}


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


PLANS: Dict[str, Dict[str, Any]] = {name: _stored_plan(name) for name in PLAN_NAMES}
