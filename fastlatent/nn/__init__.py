"""nn.Modules built on fastlatent's ops, with interfaces close to the libraries people use."""

from fastlatent.nn.scalar_quantizers import BSQ, FSQ, LFQ, CodebookUsage, LossBreakdown, Return, codebook_usage

__all__ = ["FSQ", "LFQ", "BSQ", "Return", "LossBreakdown", "CodebookUsage", "codebook_usage"]
