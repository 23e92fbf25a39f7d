"""The selective scan against the plain recurrence, mamba-ssm's reference, and its dispatcher."""

import logging
import subprocess
import sys
import textwrap

import pytest
import torch

import networks.ops.scan_torch as scan_torch
import importlib
from networks.ops.scan_reference import selective_scan_loop
from networks.ops.selective_scan import selective_scan

dispatch = importlib.import_module("networks.ops.selective_scan")  # the module, not the function

from mamba_ssm_reference import mamba_ssm_reference

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(batch, dim, nstate, length, dtype, seed=0, delta_scale=1.0, with_extras=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    inputs = {
        "u": r(batch, dim, length),
        "delta": r(batch, dim, length) * delta_scale,
        "A": -torch.rand(dim, nstate, generator=g, dtype=dtype) * 4 - 0.1,
        "B": r(batch, nstate, length),
        "C": r(batch, nstate, length),
    }
    if with_extras:
        inputs.update(D=r(dim), z=r(batch, dim, length), delta_bias=r(dim))
    return inputs


def tolerances(dtype):
    return dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)


@pytest.fixture
def small_blocks(monkeypatch):
    """Force many blocks, chunks and padding on small problems."""
    monkeypatch.setattr(scan_torch, "BLOCK_ELEMENTS", 2000)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("length", [1, 101, 1000])
@pytest.mark.parametrize("nstate", [1, 16])
@pytest.mark.parametrize("extras,softplus", [(True, True), (False, False), (True, False)])
def test_forward_matches_loop(dtype, length, nstate, extras, softplus, small_blocks):
    x = make_inputs(2, 3, nstate, length, dtype, with_extras=extras)
    if not softplus:  # without softplus, keep delta >= 0 so that the recurrence decays
        x["delta"] = x["delta"].abs()
        if extras:
            x["delta_bias"] = x["delta_bias"].abs()
    expected = selective_scan_loop(**x, delta_softplus=softplus)
    got = selective_scan(**x, delta_softplus=softplus, backend="torch")
    assert got.shape == (2, 3, length) and got.dtype == dtype
    torch.testing.assert_close(got, expected, **tolerances(dtype))


def test_large_length_default_blocks():
    x = make_inputs(1, 4, 16, 20011, torch.float64)  # prime, many default-size blocks
    expected = selective_scan_loop(**x, delta_softplus=True)
    torch.testing.assert_close(selective_scan(**x, delta_softplus=True, backend="torch"), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_underflowing_decays(dtype, small_blocks):
    """delta*A down to -1e4: exp underflows to exactly 0, states reset, nothing is NaN."""
    x = make_inputs(2, 3, 16, 300, dtype, delta_scale=1.0)
    x["delta"][:, :, ::7] = 2000.0  # softplus(2000) = 2000, times A <= -0.1 .. -4.1
    expected = selective_scan_loop(**x, delta_softplus=True)
    got = selective_scan(**x, delta_softplus=True, backend="torch")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, **tolerances(dtype))


@pytest.mark.parametrize("length", [1, 37, 600])
def test_gradients_match_loop(length, small_blocks):
    x = {k: v.requires_grad_() for k, v in make_inputs(2, 3, 8, length, torch.float64).items()}
    x["delta"].data[:, :, ::11] = 40.0  # strong decays inside the gradient test too
    grad_out = torch.randn(2, 3, length, dtype=torch.float64)
    ref = torch.autograd.grad(selective_scan_loop(**x, delta_softplus=True), list(x.values()), grad_out)
    got = torch.autograd.grad(selective_scan(**x, delta_softplus=True, backend="torch"), list(x.values()), grad_out)
    for name, a, b in zip(x, got, ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=f"gradient of {name}")


def test_gradients_float32_close_to_float64(small_blocks):
    x64 = make_inputs(1, 4, 16, 500, torch.float64)
    x32 = {k: v.float().requires_grad_() for k, v in x64.items()}
    x64 = {k: v.requires_grad_() for k, v in x64.items()}
    g64 = torch.autograd.grad(selective_scan_loop(**x64, delta_softplus=True).sum(), list(x64.values()))
    g32 = torch.autograd.grad(selective_scan(**x32, delta_softplus=True, backend="torch").sum(), list(x32.values()))
    for name, a, b in zip(x32, g32, g64):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-3 * b.abs().max().item(), msg=f"gradient of {name}")


def test_autocast_computes_in_float32():
    x = make_inputs(1, 4, 8, 64, torch.float32)
    expected = selective_scan_loop(**x, delta_softplus=True)
    bf = {k: v.bfloat16() for k, v in x.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = selective_scan(**bf, delta_softplus=True, backend="torch")
    assert got.dtype == torch.bfloat16
    expected_from_bf16 = selective_scan_loop(**{k: v.float() for k, v in bf.items()}, delta_softplus=True)
    torch.testing.assert_close(got.float(), expected_from_bf16, rtol=2e-2, atol=2e-2)
    assert (got.float() - expected).abs().max() < 0.5


def test_matches_mamba_ssm_selective_scan_ref():
    with mamba_ssm_reference() as ref:
        if ref is None:
            pytest.skip("mamba-ssm not installed (make install adds its pure-Python reference)")
        for extras, softplus in [(True, True), (False, False)]:
            x = make_inputs(2, 5, 16, 333, torch.float32, with_extras=extras, seed=3)
            if not softplus:
                x["delta"] = x["delta"].abs()
            expected = ref.selective_scan_ref(**x, delta_softplus=softplus)
            torch.testing.assert_close(selective_scan(**x, delta_softplus=softplus, backend="torch"), expected, rtol=2e-4, atol=2e-4)


def test_shape_errors_name_the_argument():
    x = make_inputs(2, 3, 4, 10, torch.float32)
    x["B"] = x["B"][:, :, :9]
    with pytest.raises(ValueError, match="B must have shape"):
        selective_scan(**x)
    with pytest.raises(ValueError, match="u must be"):
        selective_scan(torch.zeros(3, 10), *list(make_inputs(2, 3, 4, 10, torch.float32).values())[1:5])


def test_backend_choice_and_override(monkeypatch, caplog):
    x = make_inputs(1, 2, 4, 8, torch.float32, with_extras=False)
    monkeypatch.setattr(dispatch, "_logged", set())
    with caplog.at_level(logging.INFO, logger="networks.scan"):
        selective_scan(**x, backend="torch")
        selective_scan(**x, backend="torch")
    assert dispatch.last_backend() == "torch"
    assert sum("selective scan backend: torch" in r.message for r in caplog.records) == 1  # logged once
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.resolve_backend(torch.device("cpu")) == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="unknown selective-scan backend 'bogus'.*NETWORKS_SCAN_BACKEND"):
        selective_scan(**x)
    monkeypatch.delenv(dispatch.ENV_VAR)
    with pytest.raises(ValueError, match="'cuda' was requested but cannot run"):
        selective_scan(**x, backend="cuda")
    assert dispatch.resolve_backend(torch.device("cpu")) in ("fused", "torch")
    assert dispatch.available_backends()["torch"] is None
    assert dispatch.available_backends()["cuda"] is not None  # CPU-only machine


def test_forward_memory_does_not_grow_with_state_size():
    """L*D*N*4 bytes would be 2 GiB here; the scan must stay far below that."""
    code = textwrap.dedent(
        """
        import resource, torch
        from networks.ops.scan_torch import chunked_scan
        L, D, N = 262144, 64, 32
        u = torch.randn(1, D, L); dt = torch.rand(1, D, L) * 0.1; A = -torch.rand(D, N); B = torch.randn(1, N, L); C = torch.randn(1, N, L)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with torch.inference_mode():
            y = chunked_scan(u, dt, A, B, C)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    extra = int(out.stdout.strip().splitlines()[-1])
    assert extra < 400 * 2**20, f"extra memory {extra / 2**20:.0f} MiB, full (L, D, N) would be 2048 MiB"


@pytest.mark.parametrize("length", [1, 300])
def test_float32_gradients_with_underflowing_decays(length, small_blocks):
    """delta = 1e4 makes exp(delta A) exactly 0; gradients must stay at float32 accuracy (dA scales by delta)."""
    x64 = make_inputs(2, 3, 16, length, torch.float64, seed=5)
    x64["delta"][:, :, ::3] = 1e4
    x32 = {k: v.float().requires_grad_() for k, v in x64.items()}
    x64 = {k: v.requires_grad_() for k, v in x64.items()}
    g64 = torch.autograd.grad(selective_scan_loop(**x64, delta_softplus=True).sum(), list(x64.values()))
    g32 = torch.autograd.grad(selective_scan(**x32, delta_softplus=True, backend="torch").sum(), list(x32.values()))
    for name, a, b in zip(x32, g32, g64):
        scale = b.abs().max().item() or 1.0
        assert (a.double() - b).abs().max().item() <= 1e-4 * scale + 1e-6, f"gradient of {name}"
