"""Learning-rate schedules evaluated per optimizer step.

A schedule is a pure function of the step, so resuming needs no scheduler state beyond the step itself;
:meth:`LRSchedule.state_dict` records the settings so a resumed run can tell when they changed.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant")


class LRSchedule:
    """Linear warm-up followed by cosine (default), linear or constant decay.

    The learning rate of update ``step`` (0-based: the first optimizer step is ``step == 0``) is
    ``base_lr * factor(step)`` with

    - warm-up, ``step < warmup_steps``: ``factor = (step + 1) / warmup_steps`` (never 0, so the first
      update already moves the weights);
    - afterwards, with ``progress = (step - warmup_steps) / (total_steps - warmup_steps)`` in ``[0, 1)``:
      cosine ``min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * progress)) / 2``, linear
      ``1 - (1 - min_lr_ratio) * progress``, constant ``1``.

    Steps past ``total_steps`` keep the final value (``min_lr_ratio`` for the decaying kinds).

    Args:
        kind: ``"cosine"``, ``"linear"`` or ``"constant"``.
        total_steps: number of optimizer steps of the run (> 0).
        warmup_steps: linear warm-up length (0 <= warmup_steps <= total_steps).
        min_lr_ratio: final learning rate as a fraction of the base one, in [0, 1].
    """

    def __init__(
        self, kind: str = "cosine", total_steps: int = 1, warmup_steps: int = 0, min_lr_ratio: float = 0.0
    ):
        if kind not in SCHEDULES:
            raise ValueError(f"LRSchedule: kind must be one of {SCHEDULES}, got {kind!r}")
        if not isinstance(total_steps, int) or total_steps <= 0:
            raise ValueError(f"LRSchedule: total_steps must be a positive int, got {total_steps!r}")
        if not isinstance(warmup_steps, int) or not 0 <= warmup_steps <= total_steps:
            raise ValueError(
                f"LRSchedule: warmup_steps must be an int in [0, total_steps={total_steps}], "
                f"got {warmup_steps!r}"
            )
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"LRSchedule: min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.kind, self.total_steps = kind, total_steps
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio

    def factor(self, step: int) -> float:
        """Multiplier of the base learning rate for update ``step`` (0-based)."""
        if step < 0:
            raise ValueError(f"LRSchedule.factor: step must be >= 0, got {step}")
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        decay_steps = self.total_steps - self.warmup_steps
        if decay_steps <= 0:
            return 1.0
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        if self.kind == "linear":
            return 1.0 - (1.0 - self.min_lr_ratio) * progress
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "min_lr_ratio": self.min_lr_ratio,
        }

    def __repr__(self) -> str:
        return (
            f"LRSchedule(kind={self.kind!r}, total_steps={self.total_steps}, "
            f"warmup_steps={self.warmup_steps}, min_lr_ratio={self.min_lr_ratio})"
        )
