"""The ``torch`` backend of the selective scan: chunked, exact, memory-bounded, any device.

Why hand-written: PyTorch has no associative scan for eager tensors, a Python loop over tokens
costs ~20 us per step, and the obvious vectorisation (cumulative sums of log-decays) overflows
when decays are strong. This module runs the exact recurrence in a layout where every Python
step touches many independent sequences at once:

* the sequence is cut into *blocks* of ``Lb`` tokens, processed one after another, so extra
  memory is a few (Lb, D, N) buffers plus O(L*D) for outputs, never (L, D, N);
* a block is cut into K chunks of T tokens laid out as (T, B, K, D, N); one Python step of the
  recurrence advances all K chunks (and every batch, channel and state) by one token, starting
  each chunk from a zero state;
* the true state entering each chunk is then carried chunk to chunk (K small steps) and added
  back with the chunk's cumulative decay ``exp(A * cumsum(delta))``: exact, since every decay
  factor is a product of terms <= 1 when A <= 0 and no inverse decay is ever formed;
* the backward pass recomputes each block's states from a saved block-boundary state and runs
  the adjoint recurrence in reverse with the same chunking, so nothing of size (L, D, N) is
  stored between forward and backward.

The core works on ``delta`` already biased and softplus-ed; `selective_scan` applies the
elementwise parts (bias, softplus, D skip, z gate) around it with ordinary autograd.

The forward pass (`scan_forward`) is written in the subset of Python that TorchScript compiles, so
that the networks' scripted and traced forms (`torch.jit.is_scripting` / ``is_tracing`` paths, used
by ``ckpt_export``) run exactly this recurrence.
"""

from __future__ import annotations

import math
from typing import List, Tuple

import torch

# Target number of (token x channel x state) elements in one block's buffer (4 MiB of float32):
# large enough that per-step Python overhead is amortised, small enough to stay cache-friendly.
BLOCK_ELEMENTS = 1 << 20


def _plan(batch: int, dim: int, nstate: int, length: int, block_elements: int) -> List[int]:
    """Chunk length T and chunks per block K for a problem size (``block_elements``: `BLOCK_ELEMENTS`)."""
    per_token = max(1, batch * dim * nstate)
    block = max(1, min(length, block_elements // per_token))
    # T ~ sqrt(block / 2) balances the T recurrence steps against the K carry steps (measured).
    t = max(1, int(math.sqrt(block / 2)))
    k = max(1, -(-block // t))
    return [t, k]


def _to_layout(x: torch.Tensor, k: int, t: int) -> torch.Tensor:
    """(B, M, K*T) -> (T, B, K, M), contiguous (strided inputs make the broadcasts below slow)."""
    return x.reshape(x.shape[0], x.shape[1], k, t).permute(3, 0, 2, 1).contiguous()


def _exp_(x: torch.Tensor, log2e_scaled: bool) -> torch.Tensor:
    """In-place exp; for float32 as exp2 of an argument pre-scaled by log2(e).

    Why: on CPU torch's float32 exp runs ~3x slower than exp2, and it is the scan's largest cost;
    pre-scaling A by log2(e) costs one rounding of the argument (relative error ~|x| * 6e-8).
    """
    return x.exp2_() if log2e_scaled else x.exp_()


def _exp_base(a: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    """A as used in the exponent, and whether exponentials are taken base 2."""
    if a.dtype == torch.float32:
        return a * 1.4426950408889634, True  # log2(e), a literal: TorchScript reads no globals
    return a, False


def _from_layout(x: torch.Tensor) -> torch.Tensor:
    """(T, B, K, M) -> (B, M, K*T)."""
    t, b, k, m = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
    return x.permute(1, 3, 2, 0).reshape(b, m, k * t)


def _pad(x: torch.Tensor, length: int) -> torch.Tensor:
    if x.shape[-1] == length:
        return x
    return torch.nn.functional.pad(x, [0, length - x.shape[-1]])


def _block_states(dt, dtu, bm, a, h0, out_states, decay_buf, tmp_buf):
    """States of one block, in layout (T, B, K, D, N), written into ``out_states``.

    dt, dtu: (T, B, K, D); bm: (T, B, K, N); a: (D, N); h0: (B, D, N) state before the block.
    On return ``decay_buf`` holds exp(delta_t * A) per step. Returns the state after the
    block's last token (B, D, N).
    """
    t_len, k_len = dt.shape[0], dt.shape[2]
    a_exp, base2 = _exp_base(a)
    torch.mul(dt.unsqueeze(-1), a_exp, out=decay_buf)
    _exp_(decay_buf, base2)
    torch.mul(dtu.unsqueeze(-1), bm.unsqueeze(-2), out=out_states)  # delta_t B_t u_t
    # pass 1: each chunk from a zero state, to get the chunks' end states
    tmp_buf[0] = out_states[0]
    for t in range(1, t_len):
        torch.addcmul(out_states[t], decay_buf[t], tmp_buf[t - 1], out=tmp_buf[t])
    # carry the true state chunk to chunk with each chunk's total decay exp(A * sum(delta))
    total = _chunk_decay(dt, a)
    carry = torch.empty_like(total)
    h = h0
    for k in range(k_len):
        carry[:, k] = h
        h = torch.addcmul(tmp_buf[t_len - 1, :, k], total[:, k], h)
    # pass 2: the exact recurrence again, each chunk from its true entering state
    out_states[0].addcmul_(decay_buf[0], carry)
    for t in range(1, t_len):
        out_states[t].addcmul_(decay_buf[t], out_states[t - 1])
    return h


def _chunk_decay(dt, a):
    """Whole-chunk decay exp(A * sum_t delta_t): (T, B, K, D) -> (B, K, D, N)."""
    a_exp, base2 = _exp_base(a)
    return _exp_(dt.sum(0).unsqueeze(-1) * a_exp, base2)


def _reverse_adjoint(dt, a, decay, adj, tmp_buf, g_after):
    """Adjoint G_t = X_t + exp(delta_{t+1} A) G_{t+1}, in place in ``adj`` (which holds X_t).

    ``g_after`` (B, D, N) is exp(delta A) G at the first token after the block. Returns that
    quantity for the block's own first token, for the previous block.
    """
    t_len, _, k_len = decay.shape[:3]
    # pass 1: each chunk from a zero adjoint at its end
    tmp_buf[t_len - 1] = adj[t_len - 1]
    for t in range(t_len - 2, -1, -1):
        torch.addcmul(adj[t], decay[t + 1], tmp_buf[t + 1], out=tmp_buf[t])
    total = _chunk_decay(dt, a)
    carry = torch.empty_like(total)
    g = g_after
    for k in range(k_len - 1, -1, -1):
        carry[:, k] = g
        g = torch.addcmul(decay[0, :, k] * tmp_buf[0, :, k], total[:, k], g)
    # pass 2: exact, each chunk from the adjoint arriving at its end
    adj[t_len - 1].add_(carry)
    for t in range(t_len - 2, -1, -1):
        adj[t].addcmul_(decay[t + 1], adj[t + 1])
    return g


def _forward_blocks(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, t_len: int, k_len: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The scan's forward pass block by block: y (batch, dim, L), each block's entering state
    (n_blocks, batch, dim, N), which the backward pass restarts from, and the state after the last
    token (batch, dim, N). Inputs contiguous, one dtype."""
    batch, dim, length = u.shape[0], u.shape[1], u.shape[2]
    nstate = A.shape[1]
    block = t_len * k_len
    n_blocks = -(-length // block)
    y = u.new_empty(batch, dim, n_blocks * block)
    states = u.new_empty(t_len, batch, k_len, dim, nstate)
    decay = torch.empty_like(states)
    tmp = torch.empty_like(states)
    starts = u.new_empty(n_blocks, batch, dim, nstate)
    h = u.new_zeros(batch, dim, nstate)
    for i in range(n_blocks):
        lo, hi = i * block, (i + 1) * block
        starts[i] = h
        u_b, dt_b = _pad(u[:, :, lo:hi], block), _pad(delta[:, :, lo:hi], block)
        dt = _to_layout(dt_b, k_len, t_len)
        dtu = _to_layout(dt_b * u_b, k_len, t_len)
        bm = _to_layout(_pad(B[:, :, lo:hi], block), k_len, t_len)
        cm = _to_layout(_pad(C[:, :, lo:hi], block), k_len, t_len)
        h = _block_states(dt, dtu, bm, A, h, states, decay, tmp)
        y_blk = torch.einsum("tbkdn,tbkn->tbkd", [states, cm])
        y[:, :, lo:hi] = _from_layout(y_blk)
    return y[:, :, :length], starts, h


def scan_forward(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    block_elements: int = BLOCK_ELEMENTS,
) -> torch.Tensor:
    """`chunked_scan`'s forward pass alone, without autograd: the same values, compilable by TorchScript.

    Args and result as `chunked_scan`, ``block_elements`` as `BLOCK_ELEMENTS`. The inputs are detached
    (its in-place buffers cannot record a graph): no gradient flows through this scan.
    """
    t_len, k_len = _plan(u.shape[0], u.shape[1], A.shape[1], u.shape[2], block_elements)
    u, delta, A, B, C = u.detach(), delta.detach(), A.detach(), B.detach(), C.detach()
    return _forward_blocks(u.contiguous(), delta.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(), t_len, k_len)[0]


class _ChunkedScan(torch.autograd.Function):
    """(y, h_{L-1}) = scan(u, delta, A, B, C) with y_t = <C_t, h_t>; delta already final (biased, softplus).

    Padding tokens after the sequence (delta = 0, u = 0) leave the state unchanged, so the state
    after the last block is the last state, and in the backward pass its adjoint enters the
    reverse recurrence after the last token.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        ctx.set_materialize_grads(False)
        t_len, k_len = _plan(u.shape[0], u.shape[1], A.shape[1], u.shape[2], BLOCK_ELEMENTS)
        y, starts, h = _forward_blocks(u, delta, A, B, C, t_len, k_len)
        ctx.save_for_backward(u, delta, A, B, C, starts)
        ctx.plan = (t_len, k_len)
        return y, h

    @staticmethod
    def backward(ctx, dy, dlast):
        u, delta, A, B, C, starts = ctx.saved_tensors
        t_len, k_len = ctx.plan
        batch, dim, length = u.shape
        nstate = A.shape[1]
        block = t_len * k_len
        n_blocks = starts.shape[0]
        dy = torch.zeros_like(u) if dy is None else dy.to(u.dtype)
        du = u.new_empty(batch, dim, n_blocks * block)
        ddelta = torch.empty_like(du)
        dB = u.new_empty(batch, nstate, n_blocks * block)
        dC = torch.empty_like(dB)
        dA = torch.zeros_like(A)
        states, decay, tmp, adj = [u.new_empty(t_len, batch, k_len, dim, nstate) for _ in range(4)]
        ones = u.new_ones(t_len * batch * k_len)
        # d loss / d h, arriving from after the block: from after the sequence, the last state's adjoint
        g_next = u.new_zeros(batch, dim, nstate) if dlast is None else dlast.to(u.dtype).clone()
        for i in reversed(range(n_blocks)):
            sl = slice(i * block, (i + 1) * block)
            u_b, dt_b = _pad(u[..., sl], block), _pad(delta[..., sl], block)
            dt = _to_layout(dt_b, k_len, t_len)
            ul = _to_layout(u_b, k_len, t_len)
            dtu = dt * ul
            bm = _to_layout(_pad(B[..., sl], block), k_len, t_len)
            cm = _to_layout(_pad(C[..., sl], block), k_len, t_len)
            dyl = _to_layout(_pad(dy[..., sl], block), k_len, t_len)
            _block_states(dt, dtu, bm, A, starts[i], states, decay, tmp)
            # dC_t[n] = sum_d dy_t[d] h_t[d, n]
            dC_l = torch.einsum("tbkd,tbkdn->tbkn", [dyl, states])
            torch.mul(dyl.unsqueeze(-1), cm.unsqueeze(-2), out=adj)  # X_t = dy_t C_t
            g_next = _reverse_adjoint(dt, A, decay, adj, tmp, g_next)
            # input terms: d(dtu)_t[d] = sum_n G B_t[n]; dB_t[n] = sum_d G dtu_t[d]
            ddtu = torch.einsum("tbkdn,tbkn->tbkd", [adj, bm])
            dB_l = torch.einsum("tbkd,tbkdn->tbkn", [dtu, adj])
            # decay terms: Q_t = G_t * exp(delta_t A) * h_{t-1}, with h_{t-1} the states shifted by one
            # token (not h_t - delta_t B_t u_t: that difference loses all accuracy when the decay
            # underflows, and the error is then multiplied by delta in dA)
            prev = tmp
            prev[1:] = states[:-1]
            prev[0, :, 1:] = states[t_len - 1, :, :-1]
            prev[0, :, 0] = starts[i]
            prev.mul_(decay).mul_(adj)  # Q
            ddt_decay = torch.mul(prev, A, out=states).sum(-1)  # sum_n Q A
            prev.mul_(dt.unsqueeze(-1))
            dA += torch.matmul(ones, prev.view(-1, dim * nstate)).view(dim, nstate)  # sum_t Q delta
            du[..., sl] = _from_layout(ddtu * dt)
            ddelta[..., sl] = _from_layout(ddt_decay + ddtu * ul)
            dB[..., sl] = _from_layout(dB_l)
            dC[..., sl] = _from_layout(dC_l)
        return du[..., :length], ddelta[..., :length], dA, dB[..., :length], dC[..., :length]


def chunked_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 return_last_state: bool = False):
    """Core scan y_t = <C_t, h_t>, h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t, h_{-1} = 0.

    Args:
        u, delta: (batch, dim, L), delta already biased and softplus-ed.
        A: (dim, N). B, C: (batch, N, L). All of one floating dtype (float32 or float64).
        return_last_state: also return h_{L-1}, (batch, dim, N).

    Returns:
        y: (batch, dim, L), or (y, last_state). Differentiable in all five inputs, through both
        outputs; extra memory O(L * dim).
    """
    y, last = _ChunkedScan.apply(u.contiguous(), delta.contiguous(), A.contiguous(), B.contiguous(), C.contiguous())
    return (y, last) if return_last_state else y
