"""Reduced-precision inference on CPU: bfloat16 convolutions, float32 Mamba layers and logits.

``set_inference_precision(network, "bf16")`` converts a network in place for inference on a CPU with
bf16 dot-product instructions (``avx512_bf16`` / AMX on x86, ``bf16`` on Arm), where oneDNN runs 3D
convolutions about twice as fast in bfloat16 with the channels-last memory format as in float32:

- convolutions (weights and activations) in bfloat16, channels-last;
- instance norms (and the leaky ReLU that follows them inside MONAI's ``ADN``) in one pass over the
  channels-last map, statistics in float (`networks.ops.instance_norm_cl`), affine parameters float32;
- the Mamba layers (`SpatialAdapter`, `MultiMambaLayer`) in float32 as in the float32 network: their
  input is widened to float32 and their output rounded back to bfloat16;
- pooling without a bf16 CPU kernel (average pooling) in float32;
- the output heads (MONAI's ``UnetOutBlock``) in float32, so the logits, and everything downstream
  (sliding-window blending, softmax, argmax), are float32.

The network's input may be float32 (it is rounded to bfloat16 on entry); its output is float32. The
parameter names are unchanged, so a float32 state dict (``model.pt``) loads into the converted network
(values rounded to bfloat16 where the parameter is bfloat16). ``"float32"`` leaves the network as it
is; ``"auto"`` picks ``"bf16"`` where the CPU has bf16 instructions and ``"float32"`` otherwise. On a
CUDA device the mode does not apply (use the bundles' ``amp``): the network stays float32 and the
reason is logged, as it is where a CPU lacks bf16 instructions.
"""

from __future__ import annotations

import logging
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from .ops.layout_cast import to_bf16_channels_last, to_float32_channel_first

__all__ = ["PRECISIONS", "bf16_unavailable_reason", "resolve_precision", "set_inference_precision", "InstanceNormAct"]

PRECISIONS = ("float32", "bf16", "auto")
_ALIASES = {"fp32": "float32", "float": "float32", "bfloat16": "bf16", "bf16": "bf16", "float32": "float32", "auto": "auto"}

logger = logging.getLogger("networks.precision")


def bf16_unavailable_reason(device: Union[str, torch.device, None] = None) -> Optional[str]:
    """None where bf16 inference applies to ``device`` (default CPU), else why not."""
    device = torch.device(device or "cpu")
    if device.type != "cpu":
        return f"the bf16 mode is for CPU inference; {device} runs float32 (use the bundle's amp setting on a GPU)"
    if not torch.backends.mkldnn.is_available():
        return "this build of torch has no oneDNN (mkldnn), which runs bf16 convolutions on CPU"
    try:
        supported = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError) as err:  # an older or unusual torch build
        return f"torch cannot tell whether this CPU has bf16 instructions ({err})"
    if not supported:
        return "this CPU has no bf16 dot-product instructions (avx512_bf16 / AMX / Arm bf16): bf16 would be emulated, slower than float32"
    return None


def resolve_precision(precision: str, device: Union[str, torch.device, None] = None) -> Tuple[str, Optional[str]]:
    """(the precision that runs, the reason when it differs from the request) for ``device``.

    ``precision``: ``"float32"``, ``"bf16"`` or ``"auto"`` (aliases ``fp32``, ``bfloat16``). ``"bf16"``
    and ``"auto"`` fall back to ``"float32"`` where `bf16_unavailable_reason` gives a reason.
    """
    key = _ALIASES.get(str(precision).strip().lower())
    if key is None:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if key == "float32":
        return "float32", None
    reason = bf16_unavailable_reason(device)
    return ("float32", reason) if reason else ("bf16", None)


class InstanceNormAct(nn.Module):
    """Instance norm, optionally followed by a leaky ReLU, as one pass on bf16 channels-last maps.

    Same parameters (``weight``, ``bias``, float32, shape (C,)) and function as
    ``nn.InstanceNorm{1,2,3}d(C, eps, affine)`` (no running statistics) followed by
    ``nn.LeakyReLU(negative_slope)`` (or nothing when ``negative_slope`` is None; 0.0 for ReLU).

    Input and output: (B, C, *spatial), the input's dtype and memory format.
    """

    def __init__(self, norm: nn.modules.instancenorm._InstanceNorm, negative_slope: Optional[float] = None) -> None:
        super().__init__()
        self.num_features, self.eps = norm.num_features, norm.eps
        self.negative_slope = negative_slope
        self.weight = norm.weight if norm.affine else None
        self.bias = norm.bias if norm.affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .ops.instance_norm_cl import instance_norm_act

        if x.dtype == torch.bfloat16 and x.device.type == "cpu":
            # e.g. the stem's output (a convolution of a 1-channel input comes out contiguous): the
            # kernel, and the convolutions after it, want channels-last
            x = _channels_last(x)
        return instance_norm_act(x, self.weight, self.bias, self.eps, self.negative_slope)


def _float32_islands():
    """Module types that run in float32 inside a bf16 network: (type, whether their output stays float32)."""
    from monai.networks.blocks import UnetOutBlock

    from .nets.mamba_layers import MultiMambaLayer, SpatialAdapter

    return {SpatialAdapter: False, MultiMambaLayer: False, nn.AvgPool1d: False, nn.AvgPool2d: False,
            nn.AvgPool3d: False, UnetOutBlock: True}


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    if x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _to_bf16(x):
    if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
        return x
    if x.dim() in (4, 5):  # one pass: narrow and reorder
        return to_bf16_channels_last(x)
    return x.to(torch.bfloat16)


def _to_float32(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():  # one pass: widen and make contiguous
        return to_float32_channel_first(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_to_float32(v) for v in x)
    return x


def _enter_bf16(module, args):
    return tuple(_to_bf16(a) for a in args)


def _enter_float32(module, args):
    return tuple(_to_float32(a) for a in args)


def _leave_bf16(module, args, output):
    return _to_bf16(output)


def _leave_float32(module, args, output):
    return _to_float32(output)


def _fuse_norms(module: nn.Module) -> int:
    """Replace every instance norm under ``module`` by `InstanceNormAct`, taking in the activation that
    follows it inside a MONAI ``ADN`` (norm directly followed by LeakyReLU / ReLU). Returns the count."""
    from monai.networks.blocks import ADN

    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.instancenorm._InstanceNorm) and not child.track_running_stats:
            slope = None
            if isinstance(module, ADN) and name == "N":
                names = list(module._modules)
                nxt = module._modules[names[names.index("N") + 1]] if names.index("N") + 1 < len(names) else None
                if isinstance(nxt, (nn.LeakyReLU, nn.ReLU)):
                    slope = nxt.negative_slope if isinstance(nxt, nn.LeakyReLU) else 0.0
                    setattr(module, names[names.index("N") + 1], nn.Identity())
            setattr(module, name, InstanceNormAct(child, slope))
            count += 1
        else:
            count += _fuse_norms(child)
    return count


def set_inference_precision(
    network: nn.Module, precision: str = "float32", device: Union[str, torch.device, None] = None
) -> nn.Module:
    """Convert ``network`` in place for inference at ``precision`` on ``device``; returns ``network``.

    Args:
        network: any MONAI-style network taking (B, C, *spatial) and returning a tensor (or a list of
            tensors); the project's U-Nets and MONAI's DynUNet are what it is tested on.
        precision: ``"float32"`` (no change), ``"bf16"`` or ``"auto"`` (see `resolve_precision`).
        device: where the network runs (default: where its first parameter is).

    The chosen precision, and the reason for a fallback, are logged and kept on the network as
    ``network.inference_precision``. The converted network is for inference: do not train it.
    """
    if device is None:
        param = next(network.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    used, reason = resolve_precision(precision, device)
    if reason:
        logger.warning("precision %r not used, running float32: %s", precision, reason)
    network.inference_precision = used
    if used == "float32":
        return network
    islands = _float32_islands()
    fused = _fuse_norms(network)
    kept = []  # outermost float32 modules

    def convert(m: nn.Module) -> None:
        for child in m.children():
            if any(isinstance(child, t) for t in islands):
                kept.append(child)
            elif not isinstance(child, InstanceNormAct):  # its affine parameters stay float32
                convert(child)
        fmt = _memory_format_for(m)
        for key, p in m._parameters.items():
            if p is not None and p.is_floating_point():
                p.data = p.data.to(torch.bfloat16)
                if fmt is not None and p.dim() in (4, 5):
                    p.data = p.data.contiguous(memory_format=fmt)
        for key, b in m._buffers.items():
            if b is not None and b.is_floating_point():
                m._buffers[key] = b.to(torch.bfloat16)

    convert(network)
    for m in kept:
        float_out = next(out for t, out in islands.items() if isinstance(m, t))
        m.register_forward_pre_hook(_enter_float32)
        m.register_forward_hook(_leave_float32 if float_out else _leave_bf16)
    network.register_forward_pre_hook(_enter_bf16)
    network.register_forward_hook(_leave_float32)
    logger.info("inference precision bf16: convolutions bf16 channels-last, %d instance norms fused, "
                "%d modules kept float32 (Mamba layers, average pooling, output heads)", fused, len(kept))
    return network


def _memory_format_for(m: nn.Module) -> Optional[torch.memory_format]:
    """The channels-last format for a 2D / 3D (transposed) convolution's weight, else None."""
    if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
        return torch.channels_last_3d
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        return torch.channels_last
    return None
