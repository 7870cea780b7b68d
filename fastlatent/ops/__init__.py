"""fastlatent's functional API over ``torch.ops.fastlatent.*``.

Each op has a fake (meta) implementation so ``torch.compile(fullgraph=True)`` traces
through it, checks that raise the same errors as the C++ side, and a plain-PyTorch twin
in :mod:`fastlatent.reference`.
"""

from fastlatent.ops.bsq import bsq_entropy, bsq_quantize
from fastlatent.ops.fsq import fsq_indices_to_codes, fsq_quantize
from fastlatent.ops.lfq import lfq_entropy, lfq_quantize
from fastlatent.ops.nearest_code import nearest_code

__all__ = ["nearest_code", "fsq_quantize", "fsq_indices_to_codes", "lfq_quantize", "lfq_entropy",
           "bsq_quantize", "bsq_entropy"]
