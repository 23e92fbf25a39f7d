"""Token orders of a feature map: its voxels read along a permutation of the spatial axes, in place.

A feature map (B, C, *spatial) is, flattened, a token sequence (B, C, L) in row-major order of
``spatial``. Read along another axis order (``x.permute(0, 1, *(2 + a for a in axes))`` flattened),
the same voxels form another sequence; `token_offsets` gives it as a table: token t of that
sequence is the voxel at flat offset ``table[t]`` of the map in its own layout. The inference
kernels (`networks.ops.channel_ops.causal_conv1d_channels`, `networks.ops.scan_fused.fused_mamba_scan`)
read and write through such a table, so a layer runs along any axis order on the map as it lies in
memory, without a permuted copy in or an inverse permutation out. `gather_tokens` / `scatter_tokens`
are the same reordering as PyTorch ops (autograd, TorchScript, any device), for every other path.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import torch

__all__ = ["token_offsets", "gather_tokens", "scatter_tokens"]


def token_offsets(spatial: Sequence[int], axes: Sequence[int]) -> Optional[torch.Tensor]:
    """Flat offsets of the voxels of a ``spatial``-shaped map read along axis order ``axes``.

    Args:
        spatial: the map's spatial shape, e.g. (D0, D1, D2).
        axes: a permutation of range(len(spatial)); the last axis varies fastest, as in
            ``x.permute(0, 1, *(2 + a for a in axes)).reshape(B, C, -1)``.

    Returns:
        (L,) int64 CPU tensor, L = prod(spatial), a permutation of 0..L-1 with
        ``x.flatten(2)[..., table] == x.permute(0, 1, *(2 + a for a in axes)).flatten(2)``;
        None when ``axes`` is the identity (memory order). Cached per (spatial, axes) and shared:
        do not modify it.
    """
    spatial, axes = tuple(int(s) for s in spatial), tuple(int(a) for a in axes)
    if sorted(axes) != list(range(len(spatial))):
        raise ValueError(f"axis order {axes} is not a permutation of the axes of spatial shape {spatial}")
    if axes == tuple(range(len(spatial))):
        return None
    return _offsets(spatial, axes)


@functools.lru_cache(maxsize=64)
def _offsets(spatial: Tuple[int, ...], axes: Tuple[int, ...]) -> torch.Tensor:
    # a normal tensor even when first asked for under inference_mode: the autograd fallback
    # (index_select / index_copy) may save it for a backward pass later
    with torch.inference_mode(False), torch.no_grad():
        n = 1
        for s in spatial:
            n *= s
        return torch.arange(n, dtype=torch.int64).reshape(spatial).permute(axes).reshape(-1).contiguous()


def gather_tokens(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The tokens of x (..., L) in the order of a table: ``x[..., order]``, a copy."""
    return x.index_select(-1, order.to(x.device))


def scatter_tokens(y: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The inverse of `gather_tokens`: z (..., L) with ``z[..., order] = y``, a copy."""
    return torch.empty_like(y).index_copy(-1, order.to(y.device), y)
