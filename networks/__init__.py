"""Mamba U-Nets for 3D medical image segmentation as MONAI-style network classes.

After "Taming Mambas for Voxel Level 3D Medical Image Segmentation" (Lumetti, Pipoli et al.).
"""

from .quiet import filter_known_warnings

filter_known_warnings()

from .mamba import Mamba  # noqa: E402
from .ops.selective_scan import available_backends, last_backend, selective_scan  # noqa: E402

__version__ = "0.1.0"

__all__ = ["Mamba", "selective_scan", "available_backends", "last_backend",
           "SegMamba", "BiSegMamba", "MultiSegMamba", "SegMambaSkip", "ResidualUNet"]

_NETS = ("SegMamba", "BiSegMamba", "MultiSegMamba", "SegMambaSkip", "ResidualUNet")


def __getattr__(name):
    # The network classes are built from MONAI blocks; importing them on first use keeps the scan and
    # the Mamba block (and bench/gpu_check.py's scan checks) usable where MONAI is not installed.
    if name in _NETS:
        from . import nets

        return getattr(nets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_NETS))
