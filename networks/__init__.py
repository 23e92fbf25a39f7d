"""Mamba U-Nets for 3D medical image segmentation as MONAI-style network classes.

After "Taming Mambas for Voxel Level 3D Medical Image Segmentation" (Lumetti, Pipoli et al.).
"""

from .mamba import Mamba
from .nets import BiSegMamba, MultiSegMamba, ResidualUNet, SegMamba, SegMambaSkip
from .ops.selective_scan import available_backends, last_backend, selective_scan

__version__ = "0.1.0"

__all__ = ["Mamba", "selective_scan", "available_backends", "last_backend",
           "SegMamba", "BiSegMamba", "MultiSegMamba", "SegMambaSkip", "ResidualUNet"]
