"""Drop-in nn.Modules on fastlatent's kernels, with interfaces close to the libraries people use."""

from fastlatent.nn.blocks import AttnBlock, Downsample, GroupNormAct, ResnetBlock, TamingResnetBlock, Upsample
from fastlatent.nn.conv_fusion import fused_conv, fused_conv_mode, norm_act_conv, set_fused_conv
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
                                      "BSQ",
                                      "FSQ",
                                      "LFQ",
                                      "AttnBlock",
                                      "Codebook",
                                      "CodebookUsage",
                                      "Downsample",
                                      "GroupNormAct",
                                      "GroupedResidualVQ",
                                      "LossBreakdown",
                                      "RandomProjectionQuantizer",
                                      "ResidualSimVQ",
                                      "ResidualVQ",
                                      "ResnetBlock",
                                      "Return",
                                      "SimVQ",
                                      "TamingResnetBlock",
                                      "Upsample",
                                      "VQStats",
                                      "VectorQuantize",
                                      "codebook_usage",
                                      "fused_conv",
                                      "fused_conv_mode",
                                      "norm_act_conv",
                                      "orthogonal_loss",
                                      "rotate_to",
                                      "set_fused_conv",
]
