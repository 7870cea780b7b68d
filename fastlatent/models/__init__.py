"""Full two-stage latent generative models: autoencoders (stage 1), priors (stage 2) and their pipeline."""

from fastlatent.models.base import MODEL_REGISTRY, ConfigMixin, load_pretrained, register_model
from fastlatent.models.dit import DiT
from fastlatent.models.gpt import KVCache, TokenGPT, top_k_filter, top_p_filter
from fastlatent.models.latent_diffusion import LatentDiffusion
from fastlatent.models.pipeline import TwoStagePipeline
from fastlatent.models.unet import UNet

__all__ = ["MODEL_REGISTRY", "ConfigMixin", "register_model", "load_pretrained", "DiT", "UNet", "LatentDiffusion",
           "TokenGPT", "KVCache", "top_k_filter", "top_p_filter", "TwoStagePipeline"]
