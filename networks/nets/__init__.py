"""The residual U-Net and the paper's Mamba U-Nets (see `variants` for the table of Fig. 2)."""

from .blocks import BasicBlockD, ResidualStack
from .mamba_layers import BiMambaLayer, MambaLayer, MultiMambaLayer, SpatialAdapter
from .plans import PLANS, from_nnunet_plans, plan_kwargs
from .unet import MambaUNet, init_weights
from .variants import VARIANTS, BiSegMamba, MultiSegMamba, ResidualUNet, SegMamba, SegMambaSkip

__all__ = [
    "BasicBlockD", "ResidualStack", "MambaLayer", "BiMambaLayer", "MultiMambaLayer", "SpatialAdapter",
    "MambaUNet", "init_weights", "VARIANTS", "ResidualUNet", "SegMamba", "BiSegMamba", "MultiSegMamba",
    "SegMambaSkip", "PLANS", "plan_kwargs", "from_nnunet_plans",
]
