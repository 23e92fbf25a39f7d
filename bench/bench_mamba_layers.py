"""One Mamba layer of each kind at the Synapse plan's two largest stages, inference on CPU.

    python -m bench.bench_mamba_layers                 # stages 0 and 1, all three layer kinds
    python -m bench.bench_mamba_layers --stages=0 --kinds=unidirectional --threads=2

What the whole-network times of `bench.bench_networks` are made of: the layer that each variant puts
after an encoder stage (``unidirectional``: SegMamba; ``bidirectional``: BiSegMamba and
SegMambaSkip; ``multidirectional``: MultiSegMamba) on that stage's feature map (stage 0:
32 x 48 x 192 x 192, 1.77 M tokens; stage 1: 64 x 48 x 96 x 96), batch 1, eval mode under
``torch.inference_mode()``, d_state = min(C, cap) as in the variants. Two rows per layer:

* ``fused``: the default on CPU, channel-first kernels and the fused gated scan;
* ``torch``: the same layer with ``scan_backend="torch"`` (PyTorch ops and the chunked PyTorch
  scan), for comparison; skipped with ``--no-torch`` (it takes minutes at stage 0).

Time: best of ``--repeats`` calls after a warm-up on a small input. ms per million tokens is
printed too.
"""

from __future__ import annotations

import time

import fire
import torch

from bench.bench_networks import _as_list
from networks import host_memory
from networks.nets import PLANS
from networks.nets.variants import VARIANTS, bidirectional, multidirectional, unidirectional

KINDS = {"unidirectional": (unidirectional, "SegMamba"), "bidirectional": (bidirectional, "BiSegMamba"),
         "multidirectional": (multidirectional, "MultiSegMamba")}


def _stage_shape(stage: int):
    plan = PLANS["synapse"]
    size = list(plan["patch_size"])
    for s in range(stage + 1):
        size = [v // f for v, f in zip(size, plan["strides"][s])]
    return min(32 * 2**stage, 320), size


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(stages="0,1", kinds="unidirectional,bidirectional,multidirectional", threads: int = 2, repeats: int = 2,
         no_torch: bool = False, keep_freed_memory: bool = True) -> None:
    """Print one row per (stage, layer kind, backend); ``keep_freed_memory`` as the bundles (`networks.host_memory`)."""
    torch.set_num_threads(int(threads))
    host_memory.keep_freed_memory(keep_freed_memory)  # parses "false" etc. (networks.flags)
    stages = [int(s) for s in _as_list(stages)]
    kinds = _as_list(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise SystemExit(f"unknown layer kind(s) {unknown}; choose from {', '.join(KINDS)}")
    backends = ["fused"] + ([] if no_torch else ["torch"])
    print(f"{'stage':>5}  {'C x spatial':>20}  {'layer':>16}  {'backend':>7}  {'time s':>7}  {'ms/M tokens':>11}")
    for stage in stages:
        channels, size = _stage_shape(stage)
        tokens = size[0] * size[1] * size[2]
        torch.manual_seed(0)
        x = torch.randn(1, channels, *size)
        for kind in kinds:
            factory, variant = KINDS[kind]
            d_state = min(channels, VARIANTS[variant].d_state_max)
            for backend in backends:
                torch.manual_seed(0)
                layer = factory(3, channels, d_state, {"scan_backend": backend}).eval()
                with torch.inference_mode():
                    layer(x[:, :, :4, :8, :8])  # warm-up (builds / loads the kernels)
                    seconds = _time(lambda: layer(x), repeats if backend == "fused" else 1)
                shape = f"{channels} x {'x'.join(map(str, size))}"
                print(f"{stage:>5}  {shape:>20}  {kind:>16}  {backend:>7}  {seconds:>7.2f}  "
                      f"{seconds * 1e3 / (tokens / 1e6):>11.0f}", flush=True)


if __name__ == "__main__":
    fire.Fire(main)
