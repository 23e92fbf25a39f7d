"""Cost of one training step (forward, deep-supervision loss, backward; no optimizer) of the five networks on CPU.

    python -m bench.bench_train_step                                   # demo patch, all variants
    python -m bench.bench_train_step --sizes=demo,full --variants=ResidualUNet,SegMamba
    python -m bench.bench_train_step --backend=torch                   # the PyTorch path, to compare
    python -m bench.bench_train_step --tiny                            # a few seconds (CI)

Networks are built from the Synapse plan (`networks.nets.plan_kwargs`), batch 2, float32, in
``train()`` with deep supervision, the loss as the bundles' train.json (`DeepSupervisionLoss` of
`DiceCELoss` on random labels). Sizes:

* ``full``: the plan's patch 48x192x192 and filters (the paper's);
* ``demo``: the demo's patch 16x64x64 and its reduced filters (`networks.demo.run`: DEMO_SETTINGS,
  DEMO_FILTERS), what ``make demo`` trains;
* ``tiny`` (``--tiny``): 16x32x32, filters 4-8, to check that the script runs.

Each (size, variant) runs in its own subprocess (except with ``--tiny``), so that its peak
resident memory is its own. Columns:

* time s: wall-clock time, median over ``--repeats`` steps (default 2) after one warm-up step;
* CPU s: the process's CPU time (all threads) in the same steps, median: on a machine shared with
  other jobs it varies less than wall-clock time (up to ``threads`` x time when nothing else runs);
* ratio: time / ResidualUNet's time, and CPU / ResidualUNet's CPU, at the same size in the same run;
* peak RSS GiB: the process's peak resident memory (includes ~0.5 GiB of Python/torch/model), and
  +RSS GiB its increase over the resident memory before the warm-up step (the step's own memory);
* scan backend: ``networks.last_backend()`` after the step (``-`` for ResidualUNet, which has no scan),
  and whether freed memory was kept (`networks.host_memory`) and the Mamba layers checkpointed.

``--backend`` sets ``NETWORKS_SCAN_BACKEND`` for the runs: ``fused`` (the default where it is built:
C++ forward and backward kernels for LayerNorm, Conv1d and the scan) or ``torch`` (PyTorch ops with
autograd), to compare the two.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from typing import Optional

from bench._worker import run_worker, worker_env
from bench.bench_networks import VARIANTS, _as_list, _rss_gib
from networks.flags import parse_flag

SIZES = ("demo", "full", "tiny")
TINY_PATCH, TINY_FILTERS = [16, 32, 32], [4, 4, 8, 8, 8, 8]


def _size(name: str):
    from networks.demo.run import DEMO_FILTERS, DEMO_SETTINGS
    from networks.nets import PLANS

    if name == "full":
        return list(PLANS["synapse"]["patch_size"]), None
    if name == "demo":
        return list(DEMO_SETTINGS["synapse"]["patch_size"]), list(DEMO_FILTERS)
    if name == "tiny":
        return list(TINY_PATCH), list(TINY_FILTERS)
    raise ValueError(f"unknown size {name!r}; choose from {', '.join(SIZES)}")


def measure(size: str, variant: str, threads: int = 2, repeats: int = 2, batch: int = 2,
            use_checkpoint: bool = False) -> dict:
    """Time and memory of training steps of one (size, variant) in this process."""
    import torch
    from monai.losses import DeepSupervisionLoss, DiceCELoss

    import networks
    from networks.host_memory import kept
    from networks.nets import plan_kwargs

    torch.set_num_threads(int(threads))
    patch, filters = _size(size)
    kw = plan_kwargs("synapse")
    if filters is not None:
        kw["filters"] = filters
    torch.manual_seed(0)
    net = getattr(networks, variant)(deep_supervision=True, use_checkpoint=use_checkpoint, **kw).train()
    loss_fn = DeepSupervisionLoss(DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=False))
    x = torch.randn(batch, kw["in_channels"], *patch)
    label = torch.randint(0, kw["out_channels"], (batch, 1, *patch)).float()
    networks.available_backends()  # build/load the fused library outside the timed steps

    def step():
        net.zero_grad(set_to_none=True)
        t0, c0 = time.perf_counter(), time.process_time()
        loss = loss_fn(net(x), label)
        loss.backward()
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        if not torch.isfinite(loss):
            raise RuntimeError(f"{variant} at {size}: non-finite loss {loss.item()}")
        return elapsed, cpu

    rss_before = _rss_gib()
    step()  # warm-up
    times, cpus = zip(*[step() for _ in range(int(repeats))])
    return {
        "size": size, "patch": patch, "variant": variant, "time_s": statistics.median(times),
        "cpu_s": statistics.median(cpus),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "rss_before_gib": rss_before,
        "backend": (networks.last_backend() or "-") if variant != "ResidualUNet" else "-",
        "threads": torch.get_num_threads(),
        "kept": kept(),
        "checkpointed": bool(net.use_checkpoint),
    }


def worker(size: str, variant: str, threads: int, repeats: int, use_checkpoint: bool = False) -> None:
    """Measure one (size, variant) in this process and print one JSON line."""
    from networks.host_memory import keep_freed_memory

    keep_freed_memory()  # unless main's --keep_freed_memory is false (the default): NETWORKS_KEEP_FREED_MEMORY=0
    print("RESULT " + json.dumps(measure(size, variant, threads, repeats, use_checkpoint=use_checkpoint)), flush=True)


def _row(r: dict, base: Optional[float]) -> str:
    ratio = f"{r['time_s'] / base[0]:.2f} / {r['cpu_s'] / base[1]:.2f}" if base else "-"
    return (f"| {r['size']} {'x'.join(map(str, r['patch']))} | {r['variant']} | {r['time_s']:.2f} | {r['cpu_s']:.2f} "
            f"| {ratio} "
            f"| {r['peak_rss_gib']:.2f} | {r['peak_rss_gib'] - r['rss_before_gib']:.2f} "
            f"| {r['backend']} ({r['threads']} thr{', freed memory kept' if r['kept'] else ''}"
            f"{', Mamba layers checkpointed' if r['checkpointed'] else ''}) |")


def main(
    sizes="demo",
    variants=VARIANTS,
    backend: Optional[str] = None,
    threads: int = 2,
    repeats: int = 2,
    tiny: bool = False,
    use_checkpoint: bool = False,
    timeout: Optional[float] = None,
    keep_freed_memory: bool = False,
) -> None:
    """Run the benchmark and print a markdown table.

    Args:
        sizes: comma-separated subset of demo, full (and tiny).
        variants: comma-separated subset of the five class names.
        backend: scan backend for the runs (sets NETWORKS_SCAN_BACKEND): fused, torch or auto
            (default: the environment's, else auto).
        threads: torch threads (default 2).
        repeats: timed steps per run after the warm-up (the median is shown).
        tiny: the tiny size only, in this process (seconds; for CI).
        use_checkpoint: build the networks with ``use_checkpoint=True`` (the Mamba layers recomputed in the
            backward pass instead of keeping their intermediate tensors: the bundles' ``use_checkpoint``).
        timeout: seconds per (size, variant) run (None = no limit).
        keep_freed_memory: run with `networks.host_memory.keep_freed_memory` on or off (default, as the bundles'
            train.json: at 48x192x192 it made the steps run out of 24 GiB); not with ``--tiny`` (in this process).
    """
    sizes, variants = (["tiny"] if tiny else _as_list(sizes)), _as_list(variants)
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r}; choose from {VARIANTS}")
    for s in sizes:
        _size(s)
    env = worker_env(parse_flag(keep_freed_memory, "--keep_freed_memory"))
    use_checkpoint = parse_flag(use_checkpoint, "--use_checkpoint")
    if backend:
        env["NETWORKS_SCAN_BACKEND"] = os.environ["NETWORKS_SCAN_BACKEND"] = str(backend)
    header = "| size | variant | time s | CPU s | ratio (time / CPU) | peak RSS GiB | +RSS GiB | scan backend |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for size in sizes:
        base = None
        for v in variants:
            if tiny:
                r = measure(size, v, threads, repeats, use_checkpoint=use_checkpoint)
            else:
                cmd = [sys.executable, "-m", "bench.bench_train_step", "worker", size, v, str(threads), str(repeats),
                       str(int(bool(use_checkpoint)))]
                r, why = run_worker(cmd, env, timeout)
                if r is None:
                    print(f"| {size} | {v} | {why} |", flush=True)
                    continue
            if v == "ResidualUNet":
                base = (r["time_s"], r["cpu_s"])
            print(_row(r, base), flush=True)


if __name__ == "__main__":
    import fire

    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), bool(int(sys.argv[6])))
    else:
        fire.Fire(main)
