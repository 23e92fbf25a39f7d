"""The ``triton`` backend of the selective scan: GPU kernels that need no CUDA build.

Computes mamba-ssm's ``selective_scan_fn`` (forward and backward) for tensors on a GPU with
nothing beyond a CUDA build of torch (whose wheels ship Triton), and on CPU through Triton's
interpreter (``TRITON_INTERPRET=1``, used by the tests).

Algorithm. With ``dt = softplus(delta + delta_bias)``, ``a_t = exp(dt_t A)`` (D, N) and
``x_t = dt_t u_t B_t``, the state is ``h_t = a_t h_{t-1} + x_t`` and the output
``y_t = <C_t, h_t> + D u_t``, gated by ``silu(z_t)``. The sequence is cut into chunks of ``T``
tokens; one Triton program handles one (batch, block of ``BLOCK_D`` channels, chunk), and inside
it loops over the N states, as mamba-ssm's kernel does, solving the recurrence of one state
over the whole chunk with a parallel scan (``tl.associative_scan`` of the pairs ``(a_t, x_t)``),
all in float32 registers whatever the input dtype:

1. *local pass*: each chunk from a zero state; it stores its end state (B, chunks, D, N) and its
   summed step sizes (B, chunks, D), so that its total decay is ``exp(A * sum dt)``;
2. *carry*: one short sequential loop over chunks per (batch, channel, state) gives the true
   state entering every chunk, ``H_{k+1} = exp(A S_k) H_k + h_end_k`` (chunks x D x N work);
3. *output pass*: each chunk again, from its true entering state ``H_k``
   (``h_t = local_t + cumprod(a)_t H_k``), with softplus, D skip and silu(z) gate fused.

The backward pass keeps only the inputs and the chunk-entering states (memory O(L D) +
O(chunks D N), never O(L D N)). The adjoint ``G_t = C_t dy_t + a_{t+1} G_{t+1}`` runs in reverse
with the same three steps: a local reverse scan per chunk from a zero adjoint at its end, a
reverse carry of ``a_{t0} G_{t0}`` across chunks, then a pass that recomputes ``h_t`` (forward
scan from ``H_k``) and ``G_t`` (reverse scan from the carried adjoint) and forms every gradient:
``du = dt B.G + D dy``, ``ddt = u B.G + A.G (h_t - x_t)`` (``h_t - x_t = a_t h_{t-1}``, as mamba-ssm
computes it), ``dA = sum_t dt G (h_t - x_t)``, ``dB_t = sum_d dt u G``, ``dC_t = sum_d dy h``,
``dD``, ``dz`` and ``d delta_bias``. dB and dC are summed over channel blocks with float32 atomic
adds; dA, dD and d delta_bias are written per chunk and summed afterwards.

``reverse=True`` reads the sequence from its last token to its first (Mamba's backward
direction) by index arithmetic, without flipped copies. B, C and z may be strided slices (e.g.
of Mamba's ``x_proj`` output and ``in_proj`` output): only their token axis must be contiguous.

Tuning knobs: `CHUNK` (tokens per chunk T, a power of two) and `BLOCK_D` (channels per
program); tests shrink `CHUNK` to exercise chunk boundaries at small L.
"""

from __future__ import annotations

import inspect
import os
from typing import Optional, Tuple

import torch

import triton
import triton.language as tl

__all__ = ["triton_selective_scan", "unavailable_reason", "interpreting", "MIN_TRITON", "CHUNK", "BLOCK_D"]

MIN_TRITON = (3, 0)  # and tl.associative_scan with tuples and reverse=True (checked by its signature)
# Defaults chosen from the compiled sm_90 kernels (ptxas resource usage, no GPU run yet): at 2 channels x
# 256 tokens and 4 warps the forward kernel uses 56 registers and the backward one 138, without spills
# (4 x 256 takes 252 in the backward; 8 x 256 spills). bench/gpu_check.py times alternatives.
CHUNK = 256
BLOCK_D = 2
CARRY_BLOCK = 64
NUM_WARPS = 4


def interpreting() -> bool:
    """Whether Triton runs its CPU interpreter (``TRITON_INTERPRET=1`` when the kernels were defined)."""
    return _INTERPRETED


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the kernels can run on tensors on ``device``, else why not."""
    version = tuple(int(p) for p in triton.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_TRITON or "reverse" not in inspect.signature(tl.associative_scan).parameters:
        return f"triton {triton.__version__} is too old (need >= {'.'.join(map(str, MIN_TRITON))})"
    if _INTERPRETED:
        return None if device.type == "cpu" else f"TRITON_INTERPRET=1 runs CPU tensors only, these are on {device}"
    if device.type != "cuda":
        return f"tensors are on {device}, not a GPU (TRITON_INTERPRET=1, set before Triton is imported, runs them on CPU, slowly)"
    if not torch.cuda.is_available():
        return "no CUDA/ROCm GPU"
    return None


# --------------------------------------------------------------------------------------------
# Kernel helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _combine(a1, x1, a2, x2):
    """Composition of two steps h -> a h + x (first (a1, x1), then (a2, x2))."""
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _softplus(x):
    """log(1 + exp(x)), accurate for small results (log1p computed as Goldberg's log(w) e / (w - 1))."""
    e = tl.exp(-tl.abs(x))
    w = 1.0 + e
    log1p = tl.where(w == 1.0, e, tl.log(w) * e / tl.where(w == 1.0, 1.0, w - 1.0))
    return tl.maximum(x, 0.0) + log1p


@triton.jit
def _column(x, j, T: tl.constexpr):
    """Column j of a [BLOCK_D, T] tile, as a [BLOCK_D] vector."""
    return tl.sum(tl.where(tl.arange(0, T)[None, :] == j, x, 0.0), axis=1)


@triton.jit
def _step_sizes(delta_ptr, bias_ptr, row, d, mask_d, pos, mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(raw, dt) tiles [BLOCK_D, T]: raw = delta + bias, dt = softplus(raw) (or raw), 0 where masked."""
    raw = tl.load(delta_ptr + row[:, None] + pos[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(bias_ptr + d, mask=mask_d, other=0.0)[:, None]
    dt = _softplus(raw) if SOFTPLUS else raw
    return raw, tl.where(mask, dt, 0.0)


@triton.jit
def _chunk_coords(dim, L, BLOCK_D: tl.constexpr, T: tl.constexpr, REVERSE: tl.constexpr):
    """Program coordinates: chunk k, batch b, channels d, logical tokens t, memory positions pos."""
    k = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t = k * T + tl.arange(0, T)
    pos = L - 1 - t if REVERSE else t
    return k, b, d, t, pos


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    u_ptr, delta_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, out_ptr, end_ptr, dtsum_ptr, enter_ptr,
    dim, L, nstate, n_chunks, sxb, sxd, sBb, sBn, sCb, sCn, szb, szd,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    REVERSE: tl.constexpr, OUTPUT: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr,
):
    """Local pass (OUTPUT=False: chunk end states from zero, summed dt) or output pass (OUTPUT=True)."""
    k, b, d, t, pos = _chunk_coords(dim, L, BLOCK_D, T, REVERSE)
    mask_d = d < dim
    mask_t = t < L
    mask = mask_d[:, None] & mask_t[None, :]
    row = b * sxb + d.to(tl.int64) * sxd
    u = tl.load(u_ptr + row[:, None] + pos[None, :], mask=mask, other=0.0).to(tl.float32)
    raw, dt = _step_sizes(delta_ptr, bias_ptr, row, d, mask_d, pos, mask, HAS_BIAS, SOFTPLUS)
    dtu = dt * u
    state = ((b * n_chunks + k) * dim + d) * nstate  # (B, chunks, D, N) offsets of state 0
    if OUTPUT:
        y = tl.zeros([BLOCK_D, T], dtype=tl.float32)
    else:
        tl.store(dtsum_ptr + (b * n_chunks + k) * dim + d, tl.sum(dt, axis=1), mask=mask_d)
    for n in range(nstate):
        a = tl.load(A_ptr + d * nstate + n, mask=mask_d, other=0.0)
        bn = tl.load(B_ptr + b * sBb + n * sBn + pos, mask=mask_t, other=0.0).to(tl.float32)
        decay_prod, h = tl.associative_scan((tl.exp(dt * a[:, None]), dtu * bn[None, :]), 1, _combine)
        if OUTPUT:
            h += decay_prod * tl.load(enter_ptr + state + n, mask=mask_d, other=0.0)[:, None]
            cn = tl.load(C_ptr + b * sCb + n * sCn + pos, mask=mask_t, other=0.0).to(tl.float32)
            y += h * cn[None, :]
        else:
            tl.store(end_ptr + state + n, _column(h, T - 1, T), mask=mask_d)
    if OUTPUT:
        if HAS_D:
            y += u * tl.load(D_ptr + d, mask=mask_d, other=0.0)[:, None]
        if HAS_Z:
            zv = tl.load(z_ptr + b * szb + d[:, None].to(tl.int64) * szd + pos[None, :], mask=mask, other=0.0)
            zv = zv.to(tl.float32)
            y *= zv * tl.sigmoid(zv)
        tl.store(out_ptr + row[:, None] + pos[None, :], y, mask=mask)


@triton.jit
def _carry_kernel(local_ptr, dtsum_ptr, A_ptr, carried_ptr, final_ptr, dim, nstate, n_chunks,
                  REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    """Sequential over chunks: carried[k] = value entering chunk k, value' = exp(A S_k) value + local[k].

    Forward: chunks in order, carried = chunk-entering states, final = state after the last token.
    Reverse: chunks from the last, carried = adjoint arriving from after each chunk.
    """
    b = tl.program_id(1).to(tl.int64)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # flat (d, n) index
    mask = i < dim * nstate
    a = tl.load(A_ptr + i, mask=mask, other=0.0)
    d = i // nstate
    h = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(n_chunks):
        k = n_chunks - 1 - j if REVERSE else j
        off = (b * n_chunks + k) * dim * nstate + i
        tl.store(carried_ptr + off, h, mask=mask)
        total = tl.exp(a * tl.load(dtsum_ptr + (b * n_chunks + k) * dim + d, mask=mask, other=0.0))
        h = total * h + tl.load(local_ptr + off, mask=mask, other=0.0)
    tl.store(final_ptr + b * dim * nstate + i, h, mask=mask)


@triton.jit
def _bwd_kernel(
    u_ptr, delta_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dout_ptr,
    start_ptr, enter_ptr, after_ptr, du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
    dim, L, nstate, n_chunks, sxb, sxd, sBb, sBn, sCb, sCn, szb, szd,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    REVERSE: tl.constexpr, GRADS: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr,
):
    """Local reverse pass (GRADS=False: a_{t0} G_{t0} of each chunk from a zero adjoint at its end)
    or gradient pass (GRADS=True: from the chunk-entering state and the carried adjoint)."""
    k, b, d, t, pos = _chunk_coords(dim, L, BLOCK_D, T, REVERSE)
    mask_d = d < dim
    mask_t = t < L
    mask = mask_d[:, None] & mask_t[None, :]
    row = b * sxb + d.to(tl.int64) * sxd
    raw, dt = _step_sizes(delta_ptr, bias_ptr, row, d, mask_d, pos, mask, HAS_BIAS, SOFTPLUS)
    # dt_{t+1} inside the chunk (0 at its last token, so that the carried adjoint enters undecayed)
    col = tl.arange(0, T)
    next_mask = mask_d[:, None] & ((col < T - 1) & (t + 1 < L))[None, :]
    pos_next = pos - 1 if REVERSE else pos + 1
    _, dt_next = _step_sizes(delta_ptr, bias_ptr, row, d, mask_d, pos_next, next_mask, HAS_BIAS, SOFTPLUS)
    dout = tl.load(dout_ptr + row[:, None] + pos[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        zv = tl.load(z_ptr + b * szb + d[:, None].to(tl.int64) * szd + pos[None, :], mask=mask, other=0.0)
        zv = zv.to(tl.float32)
        gate = zv * tl.sigmoid(zv)
        dy = dout * gate
    else:
        dy = dout
    state = ((b * n_chunks + k) * dim + d) * nstate
    if GRADS:
        u = tl.load(u_ptr + row[:, None] + pos[None, :], mask=mask, other=0.0).to(tl.float32)
        dtu = dt * u
        du = tl.zeros([BLOCK_D, T], dtype=tl.float32)
        ddt = tl.zeros([BLOCK_D, T], dtype=tl.float32)
        y = tl.zeros([BLOCK_D, T], dtype=tl.float32)
    for n in range(nstate):
        a = tl.load(A_ptr + d * nstate + n, mask=mask_d, other=0.0)
        cn = tl.load(C_ptr + b * sCb + n * sCn + pos, mask=mask_t, other=0.0).to(tl.float32)
        decay_prod_r, g = tl.associative_scan((tl.exp(dt_next * a[:, None]), dy * cn[None, :]), 1, _combine,
                                              reverse=True)
        if GRADS:
            g += decay_prod_r * tl.load(after_ptr + state + n, mask=mask_d, other=0.0)[:, None]
            bn = tl.load(B_ptr + b * sBb + n * sBn + pos, mask=mask_t, other=0.0).to(tl.float32)
            x = dtu * bn[None, :]
            decay_prod, h = tl.associative_scan((tl.exp(dt * a[:, None]), x), 1, _combine)
            h += decay_prod * tl.load(enter_ptr + state + n, mask=mask_d, other=0.0)[:, None]
            decayed_prev = h - x  # a_t h_{t-1}
            gb = g * bn[None, :]
            du += gb * dt
            ddt += gb * u + g * decayed_prev * a[:, None]
            y += h * cn[None, :]
            tl.atomic_add(dB_ptr + (b * nstate + n) * L + pos, tl.sum(g * dtu, axis=0), mask=mask_t)
            tl.atomic_add(dC_ptr + (b * nstate + n) * L + pos, tl.sum(h * dy, axis=0), mask=mask_t)
            tl.store(dA_ptr + state + n, tl.sum(g * dt * decayed_prev, axis=1), mask=mask_d)
        else:
            first = tl.exp(_column(dt, 0, T) * a) * _column(g, 0, T)
            tl.store(start_ptr + state + n, first, mask=mask_d)
    if GRADS:
        part = (b * n_chunks + k) * dim + d  # (B, chunks, D) offsets
        if HAS_D:
            dskip = tl.load(D_ptr + d, mask=mask_d, other=0.0)
            du += dy * dskip[:, None]
            y += u * dskip[:, None]
            tl.store(dD_ptr + part, tl.sum(dy * u, axis=1), mask=mask_d)
        if HAS_Z:
            sig = tl.sigmoid(zv)
            dz = dout * y * sig * (1.0 + zv * (1.0 - sig))
            tl.store(dz_ptr + row[:, None] + pos[None, :], dz, mask=mask)
        if SOFTPLUS:
            ddt *= tl.sigmoid(raw)
        ddt = tl.where(mask, ddt, 0.0)
        if HAS_BIAS:
            tl.store(dbias_ptr + part, tl.sum(ddt, axis=1), mask=mask_d)
        tl.store(du_ptr + row[:, None] + pos[None, :], du, mask=mask)
        tl.store(ddelta_ptr + row[:, None] + pos[None, :], ddt, mask=mask)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------


def _grid(batch: int, dim: int, length: int, flags: dict) -> Tuple[int, int, int]:
    return (triton.cdiv(length, flags["T"]), triton.cdiv(dim, flags["BLOCK_D"]), batch)


def _token_major(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """t with a contiguous token (last) axis; strided batch/row axes are kept."""
    if t is None or t.stride(-1) == 1 or t.shape[-1] <= 1:
        return t
    return t.contiguous()


def _strides(t: Optional[torch.Tensor]) -> Tuple[int, int]:
    return (0, 0) if t is None else (t.stride(0), t.stride(1))


class _TritonScan(torch.autograd.Function):
    """(out, last_state) of the selective scan; see the module docstring."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus: bool, reverse: bool):
        batch, dim, length = u.shape
        nstate = A.shape[1]
        f32 = dict(device=u.device, dtype=torch.float32)
        n_chunks = triton.cdiv(length, CHUNK)
        ends = torch.empty(batch, n_chunks, dim, nstate, **f32)
        dtsum = torch.empty(batch, n_chunks, dim, **f32)
        enter = torch.empty_like(ends)
        last = torch.empty(batch, dim, nstate, **f32)
        out = torch.empty_like(u)
        flags = dict(HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus, HAS_D=D is not None, HAS_Z=z is not None,
                     REVERSE=reverse, BLOCK_D=BLOCK_D, T=CHUNK, num_warps=NUM_WARPS)
        args = (u, delta, delta_bias, A, B, C, D, z, out, ends, dtsum, enter, dim, length, nstate, n_chunks,
                *_strides(u), *_strides(B), *_strides(C), *_strides(z))
        grid = _grid(batch, dim, length, flags)
        _fwd_kernel[grid](*args, OUTPUT=False, **flags)
        _carry(ends, dtsum, A, enter, last, reverse=False)
        _fwd_kernel[grid](*args, OUTPUT=True, **flags)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, dtsum, enter)
        ctx.flags = flags
        ctx.mark_non_differentiable(last)
        return out, last

    @staticmethod
    def backward(ctx, dout, _dlast):
        u, delta, A, B, C, D, z, delta_bias, dtsum, enter = ctx.saved_tensors
        batch, dim, length = u.shape
        nstate = A.shape[1]
        f32 = dict(device=u.device, dtype=torch.float32)
        n_chunks = enter.shape[1]
        dout = dout.to(u.dtype).contiguous()
        starts, after = torch.empty_like(enter), torch.empty_like(enter)
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dz = None if z is None else torch.empty(z.shape, device=z.device, dtype=z.dtype)
        dB = torch.zeros(batch, nstate, length, **f32)
        dC = torch.zeros(batch, nstate, length, **f32)
        dA_part = torch.empty_like(enter)
        dD_part = torch.empty(batch, n_chunks, dim, **f32) if D is not None else None
        dbias_part = torch.empty(batch, n_chunks, dim, **f32) if delta_bias is not None else None
        args = (u, delta, delta_bias, A, B, C, D, z, dout, starts, enter, after, du, ddelta, dz, dB, dC,
                dA_part, dD_part, dbias_part, dim, length, nstate, n_chunks,
                *_strides(u), *_strides(B), *_strides(C), *_strides(z))
        grid = _grid(batch, dim, length, ctx.flags)
        _bwd_kernel[grid](*args, GRADS=False, **ctx.flags)
        _carry(starts, dtsum, A, after, torch.empty(batch, dim, nstate, **f32), reverse=True)
        _bwd_kernel[grid](*args, GRADS=True, **ctx.flags)
        dA = dA_part.sum((0, 1))
        dD = None if D is None else dD_part.sum((0, 1))
        dbias = None if delta_bias is None else dbias_part.sum((0, 1))
        return du, ddelta, dA, dB.to(B.dtype), dC.to(C.dtype), dD, dz, dbias, None, None


def _carry(local, dtsum, A, carried, final, reverse: bool) -> None:
    batch, n_chunks, dim, nstate = local.shape
    grid = (triton.cdiv(dim * nstate, CARRY_BLOCK), batch)
    _carry_kernel[grid](local, dtsum, A, carried, final, dim, nstate, n_chunks, REVERSE=reverse, BLOCK=CARRY_BLOCK)


def triton_selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    reverse: bool = False,
    return_last_state: bool = False,
):
    """Selective scan with mamba-ssm's ``selective_scan_fn`` semantics, on Triton kernels.

    Args:
        u, delta: (batch, dim, L); z: (batch, dim, L) or None; B, C: (batch, N, L) (strided slices
            allowed, token axis contiguous). float32, bfloat16 or float16 (float64 is computed in
            float32). A: (dim, N); D, delta_bias: (dim,) or None: used in float32.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        reverse: scan from the last token to the first (``flip(scan(flip(inputs)))``, no copies).
        return_last_state: also return the state after the last token read, (batch, dim, N)
            float32 (not differentiable), as mamba-ssm does.

    Returns:
        out (batch, dim, L) in u's dtype, or (out, last_state). Differentiable in every tensor.
    """
    if not (u.shape[-1] and u.shape[0] and u.shape[1]):
        out = torch.zeros_like(u)
        last = u.new_zeros(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float32)
        return (out, last) if return_last_state else out
    if A.shape[1] == 0:  # no state: only the D skip and the gate remain
        y = u.float() * D.float()[:, None] if D is not None else torch.zeros_like(u, dtype=torch.float32)
        out = (y * torch.nn.functional.silu(z.float()) if z is not None else y).to(u.dtype)
        return (out, u.new_zeros(u.shape[0], u.shape[1], 0, dtype=torch.float32)) if return_last_state else out
    as_f32 = lambda t: None if t is None else t.float().contiguous()  # noqa: E731
    u, delta = u.contiguous(), delta.contiguous()
    B, C, z = _token_major(B), _token_major(C), _token_major(z)
    with torch.autocast(device_type=u.device.type, enabled=False):
        out, last = _TritonScan.apply(u, delta, as_f32(A), B, C, as_f32(D), z, as_f32(delta_bias),
                                      bool(delta_softplus), bool(reverse))
    return (out, last) if return_last_state else out


try:
    from triton.runtime.interpreter import InterpretedFunction as _Interpreted

    _INTERPRETED = isinstance(_fwd_kernel, _Interpreted)
except ImportError:  # pragma: no cover - older layouts of triton
    _INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
