"""Convolutional building blocks of the residual U-Net: the ResNet-D residual block and the stem.

The convolutions, norms and activations come from `monai.networks.blocks`; only the residual block
itself is written here, because MONAI's `UnetResBlock` differs from nnU-Net's ``BasicBlockD`` in
three ways that change both the function and the parameter count:

* its skip path is a *strided* 1x1 convolution, where ResNet-D first average-pools by the stride
  and then applies a stride-1 1x1 convolution (no information is dropped by the subsampling);
* its skip path exists only as conv + norm, where ResNet-D uses pooling alone when only the
  stride changes and adds the 1x1 conv + norm only when the channel count changes;
* its convolutions have no bias, where nnU-Net's residual encoder keeps conv biases on.
"""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
import torch.nn as nn
from monai.networks.blocks.dynunet_block import get_conv_layer
from monai.networks.layers.factories import Pool
from monai.networks.layers.utils import get_act_layer

__all__ = ["BasicBlockD", "ResidualStack", "stem_block"]

NormAct = Union[Tuple, str]


class BasicBlockD(nn.Module):
    """Residual block with a ResNet-D skip path (nnU-Net's ``BasicBlockD``).

    ``out = act(norm2(conv2(act(norm1(conv1(x))))) + skip(x))`` with ``conv1`` strided and
    ``skip = [AvgPool(stride)] -> [Conv1x1(no bias) -> norm]``: the pool when ``stride`` is not all
    ones, the projection when ``in_channels != out_channels``, identity when neither.

    Input (B, in_channels, *spatial) -> output (B, out_channels, *spatial / stride).

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: kernel of both convolutions, an int or one per axis ("same" padding).
        stride: stride of the first convolution and of the skip's pooling, an int or one per axis.
        norm_name: MONAI norm spec, e.g. ``("INSTANCE", {"affine": True})``.
        act_name: MONAI activation spec, e.g. ``("leakyrelu", {"negative_slope": 0.01})``.

    Attributes:
        last_norm: the norm before the addition (zero-initialised by `init_weights`).
    """

    __jit_unused_properties__ = ["last_norm"]  # TorchScript compiles properties; this one is for init only

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: Union[Sequence[int], int],
        stride: Union[Sequence[int], int],
        norm_name: NormAct,
        act_name: NormAct,
    ) -> None:
        super().__init__()
        self.conv1 = get_conv_layer(
            spatial_dims, in_channels, out_channels, kernel_size, stride,
            act=act_name, norm=norm_name, bias=True, conv_only=False,
        )
        self.conv2 = get_conv_layer(
            spatial_dims, out_channels, out_channels, kernel_size, 1,
            act=None, norm=norm_name, bias=True, conv_only=False,
        )
        skip = []
        stride_t = (stride,) * spatial_dims if isinstance(stride, int) else tuple(stride)
        if any(s != 1 for s in stride_t):
            skip.append(Pool[Pool.AVG, spatial_dims](kernel_size=stride_t, stride=stride_t))
        if in_channels != out_channels:
            skip.append(
                get_conv_layer(
                    spatial_dims, in_channels, out_channels, 1, 1,
                    act=None, norm=norm_name, bias=False, conv_only=False,
                )
            )
        self.skip = nn.Sequential(*skip)  # empty Sequential is the identity
        self.act = get_act_layer(act_name)

    @property
    def last_norm(self) -> nn.Module:
        return self.conv2.adn.N

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.skip(x))


class ResidualStack(nn.Sequential):
    """``n_blocks`` `BasicBlockD` in sequence; the first one applies ``stride`` and the channel change.

    Input (B, in_channels, *spatial) -> output (B, out_channels, *spatial / stride).
    Arguments as `BasicBlockD`, plus ``n_blocks`` (>= 1).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: Union[Sequence[int], int],
        stride: Union[Sequence[int], int],
        norm_name: NormAct,
        act_name: NormAct,
        n_blocks: int = 2,
    ) -> None:
        if n_blocks < 1:
            raise ValueError(f"n_blocks must be >= 1, got {n_blocks}")
        blocks = [BasicBlockD(spatial_dims, in_channels, out_channels, kernel_size, stride, norm_name, act_name)]
        blocks += [
            BasicBlockD(spatial_dims, out_channels, out_channels, kernel_size, 1, norm_name, act_name)
            for _ in range(n_blocks - 1)
        ]
        super().__init__(*blocks)


def stem_block(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: Union[Sequence[int], int],
    norm_name: NormAct,
    act_name: NormAct,
) -> nn.Module:
    """The stem: conv (stride 1, bias) -> norm -> act, (B, in, *spatial) -> (B, out, *spatial)."""
    return get_conv_layer(
        spatial_dims, in_channels, out_channels, kernel_size, 1,
        act=act_name, norm=norm_name, bias=True, conv_only=False,
    )
