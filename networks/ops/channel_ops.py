"""Channel-first (B, C, L) versions of the token-wise layers around a Mamba scan.

A Mamba layer on a feature map treats voxels as tokens. Kept channel-first, the layout the
convolutions produce, a Linear layer is a matrix product ``W @ x`` and nothing is ever transposed;
these helpers give the LayerNorm, Linear and causal-Conv1d steps in that layout. Each computes the
same function as its ``nn`` module on the channel-last tokens (within float32 rounding).

Where the ``fused`` CPU library is in use (see `networks.ops.scan_fused`), LayerNorm, Conv1d+SiLU
and Linear run hand-written kernels (``csrc/channel_ops_cpu.cpp``, ``csrc/linear_cf_cpu.cpp``):
PyTorch has no channel-first LayerNorm, its depthwise Conv1d on rows of millions of tokens runs far
below memory speed, and BLAS runs a small W times millions of tokens at under half the FMA rate.
With no gradient needed, the forward kernel alone; in training (float32, a gradient needed),
autograd functions whose backward passes are C++ kernels too (`_LayerNormCF`, `_CausalConv1dCF`;
`_LinearCF`'s input gradient is the same Linear kernel on W^T, its weight gradient BLAS).
Otherwise they are PyTorch ops with autograd: the ``*_cf`` functions, which take tensors instead
of modules and compile with TorchScript (the networks' scripted forward uses them).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import scan_fused  # its _library() is looked up at call time (tests replace it)
from .scan_fused import _ptr
from .selective_scan import use_fused_kernels, use_fused_training_kernels

__all__ = ["layer_norm_channels", "linear_channels", "causal_conv1d_channels", "use_fused_kernels",
           "layer_norm_cf", "linear_cf", "causal_conv1d_cf"]


def _inference_kernel_input(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether an inference kernel of the fused library may take ``x``: a non-empty CPU tensor of ``dtype``, no
    gradient recorded and no trace under way, and the library built (the caller checks shape and layout)."""
    if x.device.type != "cpu" or x.dtype != dtype or x.numel() == 0:
        return False
    if torch.jit.is_tracing() or (torch.is_grad_enabled() and x.requires_grad):
        return False
    return scan_fused._library() is not None


def _lib_call(fn: str, what: str, shape, *args) -> None:
    """Call the fused library's ``fn(*args, threads)``; its return code as an error naming ``what`` and the
    input's shape (1: out of memory; any other non-zero: refused or failed)."""
    rc = getattr(scan_fused._library(), fn)(*args, torch.get_num_threads())
    if rc == 1:
        raise MemoryError(f"{what}: out of memory on input {tuple(shape)}")
    if rc != 0:
        raise RuntimeError(f"{what} failed (code {rc}) on input {tuple(shape)}")


def layer_norm_cf(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """LayerNorm over the channels of every token: (B, C, L) -> (B, C, L); weight, bias (C,) or None."""
    return F.layer_norm(x.transpose(1, 2), [x.shape[1]], weight, bias, eps).transpose(1, 2)


def linear_cf(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """A Linear layer on every token: (B, in_features, L) -> (B, out_features, L); weight (out, in)."""
    # mm / bmm directly: torch.matmul(W, x) folds x's batch into its rows through a transposed
    # contiguous copy of x, a full extra pass over (B, in_features, L)
    if x.shape[0] == 1:
        y = torch.mm(weight, x[0]).unsqueeze(0)
    else:
        y = torch.bmm(weight.expand(x.shape[0], -1, -1), x)
    if bias is not None:
        # in place when no graph is recorded; out of place in a trace (the same graph with or without grad)
        y = y + bias[:, None] if torch.is_grad_enabled() or torch.jit.is_tracing() else y.add_(bias[:, None])
    return y


def causal_conv1d_cf(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], silu: bool = True, reverse: bool = False
) -> torch.Tensor:
    """`causal_conv1d_channels` in PyTorch ops (autograd, TorchScript): (B, D, L) -> (B, D, L)."""
    d, k, length = weight.shape[0], weight.shape[-1], x.shape[-1]
    if reverse:
        x = x.flip(-1)
    y = F.conv1d(x, weight, bias, padding=k - 1, groups=d)[..., :length]
    if silu:
        y = F.silu(y)
    return y.flip(-1) if reverse else y


def layer_norm_channels(x: torch.Tensor, norm: nn.LayerNorm, backend: Optional[str] = None) -> torch.Tensor:
    """``norm`` applied to every token of x: (B, C, L) -> (B, C, L), normalising over C."""
    if tuple(norm.normalized_shape) != (x.shape[1],):
        raise ValueError(f"LayerNorm over {tuple(norm.normalized_shape)} cannot normalise channels of {tuple(x.shape)}")
    weight, bias = norm.weight, norm.bias
    if use_fused_training_kernels(x, weight, bias, backend=backend):
        return _LayerNormCF.apply(x, weight, bias, float(norm.eps))
    if use_fused_kernels(x, weight, bias, backend=backend) and all(
        t is None or t.dtype == torch.float32 for t in (weight, bias)
    ):
        x = x.contiguous()
        y = torch.empty_like(x)
        _lib_call("co_layer_norm_cf_f32", "channel-first layer norm", x.shape, _ptr(x), _ptr(weight), _ptr(bias),
                  _ptr(y), x.shape[0], x.shape[1], x.shape[2], float(norm.eps))
        return y
    return layer_norm_cf(x, weight, bias, norm.eps)


def linear_channels(
    x: torch.Tensor, linear: nn.Linear, backend: Optional[str] = None, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``linear`` applied to every token of x: (B, in_features, L) -> (B, out_features, L); written into
    ``out`` (a (B, out_features, L) tensor with contiguous token rows, no gradient: a contiguous tensor or a
    token slice ``t[:, :, s:e]`` of one) when given, and returned.

    Where the ``fused`` library applies (float32 CPU), the product runs the register-blocked kernel of
    ``csrc/linear_cf_cpu.cpp``: BLAS reaches under half of this CPU's FMA rate on a small W times
    millions of tokens. In training (a gradient needed, no ``out``) through `_LinearCF`. x may be a
    channel slice or a token slice of a larger tensor.
    """
    weight, bias = linear.weight, linear.bias
    want = (x.shape[0], weight.shape[0], x.shape[-1])
    if out is not None and (tuple(out.shape) != want or not _token_rows(out) or out.dtype != x.dtype):
        raise ValueError(f"linear_channels: out must be a {x.dtype} tensor of {want} with contiguous token rows, got a "
                         f"{'contiguous' if out.is_contiguous() else 'strided'} {out.dtype} tensor of {tuple(out.shape)}")
    if x.dim() == 3 and x.shape[1] == weight.shape[1]:
        if out is None and x.numel() and use_fused_training_kernels(x, weight, bias, backend=backend):
            return _LinearCF.apply(x, weight, bias)
        if use_fused_kernels(x, weight, bias, backend=backend) and all(
            t is None or t.dtype == torch.float32 for t in (weight, bias)
        ):
            if not _token_rows(x):
                x = x.contiguous()
            return _linear_kernel(x, x.stride(0) if x.shape[0] > 1 else 0, weight, bias, out)
    return linear_cf(x, weight, bias) if out is None else out.copy_(linear_cf(x, weight, bias))


def _token_rows(t: torch.Tensor) -> bool:
    """Whether a (B, rows, L) tensor's rows are contiguous and do not overlap (what the Linear kernel reads and
    writes with row and batch strides): a contiguous tensor, or a channel or token slice of one."""
    bt, rows, length = t.shape
    return (length <= 1 or t.stride(2) == 1) and (rows <= 1 or t.stride(1) >= length) and (
        bt <= 1 or t.stride(0) >= rows * length)


def _linear_kernel(x: torch.Tensor, sx: int, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W x + bias on the kernel: x (B, K, L) with contiguous rows (`_token_rows`; row stride x.stride(1)) and batch
    stride sx, weight (M, K), bias (M,) or None; into ``out`` (B, M, L) with contiguous rows when given."""
    bt, k, length = x.shape
    # named, so that a contiguous copy lives until the call returns (_ptr keeps only the address)
    w = weight.contiguous()
    b = None if bias is None else bias.contiguous()
    y = x.new_empty(bt, w.shape[0], length) if out is None else out
    rx = x.stride(1) if k > 1 else length
    ry, sy = (y.stride(1) if w.shape[0] > 1 else length), (y.stride(0) if bt > 1 else w.shape[0] * length)
    _lib_call("co_linear_cf_f32", "channel-first linear", x.shape, _ptr(w), _ptr(x), _ptr(b), _ptr(y), bt, w.shape[0],
              k, length, sx, rx, sy, ry)
    return y


class _LinearCF(torch.autograd.Function):
    """`linear_cf` for training on the kernel: y = W x + bias, x (B, K, L) with rows of L (a channel slice
    with a batch stride is fine), W (M, K), bias (M,) or None.

    Why: the forward product and the input gradient W^T dy are the inference kernel's shape (a small
    matrix times millions of tokens), where torch's bmm ran a stage-0 SegMamba layer's training forward
    (2 x 32 x 48x192x192, the layer alone) in 1.9-2.1 s and the kernel in 1.2-1.3 s; a whole full-size
    step (bench/bench_train_step.py) gains about 1 s, within its run-to-run noise. The weight gradient, a
    sum over L of outer products, is BLAS's shape and stays an mm per batch element, accumulated. Keeps x
    as given (a view of in_proj's output is not copied)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x, sx = scan_fused._rows(x)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _linear_kernel(x, sx, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        dy = dy.contiguous()
        dx = _linear_kernel(dy, dy.stride(0), weight.t(), None) if need[0] else None
        dw = None
        if need[1]:
            dw = torch.mm(dy[0], x[0].t())
            for b in range(1, x.shape[0]):
                dw.addmm_(dy[b], x[b].t())
        db = dy.sum((0, 2)) if ctx.has_bias and need[2] else None
        return dx, dw, db


def causal_conv1d_channels(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    silu: bool = True,
    reverse: bool = False,
    backend: Optional[str] = None,
    history: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mamba's depthwise causal convolution (then SiLU): (B, D, L) -> (B, D, L).

    ``weight`` (D, 1, K) and ``bias`` (D,) as `nn.Conv1d(D, D, K, groups=D, padding=K-1)`, whose
    first L outputs are taken. ``reverse=True`` convolves the sequence read backwards:
    ``flip(causal_conv1d_channels(flip(x)))``. x may be a channel slice of a larger tensor.
    ``history`` (B, D, K-1), or None for zeros: the K-1 tokens before x in reading order (those just
    before its first token, or with ``reverse`` just after its last), so that a sequence convolved
    piece by piece gives what the whole gives.
    """
    d, k = weight.shape[0], weight.shape[-1]
    length = x.shape[-1]
    if history is not None:
        if tuple(history.shape) != (x.shape[0], d, k - 1):
            raise ValueError(f"causal_conv1d_channels: history must be {(x.shape[0], d, k - 1)} for input "
                             f"{tuple(x.shape)}, got {tuple(history.shape)}")
        if not (use_fused_kernels(x, weight, bias, history, backend=backend) and k <= 64
                and weight.dtype == torch.float32 and history.dtype == torch.float32):
            whole = torch.cat([x, history] if reverse else [history, x], dim=-1)
            y = causal_conv1d_channels(whole, weight, bias, silu, reverse, backend)
            return y[..., :length] if reverse else y[..., k - 1:]
        history = history.contiguous()  # named: a copy must outlive the call
    contiguous_rows = (d == 1 or x.stride(1) == length) and (length <= 1 or x.stride(2) == 1)
    if use_fused_training_kernels(x, weight, bias, backend=backend) and k <= 64:
        return _CausalConv1dCF.apply(x if contiguous_rows else x.contiguous(), weight, bias, bool(silu), bool(reverse))
    if use_fused_kernels(x, weight, bias, backend=backend) and k <= 64 and weight.dtype == torch.float32:
        if not contiguous_rows:
            x = x.contiguous()
        y = x.new_empty(x.shape[0], d, length)
        sx = x.stride(0) if x.shape[0] > 1 else 0
        w = weight.reshape(d, k).contiguous()
        b = None if bias is None else bias.contiguous()  # named: a copy must outlive the call
        _lib_call("co_conv1d_f32", "causal conv1d", x.shape, _ptr(x), _ptr(w), _ptr(b), _ptr(y), x.shape[0], d,
                  length, sx, k, int(reverse), int(silu), _ptr(history))
        return y
    return causal_conv1d_cf(x, weight, bias, silu, reverse)


# ------------------------------------------------------------------------------------------------
# Training: autograd functions over the C++ forward and backward kernels (float32, CPU)


class _LayerNormCF(torch.autograd.Function):
    """`layer_norm_cf` on the fused kernels: the forward keeps the per-token mean and 1/std (B, L)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float):
        x = x.contiguous()
        bt, c, length = x.shape
        y = torch.empty_like(x)
        mean, rstd = x.new_empty(bt, length), x.new_empty(bt, length)
        w = None if weight is None else weight.contiguous()
        b = None if bias is None else bias.contiguous()  # named: a copy must outlive the call
        _lib_call("co_layer_norm_cf_stats_f32", "channel-first layer norm", x.shape, _ptr(x), _ptr(w), _ptr(b),
                  _ptr(y), _ptr(mean), _ptr(rstd), bt, c, length, float(eps))
        ctx.save_for_backward(x, w, mean, rstd)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, w, mean, rstd = ctx.saved_tensors
        bt, c, length = x.shape
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        dw = None if w is None else x.new_empty(c)
        db = x.new_empty(c) if ctx.has_bias else None
        _lib_call("co_layer_norm_cf_bwd_f32", "channel-first layer norm backward", x.shape, _ptr(x), _ptr(w), _ptr(mean),
                  _ptr(rstd), _ptr(dy), _ptr(dx), _ptr(dw), _ptr(db), bt, c, length)
        return dx, dw, db, None


class _CausalConv1dCF(torch.autograd.Function):
    """`causal_conv1d_cf` on the fused kernels; x: rows of L (a channel slice with a batch stride is fine).

    Keeps x, not the pre-activation: the backward kernel recomputes it (K multiply-adds per token
    from x, which it reads anyway for the weight gradient), which costs less than writing a
    (B, D, L) tensor in the forward pass and reading it back, and keeps that tensor out of memory.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, silu: bool, reverse: bool):
        bt, d, length = x.shape
        w = weight.reshape(d, weight.shape[-1]).contiguous()
        b = None if bias is None else bias.contiguous()
        y = causal_conv1d_channels(x, weight, bias, silu, reverse, backend="fused")  # no grad here: the inference kernel
        sx = x.stride(0) if bt > 1 else 0
        ctx.save_for_backward(x, w, b)
        ctx.meta = (sx, bool(silu), bool(reverse), tuple(weight.shape))
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, w, b = ctx.saved_tensors
        sx, silu, reverse, wshape = ctx.meta
        bt, d, length = x.shape
        k = w.shape[1]
        dy = dy.contiguous()
        dx = x.new_empty(bt, d, length)
        dw = torch.empty_like(w)
        db = None if b is None else torch.empty_like(b)
        _lib_call("co_conv1d_bwd_f32", "causal conv1d backward", x.shape, _ptr(x), _ptr(w), _ptr(b), _ptr(dy), _ptr(dx),
                  _ptr(dw), _ptr(db), bt, d, length, sx, k, int(reverse), int(silu))
        return dx, dw.reshape(wshape), db, None, None
