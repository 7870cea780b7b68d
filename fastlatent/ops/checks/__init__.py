"""Argument checks of each op, one module per op: torch-only leaves.

Both an op module (``fastlatent.ops.<op>``, for its fake implementation) and its plain-PyTorch twin
(``fastlatent.reference.<op>``) import these, so the op module can import its reference at module
level without an import cycle. The op modules re-export the public names
(``fastlatent.ops.fsq.check_levels`` and the like). Shared primitives live in ``fastlatent.ops._checks``.
"""
