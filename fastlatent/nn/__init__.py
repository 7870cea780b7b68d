"""Drop-in modules on fastlatent's kernels."""

from fastlatent.nn.vq import ResidualVQ, VectorQuantize, VQStats, rotate_to

__all__ = ["VectorQuantize", "ResidualVQ", "VQStats", "rotate_to"]
