"""The paper's four Mamba U-Nets and the residual U-Net baseline, as MONAI-style network classes.

All five are `MambaUNet` with one row of `VARIANTS` (the paper's Fig. 2): which Mamba layer sits
after every encoder stage (full resolution and bottleneck included), whether its output replaces
the features or feeds only the skip connection, and the cap on the Mamba state size
(d_state = min(C, d_state_max), as in the authors' code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch.nn as nn

from .mamba_layers import BiMambaLayer, MambaLayer, MultiMambaLayer, SpatialAdapter
from .unet import DEFAULT_ACT, DEFAULT_NORM, MambaUNet

__all__ = ["VARIANTS", "Variant", "ResidualUNet", "SegMamba", "BiSegMamba", "MultiSegMamba", "SegMambaSkip"]

# A layer factory: (spatial_dims, channels, d_state, mamba_kwargs) -> module (B, C, *spatial) -> same.
LayerFactory = Callable[[int, int, int, Dict[str, Any]], nn.Module]


def unidirectional(spatial_dims: int, channels: int, d_state: int, kw: Dict[str, Any]) -> nn.Module:
    """Token LayerNorm + one `MambaLayer` over the flattened volume (Fig. 1a)."""
    return SpatialAdapter(MambaLayer(channels, d_state, **kw), channels)


def bidirectional(spatial_dims: int, channels: int, d_state: int, kw: Dict[str, Any]) -> nn.Module:
    """Token LayerNorm + one `BiMambaLayer` over the flattened volume (Fig. 1b)."""
    return SpatialAdapter(BiMambaLayer(channels, d_state, **kw), channels)


def multidirectional(spatial_dims: int, channels: int, d_state: int, kw: Dict[str, Any]) -> nn.Module:
    """`MultiMambaLayer`: a `BiMambaLayer` per axis order, averaged (Fig. 3)."""
    return MultiMambaLayer(channels, d_state, spatial_dims=spatial_dims, **kw)


@dataclass(frozen=True)
class Variant:
    """One row of Fig. 2: Mamba layer per encoder stage (None: none), placement, d_state cap."""

    layer: Optional[LayerFactory]
    placement: str
    d_state_max: int


# Fig. 2 of the paper, as the authors coded it.
VARIANTS: Dict[str, Variant] = {
    #                          Mamba layer        output goes to   d_state = min(C, .)
    "ResidualUNet":  Variant(None,             "replace",       256),
    "SegMamba":      Variant(unidirectional,   "replace",       256),
    "BiSegMamba":    Variant(bidirectional,    "replace",       256),
    "MultiSegMamba": Variant(multidirectional, "replace",       64),  # the paper's text says 256
    "SegMambaSkip":  Variant(bidirectional,    "skip",          256),
}


class _PaperUNet(MambaUNet):
    """`MambaUNet` configured by the row of `VARIANTS` named by the subclass."""

    variant: str = ""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[Union[Sequence[int], int]],
        strides: Sequence[Union[Sequence[int], int]],
        filters: Optional[Sequence[int]] = None,
        deep_supervision: bool = False,
        d_state_max: Optional[int] = None,
        mamba_kwargs: Optional[Dict[str, Any]] = None,
        norm_name: Union[Tuple, str] = DEFAULT_NORM,
        act_name: Union[Tuple, str] = DEFAULT_ACT,
        use_checkpoint: bool = False,
    ) -> None:
        spec = VARIANTS[self.variant]
        cap = spec.d_state_max if d_state_max is None else int(d_state_max)
        kw = dict(mamba_kwargs or {})
        factory = None
        if spec.layer is not None:
            layer = spec.layer

            def factory(channels: int) -> nn.Module:
                return layer(spatial_dims, channels, min(channels, cap), kw)

        self.d_state_max = cap
        super().__init__(
            spatial_dims, in_channels, out_channels, kernel_size, strides, filters=filters,
            deep_supervision=deep_supervision, mamba_layer=factory, placement=spec.placement,
            norm_name=norm_name, act_name=act_name, use_checkpoint=use_checkpoint,
        )


_COMMON_DOC = """
    Input (B, in_channels, *spatial), each spatial size divisible by the product of ``strides`` on
    that axis (else ValueError). Output in ``eval()`` or without deep supervision: (B, out_channels,
    *spatial); in ``train()`` with ``deep_supervision=True``: a list of len(strides)-1 tensors, full
    resolution first, each at its decoder stage's resolution (for `monai.losses.DeepSupervisionLoss`).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels (classes incl. background).
        kernel_size: per-stage conv kernels, ints or per-axis tuples (nnU-Net conv_kernel_sizes).
        strides: per-stage strides, ints or per-axis tuples (nnU-Net pool_op_kernel_sizes), first all ones.
        filters: per-stage channels; default min(32 * 2**s, 320).
        deep_supervision: in training mode return all decoder stages' outputs.
        d_state_max: Mamba state size is min(C, d_state_max); default {cap} (ignored without Mamba).
        mamba_kwargs: extra `networks.Mamba` arguments (d_conv, expand, scan_backend, ...).
        norm_name, act_name: MONAI norm / activation specs (default InstanceNorm affine, LeakyReLU 0.01).
        use_checkpoint: in training, recompute each Mamba layer in the backward pass instead of keeping its
            intermediate tensors (`torch.utils.checkpoint`; less memory, one more forward of the layers).
"""


class ResidualUNet(_PaperUNet):
    """Residual U-Net (nnU-Net ResEnc topology) without Mamba layers: the ablation baseline."""

    variant = "ResidualUNet"


class SegMamba(_PaperUNet):
    """SegMamba: a unidirectional Mamba layer after every encoder stage; its output replaces the features."""

    variant = "SegMamba"


class BiSegMamba(_PaperUNet):
    """BiSegMamba: a bidirectional Mamba layer after every encoder stage; its output replaces the features."""

    variant = "BiSegMamba"


class MultiSegMamba(_PaperUNet):
    """MultiSegMamba: a multi-directional Mamba layer (4 axis orders x 2 directions, averaged) after every
    encoder stage; its output replaces the features. d_state = min(C, 64) as in the authors' code; pass
    ``d_state_max=256`` for the paper's stated min(C, 256)."""

    variant = "MultiSegMamba"


class SegMambaSkip(_PaperUNet):
    """SegMambaSkip: a bidirectional Mamba layer on every skip connection: the encoder passes its raw
    features down and the Mamba output only to the skip (the bottleneck's Mamba output starts the decoder)."""

    variant = "SegMambaSkip"


for _cls in (ResidualUNet, SegMamba, BiSegMamba, MultiSegMamba, SegMambaSkip):
    _cls.__doc__ += "\n" + _COMMON_DOC.format(cap=VARIANTS[_cls.variant].d_state_max)
del _cls
