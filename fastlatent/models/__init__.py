"""Full two-stage latent generative models: autoencoders (stage 1), priors (stage 2) and their pipeline."""

from fastlatent.models.base import MODEL_REGISTRY, ConfigMixin, load_pretrained, register_model

__all__ = ["MODEL_REGISTRY", "ConfigMixin", "register_model", "load_pretrained"]
