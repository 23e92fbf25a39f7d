"""What TorchScript export costs: the scripted network against the eager one, inference on CPU.

    python -m bench.bench_export                               # BiSegMamba, Synapse plan, 1 x 1 x 16 x 64 x 64
    python -m bench.bench_export --variant=SegMamba --shape="[1,1,8,32,32]" --repeats=3

The scripted network (`torch.jit.script`) runs PyTorch ops and the ``torch`` backend's scan (see
`networks.export`); the eager one is timed on the default ``fused`` CPU path and on the ``torch`` scan.
Prints the best of ``--repeats`` calls of each (the scripted one after one warm-up call, which TorchScript's
profiling executor needs) and the largest difference between the scripted and the eager ``torch`` outputs.
"""

from __future__ import annotations

import os
import time

import fire
import torch

import networks
from networks.nets.plans import plan_kwargs


def _best(fn, x, repeats: int):
    times, y = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        y = fn(x)
        times.append(time.perf_counter() - start)
    return y, min(times)


def main(variant: str = "BiSegMamba", plan: str = "synapse", shape=(1, 1, 16, 64, 64), repeats: int = 2) -> None:
    """Time eager (fused, torch scan) and scripted forward passes of ``variant`` with ``plan``'s kwargs."""
    torch.manual_seed(0)
    net = getattr(networks, variant)(**plan_kwargs(plan)).eval()
    x = torch.randn(*[int(s) for s in shape])
    start = time.perf_counter()
    scripted = torch.jit.script(net)
    print(f"script: {time.perf_counter() - start:.2f} s", flush=True)
    old = os.environ.get("NETWORKS_SCAN_BACKEND")
    try:
        with torch.no_grad():
            scripted(x)  # warm-up
            y_script, t_script = _best(scripted, x, repeats)
            os.environ["NETWORKS_SCAN_BACKEND"] = "fused"
            _, t_fused = _best(net, x, repeats)
            os.environ["NETWORKS_SCAN_BACKEND"] = "torch"
            y_torch, t_torch = _best(net, x, repeats)
    finally:
        if old is None:
            os.environ.pop("NETWORKS_SCAN_BACKEND", None)
        else:
            os.environ["NETWORKS_SCAN_BACKEND"] = old
    print(f"{variant} ({plan} plan), input {tuple(x.shape)}: eager fused {t_fused:.2f} s, eager torch {t_torch:.2f} s, "
          f"scripted {t_script:.2f} s ({t_script / t_fused:.1f}x fused); "
          f"max |scripted - eager torch| = {float((y_script - y_torch).abs().max()):.3g}")


if __name__ == "__main__":
    fire.Fire(main)
