"""Generate the twelve MONAI bundles ``bundles/<dataset>_<variant>/`` from one spec per dataset.

``python -m networks.bundle_gen`` (``make bundles``) rewrites every generated file; ``--check`` only
compares and exits non-zero listing the files that drifted (used by the tests).

Sources (all in this package):

* ``datasets/<dataset>.json``: the per-dataset template (scored regions, paper table columns and results,
  the plans' ``transpose_forward``, defaults such as ``dataset_dir``);
* ``plans/``: copies of the reference nnU-Net plans, dataset and intensity files of the paper's release,
  from which every plan value (patch, spacing, kernels, strides, batch size, channels, classes, filters,
  normalization, deep-supervision weights, rotation axes) is derived here, never written twice;
* ``templates/``: the bundle files shared by all datasets and variants, with ``{{name}}`` placeholders
  (a JSON string ``"{{name}}"`` becomes the value, ``"{{*name}}"`` in a list is spliced in).

Axis convention: ONE order, nnU-Net's. nnU-Net reads an image with SimpleITK (array axes = the file's voxel
axes (i, j, k) reversed, no reorientation), applies the plans' ``transpose_forward`` (identity in the release's
``nnUNetPlans.json`` of all three datasets, copied into ``datasets/<dataset>.json``) and its plan lists are in
that order. The bundles load with MONAI (array (i, j, k)) and then permute to exactly that array
(``networks.bundle.ToNNUNetAxesd``, inverted for evaluation and inference), so every per-axis list of a
bundle config (patch, spacing, kernels, strides, rotation, ``spatial_shape``) is the plan's list unchanged,
and the Mamba layers flatten the volume in the authors' token order.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

__all__ = ["DATASETS", "VARIANTS", "bundle_names", "context", "render_bundle", "generate", "check", "main"]

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
REPO_ROOT = HERE.parent.parent
DEFAULT_OUT = REPO_ROOT / "bundles"

DATASETS = ("brats", "synapse", "acdc")
VARIANTS: Dict[str, Tuple[str, str]] = {
    "segmamba": ("SegMamba", "a unidirectional Mamba layer after every encoder stage"),
    "bisegmamba": ("BiSegMamba", "a bidirectional Mamba layer after every encoder stage"),
    "multisegmamba": ("MultiSegMamba", "a multi-directional Mamba layer (4 axis orders, both directions) after every encoder stage"),
    "segmambaskip": ("SegMambaSkip", "a bidirectional Mamba layer on every skip connection"),
}
# Versions written to metadata.json (the versions the bundles were developed and tested with). Constants,
# not read from the environment, so that the generated files do not depend on where they are generated.
VERSIONS = {
    "monai_version": "1.6.1", "pytorch_version": "2.13.0", "numpy_version": "2.4.6", "nibabel_version": "5.4.2",
    "ignite_version": "0.5.5", "scipy_version": "1.17.1", "tensorboard_version": "2.21.0", "fire_version": "0.7.1",
    "pydicom_version": "3.0.2",
}
# What the TorchScript export costs, measured once (`docs/README.md`, "Export to TorchScript").
EXPORT_COST = (
    "measured once (`python -m bench.bench_export`) for BiSegMamba with the Synapse plan on a 1 x 1 x 16 x 64 x 64 "
    "input, best of 2 runs after a warm-up, on a 2-core CPU shared with other jobs: scripted 173 s, eager on the "
    "same `torch` scan 92 s, eager with the fused CPU kernels 10.9 s, i.e. about 16x slower than the default eager "
    "CPU path; the scripted output equalled the eager `torch` output exactly"
)
TEXT_FILES = ("configs/logging.conf", "docs/README.md", "docs/data_license.txt", "LICENSE")
JSON_FILES = ("configs/train.json", "configs/evaluate.json", "configs/inference.json",
              "configs/multi_gpu_train.json", "configs/metadata.json")
ANISO_THRESHOLD = 3  # nnU-Net: "dummy 2D" augmentation when max(patch) / patch[0] > 3


def bundle_names() -> List[str]:
    return [f"{d}_{v}" for d in DATASETS for v in VARIANTS]


def _load(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def ds_weights(n_outputs: int) -> List[float]:
    """nnU-Net deep-supervision weights: 1/2^i, the lowest-resolution output 0, normalized to sum 1."""
    w = [1.0 / 2**i for i in range(n_outputs)]
    if n_outputs > 1:
        w[-1] = 0.0
    s = sum(w)
    return [round(x / s, 10) for x in w]


def normalize_transform(plan: Dict[str, Any], intensity: Dict[str, Any]) -> Tuple[Dict[str, Any], str]:
    """nnU-Net's normalization of the plan as one MONAI transform, with a one-line description."""
    schemes, masks = plan["normalization_schemes"], plan["use_mask_for_norm"]
    if len(set(schemes)) != 1 or len(set(masks)) != 1:
        raise ValueError(f"mixed normalization schemes {schemes} / masks {masks} are not supported")
    if schemes[0] == "CTNormalization":
        if len(schemes) != 1:
            raise ValueError("CT normalization is implemented for one channel")
        s = intensity["foreground_intensity_properties_per_channel"]["0"]
        lo, hi, mean, std = s["percentile_00_5"], s["percentile_99_5"], s["mean"], s["std"]
        return ({"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": lo, "a_max": hi,
                 "b_min": (lo - mean) / std, "b_max": (hi - mean) / std, "clip": True},
                f"as nnU-Net's CT scheme: clip to the dataset's foreground 0.5/99.5 percentiles [{lo:g}, {hi:g}] "
                f"then z-score with its foreground mean {mean:.2f} and std {std:.2f} (one `ScaleIntensityRanged`)")
    if schemes[0] == "ZScoreNormalization":
        nonzero = bool(masks[0])
        return ({"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": nonzero, "channel_wise": True},
                "per image and channel z-score" + (" within the nonzero mask (outside stays 0)" if nonzero else ""))
    raise ValueError(f"unsupported normalization scheme {schemes[0]}")


QUICK_FILTERS = (8, 80)  # first stage's channels, cap: the demo's reduced network (filters 8-80)
QUICK_RUN = "--max_epochs 2 --epoch_length 10 --val_interval 1 --val_max_cases 1"


def quick_trial(quick: Dict[str, Any], divisors: List[int], n_stages: int) -> Dict[str, Any]:
    """The "Quick trial on a CPU" overrides of one dataset: coarser spacing, smaller patch and network.

    The patch must be a multiple of the strides' product per axis (checked here, so that a spec edit cannot
    publish a command that fails)."""
    patch, pixdim = list(quick["patch_size"]), list(quick["pixdim"])
    bad = [a for a in range(3) if patch[a] % divisors[a]]
    if bad:
        raise ValueError(f"quick_trial patch {patch} is not a multiple of the strides' product {divisors} on axes {bad}")
    filters = [min(QUICK_FILTERS[0] * 2**s, QUICK_FILTERS[1]) for s in range(n_stages)]

    def arg(x: List[Any]) -> str:
        return '"' + json.dumps(x).replace(" ", "") + '"'

    network = f"--pixdim {arg(pixdim)} --patch_size {arg(patch)} --filters {arg(filters)}"
    return {"quick_pixdim": pixdim, "quick_patch_size": patch, "quick_filters": filters,
            "quick_network_args": network, "quick_run_args": QUICK_RUN}


def context(dataset: str, variant: str) -> Dict[str, Any]:
    """Every placeholder value of one bundle."""
    spec = _load(HERE / "datasets" / f"{dataset}.json")
    stem = spec["plans"]
    plan = _load(HERE / "plans" / f"{stem}.json")
    ds = _load(HERE / "plans" / f"{stem}_dataset.json")
    intensity = _load(HERE / "plans" / f"{stem}_intensity.json")
    cls, summary = VARIANTS[variant]

    patch, spacing = plan["patch_size"], plan["spacing"]
    kernels, strides = plan["conv_kernel_sizes"], plan["pool_op_kernel_sizes"]
    base, cap = plan.get("UNet_base_num_features", 32), plan.get("unet_max_num_features", 320)
    filters = [min(base * 2**s, cap) for s in range(len(kernels))]
    divisors = [math.prod(s[a] for s in strides) for a in range(3)]
    dummy_2d = max(patch) / patch[0] > ANISO_THRESHOLD
    # MONAI RandRotated: range_x rotates in the plane of array axes (1, 2), i.e. about axis 0, which is the
    # plan's axis 0 (the low-resolution one): nnU-Net's dummy-2D rotation of +-180 degrees in-plane.
    rotate_range = [math.pi, 0.0, 0.0] if dummy_2d else [math.pi / 6] * 3
    channels = [ds["channel_names"][k] for k in sorted(ds["channel_names"], key=int)]
    labels = {int(v): k for k, v in ds["labels"].items()}
    norm, norm_note = normalize_transform(plan, intensity)
    transpose_forward = [int(a) for a in spec["transpose_forward"]]
    voxel_order = {"_target_": "networks.bundle.ToNNUNetAxesd", "keys": ["image", "label"],
                   "transpose_forward": transpose_forward, "allow_missing_keys": True}
    regions = {name: labs for name, labs in spec["regions"]}
    n_ds = len(strides) - 1
    title = f"{spec['title'].split(' (')[0]} {cls}"

    def fmt(x: Any) -> str:
        return json.dumps(x).replace(", ", ",")

    ctx: Dict[str, Any] = {
        **VERSIONS,
        "bundle_name": f"{dataset}_{variant}", "bundle_title": title, "dataset_title": spec["title"],
        "variant_class": cls, "variant_summary": summary, "plans": stem, "prepare": spec["prepare"],
        "dataset_dir": spec["dataset_dir"], "val_interval": spec["val_interval"], "cache_rate": spec["cache_rate"],
        "batch_size": plan["batch_size"], "in_channels": len(channels), "num_classes": len(labels),
        "patch_size": list(patch), "pixdim": list(spacing),
        "kernel_size": [list(k) for k in kernels], "strides": [list(s) for s in strides], "filters": filters,
        "ds_weights": ds_weights(n_ds), "num_ds": n_ds, "rotate_range": rotate_range, "regions": regions,
        "normalize": norm, "voxel_order": voxel_order, "channel_names": channels,
        "paper_columns": spec["paper_columns"], "paper_table": spec["paper_table"],
        "paper_result": spec["paper_results"][variant], "data_source": spec["data_source"],
        "scoring_note": spec["scoring_note"], "batch_note": spec.get("batch_note", ""), "modality": spec["modality"], "image_format": spec["image_format"],
        # twice the strides' product per axis: the smallest input whose bottleneck has more than one voxel
        # (InstanceNorm in training mode needs it, and verify_net_in_out runs the network in training mode)
        "spatial_shape": [f"{2 * d}*n" for d in divisors],
        "channel_def": {str(i): c for i, c in enumerate(channels)},
        "label_def": {str(i): labels[i] for i in sorted(labels)},
        "image_classes": f"{len(channels)} channel(s): " + ", ".join(channels)
                         + f"; resampled to {list(spacing)} mm (nnU-Net's axis order)",
        "label_classes": ", ".join(f"{i} {labels[i]}" for i in sorted(labels)),
        "task": f"{spec['title']} segmentation with {cls}",
        "description": f"{cls} ({summary}) trained with the nnU-Net 3d_fullres recipe of the paper on {spec['title']}; "
                       f"scored on {', '.join(regions)}.",
    }
    ctx.update({
        "plan_patch_size": fmt(patch), "plan_spacing": fmt(spacing), "plan_kernels": fmt(kernels),
        "plan_strides": fmt(strides), "orientation_note": spec["orientation_note"],
        "transpose_forward": fmt(transpose_forward),
        "normalization_note": norm_note,
        "rotation_note": ("about the low-resolution axis only (nnU-Net's dummy-2D augmentation for this anisotropic "
                          "patch), up to +-180 degrees" if dummy_2d else "up to +-30 degrees about every axis"),
        "region_list": ", ".join(f"{n} = labels {{{','.join(map(str, l))}}}" for n, l in regions.items()),
        "paper_columns_text": ", ".join(f"`{c}`" for c in spec["paper_columns"]),
        "label_text": ", ".join(f"{i} {labels[i]}" for i in sorted(labels)),
        "data_reference": spec["data_reference"], "data_license_text": "\n".join(spec["data_license"]),
        "export_cost": EXPORT_COST,
        "expected_input": f"a 3D {spec['modality']} volume with {len(channels)} channel(s) ({', '.join(channels)})"
                          + (" as one 4D NIfTI or one file per channel" if len(channels) > 1 else ""),
    })
    ctx.update(quick_trial(spec["quick_trial"], divisors, len(kernels)))
    ctx["inference_cost"] = spec["inference_cost"]
    for k in ("patch_size", "pixdim", "kernel_size", "strides", "filters", "ds_weights"):
        ctx.setdefault(f"{k}_text", fmt(ctx[k]))
    return ctx


_WHOLE = re.compile(r"^\{\{(\*?)(\w+)\}\}$")
_PART = re.compile(r"\{\{(\w+)\}\}")


def _text(ctx: Dict[str, Any], s: str, where: str) -> str:
    def sub(m: "re.Match[str]") -> str:
        if m.group(1) not in ctx:
            raise KeyError(f"{where}: unknown placeholder {m.group(0)}")
        v = ctx[m.group(1)]
        return v if isinstance(v, str) else json.dumps(v).replace(", ", ",")
    return _PART.sub(sub, s)


def _render(node: Any, ctx: Dict[str, Any], where: str) -> Any:
    if isinstance(node, dict):
        return {_text(ctx, k, where): _render(v, ctx, where) for k, v in node.items()}
    if isinstance(node, list):
        out: List[Any] = []
        for item in node:
            m = _WHOLE.match(item) if isinstance(item, str) else None
            if m and m.group(1):
                if m.group(2) not in ctx:
                    raise KeyError(f"{where}: unknown placeholder {item}")
                out.extend(ctx[m.group(2)])
            else:
                out.append(_render(item, ctx, where))
        return out
    if isinstance(node, str):
        m = _WHOLE.match(node)
        if m:
            if m.group(2) not in ctx:
                raise KeyError(f"{where}: unknown placeholder {node}")
            return ctx[m.group(2)]
        return _text(ctx, node, where)
    return node


def dumps(node: Any) -> str:
    """JSON text as the model zoo's pre-commit hook ``pretty-format-json --indent=4 --no-sort-keys`` writes
    it (``json.dumps`` with indent 4 and ASCII escapes, keys in their given order), without the final newline."""
    return json.dumps(node, indent=4, ensure_ascii=True)


def render_bundle(dataset: str, variant: str) -> Dict[str, str]:
    """Relative path -> file content of one bundle."""
    ctx = context(dataset, variant)
    files: Dict[str, str] = {}
    for rel in JSON_FILES:
        tpl = _load(TEMPLATES / rel)
        files[rel] = dumps(_render(tpl, ctx, rel)) + "\n"
    for rel in TEXT_FILES:
        src = (TEMPLATES / rel).read_text()
        files[rel] = _text(ctx, src, rel) if rel != "LICENSE" else src
    return files


def _all_files(names: Optional[Iterable[str]] = None) -> Dict[str, str]:
    wanted = set(names) if names else None
    out: Dict[str, str] = {}
    for d in DATASETS:
        for v in VARIANTS:
            name = f"{d}_{v}"
            if wanted is None or name in wanted:
                for rel, text in render_bundle(d, v).items():
                    out[f"{name}/{rel}"] = text
    return out


def generate(out_dir: Optional[str] = None, names: Optional[Iterable[str]] = None) -> List[str]:
    """Write the generated files under ``out_dir`` (default: the repository's ``bundles/``); returns their paths."""
    root = Path(out_dir) if out_dir else DEFAULT_OUT
    written = []
    for rel, text in _all_files(names).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
        written.append(str(path))
    return written


def check(out_dir: Optional[str] = None) -> List[str]:
    """Generated files under ``out_dir`` that are missing or differ from what the generator writes."""
    root = Path(out_dir) if out_dir else DEFAULT_OUT
    return [rel for rel, text in _all_files().items()
            if not (root / rel).is_file() or (root / rel).read_text() != text]


def main(out_dir: Optional[str] = None, check_only: bool = False) -> None:
    """Generate the bundles (``--check_only`` to only report drift, exit 1 on drift)."""
    if check_only:
        drift = check(out_dir)
        if drift:
            print("generated bundle files out of date (run `make bundles`):\n  " + "\n  ".join(drift), file=sys.stderr)
            sys.exit(1)
        print(f"all {len(_all_files())} generated bundle files are up to date")
        return
    files = generate(out_dir)
    print(f"wrote {len(files)} files for {len(bundle_names())} bundles under {Path(out_dir) if out_dir else DEFAULT_OUT}")
