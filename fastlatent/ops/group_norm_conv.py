"""group_norm_conv3x3: a GroupNorm (+ activation) folded into the 3x3 convolution that follows it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlatent._extension import extension_available, require_device
from fastlatent.ops import _checks
from fastlatent.ops._autograd import differentiable_vjp, wants_double_backward
from fastlatent.ops.group_norm import ACTIVATIONS, _channels_last, _check_layout_and_groups, group_norm

ALGORITHMS = ("auto", "fused", "unfused")
_OP = "group_norm_conv3x3"


def check_group_norm_conv3x3_args(
    x, gn_weight, gn_bias, groups, eps, activation, conv_weight, conv_bias, residual, algorithm
) -> None:
    """The C++ checks of group_norm_conv.cpp, with the same messages and exception types."""
    if x.dim() != 4:
        raise ValueError(f"fastlatent.{_OP}: x must be 4-D [N, C_in, H, W], got shape {list(x.shape)}")
    cin = _check_layout_and_groups(_OP, x, groups)
    if eps < 0:
        raise ValueError(f"fastlatent.{_OP}: eps must be >= 0, got {eps}")
    _checks.check_float(_OP, "x", x, allow_double=_checks.allows_double(x))
    _checks.check_choice(_OP, "activation", activation, ACTIVATIONS)
    _checks.check_floating_vector(_OP, x, "gn_weight", gn_weight, cin, "C_in")
    _checks.check_floating_vector(_OP, x, "gn_bias", gn_bias, cin, "C_in")
    _checks.check_same_device(_OP, "x", x, "conv_weight", conv_weight)
    if conv_weight.dim() != 4 or conv_weight.shape[0] < 1 or tuple(conv_weight.shape[1:]) != (cin, 3, 3):
        raise ValueError(
            f"fastlatent.{_OP}: conv_weight must be [C_out, C_in, 3, 3] with C_in = {cin}, got shape "
            f"{list(conv_weight.shape)}"
        )
    _checks.check_same_dtype(_OP, "x", x, "conv_weight", conv_weight)
    cout = conv_weight.shape[0]
    if conv_bias is not None:
        _checks.check_floating_vector(_OP, x, "conv_bias", conv_bias, cout, "C_out")
        _checks.check_same_dtype(_OP, "x", x, "conv_bias", conv_bias)
    if residual is not None:
        _checks.check_same_device(_OP, "x", x, "residual", residual)
        expected = [x.shape[0], cout, x.shape[2], x.shape[3]]
        if list(residual.shape) != expected:
            raise ValueError(
                f"fastlatent.{_OP}: residual must be [N, C_out, H, W] = {expected}, got shape "
                f"{list(residual.shape)}"
            )
        _checks.check_same_dtype(_OP, "x", x, "residual", residual)
    _checks.check_choice(_OP, "algorithm", algorithm, ALGORITHMS)


def group_norm_conv3x3(
    x: torch.Tensor,
    gn_weight: torch.Tensor | None,
    gn_bias: torch.Tensor | None,
    groups: int,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None = None,
    *,
    eps: float = 1e-5,
    activation: str = "silu",
    residual: torch.Tensor | None = None,
    algorithm: str = "auto",
) -> torch.Tensor:
    """``conv2d(act(GroupNorm(x)), conv_weight, conv_bias, padding=1) + residual``, the decoder's block.

    Args:
        x: ``[N, C_in, H, W]``, float32/float16/bfloat16 (float64 on the CPU), NCHW or channels-last.
        gn_weight, gn_bias: the GroupNorm's ``[C_in]`` affine or ``None`` (any floating dtype, used in fp32).
        groups: GroupNorm groups, dividing ``C_in``.
        conv_weight: ``[C_out, C_in, 3, 3]`` in x's dtype (stride 1, padding 1, no dilation or groups).
        conv_bias: ``[C_out]`` in x's dtype, or ``None``.
        eps: added to the GroupNorm variance.
        activation: ``"none"``, ``"silu"`` or ``"gelu"`` (exact), applied after the affine.
        residual: ``[N, C_out, H, W]`` in x's dtype, added to the convolution's output, or ``None``.
        algorithm: ``"fused"``: on CUDA with fp16/bf16 (compute capability 8.0+), statistics from
            :func:`group_norm_stats`, then one implicit-GEMM tensor-core kernel that normalises and
            activates its input while loading it, with the bias and residual added in its epilogue; the
            normalised activation is never written to memory. ``"unfused"``: the fused group_norm kernel,
            then the library convolution (cuDNN, oneDNN on the CPU), then the residual. ``"auto"``:
            ``"fused"`` where it applies, ``"unfused"`` elsewhere. Which is faster depends on the GPU and
            the shape: ``benchmarks/bench_norms.py`` measures both, and :func:`fastlatent.nn.set_fused_conv`
            ("auto") times both per shape at run time.

    Returns:
        ``[N, C_out, H, W]`` in x's dtype; channels-last when x is.

    Differentiable (the backward recomputes the normalised input and goes through ``group_norm`` and
    ``conv2d``'s gradients); the fused kernel is meant for inference decoding.
    """
    tensors = [t for t in (x, gn_weight, gn_bias, conv_weight, conv_bias, residual) if t is not None]
    require_device(_OP, *tensors)
    return torch.ops.fastlatent.group_norm_conv3x3.default(
        x, gn_weight, gn_bias, groups, float(eps), activation, conv_weight, conv_bias, residual, algorithm
    )


if extension_available():

    @torch.library.register_fake("fastlatent::group_norm_conv3x3")
    def _group_norm_conv3x3_fake(
        x,
        gn_weight,
        gn_bias,
        groups,
        eps,
        activation,
        conv_weight,
        conv_bias=None,
        residual=None,
        algorithm="auto",
    ):
        check_group_norm_conv3x3_args(
            x, gn_weight, gn_bias, groups, eps, activation, conv_weight, conv_bias, residual, algorithm
        )
        out = x.new_empty((x.shape[0], conv_weight.shape[0], x.shape[2], x.shape[3]))
        return out.contiguous(memory_format=torch.channels_last) if _channels_last(x) else out

    _DIFFERENTIABLE = (0, 1, 2, 6, 7, 8)  # x, gn_weight, gn_bias, conv_weight, conv_bias, residual

    def _setup_context(ctx, inputs, output):
        x, gn_weight, gn_bias, groups, eps, activation, conv_weight, conv_bias, residual, _ = inputs
        ctx.save_for_backward(x, gn_weight, gn_bias, conv_weight, conv_bias)
        ctx.groups, ctx.eps, ctx.activation = groups, eps, activation
        ctx.has_residual = residual is not None

    def _backward(ctx, grad_out):
        saved = ctx.saved_tensors
        # arguments left at their schema defaults are not in needs_input_grad
        needs_input_grad = tuple(ctx.needs_input_grad) + (False,) * (10 - len(ctx.needs_input_grad))
        needs = [needs_input_grad[i] for i in _DIFFERENTIABLE[:5]]
        # Through the group_norm op and torch's conv: with create_graph=True the gradients keep their graph
        # (group_norm's own backward then switches to its differentiable form), so they differentiate again.
        x_g, gw_g, gb_g, w_g, b_g = differentiable_vjp(
            lambda x, gw, gb, w, b: F.conv2d(
                group_norm(x, gw, gb, ctx.groups, ctx.eps, ctx.activation), w, b, padding=1
            ),
            saved,
            needs,
            (grad_out,),
            create_graph=wants_double_backward(),
        )
        residual_g = grad_out if ctx.has_residual and needs_input_grad[8] else None
        return x_g, gw_g, gb_g, None, None, None, w_g, b_g, residual_g, None

    torch.library.register_autograd("fastlatent::group_norm_conv3x3", _backward, setup_context=_setup_context)
