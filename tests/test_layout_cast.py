"""The bf16 channels-last <-> float32 channel-first casts (networks/ops/layout_cast.py) against torch's ``Tensor.to``.

Both directions must give torch's values bit for bit (widening is exact; narrowing rounds to nearest even),
NaN excepted, where only NaN-ness is compared (torch writes one canonical NaN, the kernel keeps the payload).
"""

from __future__ import annotations

import pytest
import torch

import networks
from networks import precision as prec
from networks.nets.mamba_layers import SpatialAdapter
from networks.ops import layout_cast, scan_fused
from networks.ops.layout_cast import to_bf16_channels_last, to_float32_channel_first

REASON = scan_fused.unavailable_reason()
needs_fused = pytest.mark.skipif(REASON is not None, reason=f"fused CPU library unavailable: {REASON}")

SHAPES = [(2, 3, 5, 7, 11), (1, 32, 4, 8, 9), (2, 70, 3, 5, 2), (1, 5, 13, 17), (3, 2, 1, 1, 65)]


def _cl(x):
    return x.contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)


def _awkward_floats(shape, seed):
    """float32 values spread over many binades, with exact bf16 rounding ties (even and odd), subnormals,
    signed zeros, infinities and NaN among them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-30, 30, shape, generator=g).float())
    flat = x.view(-1)
    bits = flat.view(torch.int32)
    n = flat.numel()
    bits[0:n:7] = (bits[0:n:7] & ~0xFFFF) | 0x8000  # ties: round to the even neighbour
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -3e-39, 3.3895e38])
    flat[1:n:11][: special.numel()] = special[: flat[1:n:11].numel()]
    return x


def _spy_on_casts(monkeypatch):
    """Replace the fused library by a proxy that lists the names of the cast kernels called; returns the list."""
    calls = []
    real = scan_fused._library()

    class Spy:
        def __getattr__(self, name):
            if name.startswith("lc_"):
                calls.append(name)
            return getattr(real, name)

    monkeypatch.setattr(scan_fused, "_library", lambda: Spy())
    return calls


def _same(a, b):
    """Equal values and NaN in the same places (bit patterns of NaN may differ)."""
    nan = torch.isnan(a.float())
    return torch.equal(nan, torch.isnan(b.float())) and torch.equal(a.float()[~nan].view(torch.int32),
                                                                     b.float()[~nan].view(torch.int32))


@needs_fused
@pytest.mark.parametrize("shape", SHAPES)
def test_casts_match_torch(shape):
    x = _awkward_floats(shape, seed=len(shape) * 100 + shape[1])
    with torch.inference_mode():
        narrow = to_bf16_channels_last(x)
        want = _cl(x.to(torch.bfloat16))
        assert narrow.dtype == torch.bfloat16 and narrow.shape == x.shape
        assert _cl(narrow).data_ptr() == narrow.data_ptr()  # stored channels-last
        assert _same(narrow, want)
        wide = to_float32_channel_first(want)
        assert wide.dtype == torch.float32 and wide.is_contiguous() and wide.shape == x.shape
        assert _same(wide, want.float())


@needs_fused
def test_kernels_serve_the_cases_they_are_for(monkeypatch):
    """The kernels run for bf16 channels-last -> float32 and float32 contiguous -> bf16 channels-last without
    a recorded gradient; other layouts, gradients and a missing library take torch's copy, same values."""
    calls = _spy_on_casts(monkeypatch)
    x = torch.randn(2, 6, 3, 4, 5)
    cl = _cl(x.to(torch.bfloat16))
    with torch.no_grad():
        assert _same(to_float32_channel_first(cl), cl.float()) and calls == ["lc_cl_bf16_to_cf_f32"]
        assert _same(to_bf16_channels_last(x), cl) and calls[-1] == "lc_cf_f32_to_cl_bf16"
        calls.clear()
        # not the kernels' layouts: a contiguous bf16 map, a channels-last float32 map, a transposed view,
        # a map with one channel (both layouts at once), 3-dimensional tensors
        for t in (cl.contiguous(), x.transpose(2, 3), torch.randn(1, 1, 3, 4, 5), torch.randn(2, 6, 7)):
            assert _same(to_float32_channel_first(t), t.to(torch.float32))
            assert to_float32_channel_first(t).is_contiguous()
        for t in (_cl(x), x.transpose(2, 3), torch.randn(1, 1, 3, 4, 5)):
            assert _same(to_bf16_channels_last(t), _cl(t.to(torch.bfloat16)))
        assert not calls
    g = x.clone().requires_grad_()
    y = to_bf16_channels_last(g)
    assert y.requires_grad and not calls  # autograd records torch's cast
    monkeypatch.setattr(scan_fused, "_library", lambda: None)
    with torch.no_grad():
        assert _same(to_float32_channel_first(cl), cl.float()) and _same(to_bf16_channels_last(x), cl)


@needs_fused
def test_kernel_failures_name_the_input(monkeypatch):
    class Failing:
        def __getattr__(self, name):
            return lambda *args: 2

    monkeypatch.setattr(scan_fused, "_library", lambda: Failing())
    x = torch.randn(1, 4, 2, 3, 5)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match=r"\(1, 4, 2, 3, 5\)"):
            to_bf16_channels_last(x)
        with pytest.raises(RuntimeError, match=r"\(1, 4, 2, 3, 5\)"):
            to_float32_channel_first(_cl(x.to(torch.bfloat16)))


@needs_fused
def test_bf16_network_casts_around_its_mamba_layers(monkeypatch):
    """In the bf16 mode every Mamba layer of SegMamba is entered and left through the kernels, and the
    network's output is the one torch's casts give."""
    if prec.bf16_unavailable_reason() is not None:
        pytest.skip(prec.bf16_unavailable_reason())
    torch.manual_seed(0)
    net = networks.SegMamba(3, 1, 3, kernel_size=[3, 3, 3], strides=[1, 2, 2], filters=[8, 16, 24]).eval()
    prec.set_inference_precision(net, "bf16", "cpu")
    x = torch.randn(1, 1, 8, 16, 16)
    seen = []
    # hooks registered after the precision mode's own: they see the cast that was just made
    layers = [m for m in net.modules() if isinstance(m, SpatialAdapter)]
    for m in layers:
        m.register_forward_pre_hook(lambda mod, args: seen.append(("in", calls[-1:], args[0].dtype)))
        m.register_forward_hook(lambda mod, args, out: seen.append(("out", calls[-1:], out.dtype)))
    with torch.inference_mode():
        calls = _spy_on_casts(monkeypatch)
        y = net(x)
        monkeypatch.setattr(layout_cast, "_kernel_applies", lambda *args: False)
        want = net(x)
    assert len(layers) == 3
    assert seen[:6] == [("in", ["lc_cl_bf16_to_cf_f32"], torch.float32),
                        ("out", ["lc_cf_f32_to_cl_bf16"], torch.bfloat16)] * 3
    assert torch.equal(y, want)
