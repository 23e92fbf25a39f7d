"""GPU check: the scan backends against float64, their speed at Synapse's shapes, and training cost.

Run by ``bench/gpu_check.sh`` on one GPU (budget: 8 minutes on an H100/H200 without internet, with a
CUDA build of torch and Triton; mamba-ssm and MONAI optional). Prints ONE table with a row per check:

1. accuracy: `networks.ops.mamba_scan` (both directions, float32 and bfloat16, softplus, D skip,
   z gate, delta bias) on the ``triton`` and ``torch`` backends (and ``cuda`` when mamba-ssm is
   importable) against a float64 loop: forward and the worst gradient of its nine inputs;
2. speed of `selective_scan` at the Synapse stage-0 and stage-1 shapes (batch 2, D = 64, L = 1.77 M
   and D = 128, L = 221,184, N = 32, float32): forward, forward + backward, tokens/s, peak memory,
   and triton's speed-up over ``torch`` (target >= 10x) and ratio to ``cuda`` (target <= 2x);
3. a bf16-autocast training step of every variant at the Synapse patch 48x192x192, batch 2 (the
   bundles' Dice+CE deep-supervision loss, RAdam): time and peak memory next to the paper's
   Table 5 VRAM (needs MONAI, which the networks are built from; skipped when it is missing).

Only torch, triton and the project's MONAI-free modules are imported for 1 and 2. Sections that
would run past ``--budget_s`` are skipped, with a row saying so.

``--tiny`` runs the same code at toy sizes on the CPU (Triton's interpreter, ``TRITON_INTERPRET=1``,
set here before Triton is imported): the test that keeps this script from rotting.

Usage: python -m bench.gpu_check [--tiny] [--budget_s 450] [--steps 2] [--variants SegMamba,...]
Exit status: 0 every accuracy check agrees; 1 one does not (or the triton backend cannot run);
2 no GPU (without ``--tiny``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

VARIANTS = ("ResidualUNet", "SegMamba", "BiSegMamba", "MultiSegMamba", "SegMambaSkip")
# Table 5 of the paper (A100 80 GB, GB); ResidualUNet is compared with nnU-Net ResEnc's row.
PAPER_VRAM_GB = {"ResidualUNet": 10.00, "SegMamba": 25.61, "BiSegMamba": 27.31, "MultiSegMamba": 36.92,
                 "SegMambaSkip": 29.26}
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # max error / max |reference|
FULL = dict(acc=(2, 16, 16, 1000), speed={"stage 0": (2, 64, 32, 1_769_472), "stage 1": (2, 128, 32, 221_184)},
            patch=(48, 192, 192), filters=None)
TINY = dict(acc=(2, 3, 4, 19), speed={"stage 0": (2, 2, 4, 20), "stage 1": (1, 4, 4, 12)},
            patch=(16, 32, 32), filters=[4, 8, 8, 16, 16, 16])


class Table:
    """Rows of | section | backend | case | result | reference / target | status |, printed at the end."""

    def __init__(self) -> None:
        self.rows: List[Tuple[str, ...]] = []
        self.failed = False

    def add(self, section: str, backend: str, case: str, result: str, ref: str, status: str) -> None:
        self.rows.append((section, backend, case, result, ref, status))
        self.failed |= status == "FAIL"
        print("  " + " | ".join(self.rows[-1]), flush=True)  # progress, in case the run is cut short

    def print(self) -> None:
        head = ("section", "backend", "case", "result", "reference / target", "status")
        print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for row in self.rows:
            print("| " + " | ".join(row) + " |")


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max error relative to the largest reference value."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def scan_inputs(batch: int, dim: int, nstate: int, length: int, device, dtype=torch.float32, seed: int = 0,
                rank: int = 4) -> Dict[str, torch.Tensor]:
    """Inputs of `mamba_scan` with Mamba's initialisation scales (softplus(dt) in [1e-3, 0.1])."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    dt0 = torch.rand(dim, generator=g) * 0.099 + 0.001
    x = {"u": r(batch, dim, length), "dt_low": r(batch, rank, length), "dt_weight": r(dim, rank) * rank**-0.5 * 0.5,
         "A": -torch.arange(1, nstate + 1, dtype=torch.float32).repeat(dim, 1), "B": r(batch, nstate, length),
         "C": r(batch, nstate, length), "D": torch.ones(dim), "z": r(batch, dim, length),
         "delta_bias": dt0 + torch.log(-torch.expm1(-dt0))}
    tokens = ("u", "dt_low", "dt_weight", "B", "C", "z")  # dt_weight too: as autocast casts it for the einsum
    return {k: v.to(device, dtype if k in tokens else torch.float32) for k, v in x.items()}


def reference_mamba_scan(x: Dict[str, torch.Tensor], reverse: bool) -> torch.Tensor:
    """float64 loop: softplus(dt_weight @ dt_low + bias), recurrence, D skip, silu(z) gate."""
    from networks.ops.scan_reference import selective_scan_loop

    flip = (lambda t: t.flip(-1)) if reverse else (lambda t: t)  # noqa: E731
    delta = torch.einsum("dr,brl->bdl", x["dt_weight"], x["dt_low"])
    y = selective_scan_loop(flip(x["u"]), flip(delta), x["A"], flip(x["B"]), flip(x["C"]), x["D"], flip(x["z"]),
                            x["delta_bias"], delta_softplus=True)
    return flip(y)


def backend_reason(name: str, device: torch.device) -> Optional[str]:
    from networks.ops.selective_scan import resolve_backend

    try:
        resolve_backend(device, name)
    except ValueError as err:
        return str(err).split("cannot run: ", 1)[-1]
    return None


def check_accuracy(table: Table, backends: Sequence[str], device: torch.device, size) -> None:
    from networks.ops.selective_scan import mamba_scan

    batch, dim, nstate, length = size
    for dtype, reverse in ((torch.float32, False), (torch.float32, True), (torch.bfloat16, True)):
        case = f"{'bf16' if dtype == torch.bfloat16 else 'fp32'} {'reverse' if reverse else 'forward'} scan B{batch} D{dim} N{nstate} L{length}"
        x = scan_inputs(batch, dim, nstate, length, device, dtype, seed=1)
        x64 = {k: v.double().requires_grad_() for k, v in x.items()}
        want = reference_mamba_scan(x64, reverse)
        dout = torch.randn(want.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(device)
        g_want = torch.autograd.grad(want, list(x64.values()), dout)
        for name in backends:
            leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
            got = mamba_scan(**leaves, reverse=reverse, backend=name)
            g_got = torch.autograd.grad(got, list(leaves.values()), dout.to(dtype))
            tol = TOL[dtype]
            err = rel_err(got, want)
            table.add("accuracy", name, case + " output", f"{err:.1e}", f"< {tol:.0e}", "ok" if err < tol else "FAIL")
            worst, which = max((rel_err(a, b), k) for k, a, b in zip(x, g_got, g_want))
            table.add("accuracy", name, case + " gradients", f"{worst:.1e} (worst: {which})", f"< {tol:.0e}",
                      "ok" if worst < tol else "FAIL")


def time_scan(name: str, size, device: torch.device, reps: int) -> Dict[str, float]:
    """Seconds per forward and per forward + backward, peak extra memory of the latter (GiB)."""
    from networks.ops.selective_scan import selective_scan

    batch, dim, nstate, length = size
    x = scan_inputs(batch, dim, nstate, length, device)
    delta = torch.einsum("dr,brl->bdl", x.pop("dt_weight"), x.pop("dt_low"))
    x = {"delta": delta, **x}
    leaves = {k: v.requires_grad_() for k, v in x.items()}
    dout = torch.randn_like(x["u"])
    run = lambda: selective_scan(**leaves, delta_softplus=True, backend=name)  # noqa: E731
    grad = lambda y: torch.autograd.grad(y, list(leaves.values()), dout)  # noqa: E731
    if name != "torch":  # JIT compilation / autotuning; torch's eager path needs no warm-up
        grad(run())
    _sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        for _ in range(reps):
            run()
    _sync(device)
    fwd = (time.perf_counter() - t) / reps
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t = time.perf_counter()
    for _ in range(reps):
        grad(run())
    _sync(device)
    both = (time.perf_counter() - t) / reps
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else float("nan")
    return {"fwd": fwd, "both": both, "peak": peak, "tokens": batch * length}


def _speed_row(table: Table, name: str, case: str, r: Dict[str, float]) -> None:
    mem = "-" if math.isnan(r["peak"]) else f"{r['peak']:.2f} GiB"
    table.add("speed", name, case, f"fwd {r['fwd'] * 1e3:.1f} ms ({r['tokens'] / r['fwd'] / 1e6:.2f} M tok/s), "
              f"fwd+bwd {r['both'] * 1e3:.1f} ms ({r['tokens'] / r['both'] / 1e6:.2f} M tok/s)", f"peak {mem}", "info")


def sweep_triton_tiles(table: Table, device: torch.device, stage: str, size, tiles: Sequence[str], budget: Budget,
                       reserve_s: float) -> None:
    """Triton at other (channels x tokens) tiles per program than the defaults, to tune them."""
    from networks.ops import scan_triton

    default = (scan_triton.BLOCK_D, scan_triton.CHUNK)
    for spec in tiles:
        block_d, chunk = (int(v) for v in spec.lower().split("x"))
        if (block_d, chunk) == default or budget.left() < reserve_s:
            continue
        scan_triton.BLOCK_D, scan_triton.CHUNK = block_d, chunk
        try:
            _speed_row(table, f"triton {block_d}x{chunk}", f"{stage}: B{size[0]} D{size[1]} N{size[2]} L{size[3]:,}",
                       time_scan("triton", size, device, reps=1 if device.type == "cpu" else 3))
        finally:
            scan_triton.BLOCK_D, scan_triton.CHUNK = default


def check_speed(table: Table, backends: Sequence[str], device: torch.device, sizes, budget: Budget,
                reserve_s: float, tiles: Sequence[str] = ()) -> None:
    results: Dict[Tuple[str, str], Dict[str, float]] = {}
    for stage, size in sizes.items():
        batch, dim, nstate, length = size
        case = f"{stage}: B{batch} D{dim} N{nstate} L{length:,}"
        for name in backends:
            if budget.left() < reserve_s:
                table.add("speed", name, case, "skipped", f"{budget.left():.0f}s left", "skipped: time budget")
                continue
            try:
                r = time_scan(name, size, device, reps=1 if name == "torch" or device.type == "cpu" else 3)
            except torch.cuda.OutOfMemoryError:
                table.add("speed", name, case, "out of memory", "-", "FAIL")
                continue
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            results[(stage, name)] = r
            _speed_row(table, name, case, r)
        if stage == "stage 0" and "triton" in backends:
            sweep_triton_tiles(table, device, stage, size, tiles, budget, reserve_s)
        tri = results.get((stage, "triton"))
        for other, target, good in (("torch", ">= 10x", lambda s: s >= 10), ("cuda", "<= 2x", lambda s: 1 / s <= 2)):
            ref = results.get((stage, other))
            if tri and ref:
                speedup = ref["both"] / tri["both"]
                table.add("speed", f"triton vs {other}", case, f"fwd+bwd {speedup:.2f}x faster", target,
                          "target met" if good(speedup) else "below target")


def _loss(n_outputs: int):
    """The bundles' training loss (configs/train.json)."""
    from monai.losses import DeepSupervisionLoss, DiceCELoss

    from networks.bundle_gen import ds_weights

    dice_ce = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=False,
                         smooth_nr=1e-5, smooth_dr=1e-5)
    return DeepSupervisionLoss(dice_ce, weights=ds_weights(n_outputs))


def check_steps(table: Table, device: torch.device, steps: int, batch: int, patch: Sequence[int],
                variants: Sequence[str], filters, budget: Budget) -> None:
    try:
        import networks.nets as nets
        from networks.nets.plans import plan_kwargs
    except ImportError as err:
        table.add("train step", "-", "all variants", "skipped", "-", f"skipped: the networks need MONAI ({err})")
        return
    from networks.ops.selective_scan import last_backend

    kw = plan_kwargs("synapse")
    if filters:
        kw["filters"] = filters
    loss_fn = _loss(len(kw["strides"]) - 1)
    amp = device.type == "cuda"  # bf16 autocast (CPU convolutions in bf16 are slow: --tiny runs float32)
    case = f"B{batch} patch {'x'.join(map(str, patch))} {'bf16 AMP' if amp else 'fp32'}"
    for name in variants:
        if budget.left() < 15:
            table.add("train step", "-", f"{name} {case}", "skipped", f"{budget.left():.0f}s left", "skipped: time budget")
            continue
        net = opt = x = y = loss = None
        try:
            net = getattr(nets, name)(**kw, deep_supervision=True).to(device).train()
            opt = torch.optim.RAdam(net.parameters(), lr=3e-4)
            x = torch.randn(batch, kw["in_channels"], *patch, device=device)
            y = torch.randint(0, kw["out_channels"], (batch, 1, *patch), device=device).float()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times: List[float] = []
            for i in range(steps + 1):
                _sync(device)
                t = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    loss = loss_fn(net(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                _sync(device)
                if i or not steps:  # the first step includes cuDNN autotuning and JIT compilation
                    times.append(time.perf_counter() - t)
            if not torch.isfinite(loss):
                table.add("train step", last_backend() or "-", f"{name} {case}", f"loss {loss.item()}", "finite", "FAIL")
                continue
            mean = sum(times) / len(times)
            peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")
            mem = "-" if math.isnan(peak) else f"{peak:.1f} GB"
            paper = PAPER_VRAM_GB[name]
            status = "info" if math.isnan(peak) else ("under paper" if peak < paper else "over paper")
            scan = last_backend() if name != "ResidualUNet" else "-"
            table.add("train step", scan or "-", f"{name} {case}", f"{mean:.3f} s/step, peak {mem}",
                      f"paper VRAM {paper:.2f} GB" + (" (nnU-Net ResEnc)" if name == "ResidualUNet" else ""), status)
        except torch.cuda.OutOfMemoryError:
            table.add("train step", "-", f"{name} {case}", "out of memory", f"paper VRAM {PAPER_VRAM_GB[name]:.2f} GB",
                      "FAIL")
        finally:
            del net, opt, x, y, loss
            if device.type == "cuda":
                torch.cuda.empty_cache()


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="toy sizes on CPU through Triton's interpreter (CI)")
    ap.add_argument("--budget_s", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S", 450)),
                    help="wall-clock budget of this script; sections that would overrun are skipped")
    ap.add_argument("--steps", type=int, default=2, help="timed training steps per variant (after 1 warm-up)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    ap.add_argument("--triton_tiles", default=None,
                    help="comma-separated CHANNELSxTOKENS tiles per triton program to time at stage 0 besides the "
                         "default (default: 4x128,4x256,2x512; --tiny: 4x8)")
    args = ap.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if any(v not in VARIANTS for v in variants):
        ap.error(f"unknown variants {[v for v in variants if v not in VARIANTS]}; choose from {VARIANTS}")
    budget = Budget(args.budget_s)
    sizes = TINY if args.tiny else FULL
    if torch.cuda.is_available():
        device = torch.device("cuda", 0)
        print(torch.cuda.get_device_name(device), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
    elif args.tiny:
        device = torch.device("cpu")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is first imported
        print("no GPU: --tiny on CPU, triton kernels through Triton's interpreter")
    else:
        print(f"gpu_check: no CUDA device visible to PyTorch (torch {torch.__version__}, CUDA {torch.version.cuda}); "
              "use --tiny for the CPU check", file=sys.stderr)
        return 2
    if args.tiny:
        from networks.ops import scan_triton as _st  # small chunks, so that the carry between chunks runs

        _st.CHUNK, _st.BLOCK_D = 8, 2

    table = Table()
    backends = ["torch"]
    for name in ("triton", "cuda"):  # triton must run here; mamba-ssm's cuda only when it was built
        reason = backend_reason(name, device)
        if reason is None:
            backends.insert(0, name)
        else:
            table.add("backends", name, str(device), "cannot run", reason, "FAIL" if name == "triton" else "skipped")
    check_accuracy(table, backends, device, sizes["acc"])
    tiles = (args.triton_tiles or ("4x8" if args.tiny else "4x128,4x256,2x512")).split(",")
    check_speed(table, backends, device, sizes["speed"], budget, reserve_s=0 if args.tiny else 150,
                tiles=[t for t in tiles if t])
    check_steps(table, device, 0 if args.tiny else args.steps, 1 if args.tiny else args.batch, sizes["patch"],
                variants, sizes["filters"], budget)
    table.print()
    print("\nall accuracy checks agree:", "no" if table.failed else "yes", f"({budget.left():.0f}s of the budget left)")
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
