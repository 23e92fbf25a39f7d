"""`Mamba`: the selective state-space block of Gu & Dao, weight-compatible with mamba-ssm.

Same constructor arguments, parameter names, shapes and initialisation as
``mamba_ssm.modules.mamba_simple.Mamba``, so a state dict from either loads into the other with
``strict=True`` and gives the same outputs. The scan goes through `networks.ops.selective_scan`
(``cuda``, ``fused`` or ``torch`` backend); on CUDA with mamba-ssm and causal-conv1d installed the
whole block runs mamba-ssm's fused ``mamba_inner_fn``. Scripted or traced (``torch.jit``), the block
runs PyTorch ops and the ``torch`` backend's recurrence (`mamba_scan_plain`) on any device.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from .ops.channel_ops import causal_conv1d_cf, causal_conv1d_channels, linear_cf, linear_channels
from .ops.selective_scan import mamba_scan, mamba_scan_plain, resolve_backend, use_fused_kernels

__all__ = ["Mamba", "fused_block_fn", "PIECE_TOKENS"]

# CPU inference runs a block over a longer sequence in pieces of this many tokens (`Mamba._block_in_pieces`):
# its float32 intermediates, (5 d_inner + 2 d_state) * 4 bytes a token, are then 386 MiB at a Synapse window's
# stage 0 (d_inner 64, d_state 32) instead of 2.5 GiB for its 1.77 M tokens. A multiple of 16: the scan kernel
# sums its outputs 16 steps at a time, so pieces of other lengths would differ from the whole in the last bit.
PIECE_TOKENS = 1 << 18


def _mamba_inner_fn():
    """mamba-ssm's fused block function, or None when it (or causal-conv1d) is not importable."""
    try:
        from causal_conv1d import causal_conv1d_fn  # noqa: F401
        from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn
    except Exception:
        return None
    return mamba_inner_fn


def fused_block_fn(device: torch.device, use_fast_path: bool = True, scan_backend: Optional[str] = None) -> Optional[Callable]:
    """The block implementation for tensors on ``device``: mamba-ssm's fused ``mamba_inner_fn``, or
    None for this project's path (projections, `causal_conv1d_channels`, `mamba_scan`).

    mamba-ssm's function runs where the scan backend resolves to ``cuda`` (a CUDA device with
    mamba-ssm's extension; `resolve_backend`), ``use_fast_path`` is set and causal-conv1d is
    importable. Both paths take the same weights and give the same outputs (within float32
    rounding); tests drive this choice on CPU with mamba-ssm's and causal-conv1d's references in
    place of the compiled functions.
    """
    if not use_fast_path or resolve_backend(device, scan_backend) != "cuda":
        return None
    return _mamba_inner_fn()


class Mamba(nn.Module):
    """Mamba block (selective SSM with gated causal convolution), as in mamba-ssm's ``mamba_simple``.

    Input and output: (batch, L, d_model).

    Args:
        d_model: token channels C.
        d_state: SSM state size N.
        d_conv: width of the causal depthwise convolution.
        expand: inner channels d_inner = expand * d_model.
        dt_rank: rank of the step-size projection; ``"auto"`` = ceil(d_model / 16).
        dt_min, dt_max: range of softplus(dt_proj.bias) at initialisation (log-uniform).
        dt_init: ``"random"`` (uniform) or ``"constant"`` initialisation of dt_proj.weight.
        dt_scale: scale of dt_proj.weight's initialisation.
        dt_init_floor: lower clamp of the initial step size.
        conv_bias: bias in the depthwise convolution.
        bias: bias in in_proj and out_proj.
        use_fast_path: on CUDA, use mamba-ssm's fused block when importable.
        layer_idx: kept for signature compatibility (inference caches are not supported).
        scan_backend: force a `selective_scan` backend (default: automatic / environment).

    Parameters (names and shapes as mamba-ssm): in_proj.weight (2*d_inner, d_model),
    conv1d.weight (d_inner, 1, d_conv), conv1d.bias (d_inner), x_proj.weight
    (dt_rank + 2*d_state, d_inner), dt_proj.weight (d_inner, dt_rank), dt_proj.bias (d_inner),
    A_log (d_inner, d_state), D (d_inner), out_proj.weight (d_model, d_inner).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: Union[int, str] = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_fast_path: bool = True,
        layer_idx: Optional[int] = None,
        device=None,
        dtype=None,
        scan_backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.use_fast_path = use_fast_path
        self.layer_idx = layer_idx
        self.scan_backend = scan_backend

        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias, **factory)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner, padding=d_conv - 1, bias=conv_bias, **factory
        )
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)

        dt_init_std = self.dt_rank**-0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, dt_init_std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        else:
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        dt = torch.exp(
            torch.rand(self.d_inner, **factory) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        inv_dt = dt + torch.log(-torch.expm1(-dt))  # inverse of softplus
        with torch.no_grad():
            self.dt_proj.bias.copy_(inv_dt)
        self.dt_proj.bias._no_reinit = True

        a = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(a))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(batch, L, d_model) -> (batch, L, d_model)."""
        if torch.jit.is_scripting():
            return self.forward_plain(hidden_states.transpose(1, 2), False).transpose(1, 2)
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"Mamba expects (batch, L, {self.d_model}), got {tuple(hidden_states.shape)}")
        return self.forward_channels_first(hidden_states.transpose(1, 2)).transpose(1, 2)

    def forward_channels_first(self, x: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        """The same block on channel-first tokens: (batch, d_model, L) -> (batch, d_model, L).

        Every projection is a matrix product on the channel axis, as mamba-ssm computes in_proj,
        so feature maps (B, C, *spatial) flattened to (B, C, L) need no transposed copy.
        ``reverse=True`` reads the sequence from its last token to its first (the result is
        ``flip(block(flip(x)))`` on the token axis), without flipped copies where the ``fused``
        backend runs.
        """
        if torch.jit.is_scripting():
            return self.forward_plain(x, reverse)
        if torch.jit.is_tracing():
            return self.forward_plain(x, reverse)
        if x.dim() != 3 or x.shape[1] != self.d_model:
            raise ValueError(f"Mamba.forward_channels_first expects (batch, {self.d_model}, L), got {tuple(x.shape)}")
        A = -torch.exp(self.A_log.float())
        inner = fused_block_fn(x.device, self.use_fast_path, self.scan_backend)
        if inner is not None:
            xz = linear_channels(x, self.in_proj, self.scan_backend)  # (B, 2*d_inner, L)
            src = xz.flip(-1) if reverse else xz
            out = inner(
                src.contiguous(), self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                self.out_proj.weight, self.out_proj.bias, A, None, None, self.D.float(),
                delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            ).transpose(1, 2)  # (B, d_model, L)
            return out.flip(-1) if reverse else out
        if x.shape[0] > 1 and x.device.type == "cpu" and not torch.is_grad_enabled():
            # Inference on a CPU one batch element at a time, each writing its rows of the output: the block's
            # intermediates (in_proj's output alone is 4x the input; Conv1d, x_proj and scan outputs 2x each)
            # are then those of one element, which halves their share of the peak memory for a batch of two
            # windows, and the page faults that first map it. Every token and channel is computed as in the
            # whole batch: the same result, bit for bit.
            out = x.new_empty(x.shape[0], self.d_model, x.shape[2])
            for i in range(x.shape[0]):
                self._block(x[i:i + 1], A, reverse, out[i:i + 1])
            return out
        return self._block(x, A, reverse)

    def _block(self, x: torch.Tensor, A: torch.Tensor, reverse: bool, out: Optional[torch.Tensor] = None):
        """in_proj, Conv1d, x_proj, scan and out_proj on (B, d_model, L) tokens; into ``out`` when given."""
        if x.shape[2] > PIECE_TOKENS and use_fused_kernels(x, self.in_proj.weight, A, backend=self.scan_backend):
            return self._block_in_pieces(x, A, reverse, out)
        xz = linear_channels(x, self.in_proj, self.scan_backend)  # (B, 2*d_inner, L)
        x, z = xz.chunk(2, dim=1)
        x = causal_conv1d_channels(x, self.conv1d.weight, self.conv1d.bias, silu=True, reverse=reverse,
                                   backend=self.scan_backend)
        x_dbl = linear_channels(x, self.x_proj, self.scan_backend)  # (B, dt_rank + 2N, L)
        dt, b, c = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=1)
        y = mamba_scan(
            x, dt, self.dt_proj.weight, A, b, c, self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True, reverse=reverse, backend=self.scan_backend,
        )
        return linear_channels(y, self.out_proj, self.scan_backend, out=out)

    def _block_in_pieces(self, x: torch.Tensor, A: torch.Tensor, reverse: bool, out: Optional[torch.Tensor] = None):
        """`_block` over consecutive pieces of `PIECE_TOKENS` tokens in scan order (from the end with ``reverse``),
        for inference on the ``fused`` CPU kernels. Why: the block's intermediates (in_proj's output is 4x its
        input, Conv1d's, x_proj's and the scan's outputs 2x each, all float32) are then those of one piece, not of
        a whole window's sequence, which cuts a case's peak memory and the page faults that first map it (in bf16
        mode, where the convolutions' maps are half the size, they set the peak). The pieces carry what crosses
        their borders, so the result is the whole sequence's, bit for bit: the Conv1d reads the previous piece's
        last K-1 inputs (`causal_conv1d_channels`' ``history``) and the scan starts from the states the previous
        piece ended with (`mamba_scan`'s ``state``); the projections are per token.
        """
        from .ops.scan_fused import scan_state

        bt, _, length = x.shape
        out = x.new_empty(bt, self.d_model, length) if out is None else out
        k = self.conv1d.weight.shape[-1]
        state = scan_state(bt, self.d_inner, self.d_state)
        history = None
        for first in range(0, length, PIECE_TOKENS):
            # sequence positions [s, e) of this piece: in scan order, pieces follow each other from the start (end)
            if reverse:
                s, e = max(0, length - first - PIECE_TOKENS), length - first
            else:
                s, e = first, min(length, first + PIECE_TOKENS)
            xz = linear_channels(x[:, :, s:e], self.in_proj, self.scan_backend)  # (B, 2*d_inner, e - s)
            xs, z = xz.chunk(2, dim=1)
            xc = causal_conv1d_channels(xs, self.conv1d.weight, self.conv1d.bias, silu=True, reverse=reverse,
                                        backend=self.scan_backend, history=history)
            if k > 1:  # the inputs the next piece's first outputs read: this piece's last (first, in reverse) K-1
                history = (xs[:, :, :k - 1] if reverse else xs[:, :, -(k - 1):]).contiguous()
            x_dbl = linear_channels(xc, self.x_proj, self.scan_backend)  # (B, dt_rank + 2N, e - s)
            dt, b, c = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=1)
            y = mamba_scan(
                xc, dt, self.dt_proj.weight, A, b, c, self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(),
                delta_softplus=True, reverse=reverse, backend=self.scan_backend, state=state,
            )
            linear_channels(y, self.out_proj, self.scan_backend, out=out[:, :, s:e])
        return out

    def forward_plain(self, x: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        """`forward_channels_first` in PyTorch ops only (no fused kernels, no custom autograd; the scan
        is `mamba_scan_plain`, forward only): the path of the scripted and traced block, any device."""
        xz = linear_cf(x, self.in_proj.weight, self.in_proj.bias)
        A = -torch.exp(self.A_log.float())
        xs, z = xz.chunk(2, dim=1)
        xs = causal_conv1d_cf(xs, self.conv1d.weight, self.conv1d.bias, True, reverse)
        x_dbl = linear_cf(xs, self.x_proj.weight, self.x_proj.bias)
        dt, b, c = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=1)
        y = mamba_scan_plain(xs, dt, self.dt_proj.weight, A, b, c, self.D.float(), z, self.dt_proj.bias.float(),
                             True, reverse)
        return linear_cf(y, self.out_proj.weight, self.out_proj.bias)
