"""`MambaUNet`: the one residual U-Net topology shared by all variants (nnU-Net ResEnc style).

stem -> encoder stages (residual blocks, then that stage's Mamba layer) -> decoder stages
(transposed conv, concatenation with the skip, residual blocks, 1x1 head). Which Mamba layer sits
on the encoder stages, and whether its output replaces the features or only feeds the skip, is a
constructor argument; the variants (`networks.nets.variants`) only choose those.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from monai.networks.blocks import UnetOutBlock
from monai.networks.blocks.dynunet_block import get_conv_layer

from ..flags import parse_flag
from .blocks import BasicBlockD, ResidualStack, stem_block

__all__ = ["MambaUNet", "init_weights", "PLACEMENTS"]

PLACEMENTS = ("replace", "skip")
DEFAULT_NORM = ("INSTANCE", {"affine": True, "eps": 1e-5})
DEFAULT_ACT = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})


def _per_axis(values: Sequence, spatial_dims: int, name: str) -> Tuple[Tuple[int, ...], ...]:
    out = []
    for i, v in enumerate(values):
        t = (int(v),) * spatial_dims if isinstance(v, int) else tuple(int(a) for a in v)
        if len(t) != spatial_dims or min(t) < 1:
            raise ValueError(f"{name}[{i}] must be a positive int or {spatial_dims} positive ints, got {v!r}")
        out.append(t)
    return tuple(out)


class MambaUNet(nn.Module):
    """Residual U-Net with an optional Mamba layer after every encoder stage.

    Structure (nnU-Net's residual-encoder U-Net, as in the paper's code):

    * stem: conv(kernel_size[0]) -> norm -> act, in_channels -> filters[0];
    * encoder stage s (s = 0 .. S-1): 2 `BasicBlockD`, the first with stride ``strides[s]``,
      filters[s-1] -> filters[s], kernel ``kernel_size[s]``; then ``mamba_layer(filters[s])``.
      ``placement="replace"``: its output goes down the encoder *and* to the skip;
      ``placement="skip"``: it goes only to the skip, the raw features go down. Either way the
      decoder starts from the bottleneck's Mamba output;
    * decoder stage (S-1 of them, deepest first): transposed conv (kernel = stride = strides[s],
      bias) to filters[s-1] channels, concatenation [upsampled, skip], 2 `BasicBlockD`
      (2*filters[s-1] -> filters[s-1]), a 1x1 conv head to out_channels.

    All S-1 heads always exist (so the parameter count does not depend on ``deep_supervision``);
    only the ones needed are run.

    Input: (B, in_channels, *spatial), every spatial size divisible by the product of the strides
    along that axis (`total_stride`), else ValueError.

    Output:
        * ``train()`` and ``deep_supervision=True``: a list of S-1 tensors, full resolution first,
          entry i of shape (B, out_channels, *spatial / stride-product of stages 1..i), as
          `monai.losses.DeepSupervisionLoss` takes it;
        * otherwise one tensor (B, out_channels, *spatial).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels (classes, background included).
        kernel_size: per-stage conv kernels, each an int or one int per axis (nnU-Net
            ``conv_kernel_sizes``).
        strides: per-stage strides, same format (nnU-Net ``pool_op_kernel_sizes``); the first must
            be all ones.
        filters: per-stage channels; default min(32 * 2**s, 320).
        deep_supervision: return every decoder stage's output in training mode.
        mamba_layer: factory ``channels -> module (B, C, *spatial) -> (B, C, *spatial)`` placed
            after each encoder stage; None gives the plain residual U-Net.
        placement: ``"replace"`` or ``"skip"`` (see above).
        norm_name: MONAI norm spec (default InstanceNorm, affine, eps 1e-5).
        act_name: MONAI activation spec (default LeakyReLU(0.01)).
        n_blocks: residual blocks per encoder and per decoder stage.
        use_checkpoint: in training (a gradient needed), run each Mamba layer under activation checkpointing
            (`torch.utils.checkpoint`, as MONAI's ``SwinUNETR(use_checkpoint=True)``): its intermediate tensors
            (about 15 full-resolution tensors of 1-4x the stage's channels for a unidirectional layer) are not
            kept for the backward pass but recomputed then, one more forward of the layer. Same weights,
            same gradients (within float32 rounding); no effect in inference.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[Union[Sequence[int], int]],
        strides: Sequence[Union[Sequence[int], int]],
        filters: Optional[Sequence[int]] = None,
        deep_supervision: bool = False,
        mamba_layer: Optional[Callable[[int], nn.Module]] = None,
        placement: str = "replace",
        norm_name: Union[Tuple, str] = DEFAULT_NORM,
        act_name: Union[Tuple, str] = DEFAULT_ACT,
        n_blocks: int = 2,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        kernels = _per_axis(kernel_size, spatial_dims, "kernel_size")
        strides_t = _per_axis(strides, spatial_dims, "strides")
        n_stages = len(kernels)
        if len(strides_t) != n_stages or n_stages < 2:
            raise ValueError(f"kernel_size and strides need one entry per stage (>= 2), got {len(kernels)} and {len(strides_t)}")
        if any(s != 1 for s in strides_t[0]):
            raise ValueError(f"strides[0] must be all ones (stage 0 is at full resolution), got {strides_t[0]}")
        if filters is None:
            filters = [min(32 * 2**s, 320) for s in range(n_stages)]
        filters = [int(f) for f in filters]
        if len(filters) != n_stages:
            raise ValueError(f"filters needs {n_stages} entries (one per stage), got {len(filters)}")

        self.spatial_dims = spatial_dims
        self.kernel_size, self.strides, self.filters = kernels, strides_t, tuple(filters)
        self.deep_supervision = deep_supervision
        self.placement = placement
        self.use_checkpoint = parse_flag(use_checkpoint, "use_checkpoint") and mamba_layer is not None
        self.total_stride = tuple(math.prod(s[a] for s in strides_t) for a in range(spatial_dims))
        self.total_stride_list = list(self.total_stride)  # indexable in TorchScript

        def stack(c_in: int, c_out: int, k, s) -> ResidualStack:
            return ResidualStack(spatial_dims, c_in, c_out, k, s, norm_name, act_name, n_blocks)

        self.stem = stem_block(spatial_dims, in_channels, filters[0], kernels[0], norm_name, act_name)
        self.encoder = nn.ModuleList(
            stack(filters[max(s - 1, 0)], filters[s], kernels[s], strides_t[s]) for s in range(n_stages)
        )
        self.mamba_layers = nn.ModuleList(
            mamba_layer(filters[s]) if mamba_layer is not None else nn.Identity() for s in range(n_stages)
        )
        # decoder stage i upsamples from encoder stage s = n_stages-1-i to the skip of stage s-1
        skip_stages = list(range(n_stages - 2, -1, -1))
        self.upsamples = nn.ModuleList(
            get_conv_layer(
                spatial_dims, filters[s + 1], filters[s], strides_t[s + 1], strides_t[s + 1],
                bias=True, conv_only=True, is_transposed=True,
            )
            for s in skip_stages
        )
        self.decoder = nn.ModuleList(stack(2 * filters[s], filters[s], kernels[s], 1) for s in skip_stages)
        self.heads = nn.ModuleList(UnetOutBlock(spatial_dims, filters[s], out_channels) for s in skip_stages)
        init_weights(self)

    def check_input_size(self, spatial: Sequence[int]) -> None:
        """ValueError unless every spatial size is divisible by `total_stride` on its axis."""
        spatial = tuple(int(v) for v in spatial)
        if len(spatial) != self.spatial_dims:
            raise ValueError(f"expected {self.spatial_dims} spatial dims, got input spatial shape {spatial}")
        bad = [a for a in range(self.spatial_dims) if spatial[a] % self.total_stride[a]]
        if bad:
            detail = ", ".join(f"axis {a}: {spatial[a]} is not divisible by {self.total_stride[a]}" for a in bad)
            raise ValueError(
                f"input spatial size {spatial} must be divisible by the total stride {self.total_stride} "
                f"per axis ({detail})"
            )

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        if torch.jit.is_scripting():
            for a in range(len(self.total_stride_list)):
                if x.shape[2 + a] % self.total_stride_list[a] != 0:
                    raise ValueError(f"input spatial size {x.shape[2:]} must be divisible by the total stride "
                                     f"{self.total_stride_list} per axis")
        else:
            self.check_input_size(x.shape[2:])
        x = self.stem(x)
        skips: List[torch.Tensor] = []
        index = 0
        for stage, mamba in zip(self.encoder, self.mamba_layers):
            x = stage(x)
            if self.use_checkpoint and torch.is_grad_enabled() and not torch.jit.is_scripting():
                y = self._checkpointed_mamba(index, x)
            else:
                y = mamba(x)
            index += 1
            skips.append(y)
            if self.placement == "replace":
                x = y
        x = skips[-1]
        all_outputs = self.training and self.deep_supervision
        outputs: List[torch.Tensor] = []
        last = len(self.decoder) - 1
        for i, (up, blocks, head) in enumerate(zip(self.upsamples, self.decoder, self.heads)):
            x = blocks(torch.cat([up(x), skips[-(i + 2)]], dim=1))
            if all_outputs or i == last:
                outputs.append(head(x))
        if all_outputs:
            outputs.reverse()
            return outputs
        return outputs[-1]

    @torch.jit.unused
    def _checkpointed_mamba(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """``mamba_layers[index](x)`` keeping only x for the backward pass (which runs the layer again)."""
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.mamba_layers[index], x, use_reentrant=False)


_INIT_TYPES = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def init_weights(module: nn.Module, neg_slope: float = 1e-2) -> None:
    """nnU-Net's initialisation, in place.

    Kaiming normal (a = ``neg_slope``) on 2D/3D conv and transposed-conv weights, zero biases (the
    Mamba block's Conv1d and all Linear / Mamba parameters keep their own initialisation); the
    norm before the addition in every `BasicBlockD` starts at weight 0 and bias 0.
    """
    for m in module.modules():
        if isinstance(m, _INIT_TYPES):
            nn.init.kaiming_normal_(m.weight, a=neg_slope)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, BasicBlockD):
            nn.init.zeros_(m.last_norm.weight)
            nn.init.zeros_(m.last_norm.bias)
