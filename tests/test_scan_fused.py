"""The ``fused`` CPU selective-scan backend: accuracy, gradients, threads, fallback, build cache."""

from __future__ import annotations

import importlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from networks.ops import scan_fused
from networks.ops.scan_reference import selective_scan_loop
from networks.ops.scan_torch import chunked_scan

from support import rel_err

dispatch = importlib.import_module("networks.ops.selective_scan")  # the module (the package exports the function)
REASON = scan_fused.unavailable_reason()
needs_fused = pytest.mark.skipif(REASON is not None, reason=f"fused backend unavailable: {REASON}")
IMPLS = scan_fused.available_impls() or ["generic"]  # every implementation this machine built


def _cpu_flags() -> set:
    """x86 feature flags of this CPU (empty elsewhere)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _inputs(batch, dim, nstate, length, dtype=torch.float64, huge_delta=False, seed=0):
    """Inputs in float64 (cast later), with delta up to 1 and optionally huge steps (decays underflow)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, dim, length, generator=gen, dtype=torch.float64)
    delta = torch.rand(batch, dim, length, generator=gen, dtype=torch.float64)
    if huge_delta:
        delta[..., ::3] = 1e4
    A = -torch.rand(dim, nstate, generator=gen, dtype=torch.float64) * 2 - 0.05
    B = torch.randn(batch, nstate, length, generator=gen, dtype=torch.float64)
    C = torch.randn(batch, nstate, length, generator=gen, dtype=torch.float64)
    dy = torch.randn(batch, dim, length, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (u, delta, A, B, C)], dy.to(dtype)


def _run(fn, inputs, dy):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*leaves)
    y.backward(dy)
    return [y.detach()] + [t.grad for t in leaves]




NAMES = ("y", "du", "ddelta", "dA", "dB", "dC")
# (batch, dim, N, L): L=1, primes, L not a multiple of any chunk, N not a multiple of 16, N > 64
SHAPES = [(1, 3, 16, 1), (2, 5, 16, 37), (1, 4, 32, 131), (2, 3, 5, 97), (3, 7, 8, 50), (1, 2, 80, 70), (2, 4, 16, 300)]


@needs_fused
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk", [None, 16, 32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("huge_delta", [False, True], ids=["", "underflow"])
def test_float32_matches_reference_and_torch_backend(monkeypatch, impl, chunk, shape, huge_delta):
    monkeypatch.setattr(scan_fused, "IMPL", impl)
    monkeypatch.setattr(scan_fused, "CHUNK", chunk)
    monkeypatch.setattr(scan_fused, "SUPERBLOCK", 2 * chunk if chunk else 0)  # several partial blocks
    monkeypatch.setattr(scan_fused, "MIN_WORK_PER_THREAD", 1)  # all threads, even for tiny problems
    inputs, dy = _inputs(*shape, huge_delta=huge_delta)
    ref = _run(selective_scan_loop, inputs, dy)  # float64 ground truth
    inputs32, dy32 = [t.float() for t in inputs], dy.float()
    fused = _run(scan_fused.fused_scan, inputs32, dy32)
    torch_backend = _run(chunked_scan, inputs32, dy32)
    for name, f, t, r in zip(NAMES, fused, torch_backend, ref):
        assert f.dtype == torch.float32 and f.shape == r.shape
        assert torch.isfinite(f).all(), name
        err = rel_err(f, r)
        # float32 accuracy: a few ulps of the largest value, and no worse than the torch backend
        assert err < max(3e-6, 2 * rel_err(t, r)), f"{name}: {err:.2e}"
        if not huge_delta:  # (with underflowing decays the torch backend's dA and ddelta are less exact)
            assert torch.allclose(f, t, rtol=1e-4, atol=1e-4 * r.abs().max().item() + 1e-6), name


@needs_fused
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES[:5], ids=lambda s: "x".join(map(str, s)))
def test_float64_matches_reference(monkeypatch, impl, shape):
    monkeypatch.setattr(scan_fused, "IMPL", impl)
    monkeypatch.setattr(scan_fused, "CHUNK", 16)
    monkeypatch.setattr(scan_fused, "SUPERBLOCK", 32)
    monkeypatch.setattr(scan_fused, "MIN_WORK_PER_THREAD", 1)
    inputs, dy = _inputs(*shape, huge_delta=True)
    ref = _run(selective_scan_loop, inputs, dy)
    got = _run(scan_fused.fused_scan, inputs, dy)
    for name, g, r in zip(NAMES, got, ref):
        assert g.dtype == torch.float64
        assert rel_err(g, r) < 1e-12, name


@needs_fused
@pytest.mark.parametrize("impl", IMPLS)
def test_decay_range_growth_and_nan(monkeypatch, impl):
    """y_1[d] = exp(A[d]) for A from -110 (subnormal, then 0) to +95 (inf), to float32 accuracy; NaN propagates."""
    monkeypatch.setattr(scan_fused, "IMPL", impl)
    x = torch.cat([torch.linspace(-110.0, 0.0, 45), torch.linspace(0.5, 95.0, 19)]).double()
    dim = x.numel()
    A = x[:, None]  # N = 1 (padded inside), one decay per channel
    u = torch.tensor([1000.0, 1.0], dtype=torch.float64).repeat(1, dim, 1)
    delta = torch.tensor([1e-3, 1.0], dtype=torch.float64).repeat(1, dim, 1)  # exp(delta_0 A) finite: no inf * 0
    B = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)  # h_0 = 1, h_1 = exp(A)
    C = torch.tensor([[[0.0, 1.0]]], dtype=torch.float64)
    want = torch.exp(x)
    got = scan_fused.fused_scan(*(t.float() for t in (u, delta, A, B, C)))[0, :, 1].double()
    normal = want.abs() < 3.4e38
    # the SIMD paths round A log2(e) once: an error of the size of float32's own rounding of delta * A
    tol = want * (2e-7 + 1e-7 * x.abs()) + 1e-44
    assert ((got - want).abs() <= tol)[normal].all()
    assert torch.isinf(got[~normal]).all()
    delta[0, 3, 1] = float("nan")
    got = scan_fused.fused_scan(*(t.float() for t in (u, delta, A, B, C)))
    assert torch.isnan(got[0, 3, 1]) and torch.isfinite(got[0, :, 0]).all()
    assert torch.isfinite(got[0, normal, 1][torch.arange(int(normal.sum())) != 3]).all()


@needs_fused
def test_gradcheck_float64():
    inputs, _ = _inputs(2, 3, 4, 19)
    leaves = [t.requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(scan_fused.fused_scan, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@needs_fused
@pytest.mark.parametrize("impl", IMPLS)
def test_thread_count_does_not_change_results(monkeypatch, impl):
    monkeypatch.setattr(scan_fused, "IMPL", impl)
    monkeypatch.setattr(scan_fused, "MIN_WORK_PER_THREAD", 1)  # small problem, all threads anyway
    monkeypatch.setattr(scan_fused, "CHUNK", 16)
    monkeypatch.setattr(scan_fused, "SUPERBLOCK", 32)
    inputs, dy = _inputs(3, 5, 16, 203)
    inputs, dy = [t.float() for t in inputs], dy.float()
    before = torch.get_num_threads()
    try:
        results = {}
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results[threads] = _run(scan_fused.fused_scan, inputs, dy)
    finally:
        torch.set_num_threads(before)
    for threads in (2, 3):
        for name, a, b in zip(NAMES, results[1], results[threads]):
            assert rel_err(a, b) < 1e-6, f"{name} with {threads} threads"
    # forward, du, ddelta and dA are per channel: identical whatever the split
    for a, b in zip(results[1][:4], results[2][:4]):
        assert torch.equal(a, b)


@needs_fused
def test_through_dispatcher_with_all_arguments():
    inputs, dy = _inputs(2, 4, 16, 45, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    extra = [torch.randn(4, generator=gen), torch.randn(2, 4, 45, generator=gen), torch.randn(4, generator=gen)]
    ref = _run(lambda *a: selective_scan_loop(*a[:5], D=a[5], z=a[6], delta_bias=a[7], delta_softplus=True), inputs + extra, dy)
    got = _run(
        lambda *a: dispatch.selective_scan(*a[:5], D=a[5], z=a[6], delta_bias=a[7], delta_softplus=True, backend="fused"),
        inputs + extra,
        dy,
    )
    assert dispatch.last_backend() == "fused"
    for r, g in zip(ref, got):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-5)


@needs_fused
def test_auto_prefers_fused_on_cpu(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.resolve_backend(torch.device("cpu")) == "fused"


@needs_fused
def test_noncontiguous_inputs_and_no_grad():
    inputs, _ = _inputs(2, 3, 16, 40, dtype=torch.float32)
    u, delta, A, B, C = inputs
    ut = u.transpose(1, 2).contiguous().transpose(1, 2)  # same values, non-contiguous
    Bt = B.transpose(1, 2).contiguous().transpose(1, 2)
    assert not ut.is_contiguous()
    with torch.no_grad():
        got = scan_fused.fused_scan(ut, delta, A, Bt, C)
    assert torch.allclose(got, selective_scan_loop(u, delta, A, B, C), rtol=1e-5, atol=1e-5)


@needs_fused
def test_empty_sizes():
    for shape in [(2, 3, 4, 0), (0, 3, 4, 5), (2, 3, 0, 5)]:
        inputs, dy = _inputs(*shape, dtype=torch.float32)
        y, du, ddelta, dA, dB, dC = _run(scan_fused.fused_scan, inputs, dy)
        assert y.shape == inputs[0].shape and not y.any()
        assert dA.shape == inputs[2].shape


def test_rejects_bad_arguments():
    inputs, _ = _inputs(1, 2, 4, 8, dtype=torch.float32)
    with pytest.raises(TypeError):
        scan_fused.fused_scan(inputs[0].double(), *inputs[1:])
    with pytest.raises(ValueError):
        scan_fused.fused_scan(inputs[0], inputs[1], inputs[2][:1], *inputs[3:])


# ------------------------------------------------------------------------------------------------
# Never required: disabled or unbuildable -> torch backend, reason logged once


@pytest.fixture
def fresh_dispatch_logs(monkeypatch):
    monkeypatch.setattr(dispatch, "_logged", set())
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    yield
    scan_fused._reset_for_tests()


def test_disabled_by_environment(monkeypatch, fresh_dispatch_logs, caplog):
    monkeypatch.setenv(scan_fused.ENV_DISABLE, "1")
    assert "NETWORKS_DISABLE_FUSED" in scan_fused.unavailable_reason()
    inputs, _ = _inputs(1, 2, 4, 8, dtype=torch.float32)
    with caplog.at_level(logging.INFO, logger="networks.scan"):
        for _ in range(3):
            dispatch.selective_scan(*inputs)
    assert dispatch.last_backend() == "torch"
    assert sum("NETWORKS_DISABLE_FUSED" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(ValueError, match="NETWORKS_DISABLE_FUSED"):
        dispatch.selective_scan(*inputs, backend="fused")


def test_build_failure_falls_back_to_torch(monkeypatch, fresh_dispatch_logs, caplog):
    def broken_load():
        raise scan_fused.BuildError("no C++ compiler found (simulated)")

    monkeypatch.delenv(scan_fused.ENV_DISABLE, raising=False)
    monkeypatch.setattr(scan_fused, "_load", broken_load)
    scan_fused._reset_for_tests()
    inputs, dy = _inputs(1, 3, 4, 9, dtype=torch.float32)
    with caplog.at_level(logging.INFO, logger="networks.scan"):
        for _ in range(3):
            got = _run(dispatch.selective_scan, inputs, dy)
    assert dispatch.last_backend() == "torch"
    assert "simulated" in scan_fused.unavailable_reason()
    want = _run(chunked_scan, inputs, dy)
    for g, w in zip(got, want):
        assert torch.allclose(g, w)
    by_source = {}
    for r in caplog.records:
        if "simulated" in r.getMessage():
            by_source[r.name, r.levelno] = by_source.get((r.name, r.levelno), 0) + 1
    # one warning from the loader, one "not used" line from the dispatcher; never repeated
    assert by_source == {("networks.scan", logging.WARNING): 1, ("networks.scan", logging.INFO): 1}
    with pytest.raises(RuntimeError, match="simulated"):
        scan_fused.fused_scan(*inputs)


def test_no_compiler_reason(monkeypatch, fresh_dispatch_logs):
    monkeypatch.delenv(scan_fused.ENV_DISABLE, raising=False)
    monkeypatch.setenv("CXX", "definitely-not-a-compiler")
    monkeypatch.setattr(scan_fused.shutil, "which", lambda name: None)
    scan_fused._reset_for_tests()
    assert "no C++ compiler" in scan_fused.unavailable_reason()


# ------------------------------------------------------------------------------------------------
# Build: where a compiler exists the backend must be there; concurrent first builds are safe


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which(os.environ.get("CXX") or "c++") is None,
    reason="only required on Linux with a C++ compiler",
)
def test_available_where_a_compiler_exists():
    if os.environ.get(scan_fused.ENV_DISABLE, "") not in ("", "0"):
        pytest.skip("disabled by the environment")
    assert REASON is None
    impl = scan_fused.implementation()
    flags = _cpu_flags()
    if flags:
        want = "avx512" if "avx512f" in flags else "avx2" if {"avx2", "fma"} <= flags else "generic"
        assert impl.startswith(want), impl


@needs_fused
@pytest.mark.slow
def test_concurrent_first_builds_share_one_library(tmp_path):
    script = textwrap.dedent(
        """
        from networks.ops import scan_fused
        assert scan_fused.unavailable_reason() is None, scan_fused.unavailable_reason()
        print(scan_fused.library_path())
        """
    )
    env = dict(os.environ, NETWORKS_EXTENSIONS_DIR=str(tmp_path))
    env.pop(scan_fused.ENV_DISABLE, None)
    (tmp_path / "stale.lock").write_text("")  # a lock file nobody holds does not block
    procs = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1
    libs = list(tmp_path.glob("*.so"))
    assert [str(p) for p in libs] == list(paths)
    assert not list(tmp_path.glob("*.tmp"))


@needs_fused
@pytest.mark.slow
def test_falls_back_to_a_portable_build(monkeypatch, tmp_path, fresh_dispatch_logs):
    """A compile that fails (here: an unknown flag) is followed by the next, more portable one."""
    monkeypatch.delenv(scan_fused.ENV_DISABLE, raising=False)
    monkeypatch.setenv(scan_fused.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.setattr(
        scan_fused, "_ATTEMPTS", [("broken", ["-fno-such-flag-anywhere"]), ("portable+openmp", ["-fopenmp"])]
    )
    scan_fused._reset_for_tests()
    assert scan_fused.unavailable_reason() is None
    assert scan_fused.implementation().endswith("portable+openmp")
    inputs, dy = _inputs(2, 3, 16, 40, dtype=torch.float32)
    got = _run(scan_fused.fused_scan, inputs, dy)
    want = _run(selective_scan_loop, inputs, dy)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-4)


@needs_fused
@pytest.mark.slow
@pytest.mark.skipif(not {"avx2", "fma"} <= _cpu_flags(), reason="needs an x86-64 CPU with AVX2 and FMA")
def test_avx2_only_build(monkeypatch, tmp_path, fresh_dispatch_logs):
    """The build an AVX2 machine (no AVX-512) gets: auto runs the AVX2 kernel, and it is right."""
    monkeypatch.delenv(scan_fused.ENV_DISABLE, raising=False)
    monkeypatch.setenv(scan_fused.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.setattr(scan_fused, "_ATTEMPTS", [("avx2", ["-mavx2", "-mfma", "-fopenmp"])])
    scan_fused._reset_for_tests()
    assert scan_fused.unavailable_reason() is None
    assert scan_fused.implementation() == "avx2, avx2"
    assert "avx512" not in scan_fused.available_impls()
    inputs, dy = _inputs(2, 3, 24, 77, dtype=torch.float32, huge_delta=True)
    got = _run(scan_fused.fused_scan, inputs, dy)
    want = _run(selective_scan_loop, inputs, dy)
    for name, g, w in zip(NAMES, got, want):
        assert rel_err(g, w) < 3e-6, name


@needs_fused
def test_first_use_under_inference_mode_and_autocast(monkeypatch, fresh_dispatch_logs):
    """Loading (with its self-test) on a first call made under inference_mode and autocast."""
    monkeypatch.delenv(scan_fused.ENV_DISABLE, raising=False)
    scan_fused._reset_for_tests()
    inputs, _ = _inputs(1, 4, 16, 64, dtype=torch.float32)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = scan_fused.fused_scan(*inputs)
    assert scan_fused.unavailable_reason() is None
    assert torch.allclose(got, selective_scan_loop(*inputs), rtol=1e-5, atol=1e-5)


@needs_fused
@pytest.mark.slow
def test_extra_memory_is_order_L_times_D():
    """Forward with gradients kept, L=262144, D=64, N=32: (L, D, N) would be 2 GiB; y is 64 MiB."""
    code = textwrap.dedent(
        """
        import resource, torch
        from networks.ops.scan_fused import fused_scan
        L, D, N = 262144, 64, 32
        x = [torch.randn(1, D, L), torch.rand(1, D, L) * 0.1, -torch.rand(D, N), torch.randn(1, N, L), torch.randn(1, N, L)]
        x = [t.requires_grad_() for t in x]
        fused_scan(*(t[:, :, :64] if t.dim() == 3 else t for t in x))  # load the library first
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        y = fused_scan(*x)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    extra = int(out.stdout.strip().splitlines()[-1])
    assert extra < 128 * 2**20, f"extra memory {extra / 2**20:.0f} MiB (y alone is 64 MiB)"


def test_kernel_sources_are_complete_and_packaged():
    """Every local header the kernels include is hashed into the build key, and every file ships in the wheel."""
    import configparser
    import fnmatch
    import re
    from pathlib import Path

    package = Path(scan_fused.__file__).resolve().parents[1]  # networks/
    included = set()
    for src in scan_fused.SOURCES + scan_fused.HEADERS:
        included |= set(re.findall(r'#include "([^"]+)"', src.read_text()))
    assert {scan_fused.CSRC / name for name in included} <= set(scan_fused.HEADERS)
    cfg = configparser.ConfigParser()
    cfg.read(package.parent / "setup.cfg")
    patterns = cfg["options.package_data"]["networks"].split()
    for path in scan_fused.SOURCES + scan_fused.HEADERS:
        rel = path.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), f"{rel} is not in setup.cfg's package_data"


@needs_fused
@pytest.mark.parametrize("output", [12, 13, 14])  # du, dpre, dz: the training backward's own outputs
def test_self_test_refuses_a_wrong_training_backward(output):
    """A library whose training backward (ss_bwd_gated_f32) returns one wrong gradient value is refused at load
    with the gradient named, as a miscompiled build on a user's machine would be."""
    import ctypes

    lib = scan_fused._library()
    scan_fused._self_test(lib)  # the real library passes

    class OneWrongValue:
        def __getattr__(self, name):
            fn = getattr(lib, name)
            if name != "ss_bwd_gated_f32":
                return fn

            def wrong(*args):
                rc = fn(*args)
                ctypes.cast(args[output], ctypes.POINTER(ctypes.c_float))[5] += 1.0
                return rc

            return wrong

    with pytest.raises(scan_fused.BuildError, match=r"gated backward \(reverse=False\) (du|dz|ddt) off by"):
        scan_fused._self_test(OneWrongValue())
