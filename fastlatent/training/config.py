"""The configuration of a :class:`fastlatent.training.Trainer` run: :class:`TrainerConfig` and its checks."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fastlatent.training.schedules import SCHEDULES

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Settings that decide which samples each step sees; a resumed run must keep them.
DATA_ORDER_FIELDS = ("seed", "batch_size", "grad_accum_steps", "shuffle")


@dataclasses.dataclass
class TrainerConfig:
    """Everything a run needs besides the module and the data (all JSON values, saved with the run).

    Args:
        out_dir: folder for ``metrics.jsonl``, ``metrics.png``, ``trainer_config.json`` and
            ``checkpoints/``. A run resumes from the newest checkpoint found there (``resume=True``).
        steps: total optimizer steps of the run (> 0).
        batch_size: samples per process per micro-batch; the global batch of one optimizer step is
            ``batch_size * world_size * grad_accum_steps``.
        lr, betas, weight_decay: AdamW settings of the main parameters. Weight decay applies to tensors
            with 2 or more dims (weights), not to biases and norm scales, unless ``decay_all_params``.
        disc_lr, disc_betas, disc_weight_decay: the discriminator's AdamW (default: the main values).
        schedule: ``"cosine"`` (default), ``"linear"`` or ``"constant"`` decay after a linear warm-up of
            ``warmup_steps``, down to ``min_lr_ratio * lr``; applied per step to both optimizers.
        grad_clip: clip the global gradient norm of the main parameters to this (``None``: no clipping;
            the norm is logged as ``grad_norm`` either way). ``disc_grad_clip`` likewise for the
            discriminator (default: ``grad_clip``).
        precision: ``"fp32"``, ``"bf16"`` (autocast; works on CPU) or ``"fp16"`` (autocast + GradScaler).
        ema_decay: keep an exponential moving average of the weights (``None``: off); ``ema_start``: first
            averaging step (weights are copied before). The average is in :meth:`Trainer.ema_model` and in
            the checkpoints.
        grad_accum_steps: micro-batches per optimizer step.
        checkpoint_every: write a checkpoint every this many steps (and always at the end);
            ``keep_checkpoints`` newest ones are kept (>= 1).
        log_every: log a metrics record every this many steps (and at the end).
        plot_every: redraw ``metrics.png`` every this many steps (default: at each checkpoint and the end);
            ``plots=False`` draws none (matplotlib is then not needed).
        seed: seeds the data order and, for a fresh run, the torch/numpy/python RNGs (``seed + rank``).
        shuffle: visit each epoch in a seeded random order (``False``: dataset order).
        num_workers: DataLoader worker processes.
        resume: continue from the newest checkpoint in ``out_dir`` when there is one.
        progress: tqdm progress bar (only on rank 0 and when stderr is a terminal).
        find_unused_parameters: passed to DistributedDataParallel (for modules that leave some trainable
            parameters out of the loss on some steps).
        decay_all_params: apply weight decay to 1-D parameters too.
    """

    out_dir: str
    steps: int
    batch_size: int = 32
    lr: float = 1e-4
    betas: Sequence[float] = (0.9, 0.999)
    weight_decay: float = 0.0
    disc_lr: float | None = None
    disc_betas: Sequence[float] | None = None
    disc_weight_decay: float | None = None
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    disc_grad_clip: float | None = None
    precision: str = "fp32"
    ema_decay: float | None = None
    ema_start: int = 0
    grad_accum_steps: int = 1
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10
    plot_every: int | None = None
    plots: bool = True
    seed: int = 0
    shuffle: bool = True
    num_workers: int = 0
    resume: bool = True
    progress: bool = True
    find_unused_parameters: bool = False
    decay_all_params: bool = False

    def __post_init__(self):
        self.out_dir = str(self.out_dir)
        if not self.out_dir:
            raise ValueError("TrainerConfig: out_dir must be a folder path, got an empty string")
        for name in (
            "steps",
            "batch_size",
            "grad_accum_steps",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
        ):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("warmup_steps", "ema_start", "num_workers", "seed"):
            _check_int(name, getattr(self, name), minimum=0)
        if self.plot_every is not None:
            _check_int("plot_every", self.plot_every, minimum=1)
        if self.warmup_steps > self.steps:
            raise ValueError(
                f"TrainerConfig: warmup_steps ({self.warmup_steps}) must not exceed steps ({self.steps})"
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainerConfig: schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"TrainerConfig: precision must be one of {tuple(PRECISIONS)}, got {self.precision!r}"
            )
        _check_positive("lr", self.lr)
        if self.disc_lr is not None:
            _check_positive("disc_lr", self.disc_lr)
        self.betas = _check_betas("betas", self.betas)
        if self.disc_betas is not None:
            self.disc_betas = _check_betas("disc_betas", self.disc_betas)
        for name in ("weight_decay", "disc_weight_decay"):
            value = getattr(self, name)
            if value is not None and not (_is_real(value) and value >= 0):
                raise ValueError(f"TrainerConfig: {name} must be a number >= 0, got {value!r}")
        for name in ("grad_clip", "disc_grad_clip"):
            value = getattr(self, name)
            if value is not None:
                _check_positive(name, value)
        if not (_is_real(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1):
            raise ValueError(f"TrainerConfig: min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.ema_decay is not None and not (_is_real(self.ema_decay) and 0 <= self.ema_decay < 1):
            raise ValueError(f"TrainerConfig: ema_decay must be in [0, 1) or None, got {self.ema_decay!r}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainerConfig:
        """Build from a mapping (a parsed config file); unknown keys are an error naming the valid ones."""
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"TrainerConfig: unknown setting(s) {unknown}; valid: {fields}")
        return cls(**values)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"TrainerConfig: {name} must be an int >= {minimum}, got {value!r}")


def _check_positive(name: str, value) -> None:
    if not (_is_real(value) and value > 0):
        raise ValueError(f"TrainerConfig: {name} must be a finite number > 0, got {value!r}")


def _check_betas(name: str, value) -> tuple[float, float]:
    try:
        b1, b2 = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"TrainerConfig: {name} must be two numbers (beta1, beta2), got {value!r}") from None
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise ValueError(f"TrainerConfig: {name} must lie in [0, 1), got {value!r}")
    return (b1, b2)
