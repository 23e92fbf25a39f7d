"""Small synthetic datasets shaped like the paper's three, for the demo and end-to-end tests.

Each case is drawn in millimetres and rasterised at the requested spacing, so the structures keep
their physical size whatever grid is chosen. The structures are learnable but not trivial:
neighbouring classes have overlapping intensity distributions (only position and shape tell them
apart), every case jitters positions, sizes and intensities, and Gaussian noise is added.

* ``synapse``: an abdomen-like CT in Hounsfield units, int16, with the 8 scored organs in the
  BTCV/Synapse numbering (1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 6 liver,
  7 stomach, 8 aorta, 11 pancreas).
* ``acdc``: a short-axis cardiac MRI-like volume with 1 RV, 2 myocardium (a ring), 3 LV cavity.
* ``brats``: a 4-channel brain MRI-like volume (FLAIR, T1w, T1gd, T2w) with nested regions
  1 edema, 2 non-enhancing tumour core, 3 enhancing tumour.

The output layout is what ``python -m networks.data.prepare`` writes: a datalist JSON with
``training`` (each case with its validation ``fold``), ``folds`` and ``test``, paths relative to
the datalist. Command line: ``python -m networks.demo.synthetic synapse --output_dir DIR``.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence, Tuple

import nibabel as nib
import numpy as np

__all__ = ["make_dataset", "DATASETS"]

Organ = Tuple[int, Tuple[float, float, float], Tuple[float, float, float], float]  # label, centre, radii, mean

# centre and radii in mm relative to the volume centre, (x, y, z) in RAS; intensity in HU
_SYNAPSE_ORGANS: List[Organ] = [
    (6, (28.0, 5.0, 12.0), (30.0, 28.0, 26.0), 60.0),  # liver
    (1, (-36.0, -8.0, 14.0), (12.0, 16.0, 18.0), 48.0),  # spleen
    (7, (-14.0, 18.0, 18.0), (18.0, 14.0, 14.0), -5.0),  # stomach (water and gas)
    (4, (14.0, 24.0, 0.0), (11.0, 10.0, 14.0), 5.0),  # gallbladder
    (2, (26.0, -26.0, -14.0), (12.0, 12.0, 20.0), 150.0),  # right kidney
    (3, (-26.0, -26.0, -14.0), (12.0, 12.0, 20.0), 150.0),  # left kidney
    (11, (0.0, 2.0, -4.0), (26.0, 9.0, 10.0), 105.0),  # pancreas (arterial phase)
]
_AORTA = 8


def _grid(shape: Sequence[int], spacing: Sequence[float]) -> List[np.ndarray]:
    """Voxel-centre coordinates in mm, relative to the volume centre."""
    axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing)]
    return np.meshgrid(*axes, indexing="ij")


def _ellipsoid(coords, centre, radii) -> np.ndarray:
    return sum(((c - m) / r) ** 2 for c, m, r in zip(coords, centre, radii)) <= 1.0


def _synapse_case(rng: np.random.Generator, shape, spacing) -> Tuple[np.ndarray, np.ndarray]:
    x, y, z = _grid(shape, spacing)
    image = np.full(shape, -1000.0)
    body = (x / 62.0) ** 2 + (y / 50.0) ** 2 <= 1.0
    image[body] = -90.0  # fat
    image[body & ((x / 56.0) ** 2 + (y / 44.0) ** 2 > 1.0)] = 40.0  # muscle wall
    label = np.zeros(shape, np.uint8)
    for value, centre, radii, hu in _SYNAPSE_ORGANS:
        c = [m + rng.uniform(-4, 4) for m in centre]
        r = [s * rng.uniform(0.85, 1.15) for s in radii]
        mask = _ellipsoid((x, y, z), c, r) & body
        label[mask] = value
        image[mask] = hu + rng.uniform(-10, 10)
    ax, ay, ar = rng.uniform(-3, 3), -30.0 + rng.uniform(-3, 3), 8.0 * rng.uniform(0.85, 1.15)
    aorta = ((x - ax) ** 2 + (y - ay) ** 2 <= ar**2) & body
    label[aorta] = _AORTA
    image[aorta] = 190.0 + rng.uniform(-15, 15)
    image += rng.normal(0.0, 22.0, shape)
    return np.clip(image, -1024, 3071).astype(np.int16), label


def _acdc_case(rng: np.random.Generator, shape, spacing) -> Tuple[np.ndarray, np.ndarray]:
    x, y, z = _grid(shape, spacing)
    image = rng.uniform(80, 120) + np.zeros(shape)
    label = np.zeros(shape, np.uint8)
    cx, cy = rng.uniform(-5, 5), rng.uniform(-5, 5)
    taper = np.clip(1.0 - (z / (shape[2] * spacing[2] * 0.6)) ** 2, 0.2, 1.0)  # apex to base
    r_lv, wall = rng.uniform(18, 24) * taper, rng.uniform(7, 10)
    d = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
    rv = ((x - cx + 32) / 16.0) ** 2 + ((y - cy - 6) / 26.0) ** 2 <= taper
    myo = d <= r_lv + wall
    label[rv & ~myo] = 1
    image[rv & ~myo] = 260 + rng.uniform(-20, 20)
    label[myo] = 2
    image[myo] = 150 + rng.uniform(-15, 15)
    label[d <= r_lv] = 3
    image[d <= r_lv] = 280 + rng.uniform(-20, 20)
    image += rng.normal(0.0, 30.0, shape)
    return np.clip(image, 0, None).astype(np.float32), label


def _brats_case(rng: np.random.Generator, shape, spacing) -> Tuple[np.ndarray, np.ndarray]:
    x, y, z = _grid(shape, spacing)
    brain = (x / (shape[0] * spacing[0] * 0.45)) ** 2 + (y / (shape[1] * spacing[1] * 0.45)) ** 2 + (
        z / (shape[2] * spacing[2] * 0.45)
    ) ** 2 <= 1.0
    label = np.zeros(shape, np.uint8)
    c = [rng.uniform(-12, 12) for _ in range(3)]
    r = rng.uniform(14, 20)
    edema = _ellipsoid((x, y, z), c, [r * rng.uniform(1.0, 1.3) for _ in range(3)]) & brain
    core = _ellipsoid((x, y, z), c, [r * 0.6] * 3)
    enh = core & ~_ellipsoid((x, y, z), c, [r * 0.35] * 3)
    label[edema] = 1
    label[core] = 2
    label[enh] = 3
    # per channel (FLAIR, T1w, T1gd, T2w): background brain, edema, core, enhancing
    table = [(300, 520, 430, 450), (400, 330, 300, 340), (380, 360, 340, 700), (320, 560, 520, 480)]
    image = np.zeros((4,) + tuple(shape), np.float32)
    for ch, (b, e, n, t) in enumerate(table):
        vol = np.where(brain, b, 0.0)
        vol[label == 1], vol[label == 2], vol[label == 3] = e, n, t
        vol = vol * rng.uniform(0.9, 1.1) + rng.normal(0.0, 35.0, shape) * brain
        image[ch] = np.clip(vol, 0, None)
    return image, label


DATASETS: Dict[str, dict] = {
    "synapse": dict(case=_synapse_case, shape=(80, 64, 32), spacing=(1.5, 1.5, 3.0), labels={
        0: "background", 1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gallbladder", 6: "liver",
        7: "stomach", 8: "aorta", 11: "pancreas"}, modality={"0": "CT"}),
    "acdc": dict(case=_acdc_case, shape=(64, 64, 12), spacing=(1.6, 1.6, 6.5), labels={
        0: "background", 1: "right ventricle", 2: "myocardium", 3: "left ventricle cavity"}, modality={"0": "MRI"}),
    "brats": dict(case=_brats_case, shape=(48, 48, 48), spacing=(2.0, 2.0, 2.0), labels={
        0: "background", 1: "edema", 2: "non-enhancing tumour", 3: "enhancing tumour"},
        modality={"0": "FLAIR", "1": "T1w", "2": "T1gd", "3": "T2w"}),
}


def _save(array: np.ndarray, spacing, path: str) -> None:
    affine = np.diag(list(spacing) + [1.0])
    if array.ndim == 4:  # channel-first in memory, channel-last on disk as MSD does
        array = np.moveaxis(array, 0, -1)
    img = nib.Nifti1Image(array, affine)
    img.header.set_zooms(tuple(spacing) + ((1.0,) if array.ndim == 4 else ()))
    tmp = path + ".part.nii.gz"
    nib.save(img, tmp)
    os.replace(tmp, path)


def make_dataset(
    dataset: str = "synapse",
    output_dir: str = "demo_output/data",
    n_cases: int = 30,
    n_test: int = 6,
    num_folds: int = 5,
    seed: int = 0,
    shape: Sequence[int] = None,
    spacing: Sequence[float] = None,
) -> str:
    """Write ``n_cases`` training and ``n_test`` test cases plus ``datalist.json``; return its path.

    Existing files with the same names are reused (the generator is deterministic in ``seed``).
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    if n_cases < num_folds:
        raise ValueError(f"n_cases ({n_cases}) must be at least num_folds ({num_folds})")
    spec = DATASETS[dataset]
    shape = tuple(int(s) for s in (shape or spec["shape"]))
    spacing = tuple(float(s) for s in (spacing or spec["spacing"]))
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        os.makedirs(os.path.join(output_dir, sub), exist_ok=True)
    rng = np.random.default_rng(seed)
    training, test = [], []
    for i in range(n_cases + n_test):
        case_rng = np.random.default_rng(rng.integers(2**32))
        split = "Tr" if i < n_cases else "Ts"
        cid = f"{dataset}_{i:03d}"
        item = {"id": cid, "image": f"images{split}/{cid}.nii.gz", "label": f"labels{split}/{cid}.nii.gz"}
        img_path, lab_path = (os.path.join(output_dir, item[k]) for k in ("image", "label"))
        if not (os.path.exists(img_path) and os.path.exists(lab_path)):
            image, label = spec["case"](case_rng, shape, spacing)
            _save(image, spacing, img_path)
            _save(label, spacing, lab_path)
        if split == "Tr":
            training.append(dict(item, fold=i % num_folds))
        else:
            test.append(item)
    folds = [
        {"train": [t["id"] for t in training if t["fold"] != k], "val": [t["id"] for t in training if t["fold"] == k]}
        for k in range(num_folds)
    ]
    datalist = {
        "name": f"synthetic-{dataset}", "dataset": dataset, "description": "synthetic demo data (networks.demo.synthetic)",
        "tensorImageSize": "4D" if dataset == "brats" else "3D", "modality": spec["modality"],
        "labels": {str(k): v for k, v in spec["labels"].items()}, "num_folds": num_folds,
        "numTraining": len(training), "numTest": len(test), "folds": folds, "training": training, "test": test,
    }
    path = os.path.join(output_dir, "datalist.json")
    tmp = path + ".part"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(datalist, f, indent=1)
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    import fire

    fire.Fire(make_dataset)
