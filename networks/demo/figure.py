"""A picture a person can check: CT slices with the predicted and the reference label outlines.

``save_overlay(image, prediction, reference, path)`` writes one PNG with two rows (axial, coronal)
and two columns (prediction, reference), each label's outline drawn in its own colour over the
image at the slice through the centre of the labelled region. Files are read with nibabel and
reoriented to RAS so that the views are anatomical whatever the input orientation.
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import nibabel as nib
import numpy as np

__all__ = ["save_overlay"]


def _load_ras(path: str) -> tuple:
    img = nib.as_closest_canonical(nib.load(path))
    return np.asanyarray(img.dataobj), img.header.get_zooms()[:3]


def _centre_slices(label: np.ndarray) -> tuple:
    idx = np.argwhere(label > 0)
    if idx.size == 0:
        return tuple(s // 2 for s in label.shape)
    return tuple(int(v) for v in np.round(idx.mean(0)))


def save_overlay(
    image_path: str,
    prediction_path: str,
    reference_path: Optional[str],
    output_path: str,
    label_names: Optional[Dict[int, str]] = None,
    window: tuple = (-160.0, 240.0),
) -> str:
    """Write the overlay PNG to ``output_path`` (atomically) and return the path.

    Args:
        image_path: the CT (3D NIfTI).
        prediction_path: the predicted label map on the image's grid.
        reference_path: the reference label map, or None to draw the prediction alone.
        output_path: the PNG to write.
        label_names: names for the legend, by label value.
        window: display window in HU (soft-tissue by default).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image, zooms = _load_ras(image_path)
    labels = {"prediction": _load_ras(prediction_path)[0]}
    if reference_path:
        labels["reference"] = _load_ras(reference_path)[0]
    for name, lab in labels.items():
        if lab.shape != image.shape:
            raise ValueError(f"{name} {lab.shape} is not on the image's grid {image.shape}")
    cx, cy, cz = _centre_slices(labels.get("reference", labels["prediction"]))
    views = {
        "axial": (lambda v: v[:, :, cz].T, zooms[1] / zooms[0]),
        "coronal": (lambda v: v[:, cy, :].T, zooms[2] / zooms[0]),
    }
    values = sorted({int(v) for lab in labels.values() for v in np.unique(lab) if v > 0})
    cmap = plt.get_cmap("tab20")
    colours = {v: cmap(i % 20) for i, v in enumerate(values)}
    fig, axes = plt.subplots(len(views), len(labels), figsize=(5 * len(labels), 4.5 * len(views)), squeeze=False)
    for row, (view, (cut, aspect)) in enumerate(views.items()):
        for col, (name, lab) in enumerate(labels.items()):
            ax = axes[row][col]
            ax.imshow(cut(image), cmap="gray", vmin=window[0], vmax=window[1], origin="lower", aspect=aspect)
            sl = cut(lab)
            for v in values:
                if (sl == v).any():
                    ax.contour((sl == v).astype(float), levels=[0.5], colors=[colours[v]], linewidths=1.2)
            ax.invert_xaxis()  # radiological convention: the patient's right on the image's left
            ax.set_title(f"{name}, {view}")
            ax.axis("off")
    names = label_names or {}
    handles = [plt.Line2D([0], [0], color=colours[v], lw=2, label=names.get(v, str(v))) for v in values]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    tmp = output_path + ".part.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, output_path)
    return output_path
