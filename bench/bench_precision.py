"""float32 against bf16 inference of a trained bundle: held-out Dice, voxel agreement and time.

Runs the demo's trained model (``make demo`` writes ``demo_output/<bundle>/models/model.pt``) through
the bundle's own ``evaluate.json`` (held-out synthetic cases, Dice in the original image space) and
``inference.json`` (the held-out images and the real CT, label maps written) once per precision, then
compares the label maps voxel by voxel::

    python -m bench.bench_precision --demo_dir demo_output [--bundle synapse_bisegmamba] [--threads 2]

Prints one table: per precision the mean Dice (%), its change from float32, the fraction of voxels
whose label equals float32's (all held-out cases together, the worst case, the real CT) and the
wall time of evaluation and inference. Exit status 1 when a run fails or a label map is missing.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Dict, List

import numpy as np

PRECISIONS = ("float32", "bf16")


def _label_maps(folder: str) -> Dict[str, str]:
    """case name -> path of every ``*_seg.nii.gz`` under ``folder``."""
    found = {}
    for root, _, files in os.walk(folder):
        for f in files:
            if f.endswith(".nii.gz"):
                found[f[: -len(".nii.gz")]] = os.path.join(root, f)
    return found


def _agreement(a: str, b: str) -> float:
    import nibabel as nib

    x, y = np.asarray(nib.load(a).dataobj), np.asarray(nib.load(b).dataobj)
    if x.shape != y.shape:
        raise ValueError(f"label maps differ in shape: {a} {x.shape} vs {b} {y.shape}")
    return float((x == y).mean()), x.size


def main(demo_dir: str = "demo_output", bundle: str = "synapse_bisegmamba", threads: int = 2,
         out_dir: str = "") -> List[Dict]:
    """Measure; returns the table's rows.

    Args:
        demo_dir: the ``make demo`` output folder (``--output_dir`` of ``networks.demo.run``).
        bundle: the bundle the demo trained.
        threads: CPU threads (torch.set_num_threads).
        out_dir: where the runs write (default ``<demo_dir>/<bundle>/precision``).
    """
    import torch

    from networks.demo import run as demo
    from networks.precision import resolve_precision

    torch.set_num_threads(int(threads))
    demo_dir = os.path.abspath(demo_dir)
    dataset = bundle.split("_")[0]
    run_dir = os.path.join(demo_dir, bundle)
    data_dir = os.path.join(demo_dir, "data", dataset)
    model = os.path.join(run_dir, "models", "model.pt")
    if not os.path.isfile(model):
        raise FileNotFoundError(f"no trained model at {model}: run `make demo` (or networks.demo.run --output_dir {demo_dir}) first")
    out_dir = out_dir or os.path.join(run_dir, "precision")
    bundle_dir = demo._bundle_dir(bundle)
    base = demo._overrides(dataset, data_dir, run_dir, int(threads))
    ct_dir = os.path.join(demo_dir, "ct_input")
    rows = []
    for precision in PRECISIONS:
        used, reason = resolve_precision(precision)
        if used != precision:
            print(f"precision {precision}: not available here ({reason}); skipped", flush=True)
            continue
        over = {**base, "precision": precision}
        here = os.path.join(out_dir, precision)
        t0 = time.perf_counter()
        demo.evaluate(bundle_dir, over, os.path.join(here, "eval"))
        t_eval = time.perf_counter() - t0
        with open(os.path.join(here, "eval", "metrics.json")) as f:
            dice = json.load(f)["summary"]["mean"]["Average_DSC"]
        t0 = time.perf_counter()
        demo.infer(bundle_dir, over, os.path.join(data_dir, "imagesTs"), os.path.join(here, "heldout"))
        t_infer = time.perf_counter() - t0
        t_ct = None
        if os.path.isdir(ct_dir):
            t0 = time.perf_counter()
            demo.infer(bundle_dir, over, ct_dir, os.path.join(here, "ct"))
            t_ct = time.perf_counter() - t0
        rows.append({"precision": precision, "dice": dice, "eval_s": t_eval, "heldout_infer_s": t_infer, "ct_s": t_ct,
                     "dir": here})
    if not rows or rows[0]["precision"] != "float32":
        raise RuntimeError("the float32 reference run is missing")
    ref = rows[0]
    for r in rows:
        for part in ("heldout", "ct"):
            a, b = _label_maps(os.path.join(ref["dir"], part)), _label_maps(os.path.join(r["dir"], part))
            if set(a) != set(b):
                raise RuntimeError(f"{part}: label maps {sorted(set(a) ^ set(b))} missing in one precision")
            if not a:
                r[part] = None
                continue
            stats = [_agreement(a[k], b[k]) for k in sorted(a)]
            total = sum(n for _, n in stats)
            r[part] = {"all": sum(f * n for f, n in stats) / total, "worst": min(f for f, _ in stats), "cases": len(stats)}
    print(f"\n{bundle}, demo model ({demo_dir}), {threads} threads, {torch.__version__}")
    print("| precision | held-out mean Dice % | change (points) | voxel agreement, held-out (worst case) "
          "| voxel agreement, real CT | evaluation s | inference s, held-out | inference s, real CT |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        h, c = r["heldout"], r.get("ct")
        ct_agree = "-" if not c else f"{100 * c['all']:.3f} %"
        ct_time = "-" if r["ct_s"] is None else f"{r['ct_s']:.1f}"
        print(f"| {r['precision']} | {r['dice']:.2f} | {r['dice'] - ref['dice']:+.2f} "
              f"| {100 * h['all']:.3f} % ({100 * h['worst']:.3f} %, {h['cases']} cases) | {ct_agree} "
              f"| {r['eval_s']:.1f} | {r['heldout_infer_s']:.1f} | {ct_time} |")
    return rows


if __name__ == "__main__":
    import fire

    def cli(**kwargs) -> None:
        main(**kwargs)

    try:
        fire.Fire(cli)
    except (RuntimeError, FileNotFoundError, ValueError) as err:
        print(f"bench_precision: {err}", file=sys.stderr)
        sys.exit(1)
