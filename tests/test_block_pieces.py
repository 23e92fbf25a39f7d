"""A Mamba block over pieces of its sequence in CPU inference (`networks.mamba.PIECE_TOKENS`): the carried Conv1d
history and scan states, the token-strided projections, and the block's output against the whole sequence's."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import networks.mamba as mamba_module
from networks.mamba import Mamba
from networks.ops import scan_fused
from networks.ops.channel_ops import causal_conv1d_channels, linear_channels
from networks.ops.selective_scan import mamba_scan

REASON = scan_fused.unavailable_reason()
needs_fused = pytest.mark.skipif(REASON is not None, reason=f"fused backend unavailable: {REASON}")


def _pieces(length, size, reverse):
    """Sequence ranges [s, e) of consecutive pieces in scan order (from the end when reversed)."""
    out = []
    for first in range(0, length, size):
        out.append((max(0, length - first - size), length - first) if reverse else (first, min(length, first + size)))
    return out


@needs_fused
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("backend", ["fused", "torch"])
def test_conv1d_history_continues_the_sequence(reverse, backend):
    """Each piece convolved with the K-1 inputs before it (in reading order) gives the whole sequence's outputs:
    bit for bit on the kernel, within float32 rounding on the PyTorch fallback."""
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 6, 101), torch.randn(6, 1, 4), torch.randn(6)
    with torch.no_grad():
        whole = causal_conv1d_channels(x, w, b, silu=True, reverse=reverse, backend=backend)
        got, history = torch.empty_like(whole), None
        for s, e in _pieces(101, 32, reverse):
            got[..., s:e] = causal_conv1d_channels(x[..., s:e], w, b, silu=True, reverse=reverse, backend=backend,
                                                   history=history)
            history = x[..., s:s + 3] if reverse else x[..., e - 3:e]  # the next piece's: this one's border
    if backend == "fused":
        assert torch.equal(got, whole)
    else:  # PyTorch's convolution of the concatenated inputs: the same terms, its own summation order
        torch.testing.assert_close(got, whole, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"history must be \(2, 6, 3\) for input \(2, 6, 101\), got \(2, 6, 2\)"):
        causal_conv1d_channels(x, w, b, history=torch.zeros(2, 6, 2), backend=backend)


@needs_fused
@pytest.mark.parametrize("reverse", [False, True])
def test_scan_state_carries_between_pieces(reverse):
    """Pieces scanned in order with one carried state: the whole scan, bit for bit for pieces of a multiple of
    16 tokens (the kernel sums y over 16 steps at a time), and within float32 rounding otherwise; the state ends
    as the whole scan's last state."""
    torch.manual_seed(1)
    bt, d, n, r, length = 2, 5, 12, 3, 203
    u, z = torch.randn(bt, d, length), torch.randn(bt, d, length)
    x_dbl = torch.randn(bt, r + 2 * n, length)
    dt, b, c = x_dbl.split([r, n, n], dim=1)
    w, bias, A, D = torch.randn(d, r) * 0.3, torch.randn(d) * 0.3, -torch.rand(d, n) - 0.2, torch.randn(d)
    args = dict(D=D, delta_bias=bias, delta_softplus=True, reverse=reverse, backend="fused")
    with torch.no_grad():
        whole = mamba_scan(u, dt, w, A, b, c, z=z, **args)
        for size in (64, 48, 50):
            state, got = scan_fused.scan_state(bt, d, n), torch.empty_like(whole)
            for s, e in _pieces(length, size, reverse):
                got[..., s:e] = mamba_scan(u[..., s:e], dt[..., s:e], w, A, b[..., s:e], c[..., s:e], z=z[..., s:e],
                                           state=state, **args)
            if size % 16 == 0:
                assert torch.equal(got, whole), size
            else:
                torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-6)
            assert state.abs().sum() > 0 and state[..., n:].abs().sum() == 0  # carried; the padding lanes stay zero
        with pytest.raises(ValueError, match=r"state must be a contiguous float32 tensor of \(2, 5, \d+\)"):
            mamba_scan(u, dt, w, A, b, c, z=z, state=torch.zeros(2, 5, 3), **args)
        with pytest.raises(ValueError, match="a carried state needs the fused backend's inference kernels"):
            mamba_scan(u, dt, w, A, b, c, z=z, state=scan_fused.scan_state(bt, d, n), **{**args, "backend": "torch"})


@needs_fused
def test_linear_reads_and_writes_token_slices():
    """The Linear kernel reads a token slice of a longer sequence and writes into one, in place."""
    torch.manual_seed(2)
    lin = nn.Linear(6, 9)
    x = torch.randn(2, 6, 500)
    with torch.no_grad():
        whole = linear_channels(x, lin, backend="fused")
        out = torch.full((2, 9, 500), float("nan"))
        for s, e in _pieces(500, 144, False):
            assert linear_channels(x[..., s:e], lin, backend="fused", out=out[..., s:e]) is not None
    assert torch.equal(out, whole)


@needs_fused
@pytest.mark.parametrize("reverse", [False, True])
def test_block_in_pieces_is_the_whole_block(reverse, monkeypatch):
    """A block's CPU inference over pieces (batch elements one at a time, each in pieces) gives the whole
    sequence's output bit for bit; training (gradients) does not cut the sequence."""
    torch.manual_seed(3)
    block = Mamba(d_model=8, d_state=6).eval()
    with torch.no_grad():
        block.A_log.add_(torch.randn_like(block.A_log) * 0.3)
        block.conv1d.bias.normal_()
    x = torch.randn(2, 8, 1000)
    with torch.inference_mode():
        whole = block.forward_channels_first(x, reverse)
    calls = []
    real = Mamba._block_in_pieces
    monkeypatch.setattr(Mamba, "_block_in_pieces", lambda self, *a, **k: calls.append(a[0].shape) or real(self, *a, **k))
    monkeypatch.setattr(mamba_module, "PIECE_TOKENS", 128)
    with torch.inference_mode():
        got = block.forward_channels_first(x, reverse)
    assert calls == [(1, 8, 1000)] * 2  # each batch element, in pieces
    assert torch.equal(got, whole)
    xg = x.clone().requires_grad_()
    block.train().forward_channels_first(xg, reverse).sum().backward()
    assert calls == [(1, 8, 1000)] * 2 and xg.grad is not None  # training kept the whole sequence


@needs_fused
@pytest.mark.parametrize("kind", ["unidirectional", "bidirectional", "multidirectional"])
def test_layers_in_pieces_are_the_whole_layers(kind, monkeypatch):
    """The paper's three Mamba layers (MultiSegMamba's reading its axis orders by strides) in CPU inference with
    pieces of 32 tokens: the same output, bit for bit, as with the whole sequence."""
    from networks.nets.variants import bidirectional, multidirectional, unidirectional

    factory = {"unidirectional": unidirectional, "bidirectional": bidirectional,
               "multidirectional": multidirectional}[kind]
    torch.manual_seed(4)
    layer = factory(3, 8, 4, {}).eval()
    x = torch.randn(2, 8, 4, 6, 10)
    with torch.inference_mode():
        whole = layer(x)
        monkeypatch.setattr(mamba_module, "PIECE_TOKENS", 32)
        pieces = layer(x)
    assert torch.equal(pieces, whole)


@needs_fused
def test_library_and_state_under_float64_default_dtype():
    """A process whose default dtype is float64 still loads the library (its load-time self-test gives every
    tensor a dtype) and gets float32 scan states."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import torch; torch.set_default_dtype(torch.float64)\n"
            "from networks.ops import scan_fused\n"
            "assert scan_fused._library() is not None, scan_fused.unavailable_reason()\n"
            "assert scan_fused.scan_state(1, 2, 5).dtype == torch.float32\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
