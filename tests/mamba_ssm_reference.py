"""Reach mamba-ssm's (and causal-conv1d's) pure-PyTorch reference code on a machine without CUDA.

mamba-ssm's release imports its compiled CUDA module ``selective_scan_cuda`` and Triton kernels at
import time. This helper registers stand-ins for exactly those names (and skips the package's
``__init__``, which pulls Mamba2/Mamba3/LM-head code we do not test against), loads
``selective_scan_interface`` and ``mamba_simple``, and restores ``sys.modules`` afterwards.
causal-conv1d (installed without its CUDA build by ``make reference``) is reached the same way:
its ``causal_conv1d_interface`` is loaded with a stand-in for ``causal_conv1d.cpp_functions``
(the only module that imports the compiled ``causal_conv1d_cuda``), which gives its
``causal_conv1d_ref``; mamba-ssm's ``mamba_inner_ref`` then runs with ``causal_conv1d_ref`` and
``selective_scan_ref`` in place of the compiled functions it calls.
Yields None when mamba-ssm is not installed; ``causal_conv1d_ref`` and ``mamba_inner_ref`` are
None when causal-conv1d is not.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
from typing import Iterator, Optional

import torch

_PACKAGES = ("mamba_ssm", "causal_conv1d")
_COMPILED = ("selective_scan_cuda", "causal_conv1d_cuda")


def _ours(key: str) -> bool:
    return key in _PACKAGES + _COMPILED or any(key.startswith(p + ".") for p in _PACKAGES)


def _bare_package(name: str, spec) -> types.ModuleType:
    pkg = types.ModuleType(name)
    pkg.__path__ = list(spec.submodule_search_locations)
    return pkg


@contextlib.contextmanager
def mamba_ssm_reference() -> Iterator[Optional[types.SimpleNamespace]]:
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or not spec.submodule_search_locations:
        yield None
        return
    conv_spec = importlib.util.find_spec("causal_conv1d")
    saved = {k: v for k, v in sys.modules.items() if _ours(k)}
    for key in saved:
        del sys.modules[key]
    stubs = {
        "mamba_ssm": _bare_package("mamba_ssm", spec),
        "selective_scan_cuda": types.ModuleType("selective_scan_cuda"),
        "mamba_ssm.ops.triton.layer_norm": types.ModuleType("mamba_ssm.ops.triton.layer_norm"),
    }
    stubs["mamba_ssm.ops.triton.layer_norm"]._layer_norm_fwd = None
    if conv_spec is not None and conv_spec.submodule_search_locations:
        cpp = types.ModuleType("causal_conv1d.cpp_functions")
        cpp.causal_conv1d_fwd_function = cpp.causal_conv1d_bwd_function = cpp.causal_conv1d_update_function = None
        stubs.update({"causal_conv1d": _bare_package("causal_conv1d", conv_spec), "causal_conv1d.cpp_functions": cpp})
    sys.modules.update(stubs)
    try:
        conv_ref = None
        if "causal_conv1d" in stubs:
            conv_ref = importlib.import_module("causal_conv1d.causal_conv1d_interface").causal_conv1d_ref
        iface = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
        simple = importlib.import_module("mamba_ssm.modules.mamba_simple")
        # the module's forward calls selective_scan_fn (CUDA); point it at the reference
        simple.selective_scan_fn = iface.selective_scan_ref
        simple.causal_conv1d_fn = None
        # mamba_inner_ref calls causal_conv1d_fn and selective_scan_fn: their references stand in
        iface.causal_conv1d_fn = conv_ref
        iface.selective_scan_fn = iface.selective_scan_ref
        yield types.SimpleNamespace(
            selective_scan_ref=iface.selective_scan_ref,
            mamba_inner_ref=iface.mamba_inner_ref if conv_ref is not None else None,
            causal_conv1d_ref=conv_ref,
            Mamba=simple.Mamba,
        )
    finally:
        for key in [k for k in sys.modules if _ours(k)]:
            del sys.modules[key]
        sys.modules.update(saved)


@contextlib.contextmanager
def float64_kept() -> Iterator[None]:
    """Make ``Tensor.float()`` leave float64 tensors as they are, while the block runs.

    mamba-ssm's ``selective_scan_ref`` casts its inputs with ``.float()``, so it cannot run in
    float64 as it stands; with this, the same code computes in float64 (for reference values
    without float32 rounding). Other dtypes convert as usual.
    """
    original = torch.Tensor.float
    own = "float" in vars(torch.Tensor)  # defined on torch.Tensor itself, not only on its C base

    def keep_float64(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else original(self, *args, **kwargs)

    torch.Tensor.float = keep_float64
    try:
        yield
    finally:
        if own:
            torch.Tensor.float = original
        else:
            del torch.Tensor.float
