"""The main job: train, evaluate and segment with one bundle on a CPU, on embedded data.

``python -m networks.demo.run [--bundle synapse_bisegmamba] [--output_dir demo_output]`` (``make demo``):

1. writes a synthetic dataset shaped like the bundle's dataset (`networks.demo.synthetic`);
2. trains the bundle through MONAI's bundle machinery (`ConfigWorkflow` on the bundle's own
   ``train.json``) with overrides that fit a few minutes of a 2-core CPU, with a progress bar;
3. evaluates on the held-out synthetic cases with the bundle's ``evaluate.json`` and prints the
   per-class Dice / HD95 table;
4. for Synapse bundles, segments the real abdominal CT shipped in ``tests/data/abdomen_ct_example``
   (TotalSegmentator test data, Apache-2.0, see its README) with ``inference.json`` and writes a
   PNG of axial and coronal slices with the predicted and reference outlines;
5. prints where everything went. Each step is skipped when its outputs exist (``make clean``
   removes them); ``--force`` redoes them all.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any, Dict, Optional

import torch

from .figure import save_overlay
from .synthetic import make_dataset

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CT_EXAMPLE = os.path.join(REPO, "tests", "data", "abdomen_ct_example")

# Per dataset: the grid the synthetic data is drawn on (also the training spacing, so that the
# volumes stay small), the patch (nnU-Net's axis order like every bundle list: the file's voxel axes
# reversed, the slice axis first; divisible by the plan's total stride) and the
# training length. Filters are a quarter of the paper's so that a CPU step takes about a second.
DEMO_SETTINGS: Dict[str, Dict[str, Any]] = {
    "synapse": {"pixdim": [3.0, 1.5, 1.5], "patch_size": [16, 64, 64], "max_epochs": 20, "epoch_length": 25},
    "acdc": {"pixdim": [6.5, 1.6, 1.6], "patch_size": [8, 64, 64], "max_epochs": 20, "epoch_length": 25},
    "brats": {"pixdim": [2.0, 2.0, 2.0], "patch_size": [32, 64, 64], "max_epochs": 20, "epoch_length": 25},
}
DEMO_FILTERS = [8, 16, 32, 64, 80, 80]


def _bundle_dir(bundle: str) -> str:
    path = os.path.join(REPO, "bundles", bundle)
    if not os.path.isdir(os.path.join(path, "configs")):
        choices = sorted(d for d in os.listdir(os.path.join(REPO, "bundles")) if not d.startswith("."))
        raise ValueError(f"unknown bundle {bundle!r}: no {path}/configs; choose one of {choices}")
    return path


def _overrides(dataset: str, data_dir: str, run_dir: str, threads: int) -> Dict[str, Any]:
    s = DEMO_SETTINGS[dataset]
    return {
        "bundle_root": run_dir,
        "dataset_dir": data_dir,
        "fold": 0,
        "device": "$torch.device('cpu')",
        "amp": False,
        "filters": DEMO_FILTERS,
        "pixdim": s["pixdim"],
        "patch_size": s["patch_size"],
        "max_epochs": s["max_epochs"],
        "epoch_length": s["epoch_length"],
        "batch_size": 2,
        # the demo has ~250 iterations where the paper has 75,000: a 30x higher rate that decays
        # only to a tenth
        "learning_rate": 1e-2,
        "lr_scheduler#end_factor": 0.1,
        "val_interval": 5,
        "num_workers": max(0, threads - 1),
        "cache_rate": 1.0,
        "sw_batch_size": 1,
        "seed": 0,
    }


def _workflow(bundle_dir: str, configs, workflow_type: str, overrides: Dict[str, Any]):
    from monai.bundle import ConfigWorkflow

    files = [os.path.join(bundle_dir, "configs", c) for c in configs]
    wf = ConfigWorkflow(
        config_file=files if len(files) > 1 else files[0],
        meta_file=os.path.join(bundle_dir, "configs", "metadata.json"),
        logging_file=os.path.join(bundle_dir, "configs", "logging.conf"),
        workflow_type=workflow_type,
        **overrides,
    )
    wf.initialize()
    missing = wf.check_properties()
    if missing:
        raise RuntimeError(f"bundle {bundle_dir} lacks required {workflow_type} properties: {missing}")
    return wf


def _attach_progress(trainer) -> None:
    """A tqdm bar per epoch with the loss and iterations per second (ignite's ProgressBar)."""
    from ignite.handlers import ProgressBar

    ProgressBar(persist=True).attach(trainer, output_transform=lambda out: {"loss": float(out[0]["loss"]) if isinstance(out, list) else float(out["loss"])})


def train(bundle_dir: str, overrides: Dict[str, Any]) -> float:
    wf = _workflow(bundle_dir, ["train.json"], "train", overrides)
    trainer = wf.parser.get_parsed_content("train#trainer")
    _attach_progress(trainer)
    t = time.time()
    wf.run()
    wf.finalize()
    return time.time() - t


def evaluate(bundle_dir: str, overrides: Dict[str, Any], out_dir: str) -> None:
    wf = _workflow(bundle_dir, ["train.json", "evaluate.json"], "train", {**overrides, "output_dir": out_dir, "eval_split": "test"})
    wf.run()
    wf.finalize()


def infer(bundle_dir: str, overrides: Dict[str, Any], image_dir: str, out_dir: str) -> None:
    keep = {k: overrides[k] for k in ("bundle_root", "device", "amp", "filters", "pixdim", "patch_size", "sw_batch_size",
                                      "precision") if k in overrides}
    wf = _workflow(bundle_dir, ["inference.json"], "infer", {**keep, "dataset_dir": image_dir, "output_dir": out_dir})
    wf.run()
    wf.finalize()


def print_table(metrics: Dict[str, Any]) -> None:
    """Region x (Dice %, HD95 mm) as mean +- std over the evaluated cases."""
    mean, std = metrics["summary"]["mean"], metrics["summary"]["std"]
    print(f"      {'region':14s} {'Dice (%)':>16s} {'HD95 (mm)':>16s}")
    for region in ["Average"] + list(metrics["regions"]):
        cells = [f"{mean[f'{region}_{m}']:6.2f} +- {std[f'{region}_{m}']:5.2f}" for m in ("DSC", "HD95")]
        print(f"      {region:14s} {cells[0]:>16s} {cells[1]:>16s}")


def main(
    bundle: str = "synapse_bisegmamba",
    output_dir: str = "demo_output",
    force: bool = False,
    threads: Optional[int] = None,
    n_cases: int = 30,
    n_test: int = 6,
    max_epochs: Optional[int] = None,
    epoch_length: Optional[int] = None,
    precision: str = "float32",
) -> Dict[str, str]:
    """Run the demo for ``bundle``; returns the paths written.

    Args:
        bundle: a folder name under ``bundles/``.
        output_dir: where data, checkpoints, evaluation, predictions and the picture go.
        force: redo every step even when its outputs exist.
        threads: CPU threads (default: all cores).
        n_cases, n_test: synthetic training (5 folds, fold 0 validates) and held-out test cases.
        max_epochs, epoch_length: override the demo's training length (for smoke tests).
        precision: of evaluation and inference, as the bundles' ``precision`` setting (``float32``,
            ``bf16`` or ``auto``; see `networks.precision`). Training is float32.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    bundle_dir = _bundle_dir(bundle)
    dataset = bundle.split("_")[0]
    if dataset not in DEMO_SETTINGS:
        raise ValueError(f"bundle {bundle!r}: dataset {dataset!r} has no demo settings ({sorted(DEMO_SETTINGS)})")
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    out = os.path.abspath(output_dir)
    if force and os.path.isdir(os.path.join(out, bundle)):
        shutil.rmtree(os.path.join(out, bundle))
    data_dir = os.path.join(out, "data", dataset)
    run_dir = os.path.join(out, bundle)
    paths = {"data": data_dir, "bundle_root": run_dir}

    print(f"[1/4] synthetic {dataset} data -> {data_dir}")
    make_dataset(dataset, data_dir, n_cases=n_cases, n_test=n_test, seed=0)
    overrides = _overrides(dataset, data_dir, run_dir, threads)
    overrides["precision"] = precision
    if max_epochs is not None:
        overrides["max_epochs"] = overrides["val_interval"] = int(max_epochs)
    if epoch_length is not None:
        overrides["epoch_length"] = int(epoch_length)

    model = os.path.join(run_dir, "models", "model.pt")
    done = os.path.join(run_dir, "models", "demo_training_done")
    if os.path.exists(done):
        print(f"[2/4] training: reusing {model}")
    else:
        print(f"[2/4] training {bundle} on {threads} CPU threads ({overrides['max_epochs']} epochs x {overrides['epoch_length']} iterations)")
        seconds = train(bundle_dir, overrides)
        with open(done, "w") as f:
            f.write(f"{seconds:.0f}\n")
        print(f"      trained in {seconds / 60:.1f} min")
    paths["model"] = model

    eval_dir = os.path.join(run_dir, "eval_test")
    metrics_file = os.path.join(eval_dir, "metrics.json")
    if not os.path.exists(metrics_file):
        print("[3/4] evaluating on the held-out synthetic test cases")
        evaluate(bundle_dir, overrides, eval_dir)
    with open(metrics_file) as f:
        metrics = json.load(f)
    print(f"[3/4] {metrics['num_cases']} held-out synthetic cases, in the original image space:")
    print_table(metrics)
    paths["evaluation"] = eval_dir

    if dataset == "synapse":
        ct_in = os.path.join(out, "ct_input")
        os.makedirs(ct_in, exist_ok=True)
        ct = os.path.join(ct_in, "abdomen_ct.nii.gz")
        if not os.path.exists(ct):
            shutil.copy(os.path.join(CT_EXAMPLE, "abdomen_ct.nii.gz"), ct)
        pred_dir = os.path.join(run_dir, "predictions")
        pred = os.path.join(pred_dir, "abdomen_ct", "abdomen_ct_seg.nii.gz")
        found = [os.path.join(r, f) for r, _, fs in os.walk(pred_dir) for f in fs if f.endswith(".nii.gz")] if os.path.isdir(pred_dir) else []
        if not found:
            print(f"[4/4] segmenting the real CT {ct}")
            infer(bundle_dir, overrides, ct_in, pred_dir)
            found = [os.path.join(r, f) for r, _, fs in os.walk(pred_dir) for f in fs if f.endswith(".nii.gz")]
        pred = found[0]
        png = os.path.join(run_dir, "abdomen_ct_overlay.png")
        with open(os.path.join(REPO, "networks", "bundle_gen", "plans", "synapse_dataset.json")) as f:
            names = {int(v): k for k, v in json.load(f)["labels"].items() if int(v)}
        save_overlay(ct, pred, os.path.join(CT_EXAMPLE, "abdomen_ct_label.nii.gz"), png, names)
        paths.update(prediction=pred, overlay=png)
    print("\nWritten:")
    for k, v in paths.items():
        print(f"  {k:12s} {v}")
    print(f"\nmean Dice on the held-out synthetic cases: {metrics['summary']['mean']['Average_DSC']:.2f} %")
    return paths


def cli(**kwargs: Any) -> None:
    """Command-line entry: like `main`, without echoing the returned paths a second time."""
    main(**kwargs)


if __name__ == "__main__":
    import fire

    fire.Fire(cli)
