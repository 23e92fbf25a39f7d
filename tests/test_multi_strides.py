"""Axis orders read through tables of token offsets (networks.ops.token_order): the conv1d and gated
scan kernels with an order, and MultiMambaLayer's in-place inference path, against the same
functions on explicitly permuted copies."""

from __future__ import annotations

import itertools

import pytest
import torch

import networks.nets.mamba_layers as mamba_layers
from networks.mamba import Mamba
from networks.nets.mamba_layers import DEFAULT_AXIS_ORDERS, MultiMambaLayer
from networks.ops import scan_fused
from networks.ops.channel_ops import causal_conv1d_channels
from networks.ops.selective_scan import mamba_scan
from networks.ops.token_order import token_offsets

REASON = scan_fused.unavailable_reason()
needs_fused = pytest.mark.skipif(REASON is not None, reason=f"fused backend unavailable: {REASON}")

SPATIAL = (5, 6, 7)


def _permuted(x, axes):
    """x (B, C, *spatial) along axis order ``axes``, flattened: (B, C, L), a copy."""
    return x.permute(0, 1, *(2 + a for a in axes)).reshape(x.shape[0], x.shape[1], -1)


def _unpermute(tokens, spatial, axes):
    """Inverse of `_permuted`: tokens (B, C, L) in axis order ``axes`` -> (B, C, L) in memory order."""
    shape = [spatial[a] for a in axes]
    inverse = [axes.index(i) for i in range(len(axes))]
    return tokens.reshape(*tokens.shape[:2], *shape).permute(0, 1, *(2 + a for a in inverse)).reshape(tokens.shape)


def test_token_offsets_is_the_permuted_flattening():
    x = torch.randn(2, 3, *SPATIAL)
    for axes in itertools.permutations(range(3)):
        table = token_offsets(SPATIAL, axes)
        if axes == (0, 1, 2):
            assert table is None
            continue
        assert table.dtype == torch.int64 and table.shape == (5 * 6 * 7,)
        assert torch.equal(x.flatten(2)[..., table], _permuted(x, axes))
        assert token_offsets(list(SPATIAL), list(axes)) is table  # cached
    with pytest.raises(ValueError, match="not a permutation"):
        token_offsets(SPATIAL, (0, 0, 1))


@needs_fused
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("backend", ["fused", "torch"])
def test_conv1d_with_order_matches_the_permuted_copy(reverse, backend):
    gen = torch.Generator().manual_seed(0)
    d, length = 6, 5 * 6 * 7
    xz = torch.randn(2, 2 * d, *SPATIAL, generator=gen)
    w, b = torch.randn(d, 1, 4, generator=gen), torch.randn(d, generator=gen)
    x = xz[:, :d]  # a channel slice of a larger tensor, as in Mamba
    for axes in [(0, 2, 1), (2, 0, 1), (1, 2, 0)]:
        with torch.no_grad():
            got = causal_conv1d_channels(x.reshape(2, d, length), w, b, reverse=reverse, backend=backend,
                                         order=token_offsets(SPATIAL, axes))
            want = causal_conv1d_channels(_permuted(x, axes), w, b, reverse=reverse, backend=backend)
        torch.testing.assert_close(got, _unpermute(want, SPATIAL, axes), atol=1e-6, rtol=1e-6)


@needs_fused
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("backend", ["fused", "torch"])
def test_gated_scan_with_order_matches_the_permuted_copy(reverse, backend):
    gen = torch.Generator().manual_seed(1)
    d, n, r = 5, 4, 2
    u = torch.randn(2, d, *SPATIAL, generator=gen)
    x_dbl = torch.randn(2, r + 2 * n, *SPATIAL, generator=gen)
    z = torch.randn(2, 2 * d, *SPATIAL, generator=gen)[:, d:]  # strided in the batch, as in Mamba
    w, bias, D = torch.randn(d, r, generator=gen), torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    A = -torch.rand(d, n, generator=gen) - 0.1
    flat = lambda t: t.reshape(t.shape[0], t.shape[1], -1)  # noqa: E731
    for axes in [(0, 2, 1), (2, 0, 1), (1, 0, 2)]:
        with torch.no_grad():
            xd = flat(x_dbl)
            got = mamba_scan(flat(u), xd[:, :r], w, A, xd[:, r:r + n], xd[:, r + n:], D, flat(z), bias, True, reverse,
                             backend, order=token_offsets(SPATIAL, axes))
            xp = _permuted(x_dbl, axes)
            want = mamba_scan(_permuted(u, axes), xp[:, :r], w, A, xp[:, r:r + n], xp[:, r + n:], D,
                              _permuted(z, axes), bias, True, reverse, backend)
        torch.testing.assert_close(got, _unpermute(want, SPATIAL, axes), atol=1e-5, rtol=1e-5)


@needs_fused
def test_fused_scan_refuses_an_order_out_of_bounds():
    u = torch.randn(1, 2, 8)
    args = (torch.randn(1, 1, 8), torch.randn(2, 1), None, -torch.ones(2, 3), torch.randn(1, 3, 8),
            torch.randn(1, 3, 8), None, None)
    with pytest.raises(ValueError, match="outside"):
        scan_fused.fused_mamba_scan(u, *args, order=torch.arange(8) + 1)
    with pytest.raises(ValueError, match="shape"):
        scan_fused.fused_mamba_scan(u, *args, order=torch.arange(7))


def _copying(layer, x):
    """MultiMambaLayer's function by its definition: each order a permuted copy, permuted back."""
    total = torch.zeros_like(x)
    for axes, direction in zip(layer.axis_orders, layer.directions):
        perm = (0, 1) + tuple(2 + a for a in axes)
        inverse = tuple(perm.index(i) for i in range(len(perm)))
        total = total + direction(x.permute(perm)).permute(inverse)
    return total / len(layer.axis_orders)


@needs_fused
@pytest.mark.parametrize(
    "spatial, orders",
    [
        ((5, 6, 7), None),  # the four default orders
        ((5, 6, 7), list(itertools.permutations(range(3)))),
        ((4, 8, 3), None),
        ((6, 9), None),  # 2D: both orders
    ],
)
def test_multi_layer_in_place_matches_the_copying_formulation(monkeypatch, spatial, orders):
    torch.manual_seed(0)
    layer = MultiMambaLayer(8, d_state=4, axis_orders=orders, spatial_dims=len(spatial)).eval()
    x = torch.randn(2, 8, *spatial)
    tables = []
    spy = lambda s, a: tables.append(token_offsets(s, a)) or tables[-1]  # noqa: E731
    monkeypatch.setattr(mamba_layers, "token_offsets", spy)
    with torch.inference_mode():
        got = layer(x)
        assert len(tables) == len(layer.axis_orders)  # the in-place path ran
        assert sum(t is not None for t in tables) == len(layer.axis_orders) - 1
        want = _copying(layer, x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if orders is None:
        assert layer.axis_orders == DEFAULT_AXIS_ORDERS[len(spatial)]


@needs_fused
def test_multi_layer_training_path_matches_inference():
    """With gradients the layer runs the copying formulation; same outputs as the in-place path, and
    gradients that reach every direction's parameters."""
    torch.manual_seed(0)
    layer = MultiMambaLayer(8, d_state=4)
    x = torch.randn(2, 8, 5, 6, 7)
    with torch.no_grad():
        want = layer(x)
    got = layer(x.requires_grad_())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for direction in layer.directions:
        g = direction.layer.bwd.mamba.A_log.grad
        assert g is not None and g.abs().sum() > 0


@needs_fused
def test_mamba_order_under_autograd_matches_the_permuted_copy():
    """Mamba with an order and gradients (gathered and scattered copies) against the block on the
    permuted tokens: outputs and input gradients."""
    torch.manual_seed(0)
    block = Mamba(6, d_state=4, d_conv=3, expand=2)
    axes = (2, 0, 1)
    table = token_offsets(SPATIAL, axes)
    x = torch.randn(2, 6, *SPATIAL)
    xa = x.reshape(2, 6, -1).clone().requires_grad_()
    ya = block.forward_channels_first(xa, True, table)
    xb = _permuted(x, axes).requires_grad_()
    yb = block.forward_channels_first(xb, True)
    torch.testing.assert_close(ya, _unpermute(yb, SPATIAL, axes), atol=1e-5, rtol=1e-5)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(_permuted(dy.reshape(x.shape), axes))
    torch.testing.assert_close(xa.grad, _unpermute(xb.grad, SPATIAL, axes), atol=1e-5, rtol=1e-5)
