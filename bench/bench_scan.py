"""Selective-scan backends on this CPU, in one run: `make bench-scan` (``python -m bench.bench_scan``).

    python -m bench.bench_scan              # the full table, a few minutes
    python -m bench.bench_scan --quick      # L <= 32768 only, well under a minute
    python -m bench.bench_scan --threads=4 --lengths=4096,262144 --states=16 --json=scan.json

What runs: the core scan y = scan(u, delta, A, B, C) (delta already final; no D, z, bias), batch 1,
D=64 channels, N in {16, 32}, float32, on ``--threads`` threads (default 2), for

* ``torch``:   this project's chunked pure-PyTorch scan (`networks.ops.scan_torch.chunked_scan`);
* ``fused``:   this project's fused C++ kernel (`networks.ops.scan_fused.fused_scan`);
* ``loop``:    the sequential reference, one PyTorch step per token (`scan_reference`), run at
  L=4096 only; beyond, its row says n/a and gives the time extrapolated linearly from L=4096;
* ``mambapy``: mambapy's parallel scan (`mambapy.pscan.pscan`, used as in ``mambapy.mamba``:
  exp(delta A) and delta B u materialised as (L, D, N) tensors), when mambapy is installed and those
  tensors fit in ``--mambapy-gib`` (default 4 GiB); otherwise n/a.

Lengths: 4096, 32768, 262144 for every backend, and 1,769,472 (a 96x96x192 volume) for the
project's two backends. Forward+backward (y.backward(dy)) is timed at L=32768.

Columns: time = best wall time of the repeats (the first call is a warm-up, except for calls
longer than 3 s, which are timed once); tokens/s = L / time; ns/el = time / (L * D * N);
x torch = torch backend's time / this time, same run; extra MiB = peak increase of resident
memory over its value just before one call, sampled every 0.5 ms, measured in a separate process
per (L, N) with glibc's mmap threshold fixed at 64 KiB so that freed buffers leave the resident set
(includes the outputs and, for forward+backward, the gradients; Linux only); err =
max |y - y_ref| / max |y_ref| against
the float64 sequential loop (L=4096 only). The machine's load average is printed before and
after: other processes on the same cores slow every row.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional

import torch

from networks.ops import scan_fused
from networks.ops.scan_reference import selective_scan_loop
from networks.ops.scan_torch import chunked_scan

DIM = 64
LENGTHS = (4096, 32768, 262144)
LONG = 1769472  # project backends only
STATES = (16, 32)
BACKWARD_LENGTH = 32768
LOOP_MAX_LENGTH = 4096
TIMED_ONCE_S = 3.0
# Targets of issue 4 (2 threads, D=64, N=32)
TARGET_FWD_NS = 0.5
TARGET_SPEEDUP = 4.0
TARGET_FWD_BWD_NS = 2.0


# ------------------------------------------------------------------------------------------------
# measurement


class PeakRSS:
    """Peak increase of resident memory during a block, sampled by a thread (Linux; else None)."""

    def __init__(self, interval_s: float = 5e-4):
        self.interval = interval_s
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.available = os.path.exists("/proc/self/statm")
        self.peak_bytes: Optional[int] = None

    def _rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self.page

    def _sample(self):
        while not self._stop.is_set():
            self._max = max(self._max, self._rss())
            time.sleep(self.interval)

    def __enter__(self):
        if self.available:
            gc.collect()
            self._base = self._max = self._rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.available:
            self._max = max(self._max, self._rss())
            self._stop.set()
            self._thread.join()
            self.peak_bytes = self._max - self._base
        return False


def measure(fn: Callable[[], object], min_total_s: float = 1.0, max_reps: int = 5) -> Dict[str, float]:
    """Best wall time of fn() over repeats (after a warm-up call, unless that took over 3 s)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    if first < TIMED_ONCE_S:
        total = 0.0
        while len(times) < max_reps and (total < min_total_s or len(times) < 2):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            total += times[-1]
    else:
        times = [first]
    return {"time_s": min(times), "reps": len(times)}


# ------------------------------------------------------------------------------------------------
# inputs and backends


def make_inputs(length: int, nstate: int, seed: int = 0) -> List[torch.Tensor]:
    """Mamba-like inputs: delta log-uniform in [1e-3, 1e-1], A = -(1..N) (S4D-real init)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(1, DIM, length, generator=gen)
    delta = torch.exp(torch.empty(1, DIM, length).uniform_(math.log(1e-3), math.log(1e-1), generator=gen))
    A = -torch.arange(1, nstate + 1, dtype=torch.float32).repeat(DIM, 1)
    B = torch.randn(1, nstate, length, generator=gen)
    C = torch.randn(1, nstate, length, generator=gen)
    return [u, delta, A, B, C]


def mambapy_scan():
    try:
        from mambapy.pscan import pscan
    except ImportError:
        return None

    def scan(x, delta, A, B, C):  # mambapy layout: x, delta (B, L, D); B, C (B, L, N)
        delta_a = torch.exp(delta.unsqueeze(-1) * A)
        bx = delta.unsqueeze(-1) * B.unsqueeze(2) * x.unsqueeze(-1)
        hs = pscan(delta_a, bx)
        return (hs @ C.unsqueeze(-1)).squeeze(3)

    return scan


def to_mambapy_layout(inputs):
    u, delta, A, B, C = inputs
    return [u.transpose(1, 2).contiguous(), delta.transpose(1, 2).contiguous(), A, B.transpose(1, 2).contiguous(),
            C.transpose(1, 2).contiguous()]


def mambapy_bytes(length: int, nstate: int) -> int:
    return 6 * length * DIM * nstate * 4  # ~6 live (L, D, N) float32 tensors at the peak


# ------------------------------------------------------------------------------------------------
# the run


def fmt_rate(x: Optional[float]) -> str:
    if x is None:
        return "n/a"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def row(cells, widths):
    return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))


HEAD = ["backend", "L", "N", "time ms", "tokens/s", "ns/el", "x torch", "extra MiB", "err", "note"]
WIDTHS = [8, 9, 3, 10, 9, 7, 7, 9, 8, 0]


def print_result(r):
    t = r.get("time_s")
    cells = [
        r["backend"], r["L"], r["N"],
        f"{t * 1e3:.1f}" if t else "n/a",
        fmt_rate(r["L"] / t) if t else "n/a",
        f"{r['ns_el']:.3f}" if r.get("ns_el") is not None else "n/a",
        f"{r['x_torch']:.1f}" if r.get("x_torch") else "",
        f"{r['extra_bytes'] / 2**20:.0f}" if r.get("extra_bytes") is not None else "n/a",
        f"{r['err']:.1e}" if r.get("err") is not None else "",
        r.get("note", ""),
    ]
    print(row(cells, WIDTHS), flush=True)


def make_call(pass_: str, name: str, inputs, dy, mambapy_limit: float):
    """(callable running one forward or forward+backward of backend `name`, note); callable None if n/a."""
    length, nstate = inputs[0].shape[-1], inputs[2].shape[1]
    backward = pass_ == "forward+backward"
    if name == "torch":
        core, args, grad = chunked_scan, inputs, dy
    elif name == "fused":
        reason = scan_fused.unavailable_reason()
        if reason is not None:
            return None, "unavailable"
        core, args, grad = scan_fused.fused_scan, inputs, dy
    elif name == "loop":
        if backward:
            return None, "n/a (autograd through L steps: slow, O(L*D*N) memory)"
        if length > LOOP_MAX_LENGTH:
            return None, "n/a"
        core, args, grad = selective_scan_loop, inputs, dy
    elif name == "mambapy":
        mscan = mambapy_scan()
        need = mambapy_bytes(length, nstate) * (2 if backward else 1)
        if mscan is None:
            return None, "not installed"
        if need > mambapy_limit:
            return None, f"n/a: needs ~{need / 2**30:.0f} GiB"
        core, args = mscan, to_mambapy_layout(inputs)
        grad = dy.transpose(1, 2).contiguous() if backward else None
    else:
        raise ValueError(name)
    if not backward:
        def call():
            with torch.no_grad():
                return core(*args)
        return call, ""
    leaves = [t.detach().clone().requires_grad_() for t in args]

    def step():
        for t in leaves:
            t.grad = None
        core(*leaves).backward(grad)

    return step, ""


def memory_worker(pass_: str, length: int, nstate: int, names: List[str], mambapy_limit: float) -> None:
    """Print {backend: peak extra bytes of one call} as JSON (run in a fresh process, see main)."""
    inputs = make_inputs(length, nstate)
    dy = torch.randn(1, DIM, length, generator=torch.Generator().manual_seed(1))
    out = {}
    for name in names:
        fn, _ = make_call(pass_, name, inputs, dy, mambapy_limit)
        if fn is None:
            continue
        with PeakRSS() as mem:
            fn()
        out[name] = mem.peak_bytes
        del fn
        gc.collect()
    print(json.dumps(out))


def memory_in_subprocess(pass_: str, length: int, nstate: int, names: List[str], mambapy_limit: float, threads: int):
    if not os.path.exists("/proc/self/statm"):
        return {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # freed buffers leave the resident set
    cmd = [sys.executable, "-m", "bench.bench_scan", "--memory-worker", f"{pass_}:{length}:{nstate}:{','.join(names)}",
           f"--threads={threads}", f"--mambapy-gib={mambapy_limit / 2**30}"]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return {}


def run_case(pass_, length, nstate, names, mambapy_limit, threads, results, loop_ns):
    inputs = make_inputs(length, nstate)
    dy = torch.randn(1, DIM, length, generator=torch.Generator().manual_seed(1))
    ref = None
    if pass_ == "forward" and length <= LOOP_MAX_LENGTH:
        ref = selective_scan_loop(*(t.double() for t in inputs))
    el = length * DIM * nstate
    case = []
    for name in names:
        r = {"pass": pass_, "backend": name, "L": length, "N": nstate}
        fn, note = make_call(pass_, name, inputs, dy, mambapy_limit)
        if note:
            r["note"] = note
        if name == "loop" and fn is None and pass_ == "forward" and loop_ns.get(nstate):
            r["note"] = f"n/a; ~{loop_ns[nstate] * el * 1e-9:.0f} s extrapolated from L={LOOP_MAX_LENGTH}"
        if fn is not None:
            r.update(measure(fn))
            r["ns_el"] = r["time_s"] / el * 1e9
            if ref is not None:
                y = fn()
                if name == "mambapy":
                    y = y.transpose(1, 2)
                r["err"] = ((y.double() - ref).abs().max() / ref.abs().max()).item()
                del y
            if name == "loop":
                loop_ns[nstate] = r["ns_el"]
        del fn
        gc.collect()
        case.append(r)
    del inputs, dy, ref
    gc.collect()
    measured = [r["backend"] for r in case if r.get("time_s")]
    mem = memory_in_subprocess(pass_, length, nstate, measured, mambapy_limit, threads) if measured else {}
    torch_t = case[0].get("time_s") if case[0]["backend"] == "torch" else None
    for r in case:
        if r.get("time_s") and torch_t and r["backend"] != "torch":
            r["x_torch"] = torch_t / r["time_s"]
        if r["backend"] in mem:
            r["extra_bytes"] = mem[r["backend"]]
        print_result(r)
        results.append(r)


def run_forward(lengths, states, mambapy_limit, threads, results):
    print("\nForward" + "\n" + row(HEAD, WIDTHS), flush=True)
    loop_ns: Dict[int, float] = {}
    for nstate in states:
        for length in lengths:
            names = ["torch", "fused", "loop", "mambapy"] if length != LONG else ["torch", "fused"]
            run_case("forward", length, nstate, names, mambapy_limit, threads, results, loop_ns)


def run_backward(length, states, mambapy_limit, threads, results):
    print("\nForward + backward (y.backward(dy))\n" + row(HEAD, WIDTHS), flush=True)
    for nstate in states:
        run_case("forward+backward", length, nstate, ["torch", "fused", "loop", "mambapy"], mambapy_limit, threads,
                 results, {})


def check_targets(results) -> List[str]:
    lines = []

    def get(pass_, backend, length, nstate):
        for r in results:
            if (r["pass"], r["backend"], r["L"], r["N"]) == (pass_, backend, length, nstate) and r.get("time_s"):
                return r
        return None

    for length in (262144, LONG):
        f = get("forward", "fused", length, 32)
        if f is None:
            continue
        ok = f["ns_el"] <= TARGET_FWD_NS and (f.get("x_torch") or 0) >= TARGET_SPEEDUP
        lines.append(
            f"forward L={length} N=32: fused {f['ns_el']:.3f} ns/el (target <= {TARGET_FWD_NS}), "
            f"{fmt_rate(length / f['time_s'])} tokens/s, {f.get('x_torch') or 0:.1f}x torch (target >= {TARGET_SPEEDUP}x): "
            + ("met" if ok else "NOT met")
        )
    f = get("forward+backward", "fused", BACKWARD_LENGTH, 32)
    if f is not None:
        lines.append(
            f"forward+backward L={BACKWARD_LENGTH} N=32: fused {f['ns_el']:.3f} ns/el (target <= {TARGET_FWD_BWD_NS}): "
            + ("met" if f["ns_el"] <= TARGET_FWD_BWD_NS else "NOT met")
        )
    return lines


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--quick", action="store_true", help="L in {4096, 32768} only")
    ap.add_argument("--lengths", type=str, default=None, help="comma-separated forward lengths")
    ap.add_argument("--states", type=str, default=None, help="comma-separated N values")
    ap.add_argument("--no-backward", action="store_true", help="skip the forward+backward table")
    ap.add_argument("--mambapy-gib", type=float, default=4.0, help="memory cap for mambapy's (L, D, N) tensors")
    ap.add_argument("--json", type=str, default=None, help="also write the results to this file")
    ap.add_argument("--memory-worker", type=str, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.memory_worker:
        pass_, length, nstate, names = args.memory_worker.split(":")
        memory_worker(pass_, int(length), int(nstate), names.split(","), args.mambapy_gib * 2**30)
        return 0
    if args.lengths:
        lengths = [int(x) for x in args.lengths.split(",")]
    elif args.quick:
        lengths = [4096, 32768]
    else:
        lengths = list(LENGTHS) + [LONG]
    states = [int(x) for x in args.states.split(",")] if args.states else list(STATES)
    reason = scan_fused.unavailable_reason()  # builds the kernel on first use (seconds), untimed
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical cores; torch {torch.__version__}; threads {torch.get_num_threads()}")
    print(f"fused: {scan_fused.implementation() if reason is None else 'unavailable: ' + reason}")
    print(f"D={DIM}, batch 1, float32; load average before: {load0}")
    t0 = time.time()
    results: List[dict] = []
    run_forward(lengths, states, args.mambapy_gib * 2**30, args.threads, results)
    if not args.no_backward:
        run_backward(BACKWARD_LENGTH, states, args.mambapy_gib * 2**30, args.threads, results)
    print("\nTargets (issue 4):")
    for line in check_targets(results) or ["(no N=32 fused rows at the target lengths in this run)"]:
        print("  " + line)
    load1 = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"\nload average after: {load1}; total {time.time() - t0:.0f} s")
    if args.json:
        meta = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__, "load_before": load0,
                "load_after": load1, "fused": scan_fused.implementation()}
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
