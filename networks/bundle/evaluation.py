"""Per-case and summary Dice / HD95 for the bundles' ``evaluate.json``.

Metrics are computed by MONAI (``compute_dice``, ``compute_hausdorff_distance`` with ``percentile=95`` and
the voxel spacing, so HD95 is in mm) on binary region maps in the ORIGINAL image grid (the bundle inverts
its preprocessing before scoring). Regions are the paper's scored structures: BrainTumour WT/TC/ET,
Synapse's 8 organs, ACDC RV/Myo/LV.

Empty masks (documented rule, never NaN): for a region
  * empty in both prediction and reference: DSC = 100 %, HD95 = 0 mm;
  * empty in exactly one of them: DSC = 0 %, HD95 = the image diagonal in mm (the largest distance in the
    field of view, a finite worst case).
"Average" columns are the mean over regions of one case; the summary gives mean and standard deviation
(sample, ddof=1; 0 for a single case) over cases of every column. DSC is reported in % as in the paper's
Tables 2-4, HD95 in mm.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.handlers import MeanDice
from monai.metrics import compute_dice, compute_hausdorff_distance

__all__ = ["EMPTY_RULE", "voxel_spacing", "case_metrics", "summarize", "SegmentationMetricsWriter", "MeanDicePercent"]

logger = logging.getLogger(__name__)

EMPTY_RULE = ("both empty: DSC 100 %, HD95 0 mm; exactly one empty: DSC 0 %, HD95 = image diagonal in mm")


def voxel_spacing(img: Any) -> np.ndarray:
    """Voxel size in mm from a MetaTensor's affine (column norms); ones when there is no affine."""
    affine = getattr(img, "affine", None)
    if affine is None:
        return np.ones(img.ndim - 1)
    a = np.asarray(torch.as_tensor(affine).detach().cpu(), dtype=np.float64)
    nd = img.ndim - 1
    return np.sqrt((a[:nd, :nd] ** 2).sum(axis=0))


def _binary(x: Any) -> torch.Tensor:
    if hasattr(x, "as_tensor"):  # MetaTensor -> plain tensor
        x = x.as_tensor()
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().cpu() > 0.5


def case_metrics(pred: Any, label: Any, names: Sequence[str], spacing: Optional[Sequence[float]] = None) -> Dict[str, float]:
    """DSC (%) and HD95 (mm) per region and their averages for one case.

    Args:
        pred, label: (R, *spatial) binary region maps (tensor or array), channel r = region ``names[r]``.
        names: region names, used as column prefixes (``<name>_DSC``, ``<name>_HD95``).
        spacing: voxel size in mm per spatial axis (default: from ``label``'s affine).
    """
    p, g = _binary(pred), _binary(label)
    if p.shape != g.shape or p.shape[0] != len(names):
        raise ValueError(f"prediction {tuple(p.shape)} and reference {tuple(g.shape)} must both be "
                         f"({len(names)}, *spatial) region maps for regions {list(names)}")
    sp = np.asarray(voxel_spacing(label) if spacing is None else spacing, dtype=np.float64)
    diagonal = float(np.sqrt(((np.asarray(p.shape[1:]) * sp) ** 2).sum()))
    out: Dict[str, float] = {}
    for r, name in enumerate(names):
        pr, gt = p[r][None, None], g[r][None, None]
        p_any, g_any = bool(pr.any()), bool(gt.any())
        if not p_any and not g_any:
            dsc, hd = 100.0, 0.0
        elif p_any != g_any:
            dsc, hd = 0.0, diagonal
        else:
            dsc = 100.0 * float(compute_dice(pr.float(), gt.float(), include_background=True)[0, 0])
            hd = float(compute_hausdorff_distance(pr, gt, include_background=True, percentile=95,
                                                  spacing=sp.tolist())[0, 0])
        out[f"{name}_DSC"], out[f"{name}_HD95"] = dsc, hd
    out["Average_DSC"] = float(np.mean([out[f"{n}_DSC"] for n in names]))
    out["Average_HD95"] = float(np.mean([out[f"{n}_HD95"] for n in names]))
    return out


def summarize(rows: List[Dict[str, Any]], columns: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """Mean and sample std (ddof=1; 0 for one case) over cases of each metric column."""
    summary: Dict[str, Dict[str, float]] = {"mean": {}, "std": {}}
    for c in columns:
        v = np.asarray([r[c] for r in rows], dtype=np.float64)
        summary["mean"][c] = float(v.mean()) if v.size else math.nan
        summary["std"][c] = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return summary


class MeanDicePercent(MeanDice):
    """MONAI's ``MeanDice`` handler (same arguments) reporting the mean Dice in percent, the unit of the
    evaluation files and of the paper's tables, so that ``val_mean_dice`` in the training log, TensorBoard and
    the best-model line reads like ``Average_DSC`` (``val_mean_dice 87.5`` = 87.5 %). Per-case details
    (``metric_details``) stay MONAI's fractions."""

    def compute(self) -> Any:
        result = super().compute()
        return 100.0 * result if isinstance(result, (int, float)) else result * 100.0


def _column_order(names: Sequence[str], paper_columns: Optional[Sequence[str]]) -> List[str]:
    every = ["Average_HD95", "Average_DSC"] + [f"{n}_{m}" for n in names for m in ("HD95", "DSC")]
    first = [c for c in (paper_columns or []) if c in every]
    return first + [c for c in every if c not in first]


def _write_atomic(path: str, write) -> None:
    """Write a text file through ``write(file)`` to a temporary name, then rename: never half-written."""
    tmp = path + ".part"
    with open(tmp, "w", newline="") as f:
        write(f)
    os.replace(tmp, path)


class SegmentationMetricsWriter:
    """Evaluator handler: score each case (:func:`case_metrics`) and write CSV + JSON files at the end.

    Files in ``output_dir``: ``metrics_per_case.csv`` (one row per case), ``metrics_summary.csv`` (rows
    ``mean`` and ``std``) and ``metrics.json`` (per case, summary, units, empty-mask rule). Columns start
    with ``paper_columns`` (the order of the paper's table), then every other computed column.

    Args:
        output_dir: folder for the files (created).
        regions: region names in the channel order of ``pred`` / ``label`` (after ``LabelsToRegionsd``).
        paper_columns: column order of the paper's table, e.g. ``["Average_HD95", "Average_DSC", "WT_HD95", ...]``.
        pred_key, label_key: keys of the region maps in the engine output / batch (label in the original grid).
        id_key: key of the case identifier (falls back to the label's file name).
    """

    def __init__(self, output_dir: str, regions: Sequence[str], paper_columns: Optional[Sequence[str]] = None,
                 pred_key: str = "pred", label_key: str = "label", id_key: str = "id") -> None:
        self.output_dir = os.fspath(output_dir)
        self.names = list(regions)
        self.columns = _column_order(self.names, paper_columns)
        self.pred_key, self.label_key, self.id_key = pred_key, label_key, id_key
        self.rows: List[Dict[str, Any]] = []
        self.summary: Dict[str, Dict[str, float]] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.rows = []

    def _case_id(self, d: Dict[str, Any]) -> str:
        cid = d.get(self.id_key)
        if cid is None:
            meta = getattr(d.get(self.label_key), "meta", {}) or getattr(d.get(self.pred_key), "meta", {})
            cid = os.path.basename(str(meta.get("filename_or_obj", f"case_{len(self.rows)}")))
        return str(cid[0] if isinstance(cid, (list, tuple)) else cid)

    def _collect(self, engine: Engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        if isinstance(output, dict):  # not decollated: a batch of one
            batch, output = [batch], [output]
        for b, o in zip(batch, output):
            d = {**(b if isinstance(b, dict) else {}), **o}
            row = {"id": self._case_id(d)}
            row.update(case_metrics(d[self.pred_key], d[self.label_key], self.names))
            self.rows.append(row)
            logger.info("case %s: %s", row["id"], ", ".join(f"{c} {row[c]:.2f}" for c in self.columns[:2]))

    def _write(self, engine: Engine) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        self.summary = summarize(self.rows, self.columns)
        per_case = [["id"] + self.columns] + [[r["id"]] + [f"{r[c]:.4f}" for c in self.columns] for r in self.rows]
        summary = [["statistic"] + self.columns] + [
            [stat] + [f"{self.summary[stat][c]:.4f}" for c in self.columns] for stat in ("mean", "std")
        ]
        doc = {"num_cases": len(self.rows), "regions": self.names, "columns": self.columns,
               "units": {"DSC": "%", "HD95": "mm"}, "empty_mask_rule": EMPTY_RULE,
               "summary": self.summary, "per_case": self.rows}
        _write_atomic(os.path.join(self.output_dir, "metrics_per_case.csv"), lambda f: csv.writer(f).writerows(per_case))
        _write_atomic(os.path.join(self.output_dir, "metrics_summary.csv"), lambda f: csv.writer(f).writerows(summary))
        _write_atomic(os.path.join(self.output_dir, "metrics.json"), lambda f: json.dump(doc, f, indent=2))
        for c in ("Average_DSC", "Average_HD95"):
            engine.state.metrics[c] = self.summary["mean"][c]
        logger.info("evaluation of %d cases written to %s: %s", len(self.rows), self.output_dir,
                    ", ".join(f"{c} {self.summary['mean'][c]:.2f}±{self.summary['std'][c]:.2f}" for c in self.columns))
