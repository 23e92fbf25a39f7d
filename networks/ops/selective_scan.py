"""`selective_scan`: one function, four backends, the semantics of mamba-ssm's reference.

Backends:

* ``cuda``  - mamba-ssm's fused kernel (``selective_scan_fn``), for CUDA tensors when mamba-ssm
  with its compiled extension is importable;
* ``fused`` - this project's fused C++ CPU kernel (`networks.ops.scan_fused`), when it can be
  built or loaded on this machine;
* ``triton`` - this project's Triton kernels (`networks.ops.scan_triton`), for tensors on a GPU
  when Triton (shipped with CUDA builds of torch) is importable; on CPU only when explicitly
  requested with ``TRITON_INTERPRET=1`` set (Triton's interpreter: slow, for tests);
* ``torch`` - this project's chunked pure-PyTorch scan (`networks.ops.scan_torch`), any device.

Choice: the ``backend`` argument, else the environment variable ``NETWORKS_SCAN_BACKEND``
(``auto``, ``torch``, ``fused``, ``cuda`` or ``triton``), else ``auto``: for CUDA tensors
``cuda`` when available, else ``triton`` when available, else ``torch``; for CPU tensors
``fused`` when available, else ``torch``. A backend passed over is logged once with the reason. The backend actually
used is logged once per process and per backend, and `last_backend` returns it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .scan_torch import chunked_scan, scan_forward

__all__ = ["selective_scan", "mamba_scan", "mamba_scan_plain", "use_fused_kernels", "use_fused_training_kernels", "no_autocast", "available_backends", "resolve_backend", "last_backend", "ENV_VAR", "BACKENDS"]

ENV_VAR = "NETWORKS_SCAN_BACKEND"
BACKENDS = ("torch", "fused", "cuda", "triton")
logger = logging.getLogger("networks.scan")
_logged: set = set()
_last: Optional[str] = None


def _cuda_unavailable_reason() -> Optional[str]:
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401
        import selective_scan_cuda  # noqa: F401
    except Exception as err:  # ImportError, or a broken CUDA extension raising at import
        return f"mamba-ssm is not importable with its CUDA extension ({type(err).__name__}: {err})"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def _fused_unavailable_reason() -> Optional[str]:
    try:
        from . import scan_fused
    except ImportError as err:
        return f"fused CPU scan not present ({err})"
    return scan_fused.unavailable_reason()


def _triton_unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    """Why the triton backend cannot run on ``device`` (default: a GPU, or the CPU when interpreting)."""
    try:
        from . import scan_triton
    except Exception as err:  # ImportError, or a broken triton raising at import
        return f"triton is not importable ({type(err).__name__}: {err})"
    if device is None:
        device = torch.device("cpu" if scan_triton.interpreting() else "cuda")
    return scan_triton.unavailable_reason(device)


_REASONS = {"cuda": _cuda_unavailable_reason, "fused": _fused_unavailable_reason, "torch": lambda: None,
            "triton": _triton_unavailable_reason}


def _reason(name: str, device: torch.device) -> Optional[str]:
    return _triton_unavailable_reason(device) if name == "triton" else _REASONS[name]()


def available_backends() -> Dict[str, Optional[str]]:
    """Map of backend name to None when usable here, or the reason it is not."""
    return {name: _REASONS[name]() for name in BACKENDS}


def resolve_backend(device: torch.device, requested: Optional[str] = None) -> str:
    """The backend `selective_scan` uses for tensors on ``device``.

    Raises:
        ValueError: unknown backend name, or an explicitly requested backend that cannot run
            here (the message says why).
    """
    name = (requested or os.environ.get(ENV_VAR) or "auto").strip().lower()
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"unknown selective-scan backend {name!r} (from {'argument' if requested else ENV_VAR}); choose one of auto, {', '.join(BACKENDS)}")
    if name == "auto":
        preferred = ("cuda", "triton") if device.type == "cuda" else ("fused",) if device.type == "cpu" else ()
        for cand in preferred:
            reason = _reason(cand, device)
            if reason is None:
                return cand
            _log_once(f"skip:{cand}", f"selective scan: {cand} backend not used: {reason}")
        return "torch"
    reason = _reason(name, device)
    if name == "cuda" and reason is None and device.type != "cuda":
        reason = f"tensors are on {device}, not CUDA"
    if name == "fused" and reason is None and device.type != "cpu":
        reason = f"tensors are on {device}, not CPU"
    if reason is not None:
        raise ValueError(f"selective-scan backend {name!r} was requested but cannot run: {reason}")
    return name


def use_fused_kernels(x: torch.Tensor, *params: Optional[torch.Tensor], backend: Optional[str] = None) -> bool:
    """Whether the ``fused`` library's inference kernels apply to ``x``: a float32 CPU tensor, no
    gradient needed (``torch.no_grad`` / ``inference_mode``, or none of ``x`` and ``params`` requires
    one), not being traced by ``torch.jit.trace``, and the scan backend for ``x`` resolving to ``fused``."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if torch.jit.is_tracing():  # a trace records tensor ops, not calls into a ctypes library
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x,) + params):
        return False
    return resolve_backend(x.device, backend) == "fused"


def use_fused_training_kernels(x: torch.Tensor, *params: Optional[torch.Tensor], backend: Optional[str] = None) -> bool:
    """Whether the ``fused`` library's training kernels (C++ forward and backward passes with
    autograd) apply: as `use_fused_kernels`, but for a gradient being needed (grad mode on and
    ``x`` or one of ``params`` requiring one); every tensor given float32."""
    if x.device.type != "cpu" or torch.jit.is_tracing() or not torch.is_grad_enabled():
        return False
    tensors = [t for t in (x,) + params if t is not None]
    if any(t.dtype != torch.float32 for t in tensors) or not any(t.requires_grad for t in tensors):
        return False
    return resolve_backend(x.device, backend) == "fused"


def no_autocast(device_type: str):
    """Autocast disabled on ``device_type``; a no-op where autocast does not exist (e.g. meta)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def last_backend() -> Optional[str]:
    """The backend of the most recent `selective_scan` call in this process (None before any)."""
    return _last


def _log_once(key: str, message: str) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.info(message)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    backend: Optional[str] = None,
):
    """Selective scan (S6) with the arguments and semantics of mamba-ssm's ``selective_scan_ref``.

    Args:
        u: input, (batch, dim, L).
        delta: step sizes before bias/softplus, (batch, dim, L).
        A: real state matrix, (dim, N).
        B, C: input-dependent projections, (batch, N, L).
        D: optional skip weight, (dim,).
        z: optional gate, (batch, dim, L); the output is multiplied by silu(z).
        delta_bias: optional bias added to delta, (dim,).
        delta_softplus: apply softplus to delta (after the bias).
        return_last_state: also return the state after the last token, as mamba-ssm does.
        backend: ``"auto"``, ``"torch"``, ``"fused"``, ``"cuda"`` or ``"triton"``; default from
            ``NETWORKS_SCAN_BACKEND``, else ``"auto"``.

    Returns:
        out: (batch, dim, L) in u's dtype; with ``return_last_state``, ``(out, last_state)`` with
        last_state (batch, dim, N) in the computing dtype. The scan runs in float32 (float64 for
        float64 inputs, except on ``cuda`` and ``triton``), also under autocast. Differentiable in
        every tensor argument, through both outputs (``triton``: not through last_state).
    """
    global _last
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    name = resolve_backend(u.device, backend)
    _last = name
    _log_once(f"use:{name}", f"selective scan backend: {name}")
    if name == "cuda":
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if name == "triton":
        from .scan_triton import triton_selective_scan

        return triton_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                     return_last_state=return_last_state)
    if name == "fused":
        from .scan_fused import fused_scan as core
    else:
        core = chunked_scan
    dtype_in = u.dtype
    work = torch.float64 if dtype_in == torch.float64 else torch.float32
    with no_autocast(u.device.type):
        u_w, delta_w = u.to(work), delta.to(work)
        if delta_bias is not None:
            delta_w = delta_w + delta_bias.to(work)[:, None]
        if delta_softplus:
            delta_w = F.softplus(delta_w)
        if return_last_state:
            y, last_state = core(u_w, delta_w, A.to(work), B.to(work), C.to(work), return_last_state=True)
        else:
            y = core(u_w, delta_w, A.to(work), B.to(work), C.to(work))
        if D is not None:
            y = y + u_w * D.to(work)[:, None]
        if z is not None:
            y = y * F.silu(z.to(work))
    return (y.to(dtype_in), last_state) if return_last_state else y.to(dtype_in)


def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, dim, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim or A.is_complex():
        raise ValueError(f"selective_scan: A must be real (dim={dim}, N), got shape {tuple(A.shape)} dtype {A.dtype}")
    nstate = A.shape[1]
    expected = {"delta": (delta, (batch, dim, length)), "B": (B, (batch, nstate, length)), "C": (C, (batch, nstate, length))}
    if z is not None:
        expected["z"] = (z, (batch, dim, length))
    if D is not None:
        expected["D"] = (D, (dim,))
    if delta_bias is not None:
        expected["delta_bias"] = (delta_bias, (dim,))
    for key, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"selective_scan: {key} must have shape {shape}, got {tuple(tensor.shape)}")


def mamba_scan(
    u: torch.Tensor,
    dt_low: torch.Tensor,
    dt_weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = True,
    reverse: bool = False,
    backend: Optional[str] = None,
    state: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mamba's scan step: `selective_scan` with ``delta = dt_weight @ dt_low``, optionally in reverse.

    ``reverse=True`` reads the sequence from its last token to its first:
    ``flip(mamba_scan(flip(u), flip(dt_low), ..., flip(z)))`` with every flip on the last axis.

    Where no gradient is needed (``torch.no_grad`` / ``inference_mode``, or no input requiring
    one), the ``fused`` backend runs everything (projection, bias, softplus, scan, D skip, gate,
    direction) in one pass without the (batch, dim, L) delta or flipped copies. Where a gradient is
    needed and every tensor is float32, the ``fused`` backend runs `fused_mamba_scan_train` (one
    autograd function: C++ passes for the step size, scan and gate, forward and backward).
    Otherwise it is the projection, flips and `selective_scan` on the chosen backend (same results
    within float32 rounding).

    Args:
        u: (batch, dim, L). dt_low: (batch, R, L). dt_weight: (dim, R). A: (dim, N).
        B, C: (batch, N, L). D, delta_bias: (dim,) or None. z: (batch, dim, L) or None.
        delta_softplus, backend: as `selective_scan`.
        state: the scan states carried from one piece of a sequence to the next (`scan_fused.scan_state`), for
            inference on the ``fused`` backend only (`scan_fused.fused_mamba_scan`); a ValueError elsewhere.

    Returns:
        (batch, dim, L) in u's dtype.
    """
    global _last
    fused = use_fused_kernels(u, dt_low, dt_weight, A, B, C, D, z, delta_bias, backend=backend)
    if state is not None and not fused:
        raise ValueError("mamba_scan: a carried state needs the fused backend's inference kernels (float32 CPU "
                         f"tensors, no gradient); backend {resolve_backend(u.device, backend)!r}, {u.dtype} on {u.device}")
    if fused:
        from .scan_fused import fused_mamba_scan

        _last = "fused"
        _log_once("use:fused", "selective scan backend: fused")
        f32 = [None if t is None else t.float() for t in (dt_low, dt_weight, delta_bias, A, B, C, D)]
        return fused_mamba_scan(u, *f32, z, delta_softplus, reverse, state)
    if u.numel() and A.shape[1] and use_fused_training_kernels(u, dt_low, dt_weight, A, B, C, D, z, delta_bias,
                                                               backend=backend):
        from .scan_fused import fused_mamba_scan_train

        _check_shapes(u, u, A, B, C, D, z, delta_bias)
        _last = "fused"
        _log_once("use:fused", "selective scan backend: fused")
        return fused_mamba_scan_train(u, dt_low, dt_weight, delta_bias, A, B, C, D, z, delta_softplus, reverse)
    delta = torch.einsum("dr,brl->bdl", dt_weight, dt_low)
    if reverse and resolve_backend(u.device, backend) == "triton":  # reads in reverse without flipped copies
        from .scan_triton import triton_selective_scan

        _check_shapes(u, delta, A, B, C, D, z, delta_bias)
        _last = "triton"
        _log_once("use:triton", "selective scan backend: triton")
        return triton_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse=True)
    if reverse:
        u, delta, B, C = (t.flip(-1) for t in (u, delta, B, C))
        z = None if z is None else z.flip(-1)
    y = selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend=backend)
    return y.flip(-1) if reverse else y


def mamba_scan_plain(
    u: torch.Tensor,
    dt_low: torch.Tensor,
    dt_weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
    delta_softplus: bool = True,
    reverse: bool = False,
) -> torch.Tensor:
    """`mamba_scan` on the ``torch`` backend's recurrence, forward only, in the subset of Python that
    TorchScript compiles: what the networks' scripted (and traced) forward runs, on any device.

    Arguments and result as `mamba_scan`; no gradient flows through the scan. The elementwise steps
    repeat `selective_scan`'s (that function's backend dispatch, logging and autograd cannot be scripted).
    """
    delta = torch.einsum("dr,brl->bdl", [dt_weight, dt_low])
    if reverse:
        u, delta, B, C = u.flip(-1), delta.flip(-1), B.flip(-1), C.flip(-1)
        if z is not None:
            z = z.flip(-1)
    dtype_in = u.dtype
    work = torch.float64 if dtype_in == torch.float64 else torch.float32
    u_w, delta_w = u.to(work), delta.to(work)
    if delta_bias is not None:
        delta_w = delta_w + delta_bias.to(work)[:, None]
    if delta_softplus:
        delta_w = F.softplus(delta_w)
    y = scan_forward(u_w, delta_w, A.to(work), B.to(work), C.to(work))
    if D is not None:
        y = y + u_w * D.to(work)[:, None]
    if z is not None:
        y = y * F.silu(z.to(work))
    y = y.to(dtype_in)
    return y.flip(-1) if reverse else y
