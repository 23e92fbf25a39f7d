"""Reach mamba-ssm's pure-PyTorch reference code on a machine without CUDA.

mamba-ssm's release imports its compiled CUDA module ``selective_scan_cuda`` and Triton kernels at
import time. This helper registers stand-ins for exactly those names (and skips the package's
``__init__``, which pulls Mamba2/Mamba3/LM-head code we do not test against), loads
``selective_scan_interface`` and ``mamba_simple``, and restores ``sys.modules`` afterwards.
Returns None when mamba-ssm is not installed.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
from typing import Iterator, Optional


@contextlib.contextmanager
def mamba_ssm_reference() -> Iterator[Optional[types.SimpleNamespace]]:
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or not spec.submodule_search_locations:
        yield None
        return
    saved = {k: v for k, v in sys.modules.items() if k == "mamba_ssm" or k.startswith("mamba_ssm.") or k == "selective_scan_cuda"}
    for key in saved:
        del sys.modules[key]
    pkg = types.ModuleType("mamba_ssm")
    pkg.__path__ = list(spec.submodule_search_locations)
    stubs = {
        "mamba_ssm": pkg,
        "selective_scan_cuda": types.ModuleType("selective_scan_cuda"),
        "mamba_ssm.ops.triton.layer_norm": types.ModuleType("mamba_ssm.ops.triton.layer_norm"),
    }
    stubs["mamba_ssm.ops.triton.layer_norm"]._layer_norm_fwd = None
    sys.modules.update(stubs)
    try:
        iface = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
        simple = importlib.import_module("mamba_ssm.modules.mamba_simple")
        # the module's forward calls selective_scan_fn (CUDA); point it at the reference
        simple.selective_scan_fn = iface.selective_scan_ref
        simple.causal_conv1d_fn = None
        yield types.SimpleNamespace(
            selective_scan_ref=iface.selective_scan_ref, mamba_inner_ref=iface.mamba_inner_ref, Mamba=simple.Mamba
        )
    finally:
        for key in [k for k in sys.modules if k == "mamba_ssm" or k.startswith("mamba_ssm.") or k == "selective_scan_cuda"]:
            del sys.modules[key]
        sys.modules.update(saved)
