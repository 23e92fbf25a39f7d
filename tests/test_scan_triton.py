"""The ``triton`` selective-scan backend, run on CPU by Triton's interpreter (TRITON_INTERPRET=1).

conftest.py sets TRITON_INTERPRET=1 on machines without a GPU (on a GPU the compiled kernels run
instead). Under the interpreter every program is executed by numpy, so the sizes are tiny (dim 5 =
two channel blocks of 4, state 4, L <= 67) and the chunk is shrunk to 8 tokens so that chunk
boundaries, the carry between chunks and partial last chunks are all exercised.
"""

import importlib
import os
import sys

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: `make test` installs it (setup.cfg extra 'test')")

import networks.ops.scan_triton as scan_triton  # noqa: E402

DEVICE = torch.device("cpu" if scan_triton.interpreting() else "cuda")
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set and there is no GPU", allow_module_level=True)

from networks.mamba import Mamba  # noqa: E402
from networks.ops.scan_reference import selective_scan_loop  # noqa: E402
from networks.ops.selective_scan import mamba_scan, selective_scan  # noqa: E402

from support import rel_err  # noqa: E402

# These build CPU tensors and check the interpreter's dispatch rules; on a GPU, bench/gpu_check.sh covers them.
cpu_only = pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU-tensor checks of the interpreter path")
dispatch = importlib.import_module("networks.ops.selective_scan")  # the module, not the function
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
BATCH, DIM, NSTATE, CHUNK = 2, 5, 4, 8


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(scan_triton, "CHUNK", CHUNK)
    monkeypatch.setattr(scan_triton, "BLOCK_D", 4)


def make_inputs(length, seed=0, extras=("D", "z", "delta_bias"), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    x = {"u": r(BATCH, DIM, length), "delta": r(BATCH, DIM, length) - 1.0,
         "A": -torch.rand(DIM, NSTATE, generator=g, dtype=dtype) * 4 - 0.1,
         "B": r(BATCH, NSTATE, length), "C": r(BATCH, NSTATE, length)}
    full = {"D": r(DIM), "z": r(BATCH, DIM, length), "delta_bias": r(DIM) * 0.5}
    x.update({k: full[k] for k in extras})
    return x


def reference(x, softplus, reverse):
    """float64 loop; reverse = flip(scan(flip(every token-axis input)))."""
    flip = lambda t: t.flip(-1) if reverse and t.dim() == 3 else t  # noqa: E731
    y = selective_scan_loop(**{k: flip(v) for k, v in x.items()}, delta_softplus=softplus)
    return flip(y)


def check_against_reference(x64, softplus, reverse, tol, cast=torch.float32):
    """Forward and every gradient of the triton scan on ``cast`` inputs vs the float64 loop."""
    xr = {k: v.clone().requires_grad_() for k, v in x64.items()}
    xt = {k: v.to(DEVICE, cast if v.dim() == 3 else torch.float32).detach().requires_grad_() for k, v in x64.items()}
    want = reference(xr, softplus, reverse)
    got = scan_triton.triton_selective_scan(**xt, delta_softplus=softplus, reverse=reverse)
    assert got.dtype == cast and got.shape == want.shape
    assert rel_err(got, want) < tol, f"forward: {rel_err(got, want):.2e}"
    dout = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g_want = torch.autograd.grad(want, list(xr.values()), dout)
    g_got = [g.cpu() for g in torch.autograd.grad(got, list(xt.values()), dout.to(DEVICE, cast))]
    got = got.cpu()
    for name, a, b, inp in zip(xt, g_got, g_want, xt.values()):
        assert a.dtype == inp.dtype, name
        assert rel_err(a, b) < tol, f"gradient of {name}: {rel_err(a, b):.2e}"


# L = 1, a prime below the chunk, 2 chunks exactly, 5 chunks + 3 (a prime); both directions
@pytest.mark.parametrize("length, reverse", [(1, True), (7, False), (16, True), (43, False)])
def test_forward_and_gradients_match_float64(length, reverse):
    check_against_reference(make_inputs(length), softplus=True, reverse=reverse, tol=2e-5)


@pytest.mark.parametrize("extras, softplus", [((), False), (("D",), True), (("z", "delta_bias"), False)])
def test_optional_inputs(extras, softplus):
    x = make_inputs(19, seed=2, extras=extras)
    if not softplus:
        x["delta"] = x["delta"].abs() * 0.3  # positive step sizes without softplus
    check_against_reference(x, softplus=softplus, reverse=False, tol=2e-5)


def test_underflowing_decays():
    """delta = 1e4 on every third token makes exp(delta A) exactly 0 in float32 (and float64)."""
    x = make_inputs(29, seed=5)
    x["delta"][:, :, ::3] = 1e4
    check_against_reference(x, softplus=True, reverse=True, tol=1e-4)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_half_precision_inputs(dtype, tol):
    """bf16 / fp16 token inputs (A, D, delta_bias float32, as Mamba passes them): output and gradients in the
    input dtype, computed in float32, so the error is the rounding of the results (bf16 8 bits, fp16 11 bits)."""
    x = make_inputs(27 if dtype == torch.bfloat16 else 12, seed=3)
    for k in ("u", "delta", "B", "C", "z"):  # the reference sees the same rounded values
        x[k] = x[k].to(dtype).double()
    check_against_reference(x, softplus=True, reverse=dtype == torch.bfloat16, tol=tol, cast=dtype)


@cpu_only
def test_strided_slices_and_last_state():
    """B, C sliced out of one (batch, R + 2N, L) tensor and z out of (batch, 2 dim, L), as Mamba does, give
    the contiguous result; the last state is the recurrence's final state, in either direction."""
    length = 19
    x = make_inputs(length, seed=4, dtype=torch.float32)
    packed = torch.cat([torch.randn(BATCH, 2, length), x["B"], x["C"]], dim=1)
    xz = torch.cat([torch.randn(BATCH, DIM, length), x["z"]], dim=1)
    strided = dict(x, B=packed[:, 2:2 + NSTATE], C=packed[:, 2 + NSTATE:], z=xz[:, DIM:])
    assert not strided["B"].is_contiguous() and not strided["z"].is_contiguous()
    for reverse in (False, True):
        out, last = scan_triton.triton_selective_scan(**strided, delta_softplus=True, reverse=reverse,
                                                      return_last_state=True)
        assert torch.equal(out, scan_triton.triton_selective_scan(**x, delta_softplus=True, reverse=reverse))
        x64 = {k: v.double() for k, v in x.items()}
        dt = torch.nn.functional.softplus(x64["delta"] + x64["delta_bias"][:, None])
        h = torch.zeros(BATCH, DIM, NSTATE, dtype=torch.float64)
        for t in (reversed(range(length)) if reverse else range(length)):
            h = torch.exp(dt[:, :, t, None] * x64["A"]) * h + (dt * x64["u"])[:, :, t, None] * x64["B"][:, None, :, t]
        assert last.shape == (BATCH, DIM, NSTATE) and last.dtype == torch.float32
        assert rel_err(last, h) < 1e-5


@cpu_only
def test_dispatcher_runs_triton_and_mamba_scan_reverse():
    """backend="triton" through selective_scan and mamba_scan (reverse without flips) matches ``torch``."""
    x = make_inputs(23, seed=6, dtype=torch.float32)
    y = selective_scan(**x, delta_softplus=True, backend="triton")
    assert dispatch.last_backend() == "triton"
    assert rel_err(y, selective_scan(**x, delta_softplus=True, backend="torch")) < 1e-5
    g = torch.Generator().manual_seed(7)
    dt_low, dt_weight = torch.randn(BATCH, 2, 23, generator=g), torch.randn(DIM, 2, generator=g) * 0.5
    args = [x["u"], dt_low, dt_weight, x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"]]
    grads = {}
    for backend in ("triton", "torch"):
        leaves = [a.clone().requires_grad_() for a in args]
        out = mamba_scan(*leaves, reverse=True, backend=backend)
        grads[backend] = [out] + list(torch.autograd.grad(out.square().sum(), leaves))
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(grads["triton"], grads["torch"]))


@cpu_only
def test_mamba_block_on_triton_both_directions():
    torch.manual_seed(0)
    block = Mamba(d_model=4, d_state=4, d_conv=3, expand=1)
    x = torch.randn(2, 4, 21, requires_grad=True)
    for reverse in (False, True):
        outs = {}
        for backend in ("triton", "torch"):
            block.scan_backend = backend
            y = block.forward_channels_first(x, reverse=reverse)
            outs[backend] = [y, *torch.autograd.grad(y.square().sum(), [x, block.A_log, block.x_proj.weight])]
        assert all(rel_err(a, b) < 1e-5 for a, b in zip(outs["triton"], outs["torch"])), reverse


@cpu_only
def test_backend_errors_and_automatic_fallthrough(monkeypatch, caplog):
    """backend="triton" where it cannot run raises a ValueError saying why; auto never picks it on CPU
    and, on a CUDA device it cannot serve, falls through to ``torch`` with the reason logged once."""
    cpu = torch.device("cpu")
    assert dispatch.resolve_backend(cpu, "triton") == "triton"  # interpreter: explicit request only
    assert dispatch.resolve_backend(cpu) in ("fused", "torch")
    monkeypatch.setattr(dispatch, "_logged", set())
    with caplog.at_level("INFO", logger="networks.scan"):
        assert dispatch.resolve_backend(torch.device("cuda")) == "torch"
        assert dispatch.resolve_backend(torch.device("cuda")) == "torch"
    skipped = [r.message for r in caplog.records if "triton backend not used" in r.message]
    assert len(skipped) == 1 and "TRITON_INTERPRET=1 runs CPU tensors only" in skipped[0]
    with pytest.raises(ValueError, match="'triton' was requested but cannot run: TRITON_INTERPRET=1 runs CPU"):
        dispatch.resolve_backend(torch.device("cuda"), "triton")
    monkeypatch.setattr(scan_triton, "_INTERPRETED", False)
    with pytest.raises(ValueError, match="tensors are on cpu, not a GPU"):
        selective_scan(**make_inputs(4, dtype=torch.float32), backend="triton")
    monkeypatch.setattr(scan_triton.triton, "__version__", "2.1.0")
    with pytest.raises(ValueError, match=r"triton 2.1.0 is too old \(need >= 3.0\)"):
        dispatch.resolve_backend(cpu, "triton")
    monkeypatch.setitem(sys.modules, "networks.ops.scan_triton", None)  # as if triton were missing
    monkeypatch.delattr(sys.modules["networks.ops"], "scan_triton", raising=False)
    with pytest.raises(ValueError, match="triton is not importable"):
        dispatch.resolve_backend(cpu, "triton")
    assert dispatch.available_backends()["triton"].startswith("triton is not importable")


COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import networks.ops.scan_triton as st

assert not st.interpreting()
TOKENS = {"u", "delta", "B", "C", "z", "out", "dout", "du", "ddelta", "dz"}


def source(fn, tok, none=(), **consts):
    sig, cx = {}, {}
    for a in fn.arg_names:
        if a in consts or a in none:
            sig[a], cx[a] = "constexpr", consts.get(a)
        else:
            sig[a] = (tok if a[:-4] in TOKENS else "*fp32") if a.endswith("_ptr") else "i32"
    return ASTSource(fn, sig, cx)


tiles = dict(BLOCK_D=st.BLOCK_D, T=st.CHUNK)
full = dict(HAS_BIAS=True, SOFTPLUS=True, HAS_D=True, HAS_Z=True, REVERSE=True, **tiles)
bare = dict(HAS_BIAS=False, SOFTPLUS=False, HAS_D=False, HAS_Z=False, REVERSE=False, **tiles)
none = ("bias_ptr", "D_ptr", "z_ptr", "dz_ptr", "dD_ptr", "dbias_ptr")
jobs = [source(st._fwd_kernel, "*bf16", OUTPUT=out, **full) for out in (False, True)]
jobs += [source(st._bwd_kernel, "*bf16", GRADS=g, **full) for g in (False, True)]
jobs += [source(st._fwd_kernel, "*fp32", none, OUTPUT=True, **bare), source(st._bwd_kernel, "*fp32", none, GRADS=True, **bare)]
jobs += [source(st._carry_kernel, "*fp32", REVERSE=r, BLOCK=st.CARRY_BLOCK) for r in (False, True)]
for job in jobs:
    kernel = triton.compile(job, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=st.NUM_WARPS))
    assert kernel.asm["cubin"], job.name
print("compiled", len(jobs))
"""


@pytest.mark.slow
def test_kernels_compile_for_a_gpu():
    """The interpreter does not compile: here every kernel variant goes through Triton's compiler and ptxas
    (shipped in the triton wheel) down to an sm_90 (H100/H200) binary, without a GPU."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "compiled 8" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]
