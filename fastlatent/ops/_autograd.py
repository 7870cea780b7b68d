"""Double backward for ops whose first backward is an opaque kernel.

A registered backward that calls a backward kernel returns gradients autograd cannot differentiate again:
torch would only warn that the kernel has no autograd formula and treat it as constant, so second-order
gradients (R1 / gradient penalties, Hessian-vector products) would silently miss its terms. When the
backward runs with ``create_graph=True`` (grad mode is then on inside the backward), the ops instead take
the vector-Jacobian product of their plain-PyTorch twin (``fastlatent.reference``) with autograd, keeping
the graph: the gradients are then differentiable to any order. First-order backward keeps the kernels.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def wants_double_backward() -> bool:
    """True inside a registered backward that must itself be differentiable (``create_graph=True``)."""
    return torch.is_grad_enabled()


def differentiable_vjp(
    forward: Callable,
    inputs: Sequence,
    needs: Sequence[bool],
    grad_outputs: Sequence,
    create_graph: bool = True,
) -> list:
    """Gradients of ``forward(*inputs)`` for ``grad_outputs``, differentiable again (``create_graph``).

    Args:
        forward: plain-PyTorch function of ``inputs`` returning a tensor or a tuple of tensors.
        inputs: the op's tensor inputs (None for absent optional ones), as saved by its setup_context.
        needs: per input, whether its gradient is wanted (``ctx.needs_input_grad``).
        grad_outputs: per output, the incoming gradient or None.
        create_graph: keep the graph of the gradients (else the inputs are detached first, and the result
            is a plain first-order gradient).

    Returns:
        A list aligned with ``inputs``: the gradient where wanted (zeros where the output does not depend
        on the input), None elsewhere.
    """
    with torch.enable_grad():
        leaves = [
            t if t is None or (need and create_graph) else t.detach().requires_grad_(need)
            for t, need in zip(inputs, needs)
        ]
        outputs = forward(*leaves)
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        pairs = [
            (o, g)
            for o, g in zip(outputs, grad_outputs)
            if g is not None and isinstance(o, torch.Tensor) and o.requires_grad
        ]
        wanted = [t for t, need in zip(leaves, needs) if need and t is not None]
        grads = iter(())
        if wanted and pairs:
            grads = iter(
                torch.autograd.grad(
                    [o for o, _ in pairs],
                    wanted,
                    [g.to(o.dtype) for o, g in pairs],
                    create_graph=create_graph,
                    allow_unused=True,
                )
            )
    out = []
    for t, need in zip(leaves, needs):
        if need and t is not None:
            g = next(grads, None)
            out.append(torch.zeros_like(t) if g is None else g)
        else:
            out.append(None)
    return out
