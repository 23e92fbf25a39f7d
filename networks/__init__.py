"""Mamba U-Nets for 3D medical image segmentation as MONAI-style network classes.

After "Taming Mambas for Voxel Level 3D Medical Image Segmentation" (Lumetti, Pipoli et al.).
"""

from .quiet import filter_known_warnings

filter_known_warnings()

from .mamba import Mamba  # noqa: E402
from .nets import BiSegMamba, MultiSegMamba, ResidualUNet, SegMamba, SegMambaSkip  # noqa: E402
from .ops.selective_scan import available_backends, last_backend, selective_scan  # noqa: E402

__version__ = "0.1.0"

__all__ = ["Mamba", "selective_scan", "available_backends", "last_backend",
           "SegMamba", "BiSegMamba", "MultiSegMamba", "SegMambaSkip", "ResidualUNet"]
