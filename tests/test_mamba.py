"""networks.Mamba: mamba-ssm's parameter layout, initialisation and outputs."""

import math

import pytest
import torch

from networks import Mamba

from mamba_ssm_reference import mamba_ssm_reference


def documented_shapes(d_model, d_state=16, d_conv=4, expand=2):
    """The state-dict layout of mamba_ssm.modules.mamba_simple.Mamba (bias=False, conv_bias=True)."""
    d_inner = expand * d_model
    dt_rank = math.ceil(d_model / 16)
    return {
        "A_log": (d_inner, d_state),
        "D": (d_inner,),
        "in_proj.weight": (2 * d_inner, d_model),
        "conv1d.weight": (d_inner, 1, d_conv),
        "conv1d.bias": (d_inner,),
        "x_proj.weight": (dt_rank + 2 * d_state, d_inner),
        "dt_proj.weight": (d_inner, dt_rank),
        "dt_proj.bias": (d_inner,),
        "out_proj.weight": (d_model, d_inner),
    }


@pytest.mark.parametrize("d_model,d_state", [(32, 32), (40, 16), (320, 256)])
def test_state_dict_layout(d_model, d_state):
    block = Mamba(d_model, d_state=d_state)
    assert {k: tuple(v.shape) for k, v in block.state_dict().items()} == documented_shapes(d_model, d_state)


def test_initialisation():
    block = Mamba(48, d_state=12, dt_min=0.001, dt_max=0.1)
    torch.testing.assert_close(block.A_log, torch.log(torch.arange(1, 13.0)).repeat(96, 1))
    torch.testing.assert_close(block.D, torch.ones(96))
    dt = torch.nn.functional.softplus(block.dt_proj.bias)
    assert dt.min() >= 0.001 * 0.999 and dt.max() <= 0.1 * 1.001
    bound = block.dt_rank**-0.5
    assert block.dt_proj.weight.abs().max() <= bound


def test_forward_is_causal_and_differentiable():
    torch.manual_seed(0)
    block = Mamba(16, d_state=8)
    x = torch.randn(2, 50, 16, requires_grad=True)
    y = block(x)
    assert y.shape == (2, 50, 16)
    x2 = x.detach().clone()
    x2[:, 30:] += torch.randn(2, 20, 16)
    y2 = block(x2)
    torch.testing.assert_close(y2[:, :30], y[:, :30])  # the past never sees the future
    assert not torch.allclose(y2[:, 30:], y[:, 30:])
    y.square().sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_rejects_wrong_channels():
    with pytest.raises(ValueError, match=r"Mamba expects \(batch, L, 16\)"):
        Mamba(16)(torch.randn(2, 10, 8))


def test_same_weights_same_outputs_as_mamba_ssm():
    with mamba_ssm_reference() as ref:
        if ref is None:
            pytest.skip("mamba-ssm not installed (make install adds its pure-Python reference)")
        torch.manual_seed(0)
        theirs = ref.Mamba(24, d_state=16, d_conv=4, expand=2, use_fast_path=False)
        ours = Mamba(24, d_state=16, d_conv=4, expand=2)
        assert set(theirs.state_dict()) == set(ours.state_dict())
        ours.load_state_dict(theirs.state_dict(), strict=True)
        x = torch.randn(2, 77, 24)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)
        # and the other direction, with gradients
        ours2 = Mamba(24, d_state=16)
        theirs.load_state_dict(ours2.state_dict(), strict=True)
        xa = x.clone().requires_grad_()
        xb = x.clone().requires_grad_()
        ya, yb = ours2(xa), theirs(xb)
        torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-5)
        ya.sum().backward()
        yb.sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
        for (name, pa), pb in zip(ours2.named_parameters(), [dict(theirs.named_parameters())[n] for n, _ in ours2.named_parameters()]):
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_block_choice_on_this_machine():
    """Without mamba-ssm's CUDA extension (CPU, or a CUDA device without it) the project's path runs."""
    from networks import available_backends
    from networks.mamba import fused_block_fn

    if available_backends()["cuda"] is None:
        pytest.skip("mamba-ssm's CUDA kernels are usable here: the fused block is chosen on CUDA")
    assert fused_block_fn(torch.device("cpu")) is None
    assert fused_block_fn(torch.device("cuda")) is None  # auto resolves to another backend here
    with pytest.raises(ValueError, match="'cuda' was requested but cannot run"):
        fused_block_fn(torch.device("cpu"), scan_backend="cuda")


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_mamba_ssm_fused_block_path_matches_project_path(monkeypatch, reverse):
    """The branch that calls mamba-ssm's ``mamba_inner_fn`` (on CUDA), run on CPU with mamba-ssm's
    ``mamba_inner_ref`` and causal-conv1d's ``causal_conv1d_ref`` standing in for the compiled
    functions: same weights, same outputs and gradients as the project's path, both directions."""
    import networks.mamba as mamba_module

    with mamba_ssm_reference() as ref:
        if ref is None or ref.mamba_inner_ref is None:
            pytest.skip("mamba-ssm or causal-conv1d not installed (make reference installs their Python code)")
        torch.manual_seed(0)
        block = Mamba(12, d_state=8, d_conv=4, expand=2, bias=True)
        params = dict(block.named_parameters())
        x = torch.randn(2, 12, 37)
        grad_out = torch.randn(2, 12, 37)

        def run():
            xs = x.clone().requires_grad_()
            y = block.forward_channels_first(xs, reverse=reverse)
            grads = torch.autograd.grad(y, [xs, *params.values()], grad_out)
            return y.detach(), dict(zip(["x", *params], grads))

        assert mamba_module.fused_block_fn(x.device) is None
        y_ours, g_ours = run()
        calls = []

        def inner(*args, **kwargs):
            calls.append(args[0].shape)
            return ref.mamba_inner_ref(*args, **kwargs)

        monkeypatch.setattr(mamba_module, "resolve_backend", lambda device, requested=None: "cuda")
        monkeypatch.setattr(mamba_module, "_mamba_inner_fn", lambda: inner)
        assert mamba_module.fused_block_fn(x.device) is inner
        assert mamba_module.fused_block_fn(x.device, use_fast_path=False) is None
        y_ref, g_ref = run()
        assert calls == [(2, 48, 37)]  # the mamba-ssm branch ran, on the whole (B, 2*d_inner, L) projection
        torch.testing.assert_close(y_ref, y_ours, rtol=1e-4, atol=1e-5)
        for name in g_ours:
            torch.testing.assert_close(g_ref[name], g_ours[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"d{name}: {m}")
