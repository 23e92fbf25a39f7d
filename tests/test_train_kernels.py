"""Training path of the fused CPU backend: channel-first LayerNorm, causal Conv1d+SiLU and Mamba's gated scan
as autograd functions over C++ forward and backward kernels, against autograd of the PyTorch formulation in
float32 and float64, and a Mamba layer's training step against the ``torch`` backend."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from networks.nets.mamba_layers import BiMambaLayer, MambaLayer
from networks.ops import scan_fused
from networks.ops.channel_ops import (causal_conv1d_cf, causal_conv1d_channels, layer_norm_cf, layer_norm_channels,
                                      linear_cf, linear_channels)
from networks.ops.selective_scan import mamba_scan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REASON = scan_fused.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"fused backend unavailable: {REASON}")
LENGTHS = (1, 7, 37, 300)


def _graph_nodes(t: torch.Tensor) -> set:
    """Names of the autograd nodes behind t."""
    seen, names, stack = set(), set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return names


def _grads(fn, inputs, dy):
    """fn(*inputs) and the gradients of every input, from a fresh leaf copy of each."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*leaves)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], dy.to(y.dtype))
    return y, grads


def _check(name, got, want32, want64, slack=8.0):
    """got (fused, float32) is as close to the float64 result as PyTorch's float32 autograd is, within `slack`."""
    scale = want64.abs().max().item() + 1e-30
    err = (got.double() - want64).abs().max().item()
    err32 = (want32.double() - want64).abs().max().item()
    assert err <= slack * err32 + 2e-6 * scale, f"{name}: error {err:.3g} vs torch float32 {err32:.3g} (scale {scale:.3g})"
    torch.testing.assert_close(got, want32, rtol=1e-4, atol=2e-5 * scale, msg=lambda m: f"{name}: {m}")


def _compare(fused, plain, inputs, names, dy, node):
    """Outputs and gradients of every input: fused (float32) vs plain in float32 and in float64."""
    y, g = _grads(fused, inputs, dy)
    assert node in _graph_nodes(y), f"the fused training function did not run: {_graph_nodes(y)}"
    y32, g32 = _grads(plain, inputs, dy)
    y64, g64 = _grads(plain, [None if t is None else t.double() for t in inputs], dy)
    assert node not in _graph_nodes(y64)  # float64 stays on the PyTorch path
    _check("output", y, y32, y64)
    present = [n for n, t in zip(names, inputs) if t is not None]
    assert len(g) == len(present)
    for n, a, b, c in zip(present, g, g32, g64):
        _check(f"d{n}", a, b, c)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_train(length, affine):
    gen = torch.Generator().manual_seed(length)
    c = 6
    x = torch.randn(2, c, length, generator=gen) * 3 + 1
    w = torch.randn(c, generator=gen) if affine else None
    b = torch.randn(c, generator=gen) if affine else None
    dy = torch.randn(2, c, length, generator=gen)

    def fused(x, w, b):
        norm = nn.LayerNorm(c, elementwise_affine=w is not None)
        if w is not None:  # plain tensors in place of the parameters: the gradients reach the test's leaves
            del norm.weight, norm.bias
            norm.weight, norm.bias = w, b
        return layer_norm_channels(x, norm, backend="fused")

    _compare(fused, lambda x, w, b: layer_norm_cf(x, w, b, 1e-5), [x, w, b], ["x", "weight", "bias"], dy,
             "_LayerNormCFBackward")


def _linear(weight, bias):
    """An nn.Linear whose parameters are the given tensors (the gradients reach the test's leaves)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    del lin.weight, lin.bias
    lin.weight, lin.bias = weight, bias
    return lin


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_train(length, batch, bias):
    """The kernel's forward and input gradient, BLAS's weight gradient, on a channel slice (x_proj reads
    the first half of a wider tensor) with remainder rows (M = 9: blocks of 4 and 1) and tokens."""
    gen = torch.Generator().manual_seed(length + 7 * batch)
    k, m = 6, 9
    xz = torch.randn(batch, 2 * k, length, generator=gen)
    w = torch.randn(m, k, generator=gen)
    b = torch.randn(m, generator=gen) if bias else None
    dy = torch.randn(batch, m, length, generator=gen)

    def fused(xz, w, b):
        return linear_channels(xz[:, :k], _linear(w, b), backend="fused")

    _compare(fused, lambda xz, w, b: linear_cf(xz[:, :k], w, b), [xz, w, b], ["xz", "weight", "bias"], dy,
             "_LinearCFBackward")


def test_linear_train_frozen_parts():
    """Only the gradients asked for: a frozen weight (input gradient only), an input without gradient."""
    gen = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(2, 5, 40, generator=gen), torch.randn(3, 5, generator=gen), torch.randn(3, generator=gen)
    want = linear_cf(x.double(), w.double(), b.double())
    xl = x.clone().requires_grad_()
    y = linear_channels(xl, _linear(w, b), backend="fused")  # nothing but x needs a gradient
    assert y.grad_fn.name() == "_LinearCFBackward"
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(xl.grad, w.sum(0)[None, :, None].expand(2, 5, 40))
    wl = w.clone().requires_grad_()
    y = linear_channels(x, _linear(wl, b), backend="fused")
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(wl.grad, x.sum(2).sum(0)[None, :].expand(3, 5), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y.detach().double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length", (1, 3) + LENGTHS[1:])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("silu", [True, False])
def test_causal_conv1d_train(length, reverse, silu):
    gen = torch.Generator().manual_seed(length + 10 * reverse)
    d, k = 5, 4
    xz = torch.randn(2, 2 * d, length, generator=gen)  # x is a channel slice with a batch stride
    w = torch.randn(d, 1, k, generator=gen)
    b = torch.randn(d, generator=gen)
    dy = torch.randn(2, d, length, generator=gen)

    def fused(xz, w, b):
        x = xz[:, :d]
        assert x.shape[0] == 1 or not x.is_contiguous()
        return causal_conv1d_channels(x, w, b, silu=silu, reverse=reverse, backend="fused")

    def plain(xz, w, b):
        return causal_conv1d_cf(xz[:, :d], w, b, silu, reverse)

    _compare(fused, plain, [xz, w, b], ["xz", "weight", "bias"], dy, "_CausalConv1dCFBackward")


def test_causal_conv1d_train_no_bias():
    gen = torch.Generator().manual_seed(3)
    x, w, dy = torch.randn(2, 3, 37, generator=gen), torch.randn(3, 1, 4, generator=gen), torch.randn(2, 3, 37, generator=gen)
    _compare(lambda x, w: causal_conv1d_channels(x, w, None, reverse=True, backend="fused"),
             lambda x, w: causal_conv1d_cf(x, w, None, True, True), [x, w], ["x", "weight"], dy, "_CausalConv1dCFBackward")


def _scan_inputs(length, seed, dim=6, nstate=5, rank=3):
    gen = torch.Generator().manual_seed(seed)
    x_dbl = torch.randn(2, rank + 2 * nstate, length, generator=gen)
    x_dbl[:, :rank] *= 3  # step sizes across softplus's range (and past its threshold 20)
    return dict(
        u=torch.randn(2, dim, length, generator=gen), x_dbl=x_dbl, dt_weight=torch.randn(dim, rank, generator=gen),
        A=-torch.rand(dim, nstate, generator=gen) * 2 - 0.05, D=torch.randn(dim, generator=gen),
        xz=torch.randn(2, 2 * dim, length, generator=gen), delta_bias=torch.randn(dim, generator=gen),
    )


def _scan_fn(reverse, backend, rank=3, nstate=5, gate=True, skip=True, bias=True):
    """mamba_scan on slices as Mamba passes them: dt_low, B, C of x_proj's output, z the second half of xz."""

    def fn(u, x_dbl, dt_weight, A, D, xz, delta_bias):
        dt_low, B, C = torch.split(x_dbl, [rank, nstate, nstate], dim=1)
        z = xz[:, u.shape[1]:] if gate else None
        return mamba_scan(u, dt_low, dt_weight, A, B, C, D if skip else None, z, delta_bias if bias else None,
                          delta_softplus=True, reverse=reverse, backend=backend)

    return fn


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("reverse", [False, True])
def test_mamba_scan_train(length, reverse, monkeypatch):
    monkeypatch.setattr(scan_fused, "CHUNK", 16)  # several chunks (saved states) at these lengths
    monkeypatch.setattr(scan_fused, "SUPERBLOCK", 32)
    inputs = _scan_inputs(length, seed=length + 100 * reverse)
    dy = torch.randn(2, 6, length, generator=torch.Generator().manual_seed(7))
    _compare(_scan_fn(reverse, "fused"), _scan_fn(reverse, "torch"), list(inputs.values()), list(inputs), dy,
             "_FusedMambaScanBackward")


@pytest.mark.parametrize("reverse", [False, True])
def test_mamba_scan_train_threads_share_batch_elements(reverse, monkeypatch):
    """Every thread at work on a small problem, with 3 threads over 2 x 5 channels: a batch element's
    channels belong to two threads, whose dB/dC partials are summed (written in reverse when reverse)."""
    monkeypatch.setattr(scan_fused, "CHUNK", 16)
    monkeypatch.setattr(scan_fused, "SUPERBLOCK", 32)
    monkeypatch.setattr(scan_fused, "MIN_WORK_PER_THREAD", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        inputs = _scan_inputs(101, seed=11 + reverse, dim=5)
        dy = torch.randn(2, 5, 101, generator=torch.Generator().manual_seed(9))
        _compare(_scan_fn(reverse, "fused"), _scan_fn(reverse, "torch"), list(inputs.values()), list(inputs), dy,
                 "_FusedMambaScanBackward")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("reverse", [False, True])
def test_mamba_scan_train_saves_no_copies(reverse):
    """What the backward pass keeps of u, dt_low, B, C and z are the caller's tensors (slices of x_proj's
    and in_proj's outputs as Mamba passes them), not copies, in both directions: only the core scan's output
    and its chunk states are new memory."""
    inputs = {k: v.requires_grad_() for k, v in _scan_inputs(300, seed=3).items()}
    y = _scan_fn(reverse, "fused")(*inputs.values())
    given = {t.untyped_storage().data_ptr() for t in inputs.values()}
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]
    kept = {t.untyped_storage().data_ptr() for t in saved}
    assert {inputs[k].data_ptr() for k in ("u", "x_dbl", "xz")} <= kept
    u_shape = tuple(inputs["u"].shape)
    big = [tuple(t.shape) for t in saved if t.untyped_storage().data_ptr() not in given and t.shape[-1] == 300]
    assert big == [u_shape], f"tensors of the sequence's length saved besides the inputs: {big}"


@pytest.mark.parametrize("reverse", [False, True])
def test_mamba_scan_train_without_gate_skip_bias(reverse):
    inputs = _scan_inputs(37, seed=5)
    dy = torch.randn(2, 6, 37, generator=torch.Generator().manual_seed(8))
    kw = dict(gate=False, skip=False, bias=False)
    fused, plain = _scan_fn(reverse, "fused", **kw), _scan_fn(reverse, "torch", **kw)
    names = ["u", "x_dbl", "dt_weight", "A"]
    _compare(lambda *t: fused(*t, None, None, None), lambda *t: plain(*t, None, None, None),
             [inputs[n] for n in names], names, dy, "_FusedMambaScanBackward")


@pytest.mark.filterwarnings("ignore:Input #.*double precision")
def test_gradcheck():
    """Central differences in float32 (the kernels' only dtype) agree with the analytic gradients."""
    gen = torch.Generator().manual_seed(0)
    opts = dict(eps=1e-2, atol=2e-2, rtol=2e-2, nondet_tol=1e-6)
    x = torch.randn(2, 4, 9, generator=gen).requires_grad_()
    w, b = torch.randn(4, generator=gen).requires_grad_(), torch.randn(4, generator=gen).requires_grad_()
    norm = nn.LayerNorm(4)
    del norm.weight, norm.bias

    def ln(x, w, b):
        norm.weight, norm.bias = w, b
        return layer_norm_channels(x, norm, backend="fused")

    assert torch.autograd.gradcheck(ln, (x, w, b), **opts)
    cw = torch.randn(4, 1, 3, generator=gen).requires_grad_()
    for reverse in (False, True):
        assert torch.autograd.gradcheck(
            lambda x, w, b: causal_conv1d_channels(x, w, b, reverse=reverse, backend="fused"), (x, cw, b), **opts)
    lw, lb = torch.randn(5, 4, generator=gen).requires_grad_(), torch.randn(5, generator=gen).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: linear_channels(x, _linear(w, b), backend="fused"), (x, lw, lb), **opts)
    inputs = [t.requires_grad_() for t in _scan_inputs(9, seed=1, dim=3, nstate=2, rank=2).values()]
    with torch.no_grad():
        inputs[1][:, :2] /= 3
    for reverse in (False, True):
        assert torch.autograd.gradcheck(_scan_fn(reverse, "fused", rank=2, nstate=2), inputs, **opts)


@pytest.mark.parametrize("cls", [MambaLayer, BiMambaLayer])
def test_layer_training_step_matches_torch_backend(cls):
    """loss.backward() through a Mamba layer gives the same gradients on the fused training path as on torch's."""
    torch.manual_seed(0)
    fused = cls(8, d_state=4, scan_backend="fused")
    plain = cls(8, d_state=4, scan_backend="torch")
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 8, 37)
    target = torch.randn(2, 8, 37)
    grads = {}
    for name, layer in (("fused", fused), ("torch", plain)):
        xi = x.clone().requires_grad_()
        out = layer.forward_channels_first(xi)
        loss = ((out - target) ** 2).mean()
        loss.backward()
        nodes = _graph_nodes(out)
        expected = {"_LayerNormCFBackward", "_CausalConv1dCFBackward", "_FusedMambaScanBackward", "_LinearCFBackward"}
        assert expected <= nodes if name == "fused" else not expected & nodes, nodes
        grads[name] = {"input": xi.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    assert grads["fused"].keys() == grads["torch"].keys()
    for n, g in grads["fused"].items():
        assert g is not None, n
        scale = grads["torch"][n].abs().max().item() + 1e-12
        torch.testing.assert_close(g, grads["torch"][n], rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{n}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--use_checkpoint"]], ids=["plain", "use_checkpoint"])
def test_bench_train_step_tiny(extra):
    out = subprocess.run(
        [sys.executable, "-m", "bench.bench_train_step", "--tiny", "--variants=ResidualUNet,SegMamba", "--repeats=1",
         *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith("| tiny")]
    assert len(rows) == 2 and "ResidualUNet" in rows[0] and "SegMamba" in rows[1], out.stdout
    assert "fused" in rows[1]
    assert ("Mamba layers checkpointed" in rows[1]) == bool(extra), rows
    assert "checkpointed" not in rows[0]  # ResidualUNet has no Mamba layer to checkpoint
    assert float(rows[1].split("|")[3]) > 0 and float(rows[1].split("|")[4]) > 0
