"""Channel-first inference path: fused Mamba scan, LayerNorm and causal Conv1d kernels, and the layers
and networks that use them, against the reference scan and PyTorch's modules."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import networks
from networks.mamba import Mamba
from networks.nets.mamba_layers import BiMambaLayer, MambaLayer
from networks.ops import scan_fused
from networks.ops.channel_ops import causal_conv1d_channels, layer_norm_channels, linear_channels
from networks.ops.scan_reference import selective_scan_loop

from support import rel_err

dispatch = importlib.import_module("networks.ops.selective_scan")
REASON = scan_fused.unavailable_reason()
needs_fused = pytest.mark.skipif(REASON is not None, reason=f"fused backend unavailable: {REASON}")
IMPLS = scan_fused.available_impls() or ["generic"]


def _flip(t, on):
    return None if t is None else (t.flip(-1) if on else t)


def _reference(u, dt_low, dt_weight, A, B, C, D, z, delta_bias, softplus, reverse):
    """float64 sequential loop on explicitly flipped inputs, the definition of mamba_scan."""
    w, bias = dt_weight, delta_bias
    u, dt_low, B, C, z = (_flip(t, reverse) for t in (u, dt_low, B, C, z))
    d64 = lambda t: None if t is None else t.double()  # noqa: E731
    delta = torch.einsum("dr,brl->bdl", d64(w), d64(dt_low))
    y = selective_scan_loop(d64(u), delta, d64(A), d64(B), d64(C), d64(D), d64(z), d64(bias), softplus)
    return _flip(y, reverse)


def _scan_inputs(batch, dim, nstate, rank, length, seed=0, spread=3.0, packed=True):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, dim, length, generator=gen)
    x_dbl = torch.randn(batch, rank + 2 * nstate, length, generator=gen)
    x_dbl[:, :rank] *= spread  # step sizes across softplus's range (and past its threshold 20)
    dt_low, B, C = torch.split(x_dbl, [rank, nstate, nstate], dim=1)
    if not packed:
        dt_low, B, C = dt_low.clone(), B.clone(), C.clone()
    w = torch.randn(dim, rank, generator=gen)
    A = -torch.rand(dim, nstate, generator=gen) * 2 - 0.05
    D = torch.randn(dim, generator=gen)
    bias = torch.randn(dim, generator=gen)
    xz = torch.randn(batch, 2 * dim, length, generator=gen)
    z = xz[:, dim:]  # the gate is the second half of in_proj's output: strided in the batch
    return dict(u=u, dt_low=dt_low, dt_weight=w, A=A, B=B, C=C, D=D, z=z, delta_bias=bias)




# (batch, dim, N, R, L): L = 1, primes, L not a multiple of any chunk, N not a multiple of 16, N > 64
SHAPES = [(1, 3, 16, 1, 1), (2, 5, 16, 2, 37), (1, 4, 32, 1, 131), (2, 3, 5, 3, 97), (3, 7, 8, 2, 50), (1, 2, 80, 4, 70)]


@needs_fused
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk", [None, 16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_fused_mamba_scan_matches_reference(monkeypatch, impl, chunk, shape, reverse):
    monkeypatch.setattr(scan_fused, "IMPL", impl)
    monkeypatch.setattr(scan_fused, "CHUNK", chunk)
    batch, dim, nstate, rank, length = shape
    x = _scan_inputs(batch, dim, nstate, rank, length, seed=sum(shape))
    want = _reference(**x, softplus=True, reverse=reverse)
    with torch.no_grad():
        got = dispatch.mamba_scan(**x, reverse=reverse, backend="fused")
        torch_backend = dispatch.mamba_scan(**x, reverse=reverse, backend="torch")
    assert dispatch.last_backend() == "torch"
    assert got.shape == (batch, dim, length) and got.dtype == torch.float32
    assert rel_err(got, want) < 2e-5
    assert rel_err(got, torch_backend) < 2e-5


@needs_fused
@pytest.mark.parametrize("optional", ["none", "no_z", "no_D", "no_bias", "no_softplus", "separate_tensors"])
def test_fused_mamba_scan_optional_arguments(optional):
    x = _scan_inputs(2, 6, 16, 2, 75, seed=3, packed=optional != "separate_tensors")
    if optional == "none":
        x.update(z=None, D=None, delta_bias=None)
    elif optional.startswith("no_") and optional != "no_softplus":
        x[{"no_z": "z", "no_D": "D", "no_bias": "delta_bias"}[optional]] = None
    softplus = optional != "no_softplus"
    if not softplus:
        x["dt_low"] = x["dt_low"].abs() * 0.1  # positive steps without softplus
        x["delta_bias"] = x["delta_bias"].abs()
    for reverse in (False, True):
        with torch.inference_mode():
            got = dispatch.mamba_scan(**x, delta_softplus=softplus, reverse=reverse, backend="fused")
        assert rel_err(got, _reference(**x, softplus=softplus, reverse=reverse)) < 2e-5


@needs_fused
def test_fused_mamba_scan_underflowing_decays_and_softplus_tails():
    x = _scan_inputs(1, 4, 16, 1, 200, seed=5, spread=40.0)  # steps from ~0 (softplus of -100) to ~100
    x["A"] = x["A"] * 50  # exp(delta A) underflows to 0 for large steps
    with torch.no_grad():
        got = dispatch.mamba_scan(**x, backend="fused")
    want = _reference(**x, softplus=True, reverse=False)
    assert torch.isfinite(got).all() and rel_err(got, want) < 2e-5


@needs_fused
@pytest.mark.parametrize("impl", IMPLS)
def test_fused_mamba_scan_thread_count_independent(monkeypatch, impl):
    monkeypatch.setattr(scan_fused, "IMPL", impl)
    monkeypatch.setattr(scan_fused, "MIN_WORK_PER_THREAD", 1)
    x = _scan_inputs(2, 9, 16, 2, 300, seed=7)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            with torch.no_grad():
                results.append(dispatch.mamba_scan(**x, reverse=True, backend="fused"))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-6, atol=1e-6)


@needs_fused
def test_mamba_scan_with_gradients_uses_the_differentiable_path():
    x = _scan_inputs(1, 4, 8, 1, 40, seed=9)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
    y = dispatch.mamba_scan(**leaves, reverse=True, backend="fused")
    y.square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves.values())
    ref = {k: v.detach().double().requires_grad_() for k, v in x.items()}
    _reference(**ref, softplus=True, reverse=True).square().sum().backward()
    for k in leaves:
        assert rel_err(leaves[k].grad, ref[k].grad) < 1e-4, k


def test_fused_mamba_scan_rejects_bad_input():
    x = _scan_inputs(1, 4, 8, 1, 10)
    if REASON is not None:
        pytest.skip(f"fused backend unavailable: {REASON}")
    with pytest.raises(ValueError, match="shapes"):
        scan_fused.fused_mamba_scan(x["u"], x["dt_low"], x["dt_weight"][:3], None, x["A"], x["B"], x["C"], None, None)
    with pytest.raises(TypeError, match="float32"):
        scan_fused.fused_mamba_scan(x["u"].double(), x["dt_low"], x["dt_weight"], None, x["A"], x["B"], x["C"], None, None)


# ------------------------------------------------------------------------------------------------
# LayerNorm, Linear and Conv1d in channel-first layout


@pytest.mark.parametrize("backend", ["fused", "torch"])
@pytest.mark.parametrize("channels,length", [(1, 5), (3, 1), (32, 1000), (70, 517), (320, 40)])
def test_layer_norm_channels_matches_layernorm(backend, channels, length):
    if backend == "fused" and REASON is not None:
        pytest.skip(REASON)
    torch.manual_seed(channels)
    norm = nn.LayerNorm(channels)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = torch.randn(2, channels, length) * 3 + 5  # an offset: the variance must not cancel
    want = norm(x.transpose(1, 2)).transpose(1, 2)
    with torch.no_grad():
        got = layer_norm_channels(x, norm, backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_layer_norm_channels_rejects_wrong_channels():
    with pytest.raises(ValueError, match=r"\(8,\)"):
        layer_norm_channels(torch.randn(1, 7, 4), nn.LayerNorm(8))


@pytest.mark.parametrize("batch", [1, 3])
def test_linear_channels_matches_linear(batch):
    torch.manual_seed(batch)
    lin = nn.Linear(6, 5)
    x = torch.randn(batch, 6, 33)
    want = lin(x.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(linear_channels(x, lin), want)
    with torch.no_grad():
        torch.testing.assert_close(linear_channels(x.transpose(1, 2).contiguous().transpose(1, 2), lin), want)


def _linear_reference(x, lin):
    y = torch.einsum("mk,bkl->bml", lin.weight.double(), x.double())
    return y if lin.bias is None else y + lin.bias.double()[:, None]


@needs_fused
@pytest.mark.parametrize("out_f, in_f", [(1, 1), (3, 5), (4, 32), (7, 3), (66, 64)])
@pytest.mark.parametrize("length", [1, 15, 64, 65, 1000])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_linear_channels_matches_float64(out_f, in_f, length, batch, bias):
    """The register-blocked kernel: row blocks of 4 and remainders, whole and partial 64-token blocks."""
    torch.manual_seed(out_f * 100 + in_f + length)
    lin = nn.Linear(in_f, out_f, bias=bias)
    x = torch.randn(batch, in_f, length)
    with torch.no_grad():
        got = linear_channels(x, lin)
    assert got.shape == (batch, out_f, length) and got.dtype == torch.float32
    assert rel_err(got, _linear_reference(x, lin)) < 1e-6


@needs_fused
def test_fused_linear_channels_reads_slices_and_strided_tokens():
    """A channel slice with a batch stride (the gate half of in_proj's output) and a transposed view."""
    torch.manual_seed(5)
    lin = nn.Linear(6, 9)
    xz = torch.randn(3, 12, 200)
    half = xz[:, 6:]
    with torch.no_grad():
        got = linear_channels(half, lin)
        tokens_last = linear_channels(torch.randn(2, 200, 6).transpose(1, 2), lin)
    assert rel_err(got, _linear_reference(half, lin)) < 1e-6
    assert tokens_last.shape == (2, 9, 200)


@needs_fused
@pytest.mark.parametrize("length", [147456, 147461])
def test_fused_linear_channels_large_output(length):
    """Over 64 MiB of output: rows of 64-byte multiples are written around the caches, others not."""
    torch.manual_seed(6)
    lin = nn.Linear(3, 120)
    x = torch.randn(1, 3, length)
    with torch.no_grad():
        got = linear_channels(x, lin)
    assert got.numel() * 4 > 64 * 2**20
    assert rel_err(got, _linear_reference(x, lin)) < 1e-6


@needs_fused
def test_fused_linear_channels_dispatch(monkeypatch):
    """The kernel serves inference and training (forward and input gradient); with backend "torch",
    PyTorch's product runs (and gives the same values)."""
    lin = nn.Linear(4, 5)
    x = torch.randn(1, 4, 70, requires_grad=True)
    calls = []
    real = scan_fused._library()

    class Spy:
        def __getattr__(self, name):
            if name == "co_linear_cf_f32":
                calls.append(name)
            return getattr(real, name)

    monkeypatch.setattr(scan_fused, "_library", lambda: Spy())
    want = _linear_reference(x.detach(), lin)
    y = linear_channels(x, lin, backend="torch")
    y.sum().backward()
    assert not calls and lin.weight.grad is not None and x.grad is not None
    torch.testing.assert_close(y.detach().double(), want, rtol=1e-5, atol=1e-5)
    y = linear_channels(x, lin)
    assert calls == ["co_linear_cf_f32"] and y.grad_fn.name() == "_LinearCFBackward"
    y.sum().backward()
    assert calls == ["co_linear_cf_f32"] * 2  # the input gradient
    torch.testing.assert_close(y.detach().double(), want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(linear_channels(x, lin, backend="torch").double(), want, rtol=1e-5, atol=1e-5)
        assert len(calls) == 2
        torch.testing.assert_close(linear_channels(x, lin).double(), want, rtol=1e-5, atol=1e-5)
    assert len(calls) == 3


@needs_fused
def test_fused_linear_channels_reports_failures(monkeypatch):
    class Failing:
        def __init__(self, code):
            self.code = code

        def co_linear_cf_f32(self, *args):
            return self.code

    x = torch.randn(1, 4, 70)
    for code, err in ((1, MemoryError), (2, RuntimeError)):
        monkeypatch.setattr(scan_fused, "_library", lambda: Failing(code))
        with torch.no_grad(), pytest.raises(err, match=r"\(1, 4, 70\)"):
            linear_channels(x, nn.Linear(4, 5))


@needs_fused
@pytest.mark.parametrize("code, err", [(1, MemoryError), (2, RuntimeError)])
def test_fused_inference_kernels_report_failures(monkeypatch, code, err):
    """LayerNorm, Conv1d and the bf16 instance norm: a return code from the library is an error naming the
    operation and the input's shape (1: out of memory), never an unwritten output passed on."""
    from networks.ops.instance_norm_cl import instance_norm_act

    class Failing:
        def __getattr__(self, name):
            return lambda *args: code

    monkeypatch.setattr(scan_fused, "_library", lambda: Failing())
    x = torch.randn(2, 4, 70)
    cl = torch.randn(1, 4, 3, 5, 6).to(torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        with pytest.raises(err, match=r"channel-first layer norm.*\(2, 4, 70\)"):
            layer_norm_channels(x, nn.LayerNorm(4))
        with pytest.raises(err, match=r"causal conv1d.*\(2, 4, 70\)"):
            causal_conv1d_channels(x, torch.randn(4, 1, 4), torch.randn(4))
        with pytest.raises(err, match=r"bf16 channels-last instance norm.*\(1, 4, 3, 5, 6\)"):
            instance_norm_act(cl, torch.ones(4), torch.zeros(4), 1e-5, 0.01)


@pytest.mark.parametrize("backend", ["fused", "torch"])
@pytest.mark.parametrize("width", [1, 2, 4, 7])
@pytest.mark.parametrize("length", [1, 3, 2500])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_causal_conv1d_channels_matches_conv1d(backend, width, length, reverse):
    if backend == "fused" and REASON is not None:
        pytest.skip(REASON)
    torch.manual_seed(width * 7 + length)
    dim = 5
    conv = nn.Conv1d(dim, dim, width, groups=dim, padding=width - 1)
    xz = torch.randn(2, 2 * dim, length)
    x = xz[:, :dim]  # a channel slice, as Mamba's in_proj output is split
    src = x.flip(-1) if reverse else x
    want = F.silu(conv(src)[..., :length])
    want = want.flip(-1) if reverse else want
    with torch.no_grad():
        got = causal_conv1d_channels(x, conv.weight, conv.bias, silu=True, reverse=reverse, backend=backend)
        plain = causal_conv1d_channels(x, conv.weight, None, silu=False, reverse=reverse, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    want_plain = conv(src)[..., :length] - conv.bias[:, None]
    torch.testing.assert_close(plain, want_plain.flip(-1) if reverse else want_plain, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Layers and networks: the channel-first inference path computes what the autograd path computes


def test_mamba_channels_first_and_reverse():
    torch.manual_seed(0)
    block = Mamba(12, d_state=8)
    x = torch.randn(2, 12, 45)
    with torch.no_grad():
        cf = block.forward_channels_first(x)
        rev = block.forward_channels_first(x, reverse=True)
        torch.testing.assert_close(cf, block(x.transpose(1, 2)).transpose(1, 2), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rev, block.forward_channels_first(x.flip(-1)).flip(-1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(batch, 12, L\)"):
        block.forward_channels_first(torch.randn(1, 45, 12))


def test_bidirectional_layer_reads_backwards_without_flips():
    torch.manual_seed(1)
    layer = BiMambaLayer(8, 4)
    x = torch.randn(1, 30, 8)
    with torch.no_grad():
        want = layer.norm(layer.fwd(x) + layer.bwd(x.flip(1)).flip(1))  # Fig. 1b as written
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.forward_channels_first(x.transpose(1, 2)), want.transpose(1, 2), rtol=1e-5,
                                   atol=1e-5)


def test_mamba_layer_token_and_channel_first_agree_with_gradients():
    torch.manual_seed(2)
    layer = MambaLayer(8, 4)
    x = torch.randn(2, 20, 8, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    g = x.grad.clone()
    x.grad = None
    layer.forward_channels_first(x.transpose(1, 2)).sum().backward()
    torch.testing.assert_close(x.grad, g, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["SegMamba", "BiSegMamba", "MultiSegMamba", "SegMambaSkip"])
def test_networks_inference_equals_autograd_path_and_torch_backend(variant):
    torch.manual_seed(3)
    kw = dict(spatial_dims=3, in_channels=1, out_channels=3, kernel_size=[3, 3, 3], strides=[1, 2, 2],
              filters=[8, 16, 24])
    net = getattr(networks, variant)(**kw).eval()
    for p in net.parameters():  # away from the zero-initialised norms, so every path matters
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 1, 12, 8, 16)
    with torch.enable_grad():
        with_graph = net(x.requires_grad_())  # autograd path (PyTorch ops, differentiable scan)
    x = x.detach()
    with torch.inference_mode():
        fast = net(x)  # channel-first kernels where the fused backend is available
    torch_net = getattr(networks, variant)(**kw, mamba_kwargs={"scan_backend": "torch"}).eval()
    torch_net.load_state_dict(net.state_dict())
    with torch.inference_mode():
        plain = torch_net(x)
    assert fast.shape == (2, 3, 12, 8, 16)
    torch.testing.assert_close(fast, with_graph.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(plain, with_graph.detach(), rtol=1e-4, atol=1e-4)


def test_disabled_fused_library_uses_pytorch_ops(monkeypatch):
    monkeypatch.setenv(scan_fused.ENV_DISABLE, "1")
    monkeypatch.setattr(dispatch, "_logged", set())
    calls = []
    monkeypatch.setattr(scan_fused, "_library", lambda: calls.append(1))  # must not be reached
    torch.manual_seed(4)
    layer = BiMambaLayer(8, 4)
    x = torch.randn(1, 8, 25)
    with torch.no_grad():
        y = layer.forward_channels_first(x)
    assert dispatch.last_backend() == "torch" and not calls
    assert y.shape == x.shape and torch.isfinite(y).all()
