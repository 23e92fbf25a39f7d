"""Casts between bfloat16 channels-last and float32 channel-first feature maps on CPU.

In the bf16 inference mode (`networks.precision`) the convolutions run on bfloat16 channels-last maps and
the Mamba layers on float32 channel-first ones, so every Mamba layer starts and ends with a cast that also
changes the memory layout. torch does both in one element-wise copy with a gather on one side, several
times slower than reading and writing the bytes (0.47 s in and 0.17 s out for a 32 x 48x192x192 map of two
windows on 2 cores, freed memory kept; the kernels 0.04-0.13 s and 0.08-0.12 s). `to_float32_channel_first` and `to_bf16_channels_last`
run the ``fused`` CPU library's blocked kernels (``csrc/layout_cast_cpu.cpp``) where they apply and
torch's ``Tensor.to`` otherwise; the values are the same either way (widening is exact, narrowing rounds
to nearest even as torch does).
"""

from __future__ import annotations

import torch

from .channel_ops import _inference_kernel_input, _lib_call
from .scan_fused import _ptr

__all__ = ["to_float32_channel_first", "to_bf16_channels_last"]

_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _kernel_applies(x: torch.Tensor, dtype: torch.dtype, memory_format: torch.memory_format) -> bool:
    """A CPU map (B, C, *spatial) of ``dtype`` stored in ``memory_format`` (and no other), no gradient
    recorded, and the fused library built."""
    if x.dim() not in _CHANNELS_LAST or not x.is_contiguous(memory_format=memory_format):
        return False
    # a map contiguous in both formats (one channel, or one token) needs no reordering
    other = torch.contiguous_format if memory_format != torch.contiguous_format else _CHANNELS_LAST[x.dim()]
    if x.is_contiguous(memory_format=other):
        return False
    return _inference_kernel_input(x, dtype)


def to_float32_channel_first(x: torch.Tensor) -> torch.Tensor:
    """``x.to(torch.float32, memory_format=torch.contiguous_format)``: (B, C, *spatial) any dtype and layout
    -> float32, contiguous. A bfloat16 channels-last map takes the blocked kernel (same values: exact)."""
    if not _kernel_applies(x, torch.bfloat16, _CHANNELS_LAST.get(x.dim(), torch.contiguous_format)):
        return x.to(torch.float32, memory_format=torch.contiguous_format).contiguous()  # `to` keeps a float32 view
    y = torch.empty(x.shape, dtype=torch.float32)
    b, c = x.shape[:2]
    _lib_call("lc_cl_bf16_to_cf_f32", "bf16 channels-last -> float32 cast", x.shape, _ptr(x), _ptr(y), b,
              x[0, 0].numel(), c)
    return y


def to_bf16_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x.to(torch.bfloat16, memory_format=channels_last[_3d])``: (B, C, *spatial) (4 or 5 dims) any dtype and
    layout -> bfloat16 channels-last, rounded to nearest even. A contiguous float32 map takes the blocked kernel."""
    fmt = _CHANNELS_LAST[x.dim()]
    if not _kernel_applies(x, torch.float32, torch.contiguous_format):
        return x.to(torch.bfloat16, memory_format=fmt)
    y = torch.empty(x.shape, dtype=torch.bfloat16, memory_format=fmt)
    b, c = x.shape[:2]
    _lib_call("lc_cf_f32_to_cl_bf16", "float32 -> bf16 channels-last cast", x.shape, _ptr(x), _ptr(y), b, c,
              x[0, 0].numel())
    return y
