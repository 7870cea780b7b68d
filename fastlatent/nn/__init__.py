"""Drop-in nn.Modules on fastlatent's kernels, with interfaces close to the libraries people use."""

from fastlatent.nn.blocks import AttnBlock, Downsample, GroupNormAct, ResnetBlock, TamingResnetBlock, Upsample
from fastlatent.nn.conv_fusion import fused_conv, fused_conv_mode, norm_act_conv, set_fused_conv
from fastlatent.nn.latent_quantize import LatentQuantize
from fastlatent.nn.residual_scalar import GroupedResidualFSQ, GroupedResidualLFQ, ResidualFSQ, ResidualLFQ
from fastlatent.nn.residual_vq import (
    GroupedResidualVQ,
    RandomProjectionQuantizer,
    ResidualSimVQ,
    ResidualVQ,
    SimVQ,
)
from fastlatent.nn.scalar_quantizers import (
    BSQ,
    FSQ,
    LFQ,
    CodebookUsage,
    LossBreakdown,
    Return,
    codebook_usage,
)
from fastlatent.nn.vq import Codebook, VectorQuantize, VQStats, orthogonal_loss, rotate_to

__all__ = [
    "VectorQuantize",
    "ResidualVQ",
    "GroupedResidualVQ",
    "SimVQ",
    "ResidualSimVQ",
    "RandomProjectionQuantizer",
    "Codebook",
    "VQStats",
    "orthogonal_loss",
    "rotate_to",
    "FSQ",
    "LFQ",
    "BSQ",
    "ResidualFSQ",
    "GroupedResidualFSQ",
    "ResidualLFQ",
    "GroupedResidualLFQ",
    "LatentQuantize",
    "Return",
    "LossBreakdown",
    "CodebookUsage",
    "codebook_usage",
    "GroupNormAct",
    "ResnetBlock",
    "TamingResnetBlock",
    "Upsample",
    "Downsample",
    "AttnBlock",
    "set_fused_conv",
    "fused_conv_mode",
    "fused_conv",
    "norm_act_conv",
]
