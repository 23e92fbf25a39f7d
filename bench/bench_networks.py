"""Forward cost of the five networks at each dataset's plan and patch size, batch 1, on this machine.

    python -m bench.bench_networks                                  # all datasets, all variants
    python -m bench.bench_networks --datasets=synapse --variants=ResidualUNet,SegMamba --scale=0.5

Each (dataset, variant) runs in its own subprocess, so that its peak resident memory (ru_maxrss)
is its own. Columns:

* params: trainable parameters.
* GFLOPs: forward FLOPs from `torch.utils.flop_counter.FlopCounterMode` (2 per multiply-add),
  counted on the meta device. It covers convolutions, transposed convolutions and matmuls
  (Linear layers, Mamba's in/x/dt/out projections and its depthwise Conv1d); it does not count
  norms, activations, pooling, additions and other elementwise work, nor the selective scan, which
  is replaced by a stub while counting.
* scan Gelem: the selective scan's own work, sum over scan calls of batch * L * d_inner * d_state
  (state updates; each costs a few elementwise flops).
* time: one forward in eval mode under torch.inference_mode() after a warm-up on a minimal input, with freed
  memory kept for reuse as the bundles do (`networks.host_memory`; ``--keep_freed_memory false`` to compare).
* peak RSS: the process's peak resident memory (includes ~0.5 GiB of Python/torch/model), and the
  increase over the resident memory just before the timed forward.
* ratio: time / ResidualUNet's time in the same run.
* scan backend: `networks.last_backend()` after the forward.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from typing import Dict, Optional, Sequence

from bench._worker import run_worker, worker_env
from networks.flags import parse_flag

DATASETS = ("synapse", "acdc", "brain_tumour")
VARIANTS = ("ResidualUNet", "SegMamba", "BiSegMamba", "MultiSegMamba", "SegMambaSkip")


def _as_list(v) -> list:
    """A command-line list: a comma-separated string, or what fire makes of one (a tuple, or one int)."""
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return list(v)
    return [s for s in str(v).replace(" ", "").split(",") if s]


def _rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def _patch(dataset: str, scale: float):
    from networks.nets import PLANS

    plan = PLANS[dataset]
    total = [math.prod(s[a] for s in plan["strides"]) for a in range(3)]
    # each axis scaled, rounded to a multiple of the total stride (at least 1x)
    return [max(t, int(round(p * scale / t)) * t) for p, t in zip(plan["patch_size"], total)]


def _count_flops(cls, kw, patch) -> Dict[str, float]:
    """Forward FLOPs (scan stubbed) and scan elements, on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import networks.mamba as mamba_mod

    scan_elems = [0]
    real = mamba_mod.mamba_scan

    def stub(u, dt_low, dt_weight, A, B, C, *args, **kwargs):
        scan_elems[0] += u.shape[0] * u.shape[1] * u.shape[2] * A.shape[1]
        torch.einsum("dr,brl->bdl", dt_weight, dt_low)  # the step-size projection's FLOPs
        return u.new_empty(u.shape)

    mamba_mod.mamba_scan = stub
    try:
        with torch.device("meta"):
            net = cls(**kw).eval()
            x = torch.empty(1, kw["in_channels"], *patch)
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            net(x)
    finally:
        mamba_mod.mamba_scan = real
    return {"gflops": counter.get_total_flops() / 1e9, "scan_gelem": scan_elems[0] / 1e9}


def worker(dataset: str, variant: str, patch: Sequence[int], threads: int = 0, precision: str = "float32") -> None:
    """Measure one (dataset, variant, precision) in this process and print one JSON line."""
    import torch

    import networks
    from networks.host_memory import keep_freed_memory, kept
    from networks.nets import plan_kwargs

    if threads:
        torch.set_num_threads(int(threads))
    keep_freed_memory()  # as the bundles' configs do; off with NETWORKS_KEEP_FREED_MEMORY=0 (main's option)
    patch = [int(p) for p in patch]
    cls = getattr(networks, variant)
    kw = plan_kwargs(dataset)
    out = {"dataset": dataset, "variant": variant, "patch": patch}
    out.update(_count_flops(cls, kw, patch))
    torch.manual_seed(0)
    net = cls(**kw).eval()
    out["params"] = sum(p.numel() for p in net.parameters())
    if precision != "float32":
        from networks.precision import set_inference_precision

        set_inference_precision(net, precision, "cpu")
    out["precision"] = getattr(net, "inference_precision", "float32")
    out["kept"] = kept()
    # probe the scan backends outside inference_mode: the fused backend's availability check
    # fails when first run under torch.inference_mode() (and then falls back to torch)
    networks.available_backends()
    # warm-up on the smallest input with > 1 voxel at the bottleneck
    small = list(net.total_stride)
    small[0] *= 2
    with torch.inference_mode():
        net(torch.randn(1, kw["in_channels"], *small))
        x = torch.randn(1, kw["in_channels"], *patch)
        out["rss_before_gib"] = _rss_gib()
        t0 = time.perf_counter()
        y = net(x)
        out["time_s"] = time.perf_counter() - t0
    assert tuple(y.shape) == (1, kw["out_channels"], *patch)
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out["backend"] = networks.last_backend() or "-"
    out["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(out), flush=True)


def main(
    datasets=DATASETS,
    variants=VARIANTS,
    scale: float = 1.0,
    threads: int = 0,
    timeout: Optional[float] = None,
    precisions="float32",
    keep_freed_memory: bool = True,
) -> None:
    """Run the benchmark and print a markdown table.

    Args:
        datasets: comma-separated subset of synapse, acdc, brain_tumour.
        variants: comma-separated subset of the five class names.
        scale: patch size factor per axis (1.0 = the plan's patch; rounded to the total stride).
        threads: torch threads per run (0 = torch's default).
        timeout: seconds per (dataset, variant) run (None = no limit).
        precisions: comma-separated ``float32`` and/or ``bf16`` (`networks.precision`); each variant runs at
            each, and "vs float32" is its time over the same variant's float32 time in this run.
        keep_freed_memory: run with `networks.host_memory.keep_freed_memory` on (as the bundles do) or off.
    """
    datasets, variants, precisions = _as_list(datasets), _as_list(variants), _as_list(precisions)
    keep_freed_memory = parse_flag(keep_freed_memory, "--keep_freed_memory")
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r}; choose from {VARIANTS}")
    header = ("| dataset | patch | variant | precision | params | GFLOPs | scan Gelem | time s | ratio | vs float32 "
              "| peak RSS GiB | +RSS GiB | scan backend |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for ds in datasets:
        patch = _patch(ds, scale)
        base_time: Dict[str, float] = {}
        for v in variants:
            f32_time = None
            for prec in precisions:
                cmd = [sys.executable, "-m", "bench.bench_networks", "worker", ds, v, ",".join(map(str, patch)),
                       f"--threads={threads}", f"--precision={prec}"]
                cells = f"| {ds} | {'x'.join(map(str, patch))} | {v} | {prec} |"
                r, why = run_worker(cmd, worker_env(keep_freed_memory), timeout)
                if r is None:
                    print(f"{cells} {why} |", flush=True)
                    continue
                if r["precision"] != prec:
                    print(f"{cells} ran as {r['precision']} (see networks.precision's log) |", flush=True)
                    continue
                if v == "ResidualUNet":
                    base_time[prec] = r["time_s"]
                if prec == "float32":
                    f32_time = r["time_s"]
                ratio = f"{r['time_s'] / base_time[prec]:.2f}" if prec in base_time else "-"
                vs32 = f"{r['time_s'] / f32_time:.2f}" if f32_time else "-"
                print(
                    f"{cells} {r['params']:,} | {r['gflops']:.1f} | {r['scan_gelem']:.2f} | {r['time_s']:.1f} | {ratio} "
                    f"| {vs32} | {r['peak_rss_gib']:.2f} | {r['peak_rss_gib'] - r['rss_before_gib']:.2f} "
                    f"| {r['backend']} ({r['threads']} thr{', freed memory kept' if r['kept'] else ''}) |",
                    flush=True,
                )


if __name__ == "__main__":
    import fire

    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        ds, var, patch = sys.argv[2], sys.argv[3], sys.argv[4].split(",")
        thr = next((a.split("=", 1)[1] for a in sys.argv[5:] if a.startswith("--threads=")), "0")
        prec = next((a.split("=", 1)[1] for a in sys.argv[5:] if a.startswith("--precision=")), "float32")
        worker(ds, var, patch, int(thr), prec)
    else:
        fire.Fire(main)
