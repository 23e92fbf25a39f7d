"""GPU check: mamba-ssm's CUDA path against the project's own scan, and training-step cost per variant.

Run by ``bench/gpu_check.sh`` on a machine with one NVIDIA GPU (needs mamba-ssm and causal-conv1d
built for it). Prints, in one run:

1. the ``cuda`` backend vs the ``torch`` backend of `networks.selective_scan` on the same inputs
   (forward and all gradients, float32), and `networks.Mamba` with mamba-ssm's fused block
   (``mamba_inner_fn``) vs the project's path on the same weights (forward and all gradients);
2. for every variant at the Synapse plan's patch (48x192x192, batch 2, bf16 autocast, the bundles' loss:
   Dice+CE with deep supervision and nnU-Net's weights, RAdam): mean training-step time and peak GPU
   memory, next to ResidualUNet.

Usage: python -m bench.gpu_check [--steps 5] [--batch 2] [--patch 48,192,192] [--variants SegMamba,...]
Exit status: 0 when the CUDA path agrees, 1 when it does not, 2 when it cannot run (no CUDA device,
mamba-ssm's CUDA path not importable).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

import networks
from networks.nets.plans import plan_kwargs

VARIANTS = ("ResidualUNet", "SegMamba", "BiSegMamba", "MultiSegMamba", "SegMambaSkip")
SCAN_TOL, GRAD_TOL, BLOCK_TOL = 1e-3, 5e-3, 1e-3


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def check_scan(device: torch.device) -> bool:
    """selective_scan: cuda vs torch backend, forward and every input's gradient."""
    torch.manual_seed(0)
    b, d, n, length = 2, 64, 16, 4096
    x = {
        "u": torch.randn(b, d, length), "delta": torch.randn(b, d, length), "A": -torch.rand(d, n) * 4,
        "B": torch.randn(b, n, length), "C": torch.randn(b, n, length), "D": torch.randn(d),
        "z": torch.randn(b, d, length), "delta_bias": torch.randn(d),
    }
    results = {}
    for backend in ("cuda", "torch"):
        inp = {k: v.to(device).requires_grad_() for k, v in x.items()}
        y = networks.selective_scan(**inp, delta_softplus=True, backend=backend)
        y.square().sum().backward()
        results[backend] = (y.detach(), {k: v.grad for k, v in inp.items()})
    err = _max_rel(results["cuda"][0], results["torch"][0])
    print(f"scan forward        cuda vs torch: max rel err {err:.2e}")
    ok = err < SCAN_TOL
    for k in x:
        err = _max_rel(results["cuda"][1][k], results["torch"][1][k])
        print(f"scan grad {k:10s} cuda vs torch: max rel err {err:.2e}")
        ok &= err < GRAD_TOL
    return ok


def check_block(device: torch.device) -> bool:
    """networks.Mamba: mamba-ssm's fused mamba_inner_fn vs the project's path, same weights."""
    from networks.mamba import _mamba_inner_fn

    if _mamba_inner_fn() is None:
        print("Mamba block: mamba-ssm's mamba_inner_fn / causal-conv1d not importable: fused path NOT checked")
        return False
    torch.manual_seed(0)
    block = networks.Mamba(64, d_state=32).to(device)
    xin = torch.randn(2, 2048, 64, device=device)
    outs = []
    for fast in (True, False):
        block.zero_grad(set_to_none=True)
        block.use_fast_path, block.scan_backend = fast, ("cuda" if fast else "torch")
        inp = xin.clone().requires_grad_()
        y = block(inp)
        y.square().mean().backward()
        outs.append((y.detach(), inp.grad, {k: p.grad.clone() for k, p in block.named_parameters()}))
    err = _max_rel(outs[0][0], outs[1][0])
    print(f"Mamba block forward  mamba-ssm fused vs project path: max rel err {err:.2e}")
    ok = err < BLOCK_TOL
    grads = {"input": (outs[0][1], outs[1][1]), **{k: (outs[0][2][k], outs[1][2][k]) for k in outs[0][2]}}
    worst = max((_max_rel(a, b), k) for k, (a, b) in grads.items())
    print(f"Mamba block grads    mamba-ssm fused vs project path: max rel err {worst[0]:.2e} ({worst[1]})")
    return ok and worst[0] < GRAD_TOL


def _loss(n_outputs: int):
    """The bundles' training loss (configs/train.json)."""
    from monai.losses import DeepSupervisionLoss, DiceCELoss

    from networks.bundle_gen import ds_weights

    dice_ce = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=False,
                         smooth_nr=1e-5, smooth_dr=1e-5)
    return DeepSupervisionLoss(dice_ce, weights=ds_weights(n_outputs))


def step_costs(device: torch.device, steps: int, batch: int, patch: Sequence[int], variants: Sequence[str]) -> None:
    kw = plan_kwargs("synapse")
    loss_fn = _loss(len(kw["strides"]) - 1)
    print(f"\ntraining step, Synapse plan, patch {tuple(patch)}, batch {batch}, bf16 autocast, "
          f"{steps} timed steps after 1 warm-up")
    print("| variant | params (M) | step (s) | ratio to ResidualUNet | peak GPU memory (GiB) |")
    print("|---|---|---|---|---|")
    base: Optional[float] = None
    for name in variants:
        net = opt = x = y = loss = None
        try:
            net = getattr(networks, name)(**kw, deep_supervision=True).to(device).train()
            opt = torch.optim.RAdam(net.parameters(), lr=3e-4)
            x = torch.randn(batch, kw["in_channels"], *patch, device=device)
            # float labels, as the bundles' (DeepSupervisionLoss resizes them with nearest interpolation)
            y = torch.randint(0, kw["out_channels"], (batch, 1, *patch), device=device).float()
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            times: List[float] = []
            for i in range(steps + 1):
                torch.cuda.synchronize(device)
                t = time.perf_counter()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = loss_fn(net(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                torch.cuda.synchronize(device)
                if i:  # the first step includes cuDNN autotuning and lazy initialisation
                    times.append(time.perf_counter() - t)
            mean = sum(times) / len(times)
            if name == "ResidualUNet":
                base = mean
            ratio = f"{mean / base:.2f}" if base else "-"
            params = sum(p.numel() for p in net.parameters()) / 1e6
            peak = torch.cuda.max_memory_allocated(device) / 2**30
            print(f"| {name} | {params:.2f} | {mean:.3f} | {ratio} | {peak:.1f} |", flush=True)
        except torch.cuda.OutOfMemoryError:
            print(f"| {name} | - | out of memory | - | > {torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} |",
                  flush=True)
        finally:
            del net, opt, x, y, loss
            torch.cuda.empty_cache()


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per variant (after 1 warm-up)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--patch", default="48,192,192", help="patch in the plan's axis order, comma-separated")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated; ResidualUNet first for ratios")
    ap.add_argument("--skip_costs", action="store_true", help="only the CUDA-path checks")
    args = ap.parse_args(argv)
    patch = tuple(int(p) for p in args.patch.replace("x", ",").split(",") if p.strip())
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if len(patch) != 3 or unknown:
        ap.error(f"--patch needs 3 sizes, got {args.patch!r}" if len(patch) != 3 else f"unknown variants {unknown}")

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to PyTorch "
              f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0)
    print(torch.cuda.get_device_name(device), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
    backends: Dict[str, Optional[str]] = networks.available_backends()
    print("scan backends:", {k: v or "available" for k, v in backends.items()})
    if backends["cuda"] is not None:
        print(f"gpu_check: the CUDA path cannot run: {backends['cuda']}", file=sys.stderr)
        return 2
    ok = check_scan(device)
    ok &= check_block(device)
    if not args.skip_costs:
        step_costs(device, args.steps, args.batch, patch, variants)
    print("\nCUDA path agrees with the project's scan:", "yes" if ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
