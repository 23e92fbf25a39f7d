"""Small synthetic cases shaped like each dataset, for tests and smoke runs of the bundles.

``python -m networks.bundle.synthetic synapse /tmp/synthetic_synapse`` writes ``imagesTr/``, ``labelsTr/``,
``imagesTs/`` and a ``datalist.json`` in the format of ``networks.data.prepare`` (3 cases in 3 folds, 1 test case), plus the test
overrides that make a bundle run in seconds on a CPU (:data:`TINY_OVERRIDES`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Tuple

import nibabel as nib
import numpy as np

__all__ = ["DATASETS", "TINY_OVERRIDES", "tiny_overrides", "make_case", "make_dataset"]

# spacing (mm) and shape along the file's voxel axes (i, j, k), channels, label values, affine kind
DATASETS: Dict[str, Dict[str, Any]] = {
    "synapse": {"spacing": (0.9, 0.9, 2.5), "shape": (40, 30, 8), "channels": 1, "labels": list(range(1, 14)),
                "affine": "lps"},
    "brats": {"spacing": (1.0, 1.0, 1.0), "shape": (36, 30, 28), "channels": 4, "labels": [1, 2, 3], "affine": "ras"},
    "acdc": {"spacing": (1.6, 1.6, 7.0), "shape": (40, 32, 5), "channels": 1, "labels": [1, 2, 3], "affine": "oblique"},
}

# Overrides for a seconds-long CPU run: tiny filters, the smallest patch (in nnU-Net's axis order, like every
# bundle list) the plan's strides allow with a bottleneck of more than one voxel (InstanceNorm in training needs
# it), one epoch of two iterations.
TINY_OVERRIDES: Dict[str, Dict[str, Any]] = {
    "synapse": {"patch_size": [8, 32, 64]},
    "brats": {"patch_size": [32, 32, 64]},
    "acdc": {"patch_size": [4, 32, 64]},
}
COMMON_TINY = {"filters": [4, 8, 8, 8, 8, 8], "max_epochs": 1, "epoch_length": 2, "batch_size": 1, "num_workers": 0,
               "val_interval": 1, "sw_batch_size": 1, "cache_rate": 0.0, "device": "$torch.device('cpu')",
               "amp": False}


def tiny_overrides(dataset: str, **extra: Any) -> Dict[str, Any]:
    return {**COMMON_TINY, **TINY_OVERRIDES[dataset], **extra}


def _affine(kind: str, spacing: Tuple[float, ...], rng: np.random.Generator) -> np.ndarray:
    a = np.diag(list(spacing) + [1.0])
    if kind == "lps":
        a[0, 0], a[1, 1] = -spacing[0], -spacing[1]
    elif kind == "oblique":  # short-axis-like stack: rotated about two axes
        t1, t2 = 0.5, 0.3
        r1 = np.array([[1, 0, 0], [0, np.cos(t1), -np.sin(t1)], [0, np.sin(t1), np.cos(t1)]])
        r2 = np.array([[np.cos(t2), 0, np.sin(t2)], [0, 1, 0], [-np.sin(t2), 0, np.cos(t2)]])
        a[:3, :3] = r2 @ r1 @ np.diag(spacing)
    a[:3, 3] = rng.uniform(-50, 50, 3)
    return a


def _ellipsoid(shape, center, radii) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0


def make_case(dataset: str, seed: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, label, affine) of one synthetic case; image is (X, Y, Z) or (X, Y, Z, C)."""
    cfg = DATASETS[dataset]
    rng = np.random.default_rng(seed)
    shape, labels = cfg["shape"], cfg["labels"]
    label = np.zeros(shape, np.uint8)
    body = _ellipsoid(shape, [s / 2 for s in shape], [s * 0.45 for s in shape])
    # one blob per label along a ring inside the body; later blobs may overlap earlier ones
    for i, lab in enumerate(labels):
        ang = 2 * np.pi * i / len(labels) + rng.uniform(-0.2, 0.2)
        c = [shape[0] / 2 + shape[0] * 0.22 * np.cos(ang), shape[1] / 2 + shape[1] * 0.22 * np.sin(ang), shape[2] / 2]
        r = [max(2.0, shape[0] * 0.1), max(2.0, shape[1] * 0.1), max(1.0, shape[2] * 0.3)]
        if dataset != "synapse":  # nested structures (tumour regions, heart)
            c = [shape[0] / 2 + rng.uniform(-2, 2), shape[1] / 2 + rng.uniform(-2, 2), shape[2] / 2]
            r = [shape[0] * (0.3 - 0.07 * i), shape[1] * (0.3 - 0.07 * i), max(1.0, shape[2] * (0.35 - 0.08 * i))]
        label[_ellipsoid(shape, c, r) & body] = lab
    if dataset == "synapse":
        img = np.where(body, 20.0, -1000.0) + 8.0 * label + rng.normal(0, 10, shape)
        image = np.round(img).astype(np.int16)
    else:
        chans = []
        for ch in range(cfg["channels"]):
            base = np.where(body, 300.0 + 40 * ch, 0.0)
            img = base + (60.0 + 10 * ch) * label + np.where(body, rng.normal(0, 15, shape), 0)
            chans.append(np.clip(img, 0, None).astype(np.float32))
        image = np.stack(chans, -1) if cfg["channels"] > 1 else chans[0]
    return image, label, _affine(cfg["affine"], cfg["spacing"], rng)


def make_dataset(dataset: str, root: str, n_train: int = 3, n_test: int = 1, num_folds: int = 3) -> str:
    """Write a synthetic dataset and its datalist (``networks.data.prepare`` format); returns the datalist path."""
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    training: List[Dict[str, Any]] = []
    test: List[Dict[str, Any]] = []
    for i in range(n_train + n_test):
        case = f"{dataset}_{i:03d}"
        image, label, affine = make_case(dataset, seed=i)
        split = "Tr" if i < n_train else "Ts"
        img_rel, lab_rel = f"images{split}/{case}.nii.gz", f"labels{split}/{case}.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), os.path.join(root, img_rel))
        nib.save(nib.Nifti1Image(label, affine), os.path.join(root, lab_rel))
        item = {"id": case, "image": img_rel, "label": lab_rel}
        if i < n_train:
            training.append({**item, "fold": i % num_folds})
        else:
            test.append(item)
    datalist = {"name": f"synthetic {dataset}", "dataset": dataset, "num_folds": num_folds,
                "folds": [{"train": [t["id"] for t in training if t["fold"] != k],
                           "val": [t["id"] for t in training if t["fold"] == k]} for k in range(num_folds)],
                "training": training, "test": test}
    path = os.path.join(root, "datalist.json")
    with open(path, "w") as f:
        json.dump(datalist, f, indent=2)
    return path


if __name__ == "__main__":
    import fire

    fire.Fire(make_dataset)
