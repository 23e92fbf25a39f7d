"""The ``fused`` CPU backend of the selective scan: one C++ loop per channel, states in registers.

The kernel (``csrc/selective_scan_cpu.cpp``) is plain C++ with a C ABI and no Torch or Python
headers; it is built into one library with its channel-first companions for inference
(``csrc/channel_ops_cpu.cpp``, used by `networks.ops.channel_ops`) and `fused_mamba_scan`, the
scan fused with Mamba's step-size projection and gate (`fused_mamba_scan_train`: the same with
autograd, for training). On first use it is compiled with the system C++ compiler (``$CXX``, else ``c++``,
``g++`` or ``clang++``) for this machine (``-O3 -march=native -fopenmp``; a portable build, then a
build without OpenMP, are tried if that fails), which takes a few seconds, and cached as one
shared library per source, compiler and CPU. Later processes load it with `ctypes` (which releases
the GIL during the call) in milliseconds. Concurrent first uses (pytest-xdist, torchrun ranks) are
safe: the build holds an exclusive ``flock`` (released by the kernel if the process dies) and the
library is written under a temporary name and renamed into place atomically.

The backend is never required. When it cannot be built or loaded (no compiler, unsupported
platform, failed self-test) or is disabled with ``NETWORKS_DISABLE_FUSED=1``, `unavailable_reason`
says why, the dispatcher uses the ``torch`` backend, and a build failure is logged once to the
``networks.scan`` logger.

Cache location: ``$NETWORKS_EXTENSIONS_DIR``, else ``$TORCH_EXTENSIONS_DIR/networks``, else
``$XDG_CACHE_HOME/networks/extensions`` (default ``~/.cache``), else a folder in the temp dir.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import List, Optional, Tuple

import torch

__all__ = ["fused_scan", "fused_mamba_scan", "fused_mamba_scan_train", "unavailable_reason", "library_path", "implementation", "available_impls",
           "ENV_DISABLE", "ENV_CACHE_DIR"]

ENV_DISABLE = "NETWORKS_DISABLE_FUSED"
ENV_CACHE_DIR = "NETWORKS_EXTENSIONS_DIR"
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCE = CSRC / "selective_scan_cpu.cpp"
# Compiled together into one library: the scan, its channel-first companions (networks.ops.channel_ops),
# the bf16 channels-last instance norm (networks.ops.instance_norm_cl), the bf16 <-> float32 layout casts
# (networks.ops.layout_cast) and the header they share.
SOURCES = (SOURCE, CSRC / "channel_ops_cpu.cpp", CSRC / "linear_cf_cpu.cpp", CSRC / "norm_cl_cpu.cpp",
           CSRC / "layout_cast_cpu.cpp")
HEADERS = (CSRC / "cpu_common.h",)
ABI_VERSION = 9
COMPILE_TIMEOUT_S = 180

# Tuning knobs (tests set them to exercise chunk and super-block boundaries at small L).
CHUNK: Optional[int] = None  # steps between saved states (multiple of 16); None: automatic
SUPERBLOCK: int = 0  # backward: steps per dB/dC partial (rounded to a multiple of CHUNK); 0: automatic
IMPL: str = "auto"  # "auto" (the best built: avx512 > avx2 > generic), or one of IMPLS by name
# Smallest work (batch * dim * L * N elements) worth one more thread: a parallel region costs a few
# microseconds, and much more when the machine is oversubscribed and a thread must wait its turn.
MIN_WORK_PER_THREAD: int = 1 << 18

logger = logging.getLogger("networks.scan")

_BASE_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
# Tried in order; the first that builds is used (and cached).
_ATTEMPTS: List[Tuple[str, List[str]]] = [
    ("native+openmp", ["-march=native", "-fopenmp"]),
    ("portable+openmp", ["-fopenmp"]),
    ("native", ["-march=native", "-fopenmp-simd"]),  # no OpenMP runtime (e.g. Apple clang): one thread
    ("portable", []),
]
IMPLS = {"auto": 0, "generic": 1, "avx2": 2, "avx512": 3}

_lock = threading.Lock()
_state = {"done": False, "lib": None, "reason": None, "path": None, "variant": None}


def unavailable_reason() -> Optional[str]:
    """None when the fused backend can run here, else why not (builds it on first call)."""
    flag = os.environ.get(ENV_DISABLE, "").strip().lower()
    if flag not in ("", "0", "false", "no", "off"):
        return f"disabled by {ENV_DISABLE}={os.environ[ENV_DISABLE]}"
    _library()
    return _state["reason"]


def library_path() -> Optional[str]:
    """Path of the loaded shared library (None when unavailable)."""
    _library()
    return _state["path"]


def implementation() -> Optional[str]:
    """What float32 runs on by default, and the build, e.g. ``"avx512, native+openmp"`` (None when unavailable)."""
    lib = _library()
    if lib is None:
        return None
    return f"{_impl_name(lib.ss_resolve(0, 0, 16))}, {_state['variant']}"


def available_impls() -> List[str]:
    """Implementations built into the library ("generic", "avx2", "avx512"); [] when unavailable."""
    lib = _library()
    return [] if lib is None else [name for name, code in IMPLS.items() if code and lib.ss_has_impl(code)]


def _impl_name(code: int) -> str:
    return {code: name for name, code in IMPLS.items()}.get(code, str(code))


# ------------------------------------------------------------------------------------------------
# Build and load


def _library():
    if _state["done"]:
        return _state["lib"]
    with _lock:
        if not _state["done"]:
            try:
                lib, path, variant = _load()
                _state.update(lib=lib, path=path, variant=variant, reason=None)
            except Exception as err:  # any failure means: not available, use the torch backend
                reason = str(err) or type(err).__name__
                _state.update(lib=None, path=None, variant=None, reason=reason)
                logger.warning("fused CPU selective scan unavailable (the torch backend is used): %s", reason)
            _state["done"] = True
    return _state["lib"]


def _reset_for_tests() -> None:
    """Forget the loaded library and reason, so that the next call loads again."""
    with _lock:
        _state.update(done=False, lib=None, reason=None, path=None, variant=None)


class BuildError(RuntimeError):
    pass


def _load():
    if sys.platform.startswith("win"):
        raise BuildError("unsupported platform (Windows): the fused kernel is built with a Unix C++ toolchain")
    missing = [str(f) for f in SOURCES + HEADERS if not f.is_file()]
    if missing:
        raise BuildError(f"kernel source missing: {', '.join(missing)}")
    compiler = _find_compiler()
    cache = _cache_dir()
    source = b"\0".join(f.read_bytes() for f in SOURCES + HEADERS)
    identity = _compiler_identity(compiler)
    errors = []
    for variant, flags in _ATTEMPTS:
        key = hashlib.sha256(
            b"\0".join(
                [source, identity.encode(), " ".join(_BASE_FLAGS + flags).encode(), _cpu_identity().encode(),
                 str(ABI_VERSION).encode()]
            )
        ).hexdigest()[:16]
        path = cache / f"selective_scan_cpu_{variant}_{key}.so"
        try:
            _build_if_missing(compiler, flags, path)
            lib = _bind(ctypes.CDLL(str(path)))
            if lib.ss_abi_version() != ABI_VERSION:
                raise BuildError(f"{path.name} has ABI {lib.ss_abi_version()}, expected {ABI_VERSION}")
            _self_test(lib)  # a build that computes wrong results is not used either
        except (BuildError, OSError, AttributeError) as err:
            errors.append(f"{variant}: {err}")
            continue
        return lib, str(path), variant
    raise BuildError(f"no usable build of {SOURCE.name} with {compiler}: " + " | ".join(errors))


def _find_compiler() -> str:
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand:
            found = shutil.which(cand.split()[0])
            if found:
                return found
    raise BuildError("no C++ compiler found (install g++ or set CXX)")


def _compiler_identity(compiler: str) -> str:
    try:
        out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise BuildError(f"cannot run {compiler}: {err}") from err
    return f"{compiler}\n{out.splitlines()[0] if out else ''}"


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU model and feature flags (first processor)."""
    parts = [platform.system(), platform.machine()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            seen = set()
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "flags", "features", "cpu part", "isa") and key not in seen:
                    seen.add(key)
                    parts.append(f"{key}={value.strip()}")
                elif not line.strip() and seen:
                    break
    except OSError:
        parts.append(platform.processor())
    return "\n".join(parts)


def _cache_dir() -> Path:
    candidates = []
    if os.environ.get(ENV_CACHE_DIR):
        candidates.append(Path(os.environ[ENV_CACHE_DIR]))
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        candidates.append(Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "networks")
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    candidates.append(Path(xdg) / "networks" / "extensions")
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    candidates.append(Path(tempfile.gettempdir()) / f"networks-extensions-{uid}")
    for cand in candidates:
        try:
            cand.mkdir(parents=True, exist_ok=True)
            if os.access(cand, os.W_OK | os.X_OK):
                return cand
        except OSError:
            continue
    raise BuildError("no writable cache directory for the compiled kernel (set " + ENV_CACHE_DIR + ")")


def _build_if_missing(compiler: str, flags: List[str], path: Path) -> None:
    if path.is_file():
        return
    with _FileLock(path.with_suffix(".lock")):
        if path.is_file():  # built by another process while we waited
            return
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp")
        os.close(fd)
        cmd = [compiler, *_BASE_FLAGS, *flags, *(str(f) for f in SOURCES), "-o", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                raise BuildError(f"exit {proc.returncode}: " + " / ".join(tail))
            os.replace(tmp, path)  # atomic: a reader never sees a partial library
        except subprocess.TimeoutExpired as err:
            raise BuildError(f"compiler timed out after {COMPILE_TIMEOUT_S} s") from err
        except OSError as err:
            raise BuildError(f"cannot run the compiler: {err}") from err
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


class _FileLock:
    """Exclusive advisory lock on a file (no-op where fcntl is missing); freed if the holder dies."""

    def __init__(self, path: Path):
        self.path = path
        self.fh = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:
            return self
        self.fh = open(self.path, "a+")
        fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fh is not None:
            import fcntl

            fcntl.flock(self.fh.fileno(), fcntl.LOCK_UN)
            self.fh.close()
        return False


def _bind(lib):
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.ss_abi_version.restype = i32
    lib.ss_abi_version.argtypes = []
    lib.ss_has_impl.restype = i32
    lib.ss_has_impl.argtypes = [i32]
    lib.ss_resolve.restype = i32
    lib.ss_resolve.argtypes = [i32, i32, i64]
    lib.ss_openmp.restype = i32
    lib.ss_openmp.argtypes = []
    lib.ss_state_pad.restype = i64
    lib.ss_state_pad.argtypes = [i32, i32, i64]
    for name in ("ss_fwd_f32", "ss_fwd_f64"):
        fn = getattr(lib, name)
        fn.restype = i32
        fn.argtypes = [p] * 8 + [i64] * 5 + [i32, i32]
    for name in ("ss_bwd_f32", "ss_bwd_f64"):
        fn = getattr(lib, name)
        fn.restype = i32
        fn.argtypes = [p] * 13 + [i64] * 6 + [i32, i32]
    lib.ss_fwd_gated_f32.restype = i32
    lib.ss_fwd_gated_f32.argtypes = [p] * 12 + [i64] * 7 + [i32, i32, i64, i32, i32, p]
    lib.co_layer_norm_cf_f32.restype = i32
    lib.co_layer_norm_cf_f32.argtypes = [p] * 4 + [i64] * 3 + [ctypes.c_double, i32]
    lib.co_conv1d_f32.restype = i32
    lib.co_conv1d_f32.argtypes = [p] * 4 + [i64] * 5 + [i32, i32, p, i32]
    lib.co_linear_cf_f32.restype = i32
    lib.co_linear_cf_f32.argtypes = [p] * 4 + [i64] * 8 + [i32]
    lib.nc_instance_norm_cl_bf16.restype = i32
    lib.nc_instance_norm_cl_bf16.argtypes = [p] * 4 + [i64] * 3 + [ctypes.c_double, i32, ctypes.c_double, i32]
    for name in ("lc_cl_bf16_to_cf_f32", "lc_cf_f32_to_cl_bf16"):
        fn = getattr(lib, name)
        fn.restype = i32
        fn.argtypes = [p] * 2 + [i64] * 3 + [i32]
    return _bind_training(lib)


def _bind_training(lib):
    """Signatures of the training kernels (backward passes)."""
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    signatures = {
        "co_layer_norm_cf_stats_f32": [p] * 6 + [i64] * 3 + [ctypes.c_double, i32],
        "co_layer_norm_cf_bwd_f32": [p] * 8 + [i64] * 3 + [i32],
        "co_conv1d_bwd_f32": [p] * 7 + [i64] * 5 + [i32] * 3,
        "ss_bwd_gated_f32": [p] * 19 + [i64] * 7 + [i32, i32, i64, i64, i32, i32],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.restype = i32
        fn.argtypes = argtypes
    return lib


def _self_test(lib) -> None:
    """A tiny forward and backward against the sequential reference, to refuse a bad build."""
    # The first use may come under inference_mode, no_grad or autocast: the check needs none of them.
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
        _self_test_body(lib)


def _self_test_body(lib) -> None:
    from .scan_reference import selective_scan_loop

    gen = torch.Generator().manual_seed(0)
    bt, d, n, length = 2, 3, 5, 41
    f32 = dict(generator=gen, dtype=torch.float32)
    u = torch.randn(bt, d, length, **f32)
    delta = torch.rand(bt, d, length, **f32) * 0.5
    a = -torch.rand(d, n, **f32) - 0.1
    b = torch.randn(bt, n, length, **f32)
    c = torch.randn(bt, n, length, **f32)
    inputs = [t.requires_grad_() for t in (u, delta, a, b, c)]
    dy, dlast = torch.randn(bt, d, length, **f32), torch.randn(bt, d, n, **f32)
    want, want_last = selective_scan_loop(*inputs, return_last_state=True)
    want_grads = torch.autograd.grad((want, want_last), inputs, (dy, dlast))
    inputs = [t.detach() for t in inputs]
    for impl in [code for code in (1, 2, 3) if lib.ss_has_impl(code)]:
        got, last, ck, k = _forward(lib, *inputs, True, impl, chunk=16)
        grads = _backward(lib, *inputs, ck, dy, dlast, k, impl, superblock=32)
        for name, g, w in zip(("y", "last_state", "du", "ddelta", "dA", "dB", "dC"), (got, last, *grads),
                              (want, want_last, *want_grads)):
            if not torch.allclose(g, w, rtol=1e-3, atol=1e-3):
                err = (g - w).abs().max().item()
                raise BuildError(f"self-test failed ({_impl_name(impl)}): {name} off by {err:.3g}")
    # the inference kernel: step-size projection, softplus, D skip, gate, both directions
    r = 2
    dt_low = torch.randn(bt, r, length, **f32) * 2
    w = torch.randn(d, r, **f32)
    bias, skip = torch.randn(d, **f32), torch.randn(d, **f32)
    z = torch.randn(bt, d, length, **f32)
    packed = torch.cat([dt_low, b, c], dim=1)  # the kernel reads dt_low, B, C as slices of one tensor
    for reverse in (False, True):
        f = (lambda t: t.flip(-1)) if reverse else (lambda t: t)
        dl = torch.nn.functional.softplus(torch.einsum("dr,brl->bdl", w, f(dt_low)) + bias[:, None])
        want = f((selective_scan_loop(f(u), dl, a, f(b), f(c)) + f(u) * skip[:, None]) * torch.nn.functional.silu(f(z)))
        for impl in [code for code in (1, 2, 3) if lib.ss_has_impl(code)]:
            got = torch.empty_like(u)
            _gated_forward(lib, u, packed[:, :r], w, bias, a, packed[:, r:r + n], packed[:, r + n:], skip, z, got,
                           packed.stride(0), z.stride(0), True, reverse, impl, chunk=16)
            if not torch.allclose(got, want, rtol=1e-3, atol=1e-3):
                err = (got - want).abs().max().item()
                raise BuildError(f"self-test failed ({_impl_name(impl)}): gated forward (reverse={reverse}) off by {err:.3g}")
    _self_test_gated_backward(lib, u, dt_low, w, bias, a, b, c, skip, z, packed, dy)
    # the channel-first Linear: row blocks of 4 and a remainder, whole and partial token blocks, a
    # channel slice of a larger tensor (batch stride)
    w, bias, x = torch.randn(7, 5, **f32), torch.randn(7, **f32), torch.randn(bt, 9, 133, **f32)[:, 2:7]
    got = torch.empty(bt, 7, 133, dtype=torch.float32)
    rc = lib.co_linear_cf_f32(_ptr(w), _ptr(x), _ptr(bias), _ptr(got), bt, 7, 5, 133, x.stride(0), 133, 7 * 133, 133, 2)
    want = torch.einsum("mk,bkl->bml", w.double(), x.double()) + bias.double()[:, None]
    if rc != 0 or not torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5):
        raise BuildError(f"self-test failed: channel-first linear (code {rc})")
    # the bf16 channels-last <-> float32 channel-first casts: a partial token block, both directions exact
    cl = torch.randn(bt, 3, 5, 7, 11, **f32).to(torch.bfloat16, memory_format=torch.channels_last_3d)
    cf = torch.empty(cl.shape, dtype=torch.float32)
    back = torch.empty_like(cl)
    rc = lib.lc_cl_bf16_to_cf_f32(_ptr(cl), _ptr(cf), bt, 385, 3, 2)
    rc = rc or lib.lc_cf_f32_to_cl_bf16(_ptr(cf), _ptr(back), bt, 3, 385, 2)
    if rc != 0 or not torch.equal(cf, cl.float()) or not torch.equal(back, cl):
        raise BuildError(f"self-test failed: bf16 layout casts (code {rc})")


def _self_test_gated_backward(lib, u, dt_low, w, bias, a, b, c, skip, z, packed, dy) -> None:
    """The training kernels (gated forward keeping states, gated backward) against autograd of the loop."""
    from .scan_reference import selective_scan_loop

    bt, d, length = u.shape
    r, n = dt_low.shape[1], a.shape[1]
    for reverse in (False, True):
        f = (lambda t: t.flip(-1)) if reverse else (lambda t: t)
        leaves = [t.detach().clone().requires_grad_() for t in (u, a, b, c, skip, z)]
        lu, la, lb, lc, lskip, lz = leaves
        pre = (torch.einsum("dr,brl->bdl", w, dt_low) + bias[:, None]).detach().requires_grad_()
        dl = torch.nn.functional.softplus(f(pre))
        core = selective_scan_loop(f(lu), dl, la, f(lb), f(lc))
        want = f((core + f(lu) * lskip[:, None]) * torch.nn.functional.silu(f(lz)))
        wants = torch.autograd.grad(want, leaves + [pre], dy)
        for impl in [code for code in (1, 2, 3) if lib.ss_has_impl(code)]:
            y = torch.empty_like(u)
            rows = packed[:, :r], packed[:, r:r + n], packed[:, r + n:]
            ys, ck, k = _gated_forward(lib, u, rows[0], w, bias, a, rows[1], rows[2], skip, z, y, packed.stride(0),
                                       z.stride(0), True, reverse, impl, chunk=16, keep=True)
            rc, (du, dpre, dz, d_rows, dA, dB, dC) = _gated_backward(
                lib, u, rows[0], w, bias, a, rows[1], rows[2], skip, z, ys, ck, dy, packed.stride(0), z.stride(0),
                True, reverse, k, impl, superblock=32, threads=2)
            got = (du, dA, dB, dC, d_rows.sum(0), dz, dpre)
            for name, g, wt in zip(("du", "dA", "dB", "dC", "dD", "dz", "ddt"), got, wants):
                if rc != 0 or not torch.allclose(g, wt, rtol=1e-3, atol=1e-3):
                    err = (g - wt).abs().max().item()
                    raise BuildError(f"self-test failed ({_impl_name(impl)}): gated backward (reverse={reverse}) "
                                     f"{name} off by {err:.3g} (code {rc})")


# ------------------------------------------------------------------------------------------------
# Calls


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _impl_code() -> int:
    if IMPL not in IMPLS:
        raise ValueError(f"scan_fused.IMPL must be one of {', '.join(IMPLS)}, got {IMPL!r}")
    return IMPLS[IMPL]


def _chunk_for(n_padded: int) -> int:
    if CHUNK is not None:
        k = int(CHUNK)
        if k <= 0 or k % 16:
            raise ValueError(f"scan_fused.CHUNK must be a positive multiple of 16, got {CHUNK}")
        return k
    # (K, N) recompute buffers of ~16-32 KiB stay in L1/L2; K >= N keeps saved states O(L * D).
    return max(64, min(512, 4096 // max(1, n_padded) // 16 * 16), (n_padded + 15) // 16 * 16)


def _threads(u: torch.Tensor, n: int) -> int:
    bt, d, length = u.shape
    work = bt * d * length * max(n, 1)
    return int(max(1, min(torch.get_num_threads(), bt * d, work // max(1, MIN_WORK_PER_THREAD))))


def _check(rc: int, what: str) -> None:
    if rc == 1:
        raise MemoryError(f"fused selective scan {what}: out of memory")
    if rc == 3:
        raise RuntimeError(f"fused selective scan {what}: implementation {IMPL!r} is not built on this machine")
    if rc != 0:
        raise RuntimeError(f"fused selective scan {what}: error code {rc}")


def _forward(lib, u, delta, A, B, C, keep_states: bool, impl: int, chunk=None):
    """y, the last state (batch, dim, N), the saved chunk-entering states (or None) and the chunk length."""
    bt, d, length = u.shape
    n = A.shape[1]
    code = 0 if u.dtype == torch.float32 else 1
    n_pad = lib.ss_state_pad(code, impl, n)
    if n_pad < 0:
        _check(3, "forward")
    k = chunk or _chunk_for(n_pad)
    y = torch.empty_like(u)
    last = u.new_empty(bt, d, n)
    ck = u.new_empty(bt, d, -(-length // k), n_pad) if keep_states else None
    fn = lib.ss_fwd_f32 if code == 0 else lib.ss_fwd_f64
    rc = fn(_ptr(u), _ptr(delta), _ptr(A), _ptr(B), _ptr(C), _ptr(y), _ptr(ck), _ptr(last), bt, d, length, n, k,
            _threads(u, n), impl)
    _check(rc, "forward")
    return y, last, ck, k


def _backward(lib, u, delta, A, B, C, ck, dy, dlast, k, impl, superblock=None):
    """Gradients of the five inputs from dy and the last state's adjoint dlast (batch, dim, N) or None."""
    bt, d, length = u.shape
    n = A.shape[1]
    du, ddelta = torch.empty_like(u), torch.empty_like(u)
    dA, dB, dC = torch.empty_like(A), torch.empty_like(B), torch.empty_like(C)
    fn = lib.ss_bwd_f32 if u.dtype == torch.float32 else lib.ss_bwd_f64
    rc = fn(_ptr(u), _ptr(delta), _ptr(A), _ptr(B), _ptr(C), _ptr(ck), _ptr(dy), _ptr(dlast), _ptr(du), _ptr(ddelta), _ptr(dA),
            _ptr(dB), _ptr(dC), bt, d, length, n, k, SUPERBLOCK if superblock is None else superblock,
            _threads(u, n), impl)
    _check(rc, "backward")
    return du, ddelta, dA, dB, dC


class _FusedScan(torch.autograd.Function):
    """(y, last_state) = scan(u, delta, A, B, C); the backward pass takes the adjoints of both."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        lib = _library()
        if lib is None:
            raise RuntimeError(f"fused selective scan unavailable: {_state['reason']}")
        ctx.set_materialize_grads(False)
        impl = _impl_code()
        empty = u.numel() == 0 or A.shape[1] == 0
        need = any(ctx.needs_input_grad)
        if empty:
            y, last, ck, k = torch.zeros_like(u), u.new_zeros(u.shape[0], u.shape[1], A.shape[1]), None, 0
        else:
            y, last, ck, k = _forward(lib, u, delta, A, B, C, need, impl)
        if need:
            ctx.save_for_backward(u, delta, A, B, C, ck)
            ctx.meta = (k, impl, empty)
        return y, last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dlast):
        u, delta, A, B, C, ck = ctx.saved_tensors
        k, impl, empty = ctx.meta
        if empty:
            return tuple(torch.zeros_like(t) for t in (u, delta, A, B, C))
        dy = torch.zeros_like(u) if dy is None else dy.to(u.dtype).contiguous()
        dlast = None if dlast is None else dlast.to(u.dtype).contiguous()
        return _backward(_library(), u, delta, A, B, C, ck, dy, dlast, k, impl)


def fused_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
               return_last_state: bool = False):
    """Core scan y_t = <C_t, h_t>, h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t, h_{-1} = 0, fused on CPU.

    Args:
        u, delta: (batch, dim, L), delta already biased and softplus-ed.
        A: (dim, N). B, C: (batch, N, L). CPU tensors of one dtype, float32 or float64.
        return_last_state: also return h_{L-1}, (batch, dim, N).

    Returns:
        y: (batch, dim, L), or (y, last_state). Differentiable in all five inputs (once), through
        both outputs; extra memory O(L * dim): the state every CHUNK steps is kept for the
        backward pass, which recomputes the rest.
    """
    tensors = (u, delta, A, B, C)
    if any(t.device.type != "cpu" for t in tensors):
        raise ValueError("fused_scan runs on CPU tensors only")
    if u.dtype not in (torch.float32, torch.float64) or any(t.dtype != u.dtype for t in tensors):
        raise TypeError(f"fused_scan needs five tensors of one dtype, float32 or float64; got {[t.dtype for t in tensors]}")
    bt, d, length = u.shape
    n = A.shape[1]
    if delta.shape != u.shape or A.shape != (d, n) or B.shape != (bt, n, length) or C.shape != (bt, n, length):
        raise ValueError(
            f"fused_scan: shapes u{tuple(u.shape)} delta{tuple(delta.shape)} A{tuple(A.shape)} B{tuple(B.shape)} C{tuple(C.shape)}"
        )
    y, last = _FusedScan.apply(*(t.contiguous() for t in tensors))
    return (y, last) if return_last_state else y


def _batch_stride(t: torch.Tensor) -> Optional[int]:
    """Batch stride of a (batch, rows, L) tensor whose rows are contiguous and L apart, else None."""
    bt, rows, length = t.shape
    if (rows > 1 and t.stride(1) != length) or (length > 1 and t.stride(2) != 1):
        return None
    return t.stride(0) if bt > 1 else 0


def fused_mamba_scan(
    u: torch.Tensor,
    dt_low: torch.Tensor,
    dt_weight: torch.Tensor,
    dt_bias: Optional[torch.Tensor],
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    delta_softplus: bool = True,
    reverse: bool = False,
    state: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mamba's scan step with its step-size projection and gate fused, for inference (no autograd).

    Computes, in one pass over the sequence,
    ``delta = softplus(dt_weight @ dt_low + dt_bias)`` (softplus if ``delta_softplus``),
    ``y = (scan(u, delta, A, B, C) + D * u) * silu(z)``; with ``reverse`` the sequence is read from
    its last token to its first (``flip(f(flip(inputs)))``), without flipped copies.

    Args:
        u: (batch, dim, L) contiguous. dt_low: (batch, R, L); B, C: (batch, N, L): each with
            contiguous rows of L, and dt_low, B and C with one batch stride (slices of one
            (batch, R + 2N, L) tensor, as Mamba's x_proj output, need no copy).
        dt_weight: (dim, R). dt_bias, D: (dim,) or None. A: (dim, N). z: rows as u, or None.
        All float32 CPU tensors.
        state: None (the scan starts from zero states), or `scan_state`'s tensor: the states entering the
            sequence, replaced by those after its last token in scan order. Consecutive pieces of a sequence,
            in scan order (from its end with ``reverse``), each scanned with the same ``state``, give what the
            whole sequence gives, bit for bit.

    Returns:
        y: (batch, dim, L) float32.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError(f"fused selective scan unavailable: {_state['reason']}")
    bt, d, length = u.shape
    n, r = A.shape[1], dt_weight.shape[1]
    tensors = [u, dt_low, dt_weight, A, B, C] + [t for t in (dt_bias, D, z) if t is not None]
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        raise TypeError("fused_mamba_scan takes float32 CPU tensors")
    if (dt_low.shape != (bt, r, length) or dt_weight.shape != (d, r) or A.shape != (d, n)
            or B.shape != (bt, n, length) or C.shape != (bt, n, length) or (z is not None and z.shape != u.shape)
            or any(t is not None and t.shape != (d,) for t in (dt_bias, D))):
        shape = lambda t: None if t is None else tuple(t.shape)  # noqa: E731
        raise ValueError(
            f"fused_mamba_scan: shapes u{shape(u)} dt_low{shape(dt_low)} dt_weight{shape(dt_weight)} A{shape(A)} "
            f"B{shape(B)} C{shape(C)} D{shape(D)} dt_bias{shape(dt_bias)} z{shape(z)}"
        )
    if state is not None:
        want = (bt, d, lib.ss_state_pad(0, _impl_code(), n))
        if tuple(state.shape) != want or state.dtype != torch.float32 or not state.is_contiguous():
            raise ValueError(f"fused_mamba_scan: state must be a contiguous float32 tensor of {want} (scan_state), "
                             f"got {state.dtype} {tuple(state.shape)}")
    u = u.contiguous()
    dt_low, B, C, sx = _slices_of_one(dt_low, B, C)
    z, sz = _rows(z)
    y = torch.empty_like(u)
    if y.numel() == 0:
        return y
    if n == 0:
        base = u * D[:, None] if D is not None else torch.zeros_like(u)
        return base * torch.nn.functional.silu(z) if z is not None else base
    dt_bias = None if dt_bias is None else dt_bias.contiguous()
    D = None if D is None else D.contiguous()
    _gated_forward(lib, u, dt_low, dt_weight.contiguous(), dt_bias, A.contiguous(), B, C, D, z, y, sx, sz,
                   delta_softplus, reverse, _impl_code(), state=state)
    return y


def scan_state(batch: int, dim: int, d_state: int) -> torch.Tensor:
    """Zero scan states for `fused_mamba_scan`'s ``state``: (batch, dim, d_state padded to the kernel's vector
    width), float32 (the padding lanes stay zero)."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"fused selective scan unavailable: {_state['reason']}")
    n_pad = lib.ss_state_pad(0, _impl_code(), d_state)
    if n_pad < 0:
        _check(3, "state")
    return torch.zeros(batch, dim, n_pad, dtype=torch.float32)


def _slices_of_one(dt_low, B, C):
    """dt_low, B, C as row slices of one (batch, R + 2N, L) tensor (a copy only when they are not), and its batch stride.

    The fused kernels read the three with one batch stride, as Mamba's x_proj output holds them."""
    r, n = dt_low.shape[1], B.shape[1]
    strides = {_batch_stride(t) for t in (dt_low, B, C) if t.shape[1]}
    if None in strides or len(strides) > 1:
        packed = torch.cat([dt_low, B, C], dim=1)
        dt_low, B, C = packed.split([r, n, n], dim=1)
        strides = {packed.stride(0)}
    return dt_low, B, C, (strides.pop() if strides else 0)


def _gated_forward(lib, u, dt_low, dt_weight, dt_bias, A, B, C, D, z, y, sx, sz, softplus, reverse, impl, chunk=None,
                   keep=False, state=None):
    """y; with ``keep`` (training) also the core scan's output, the chunk-entering states and the chunk length;
    ``state`` (`scan_state`): the states entering the sequence, replaced by those after it."""
    bt, d, length = u.shape
    n, r = A.shape[1], dt_weight.shape[1]
    n_pad = lib.ss_state_pad(0, impl, n)
    if n_pad < 0:
        _check(3, "gated forward")
    k = chunk or _chunk_for(n_pad)
    ys = torch.empty_like(u) if keep else None
    ck = u.new_empty(bt, d, -(-length // k), n_pad) if keep else None
    rc = lib.ss_fwd_gated_f32(
        _ptr(u), _ptr(dt_low), _ptr(dt_weight), _ptr(dt_bias), _ptr(A), _ptr(B), _ptr(C), _ptr(D), _ptr(z), _ptr(y),
        _ptr(ys), _ptr(ck), bt, d, length, n, r, sx, sz, int(bool(softplus)), int(bool(reverse)), k,
        _threads(u, n), impl, _ptr(state),
    )
    _check(rc, "gated forward")
    return ys, ck, k


def _gated_backward(lib, u, dt_low, dt_weight, dt_bias, A, B, C, D, z, ys, ck, dy, sx, sz, softplus, reverse, k,
                    impl, superblock=None, threads=None):
    """The return code and (du, dpre, dz, dD per row, dA, dB, dC) of `ss_bwd_gated_f32` on `_gated_forward`'s
    saved ``ys``/``ck``; dpre is the gradient of the step size before softplus, dz is None without a gate."""
    bt, d, length = u.shape
    n, r = A.shape[1], dt_weight.shape[1]
    du, dpre = torch.empty_like(u), torch.empty_like(u)
    dz = None if z is None else torch.empty_like(u)
    d_rows = u.new_empty(bt, d)
    dA, dB, dC = torch.empty_like(A), u.new_empty(bt, n, length), u.new_empty(bt, n, length)
    rc = lib.ss_bwd_gated_f32(
        _ptr(u), _ptr(dt_low), _ptr(dt_weight), _ptr(dt_bias), _ptr(A), _ptr(B), _ptr(C), _ptr(D), _ptr(z),
        _ptr(ys), _ptr(ck), _ptr(dy), _ptr(du), _ptr(dpre), _ptr(dz), _ptr(d_rows), _ptr(dA), _ptr(dB), _ptr(dC),
        bt, d, length, n, r, sx, sz, int(bool(softplus)), int(bool(reverse)), k, superblock or SUPERBLOCK,
        threads or _threads(u, n), impl)
    return rc, (du, dpre, dz, d_rows, dA, dB, dC)


# ------------------------------------------------------------------------------------------------
# Training: Mamba's scan step with autograd


def _rows(t: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], int]:
    """t with contiguous rows of L (a copy only when needed) and its batch stride."""
    if t is None:
        return None, 0
    if _batch_stride(t) is None:
        t = t.contiguous()
    return t, _batch_stride(t)


class _FusedMambaScan(torch.autograd.Function):
    """y = (scan(u, softplus(W dt_low + bias), A, B, C) + D u) silu(z), read in reverse if asked.

    Forward and backward are one kernel call each (`ss_fwd_gated_f32`, `ss_bwd_gated_f32`): the
    step size, the reversed reading, the D skip and the gate are computed per chunk inside them.
    Saves the inputs as given (no flipped copies), the core scan's output and its chunk-entering
    states; delta is recomputed in the backward pass (R multiply-adds per element, cheaper than
    keeping a (batch, dim, L) tensor alive).
    """

    @staticmethod
    def forward(ctx, u, dt_low, dt_weight, A, B, C, D, z, dt_bias, softplus: bool, reverse: bool):
        lib = _library()
        impl = _impl_code()
        u = u.contiguous()
        dt_low, B, C, sx = _slices_of_one(dt_low, B, C)
        z, sz = _rows(z)
        dt_weight, A = dt_weight.contiguous(), A.contiguous()
        D = None if D is None else D.contiguous()
        dt_bias = None if dt_bias is None else dt_bias.contiguous()
        y = torch.empty_like(u)
        ys, ck, k = _gated_forward(lib, u, dt_low, dt_weight, dt_bias, A, B, C, D, z, y, sx, sz, softplus, reverse,
                                   impl, keep=True)
        ctx.save_for_backward(u, dt_low, dt_weight, A, B, C, D, z, dt_bias, ys, ck)
        ctx.meta = (sx, sz, k, impl, bool(softplus), bool(reverse))
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        u, dt_low, dt_weight, A, B, C, D, z, dt_bias, ys, ck = ctx.saved_tensors
        sx, sz, k, impl, softplus, reverse = ctx.meta
        bt = u.shape[0]
        rc, (du, dpre, dz, d_rows, dA, dB, dC) = _gated_backward(
            _library(), u, dt_low, dt_weight, dt_bias, A, B, C, D, z, ys, ck, dy.contiguous(), sx, sz, softplus,
            reverse, k, impl)
        _check(rc, "training backward")
        need = ctx.needs_input_grad
        d_dt_low = torch.bmm(dt_weight.t().expand(bt, -1, -1), dpre) if need[1] else None
        d_weight = torch.bmm(dpre, dt_low.transpose(1, 2)).sum(0) if need[2] else None
        d_bias = dpre.sum((0, 2)) if dt_bias is not None and need[8] else None
        d_skip = d_rows.sum(0) if D is not None and need[6] else None
        return du, d_dt_low, d_weight, dA, dB, dC, d_skip, dz, d_bias, None, None


def fused_mamba_scan_train(
    u: torch.Tensor,
    dt_low: torch.Tensor,
    dt_weight: torch.Tensor,
    dt_bias: Optional[torch.Tensor],
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    delta_softplus: bool = True,
    reverse: bool = False,
) -> torch.Tensor:
    """`fused_mamba_scan` with autograd: differentiable (once) in u, dt_low, dt_weight, dt_bias, A, B, C, D, z.

    Arguments and result as `fused_mamba_scan` (float32 CPU tensors; batch, dim, L, N > 0).
    Forward and backward are one pass each over the sequence: the step size (projection, bias,
    softplus), the core scan (with saved chunk states in the forward pass, recomputed chunk by chunk
    in the backward pass), the D skip and the gate, fused per chunk; reverse by index arithmetic, no
    flipped copies. Extra memory kept for the backward pass: the core scan's output (batch, dim, L)
    and its chunk states (batch, dim, L / K, N), K >= N.
    """
    if _library() is None:
        raise RuntimeError(f"fused selective scan unavailable: {_state['reason']}")
    tensors = [u, dt_low, dt_weight, A, B, C] + [t for t in (dt_bias, D, z) if t is not None]
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        raise TypeError("fused_mamba_scan_train takes float32 CPU tensors")
    bt, d, length = u.shape
    n, r = A.shape[1], dt_weight.shape[1]
    if (dt_low.shape != (bt, r, length) or dt_weight.shape != (d, r) or A.shape != (d, n)
            or B.shape != (bt, n, length) or C.shape != (bt, n, length) or (z is not None and z.shape != u.shape)
            or any(t is not None and t.shape != (d,) for t in (dt_bias, D)) or u.numel() == 0 or n == 0):
        shape = lambda t: None if t is None else tuple(t.shape)  # noqa: E731
        raise ValueError(
            f"fused_mamba_scan_train: shapes u{shape(u)} dt_low{shape(dt_low)} dt_weight{shape(dt_weight)} A{shape(A)} "
            f"B{shape(B)} C{shape(C)} D{shape(D)} dt_bias{shape(dt_bias)} z{shape(z)} (all sizes > 0)"
        )
    return _FusedMambaScan.apply(u, dt_low, dt_weight, A, B, C, D, z, dt_bias, bool(delta_softplus), bool(reverse))
