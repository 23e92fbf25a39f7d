"""Mamba layers of the paper (Fig. 1 and Fig. 3), each a reusable module.

Token layers work on sequences (B, L, C): `MambaLayer` (the wrapper around one Mamba block),
`BiMambaLayer` (forward + flipped backward, summed and normalised). Each also computes the same
function on channel-first tokens (B, C, L) with ``forward_channels_first``, which is what the
volume layers use: a feature map (B, C, *spatial) is already (B, C, L) in memory, so no token
tensor is transposed, and the backward direction reads the sequence in reverse instead of
flipping copies. Volume layers work on feature maps (B, C, *spatial): `SpatialAdapter` turns a
token layer into one, `MultiMambaLayer` runs a bidirectional layer along several axis orders and
averages them.
"""

from __future__ import annotations

import itertools
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..mamba import Mamba
from ..ops.channel_ops import layer_norm_cf, layer_norm_channels, linear_cf, linear_channels
from ..ops.selective_scan import no_autocast as _no_autocast

__all__ = ["MambaLayer", "BiMambaLayer", "SpatialAdapter", "MultiMambaLayer", "DEFAULT_AXIS_ORDERS"]


class MambaLayer(nn.Module):
    """The paper's "Mamba Layer" (Fig. 1a; ``MambaTrans`` in the authors' code).

    ``x = Mamba(LN1(x)) + x`` then ``x = Linear(LN2(x)) + x`` (a C x C linear with bias).

    Input and output: (B, L, dim).

    Args:
        dim: token channels C.
        d_state: Mamba state size N.
        d_conv: width of Mamba's causal convolution.
        expand: Mamba's inner expansion (d_inner = expand * dim).
        mamba_kwargs: further keyword arguments of `networks.Mamba` (e.g. ``scan_backend``).
    """

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, **mamba_kwargs) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mamba = Mamba(d_model=dim, d_state=d_state, d_conv=d_conv, expand=expand, **mamba_kwargs)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_channels_first(x.transpose(1, 2)).transpose(1, 2)

    def forward_channels_first(self, x: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        """The same layer on (B, dim, L); ``reverse`` runs the Mamba block from the last token to the first."""
        if torch.jit.is_scripting():
            return self._forward_plain(x, reverse)
        backend = self.mamba.scan_backend
        h = self.mamba.forward_channels_first(layer_norm_channels(x, self.norm1, backend), reverse)
        x = _add(h, x)
        return _add(linear_channels(layer_norm_channels(x, self.norm2, backend), self.mlp, backend), x)

    def _forward_plain(self, x: torch.Tensor, reverse: bool) -> torch.Tensor:
        """`forward_channels_first` in PyTorch ops (the scripted path)."""
        h = self.mamba.forward_plain(layer_norm_cf(x, self.norm1.weight, self.norm1.bias, self.norm1.eps), reverse)
        x = h + x
        y = layer_norm_cf(x, self.norm2.weight, self.norm2.bias, self.norm2.eps)
        return linear_cf(y, self.mlp.weight, self.mlp.bias) + x


class BiMambaLayer(nn.Module):
    """Bidirectional Mamba layer (Fig. 1b): ``LN(fwd(x) + flip(bwd(flip(x))))``, flips on the token axis.

    ``fwd`` and ``bwd`` are two separate `MambaLayer`; the backward one reads the sequence from its
    last token to its first.

    Input and output: (B, L, dim). Arguments as `MambaLayer`.
    """

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, **mamba_kwargs) -> None:
        super().__init__()
        self.fwd = MambaLayer(dim, d_state, d_conv, expand, **mamba_kwargs)
        self.bwd = MambaLayer(dim, d_state, d_conv, expand, **mamba_kwargs)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_channels_first(x.transpose(1, 2)).transpose(1, 2)

    def forward_channels_first(self, x: torch.Tensor) -> torch.Tensor:
        """The same layer on (B, dim, L): ``bwd`` reads the tokens in reverse, no flipped copies."""
        if torch.jit.is_scripting():
            y = self.fwd.forward_channels_first(x) + self.bwd.forward_channels_first(x, True)
            return layer_norm_cf(y, self.norm.weight, self.norm.bias, self.norm.eps)
        y = _add(self.fwd.forward_channels_first(x), self.bwd.forward_channels_first(x, reverse=True))
        return layer_norm_channels(y, self.norm, self.fwd.mamba.scan_backend)


def _add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b, into a's memory when no graph is recorded (a is always a fresh result here; a trace
    records out-of-place ops, so that it is the same graph with and without gradients)."""
    return a + b if torch.is_grad_enabled() or torch.jit.is_tracing() else a.add_(b)


class SpatialAdapter(nn.Module):
    """Runs a token layer on a feature map: (B, C, *spatial) -> (B, L, C) -> layer -> (B, C, *spatial).

    Tokens are the voxels in row-major order of ``spatial`` (L = prod(spatial)). The tokens are
    layer-normalised first when ``norm`` is set (the authors' SegMamba / BiSegMamba / SegMambaSkip
    wrapper; their MultiSegMamba omits it). Everything inside runs in float32 with autocast off,
    whatever the input dtype; the output has the input's dtype.

    Input and output: (B, channels, *spatial).

    Args:
        layer: a module (B, L, channels) -> (B, L, channels).
        channels: C.
        norm: apply a LayerNorm(C) to the tokens before ``layer``.
    """

    def __init__(self, layer: nn.Module, channels: int, norm: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels) if norm else nn.Identity()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # no autocast context in TorchScript: float32 throughout
            tokens = x.float().reshape(x.shape[0], x.shape[1], -1)
            tokens = self.norm(tokens.transpose(1, 2)).transpose(1, 2)  # LayerNorm or Identity
            return self.layer.forward_channels_first(tokens).reshape(x.shape).to(x.dtype)
        shape, dtype = x.shape, x.dtype
        with _no_autocast(x.device.type):
            tokens = x.float().reshape(shape[0], shape[1], -1)  # (B, C, L): a view of a contiguous map
            if hasattr(self.layer, "forward_channels_first"):
                if isinstance(self.norm, nn.LayerNorm):
                    tokens = layer_norm_channels(tokens, self.norm, _scan_backend(self.layer))
                tokens = self.layer.forward_channels_first(tokens)
            else:  # any other token layer: (B, L, C)
                tokens = self.layer(self.norm(tokens.transpose(1, 2))).transpose(1, 2)
            return tokens.reshape(shape).to(dtype)


def _scan_backend(layer: nn.Module) -> Optional[str]:
    """The scan backend forced on the first Mamba block inside ``layer`` (None: automatic)."""
    return next((m.scan_backend for m in layer.modules() if isinstance(m, Mamba)), None)


def _axis_orders(spatial_dims: int) -> Tuple[Tuple[int, ...], ...]:
    perms = list(itertools.permutations(range(spatial_dims)))
    if spatial_dims == 3:
        # (1,2,3), (1,3,2), (2,1,3), (3,1,2): permutations 0, 1, 2 and 4, as in the authors' code
        return tuple(perms[i] for i in (0, 1, 2, 4))
    return tuple(perms)


DEFAULT_AXIS_ORDERS = {3: _axis_orders(3), 2: _axis_orders(2)}


class MultiMambaLayer(nn.Module):
    """Multi-directional Mamba layer (Fig. 3): one `BiMambaLayer` per axis order, outputs averaged.

    For each order, the spatial axes are permuted to that order, flattened to tokens (no token
    LayerNorm, as in the authors' code), run through that order's bidirectional layer, reshaped and
    permuted back; the per-order results are stacked and averaged.

    Input and output: (B, dim, *spatial).

    Args:
        dim: channels C.
        d_state, d_conv, expand, mamba_kwargs: as `MambaLayer`.
        axis_orders: permutations of range(len(spatial)); default for 3D the four orders
            (0,1,2), (0,2,1), (1,0,2), (2,0,1) of the paper, for 2D both orders.
        spatial_dims: used to pick the default ``axis_orders``.
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        axis_orders: Optional[Sequence[Sequence[int]]] = None,
        spatial_dims: int = 3,
        **mamba_kwargs,
    ) -> None:
        super().__init__()
        orders = tuple(tuple(o) for o in (axis_orders or _axis_orders(spatial_dims)))
        for order in orders:
            if sorted(order) != list(range(len(orders[0]))):
                raise ValueError(f"axis order {order} is not a permutation of {tuple(range(len(orders[0])))}")
        self.axis_orders = orders
        # the permutations of (B, C, *spatial) and their inverses, as lists that TorchScript indexes
        self.perms = [[0, 1] + [2 + a for a in order] for order in orders]
        self.inverse_perms = [[perm.index(i) for i in range(len(perm))] for perm in self.perms]
        self.directions = nn.ModuleList(
            SpatialAdapter(BiMambaLayer(dim, d_state, d_conv, expand, **mamba_kwargs), dim, norm=False) for _ in orders
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            total = torch.zeros_like(x)
            for i, layer in enumerate(self.directions):
                total = total + layer(x.permute(self.perms[i])).permute(self.inverse_perms[i])
            return total / len(self.perms)
        if x.dim() - 2 != len(self.axis_orders[0]):
            raise ValueError(f"MultiMambaLayer built for {len(self.axis_orders[0])} spatial dims, got input {tuple(x.shape)}")
        total = None
        for order, layer in zip(self.axis_orders, self.directions):
            perm = (0, 1) + tuple(2 + a for a in order)
            inverse = tuple(perm.index(i) for i in range(len(perm)))
            y = layer(x.permute(perm)).permute(inverse)
            total = y if total is None else _add(total, y)
        if torch.is_grad_enabled() or torch.jit.is_tracing():
            return total / len(self.axis_orders)
        return total.div_(len(self.axis_orders))
