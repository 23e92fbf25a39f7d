"""Whole-volume CPU inference through the Synapse bundles' own ``inference.json``, one table.

    python -m bench.bench_volume                                   # both volumes, six networks, float32 and bf16
    python -m bench.bench_volume --volumes=real --networks=residualunet,dynunet,segmamba --precision=float32
    python -m bench.bench_volume --tiny --output=bench_volume      # tiny networks and volume (the CI test)

Each row runs ``configs/inference.json`` of a Synapse bundle through MONAI's ``ConfigWorkflow`` (what
``python -m monai.bundle run --config_file configs/inference.json`` does): load, input check, crop to nonzero,
intensity scaling, resampling (``Spacingd``), sliding window with the bundle's patch, overlap and Gaussian
blending, ``Invertd`` back to the input grid, ``AsDiscreted`` argmax and ``SaveOnInputGridd``. The only
overrides are the paths, the CPU device, ``num_workers=0`` (so that loading and preprocessing run, and are
timed, in the row's process), ``precision`` and ``sw_batch_size`` when given, and with ``--tiny`` small
filters, patch and spacing. Weights are random (seed 0), written as the copied bundle's ``models/model.pt``
with the record a trained one carries (``networks.bundle.TrainedModel`` checks it before the run).

Volumes:

* ``real``: the repository's real abdominal CT, ``tests/data/abdomen_ct_example/abdomen_ct.nii.gz``
  (122 x 101 x 30 voxels at 3 mm; TotalSegmentator test data by Jakob Wasserthal et al., Apache-2.0, see
  that folder's README.md).
* ``synthetic``: a full-size abdominal CT, 512 x 512 x 120 voxels at 0.78 x 0.78 x 2.5 mm (int16 HU: air
  -1000 and -1024 outside the scanner's circular field of view, as in real scans, a body ellipse of fat,
  muscle, liver, kidneys, spine and bowel gas, Gaussian noise; seed 0), written once into ``--cache_dir``.
  Like a real CT it has almost no voxel equal to 0, so the bundles' crop to nonzero keeps the whole field.

Networks: the four variants' Synapse bundles (``segmamba``, ``bisegmamba``, ``multisegmamba``,
``segmambaskip``), and through ``synapse_segmamba``'s config with ``network_def`` replaced,
``networks.ResidualUNet`` and MONAI's ``monai.networks.nets.DynUNet`` built from the same plan (kernel sizes,
strides, ``upsample_kernel_size = strides[1:]``, filters, instance norm with affine, leaky ReLU, no deep
supervision, ``res_block=False``: the nnU-Net network a MONAI user would pick instead).

Each row runs in its own subprocess (its peak resident memory is its own). Columns:

* windows: sliding windows the network ran (counted by a forward hook: the batch sizes it saw).
* I/O+pre s: the data loader's time for the case (reading the NIfTI and all preprocessing transforms).
* network s: the network's forward calls only; sliding window s: the whole inferer call (the network,
  padding, window gathering and Gaussian blending).
* call s first / median: the first network call (a batch of ``sw_batch_size`` windows) and the median of all:
  the first maps the memory that the next ones reuse (``keep_freed_memory``), the median is the steady state.
* post s: the evaluator's postprocessing (``Invertd``, argmax, writing the NIfTI).
* total s: ``evaluator.run()`` wall time (also verifying and loading the weights).
* peak RSS GiB: the row process's peak resident memory (``ru_maxrss``), Python, torch and the model included.
* ratios: total and network time / ResidualUNet's on the same volume and precision in this run.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional

from bench._worker import ROOT as _ROOT
from bench.bench_networks import _as_list
from networks.flags import parse_flag

VOLUMES = ("real", "synthetic")
NETWORKS = ("segmamba", "bisegmamba", "multisegmamba", "segmambaskip", "residualunet", "dynunet")
PRECISIONS = ("float32", "bf16", "auto")
REAL_CT = os.path.join(_ROOT, "tests", "data", "abdomen_ct_example", "abdomen_ct.nii.gz")
BASELINE = "residualunet"

# The synthetic CT's grid, spacing (mm, file axes x, y, z) and seed.
SYNTHETIC = {"shape": (512, 512, 120), "spacing": (0.78, 0.78, 2.5), "seed": 0}
TINY_SYNTHETIC = {"shape": (160, 160, 32), "spacing": (0.78, 0.78, 2.5), "seed": 0}
# --tiny: filters, patch (nnU-Net axis order, slice axis first) and spacing small enough for seconds per row.
TINY_OVERRIDES = {"filters": [4, 8, 8, 8, 8, 8], "patch_size": [16, 64, 64], "pixdim": [3.0, 4.5, 4.5]}


def _bundle_for(network: str) -> str:
    """The Synapse bundle whose inference.json a network's rows run (the two baselines use SegMamba's config)."""
    return f"synapse_{network}" if network not in (BASELINE, "dynunet") else "synapse_segmamba"


def _network_override(network: str) -> Dict[str, Any]:
    """``network_def`` overrides that build the baselines from the bundle's plan (empty for the bundles' own)."""
    if network == BASELINE:
        return {"network_def#_target_": "networks.ResidualUNet"}
    if network == "dynunet":
        return {"network_def": {
            "_target_": "monai.networks.nets.DynUNet",
            "spatial_dims": 3,
            "in_channels": "@in_channels",
            "out_channels": "@num_classes",
            "kernel_size": "@kernel_size",
            "strides": "@strides",
            "upsample_kernel_size": "$@strides[1:]",
            "filters": "@filters",
            "norm_name": ["INSTANCE", {"affine": True}],
            "act_name": ["leakyrelu", {"inplace": True, "negative_slope": 0.01}],
            "deep_supervision": False,
            "res_block": False,
        }}
    return {}


def write_synthetic_ct(path: str, shape=SYNTHETIC["shape"], spacing=SYNTHETIC["spacing"], seed: int = 0) -> str:
    """Write an int16 abdominal-CT-like NIfTI of ``shape`` (x, y, z) voxels at ``spacing`` mm to ``path`` (atomic).

    HU values: -1024 outside the circular field of view, air -1000, a body ellipse (about 340 x 250 mm) of
    subcutaneous fat (-100) around muscle / soft tissue (40), a liver (60) on the right, two kidneys (30), a
    vertebral body (700) and bowel gas (-900) pockets, plus Gaussian noise (sigma 12 HU).
    """
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    sx, sy, sz = spacing
    x = (np.arange(nx) - nx / 2 + 0.5)[:, None] * sx  # mm from the centre
    y = (np.arange(ny) - ny / 2 + 0.5)[None, :] * sy
    vol = np.empty(shape, np.int16)
    gas = [(rng.uniform(-90, 90), rng.uniform(-50, 60), rng.uniform(0, nz * sz), rng.uniform(8, 20)) for _ in range(12)]
    for k in range(nz):
        z = k * sz
        grow = 1.0 + 0.05 * np.sin(np.pi * k / max(nz - 1, 1))  # the abdomen widens mid-volume
        r_body = (x / (170 * grow)) ** 2 + (y / (125 * grow)) ** 2
        sl = np.full((nx, ny), -1000.0)
        sl[r_body < 1.0] = -100.0
        sl[(x / (160 * grow)) ** 2 + (y / (112 * grow)) ** 2 < 1.0] = 40.0
        # RAS: +x is the patient's right, +y anterior
        sl[((x - 60) / 80) ** 2 + ((y - 10) / 70) ** 2 < 1.0] = 60.0  # liver
        for cx in (-55.0, 55.0):
            sl[((x - cx) / 28) ** 2 + ((y + 55) / 40) ** 2 < 1.0] = 30.0  # kidneys
        sl[(x / 22) ** 2 + ((y + 80) / 20) ** 2 < 1.0] = 700.0  # vertebral body
        for gx, gy, gz, gr in gas:
            if abs(z - gz) < gr:
                sl[(x - gx) ** 2 + (y - gy) ** 2 < gr ** 2 - (z - gz) ** 2] = -900.0
        sl += rng.normal(0.0, 12.0, sl.shape)
        sl[(x / (nx * sx / 2)) ** 2 + (y / (ny * sy / 2)) ** 2 > 1.0] = -1024.0
        vol[:, :, k] = np.clip(np.round(sl), -1024, 3071).astype(np.int16)
    img = nib.Nifti1Image(vol, np.diag([sx, sy, sz, 1.0]))
    img.header.set_xyzt_units("mm")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.nii.gz"
    nib.save(img, tmp)
    os.replace(tmp, path)
    return path


def _synthetic_path(cache_dir: str, spec: Dict[str, Any]) -> str:
    """The cached synthetic CT for ``spec``, written on first use."""
    nx, ny, nz = spec["shape"]
    name = f"synthetic_ct_{nx}x{ny}x{nz}_{'x'.join(map(str, spec['spacing']))}mm_seed{spec['seed']}.nii.gz"
    path = os.path.join(cache_dir, name)
    if not os.path.isfile(path):
        print(f"writing the synthetic CT {path}", file=sys.stderr, flush=True)
        write_synthetic_ct(path, spec["shape"], spec["spacing"], spec["seed"])
    return path


def _bundle_config(bundle: str) -> Dict[str, Any]:
    with open(os.path.join(_ROOT, "bundles", bundle, "configs", "inference.json")) as f:
        return json.load(f)


def prepare_bundle(network: str, work_dir: str, overrides: Dict[str, Any]) -> str:
    """Copy the network's Synapse bundle into ``work_dir/<network>`` and write its ``models/model.pt``.

    The weights are the network's random initialisation (``torch.manual_seed(0)``) with the record a trained
    ``model.pt`` carries (network target and arguments, preprocessing settings, sha256), taken from the
    config's own ``model_record`` under ``overrides``, so that ``TrainedModel.check`` accepts them.
    """
    import torch
    from monai.bundle import ConfigParser

    from networks.bundle.checkpoint import _model_state, atomic_torch_save  # the format BestModelSaver writes

    bundle = _bundle_for(network)
    root = os.path.join(work_dir, network)
    shutil.copytree(os.path.join(_ROOT, "bundles", bundle), root, dirs_exist_ok=True)
    parser = ConfigParser()
    parser.read_config(os.path.join(root, "configs", "inference.json"))
    parser.update({"bundle_root": root, "device": "$torch.device('cpu')", **overrides})
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    record = parser.get_parsed_content("model_record")
    os.makedirs(os.path.join(root, "models"), exist_ok=True)
    atomic_torch_save(_model_state(net, {"epoch": 0, **record}), os.path.join(root, "models", "model.pt"))
    return root


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def worker(spec: Dict[str, Any]) -> None:
    """Run one row (``spec``: bundle_root, image, out_dir, overrides, threads) and print one ``RESULT`` JSON line."""
    import torch
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    torch.set_num_threads(int(spec["threads"]))
    root = spec["bundle_root"]
    datalist = os.path.join(spec["out_dir"], "datalist.json")
    os.makedirs(spec["out_dir"], exist_ok=True)
    case_id = os.path.basename(spec["image"]).split(".")[0]
    with open(datalist, "w") as f:
        json.dump([{"image": spec["image"], "id": case_id}], f)
    pred_dir = os.path.join(spec["out_dir"], "pred")
    conf = os.path.join(root, "configs")
    wf = ConfigWorkflow(config_file=os.path.join(conf, "inference.json"), meta_file=os.path.join(conf, "metadata.json"),
                        logging_file=os.path.join(conf, "logging.conf"), workflow_type="infer",
                        bundle_root=root, dataset_dir=None, datalist=datalist, output_dir=pred_dir, overwrite=True,
                        device="$torch.device('cpu')", num_workers=0, **spec["overrides"])
    wf.initialize()
    evaluator = wf.parser.get_parsed_content("evaluator")

    # Instrumentation only (the bundle's objects are used as parsed): ignite events around the data loader and
    # the iteration, a wrapper around the inferer call and hooks around the network's forward.
    t: Dict[str, float] = {"pre": 0.0, "sw": 0.0, "net": 0.0, "iter": 0.0}
    marks: Dict[str, float] = {}
    windows, grids = [0], []

    def mark(name):
        return lambda _: marks.__setitem__(name, time.perf_counter())

    def add(key, since):
        return lambda _: t.__setitem__(key, t[key] + time.perf_counter() - marks[since])

    evaluator.add_event_handler(Events.GET_BATCH_STARTED, mark("batch"))
    evaluator.add_event_handler(Events.GET_BATCH_COMPLETED, add("pre", "batch"))
    evaluator.add_event_handler(Events.ITERATION_STARTED, mark("iter"))
    # registered after the evaluator's own postprocessing handler on ITERATION_COMPLETED, so it runs after it
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, add("iter", "iter"))

    inferer = evaluator.inferer

    def timed_inferer(inputs, network, *args, **kwargs):
        grids.append([int(s) for s in inputs.shape[2:]])
        t0 = time.perf_counter()
        try:
            return inferer(inputs, network, *args, **kwargs)
        finally:
            t["sw"] += time.perf_counter() - t0

    evaluator.inferer = timed_inferer

    calls: List[float] = []  # each network call (a batch of windows): the first pays for memory the next reuse

    def before_forward(_module, args):
        windows[0] += int(args[0].shape[0])
        marks["net"] = time.perf_counter()

    def after_forward(_module, _args, _out):
        calls.append(time.perf_counter() - marks["net"])
        t["net"] += calls[-1]

    evaluator.network.register_forward_pre_hook(before_forward)
    evaluator.network.register_forward_hook(after_forward)

    t0 = time.perf_counter()
    wf.run()
    total = time.perf_counter() - t0
    wf.finalize()
    pred = os.path.join(pred_dir, f"{case_id}_seg.nii.gz")
    if not os.path.isfile(pred):
        raise SystemExit(f"error: the run wrote no segmentation {pred}")
    out = {"windows": windows[0], "grid": grids[0] if grids else None, "pre_s": t["pre"], "net_s": t["net"],
           "sw_s": t["sw"], "post_s": t["iter"] - t["sw"], "total_s": total, "peak_rss_gib": _peak_rss_gib(),
           "net_calls_s": calls, "threads": torch.get_num_threads()}
    print("RESULT " + json.dumps(out), flush=True)


def machine(threads: int) -> Dict[str, Any]:
    """CPU model, logical cores, cores this process may use, threads per row and the load average."""
    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "cores": os.cpu_count(), "usable_cores": usable, "threads": threads,
            "load_average": [round(v, 2) for v in os.getloadavg()]}


def _fmt(v: Optional[float], spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


HEADER = ("| volume (x y z) | resampled (z y x) | network | precision | windows | I/O+pre s | network s "
          "| call s first / median | sliding window s | post s | total s | peak RSS GiB | total ratio | network ratio |")


def _calls_text(r: Dict[str, Any]) -> str:
    calls = r.get("net_calls_s") or []
    return f"{calls[0]:.1f} / {statistics.median(calls):.1f}" if calls else "-"


def _row_md(r: Dict[str, Any]) -> str:
    lead = f"| {r['volume']} ({r['shape']}) | {r.get('grid_text', '-')} | {r['network']} | {r['precision']} "
    if "error" in r:
        return lead + f"| {r['error']} |"
    return lead + (f"| {r['windows']} | {_fmt(r['pre_s'])} | {_fmt(r['net_s'])} | {_calls_text(r)} | {_fmt(r['sw_s'])} "
                   f"| {_fmt(r['post_s'])} "
                   f"| {_fmt(r['total_s'])} | {_fmt(r['peak_rss_gib'], '.2f')} | {_fmt(r.get('total_ratio'), '.2f')} "
                   f"| {_fmt(r.get('net_ratio'), '.2f')} |")


def main(
    volumes=VOLUMES,
    networks=NETWORKS,
    precision="float32,bf16",
    threads: int = 2,
    sw_batch_size: Optional[int] = None,
    tiny: bool = False,
    output: Optional[str] = None,
    cache_dir: Optional[str] = None,
    work_dir: Optional[str] = None,
    timeout: Optional[float] = None,
    keep_freed_memory: bool = True,
) -> None:
    """Run the benchmark and print the machine and one markdown table (ResidualUNet's rows first: the ratios'
    reference).

    Args:
        volumes: comma-separated subset of real, synthetic.
        networks: comma-separated subset of segmamba, bisegmamba, multisegmamba, segmambaskip, residualunet, dynunet.
        precision: comma-separated subset of float32, bf16, auto, passed as the bundle's ``precision``; a
            precision other than float32 is skipped, with the reason printed, when the bundle has no such key.
        threads: torch threads in each row's process.
        sw_batch_size: windows per network call (default: the bundle's).
        tiny: tiny filters (4-8), patch 16 x 64 x 64, spacing 3 x 4.5 x 4.5 mm and a 160 x 160 x 32 synthetic CT (seconds).
        output: also write the table to ``<output>.json`` (machine and rows) and ``<output>.md``.
        cache_dir: where the synthetic CT is written once (default: <tmp>/networks_bench_volume).
        work_dir: where the bundle copies and predictions go (default: a temporary folder, removed after).
        timeout: seconds per row (None = no limit).
        keep_freed_memory: the bundles' ``keep_freed_memory`` setting (`networks.host_memory`; default true as in
            the bundles); false to measure what it saves.
    """
    import nibabel as nib

    volumes, networks, precisions = _as_list(volumes), _as_list(networks), _as_list(precision)
    for name, got, allowed in (("volume", volumes, VOLUMES), ("network", networks, NETWORKS),
                               ("precision", precisions, PRECISIONS)):
        bad = [v for v in got if v not in allowed]
        if bad or not got:
            raise SystemExit(f"error: unknown or no {name} {bad}; choose from {', '.join(allowed)}")
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "networks_bench_volume")
    images = {"real": REAL_CT} if "real" in volumes else {}
    if "synthetic" in volumes:
        images["synthetic"] = _synthetic_path(cache_dir, TINY_SYNTHETIC if tiny else SYNTHETIC)

    base_overrides: Dict[str, Any] = dict(TINY_OVERRIDES) if tiny else {}
    if sw_batch_size:
        base_overrides["sw_batch_size"] = int(sw_batch_size)
    keep_freed_memory = parse_flag(keep_freed_memory, "--keep_freed_memory")
    base_overrides["keep_freed_memory"] = keep_freed_memory

    info = machine(int(threads))
    print(f"machine: {info['cpu']}, {info['cores']} logical cores ({info['usable_cores']} usable), "
          f"{info['threads']} torch threads per row, load average {info['load_average']} at start, freed memory "
          f"{'kept for reuse' if keep_freed_memory else 'returned (keep_freed_memory false)'}"
          + (" (tiny networks and volume)" if tiny else ""), flush=True)
    # a precision the bundle has no `precision` key for is skipped, saying why, before anything runs
    supported = {net: "precision" in _bundle_config(_bundle_for(net)) for net in networks}
    skipped = [f"precision {prec} not supported by this bundle ({_bundle_for(net)}: its configs/inference.json has "
               f"no `precision` key): {net} {prec} skipped"
               for net in networks for prec in precisions if prec != "float32" and not supported[net]]
    for line in skipped:
        print(line, flush=True)
    own_work = work_dir is None
    work_dir = work_dir or tempfile.mkdtemp(prefix="bench_volume_")
    rows: List[Dict[str, Any]] = []
    try:
        roots = {}
        for volume, image in images.items():
            shape = "x".join(map(str, nib.load(image).shape))
            base = {}
            for prec in precisions:
                for net in sorted(networks, key=lambda n: n != BASELINE):
                    if not supported[net] and prec != "float32":
                        continue
                    overrides = {**base_overrides, **_network_override(net)}
                    # float32 without a `precision` key is the bundle's CPU default (amp off)
                    overrides.update({"precision": prec} if supported[net] else {"amp": False})
                    if net not in roots:
                        roots[net] = prepare_bundle(net, os.path.join(work_dir, "bundles"),
                                                    {k: v for k, v in overrides.items() if k != "precision"})
                    row = {"volume": volume, "shape": shape, "network": net, "precision": prec}
                    row.update(_run_row(roots[net], image, os.path.join(work_dir, "runs", f"{volume}_{net}_{prec}"),
                                        overrides, int(threads), timeout, f"{volume} {net} {prec}"))
                    if "grid" in row and row["grid"]:
                        row["grid_text"] = "x".join(map(str, row["grid"]))
                    if net == BASELINE and "error" not in row:
                        base[prec] = row
                    if prec in base and "error" not in row:
                        row["total_ratio"] = row["total_s"] / base[prec]["total_s"]
                        row["net_ratio"] = row["net_s"] / base[prec]["net_s"]
                    rows.append(row)
                    if len(rows) == 1:
                        print(HEADER)
                        print("|" + "---|" * (HEADER.count("|") - 1), flush=True)
                    print(_row_md(row), flush=True)
        if not rows:
            print("no row ran")
    finally:
        if own_work:
            shutil.rmtree(work_dir, ignore_errors=True)
    if output:
        stem = output[: -len(".json")] if output.endswith(".json") else output[: -len(".md")] if output.endswith(".md") else output
        os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
        with open(stem + ".json", "w") as f:
            json.dump({"machine": info, "tiny": bool(tiny), "keep_freed_memory": bool(keep_freed_memory), "rows": rows,
                       "skipped": skipped}, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write("\n".join([HEADER, "|" + "---|" * (HEADER.count("|") - 1)] + [_row_md(r) for r in rows]
                              + [""] + skipped) + "\n")
    if any("error" in r for r in rows):
        raise SystemExit(1)


def _run_row(root: str, image: str, out_dir: str, overrides: Dict[str, Any], threads: int,
             timeout: Optional[float], label: str = "") -> Dict[str, Any]:
    """One row in a subprocess: its RESULT dict, or ``{"error": ...}`` naming the failure.

    The row's sliding-window progress lines (``networks.bundle.SlidingWindowProgressInferer``: windows done,
    time left) are passed on to stderr, prefixed with ``label``; the last line of its stderr names a failure."""
    spec = {"bundle_root": root, "image": image, "out_dir": out_dir, "overrides": overrides, "threads": threads}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = os.pathsep.join([_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    cmd = [sys.executable, "-m", "bench.bench_volume", "worker", json.dumps(spec)]
    results: List[str] = []
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=_ROOT, env=env)

        def pump() -> None:  # the bundle's logging.conf logs to stdout, where the RESULT line also goes
            for line in proc.stdout:
                if line.startswith("RESULT "):
                    results.append(line[len("RESULT "):])
                elif "sliding window" in line:
                    print(f"{label}: {line.strip()}", file=sys.stderr, flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return {"error": f"timed out after {timeout} s"}
        finally:
            reader.join(timeout=10)
        stderr.seek(0)
        err = ([ln for ln in stderr.read().splitlines() if ln.strip()] or ["?"])[-1]
    if rc or not results:
        return {"error": f"failed (rc {rc}): {err}"}
    return json.loads(results[-1])


if __name__ == "__main__":
    import fire

    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(json.loads(sys.argv[2]))
    else:
        fire.Fire(main)
