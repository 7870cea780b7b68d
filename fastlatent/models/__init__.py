"""Full two-stage latent generative models: autoencoders (stage 1), priors (stage 2) and their pipeline."""

from fastlatent.models.autoencoder_kl import (
    AutoencoderKL,
    diffusers_to_ldm_vae_state_dict,
    ldm_to_diffusers_vae_state_dict,
    vae_config_from_state_dict,
)
from fastlatent.models.autoencoders import AutoencoderOutput, DiagonalGaussian, LatentScaleMixin
from fastlatent.models.base import MODEL_REGISTRY, ConfigMixin, load_pretrained, register_model
from fastlatent.models.dgae import DGAETask, DiffusionDecoderAutoencoder
from fastlatent.models.discrete_autoencoders import FSQAutoencoder, VQAutoencoder
from fastlatent.models.dit import DiT
from fastlatent.models.gpt import KVCache, TokenGPT, top_k_filter, top_p_filter
from fastlatent.models.latent_diffusion import LatentDiffusion
from fastlatent.models.losses import (
    LPIPS,
    AutoencoderLoss,
    AutoencoderTask,
    PatchGANDiscriminator,
    adaptive_generator_weight,
    hinge_d_loss,
    vanilla_d_loss,
)
from fastlatent.models.pipeline import TwoStagePipeline
from fastlatent.models.unet import UNet
from fastlatent.models.vae_blocks import Decoder, Encoder

__all__ = [
    "MODEL_REGISTRY",
    "ConfigMixin",
    "register_model",
    "load_pretrained",
    "AutoencoderKL",
    "AutoencoderOutput",
    "DiagonalGaussian",
    "Encoder",
    "Decoder",
    "ldm_to_diffusers_vae_state_dict",
    "diffusers_to_ldm_vae_state_dict",
    "vae_config_from_state_dict",
    "LatentScaleMixin",
    "VQAutoencoder",
    "FSQAutoencoder",
    "LPIPS",
    "PatchGANDiscriminator",
    "AutoencoderLoss",
    "AutoencoderTask",
    "adaptive_generator_weight",
    "hinge_d_loss",
    "vanilla_d_loss",
    "DiT",
    "UNet",
    "LatentDiffusion",
    "TokenGPT",
    "KVCache",
    "top_k_filter",
    "top_p_filter",
    "TwoStagePipeline",
    "DiffusionDecoderAutoencoder",
    "DGAETask",
]
