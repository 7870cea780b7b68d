"""Argument checks shared by the fake (meta) implementations.

They mirror csrc/torch/checks.h: same messages, same exception types, so a bad input
fails the same way eagerly, under torch.compile and on the meta device.
"""

from __future__ import annotations

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_dim(op: str, name: str, t: torch.Tensor, dim: int, layout: str) -> None:
    if t.dim() != dim:
        raise ValueError(f"fastlatent.{op}: {name} must be {dim}-D {layout}, got shape {list(t.shape)}")


def check_float(op: str, name: str, t: torch.Tensor, allow_double: bool = False) -> None:
    check_float_dtype(op, name, t.dtype, allow_double)


def check_float_dtype(op: str, name: str, dtype: torch.dtype, allow_double: bool = False) -> None:
    if dtype in KERNEL_DTYPES or (allow_double and dtype == torch.float64):
        return
    extra = " (or float64)" if allow_double else ""
    raise TypeError(f"fastlatent.{op}: {name} must be float32, float16 or bfloat16{extra}, got {dtype}")


def allows_double(t: torch.Tensor) -> bool:
    """Kernels that take float64 (for gradcheck) do so on the CPU only."""
    return t.device.type != "cuda"


def check_last_dim(op: str, name: str, t: torch.Tensor, d: int, what: str) -> None:
    if t.dim() < 1 or t.shape[-1] != d:
        raise ValueError(
            f"fastlatent.{op}: {name} must be [..., {what}] with {what}={d} in its last dim, "
            f"got shape {list(t.shape)}"
        )


def check_same_shape(op: str, name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"fastlatent.{op}: {name_a} and {name_b} must have the same shape, "
            f"got {list(a.shape)} and {list(b.shape)}"
        )


def check_index(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"fastlatent.{op}: {name} must be torch.int64 or torch.int32, got {t.dtype}")


def check_same_device(op: str, name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.device != b.device:
        raise RuntimeError(
            f"fastlatent.{op}: {name_a} and {name_b} must be on the same device, "
            f"got {a.device} and {b.device}"
        )


def check_same_dtype(op: str, name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.dtype != b.dtype:
        raise TypeError(
            f"fastlatent.{op}: {name_a} and {name_b} must have the same dtype, got {a.dtype} and {b.dtype}"
        )


def check_floating_vector(op: str, x: torch.Tensor, name: str, t, size: int, what: str) -> None:
    """``t`` (optional): a 1-D floating tensor of ``size`` elements on x's device, the size named ``what``."""
    if t is None:
        return
    check_same_device(op, "x", x, name, t)
    if t.dim() != 1 or t.shape[0] != size:
        raise ValueError(f"fastlatent.{op}: {name} must be [{what}] = [{size}], got shape {list(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"fastlatent.{op}: {name} must be a floating tensor, got {t.dtype}")


def check_choice(op: str, name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        quoted = [f'"{c}"' for c in choices]
        options = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
        raise ValueError(f'fastlatent.{op}: {name} must be {options}, got "{value}"')


def check_int64(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype != torch.int64:
        raise TypeError(f"fastlatent.{op}: {name} must be torch.int64, got {t.dtype}")


def check_fp32(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype != torch.float32:
        raise TypeError(f"fastlatent.{op}: {name} must be torch.float32, got {t.dtype}")
