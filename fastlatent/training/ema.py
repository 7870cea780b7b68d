"""Exponential moving average of a module's weights."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn


class EMA:
    """A shadow copy of ``model`` whose trained parameters follow an exponential moving average.

    After each optimizer step, :meth:`update` sets, for every averaged parameter,
    ``shadow = decay * shadow + (1 - decay) * param`` once ``step >= start_step``; before that the shadow
    simply copies the weights (so averaging starts from the weights at ``start_step``, not from the random
    initialisation). Buffers (BatchNorm statistics, EMA codebooks of :class:`fastlatent.nn.VectorQuantize`,
    counters) are copied, not averaged: they are already running statistics, and integer/bool buffers can't
    be averaged.

    Averaged are the parameters that require grad when the EMA is built, minus ``exclude`` (the trainer
    excludes the discriminator: the EMA model is for sampling and evaluation). Other parameters (frozen
    LPIPS backbones, the discriminator) keep their values from the copy made here.

    Args:
        model: the module being trained. The shadow is a deep copy in eval mode, with ``requires_grad=False``.
        decay: in [0, 1); typical 0.999-0.9999 for long runs, ~0.99 for a few thousand steps.
        start_step: first step that averages; earlier updates copy.
        exclude: parameters not to average.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.999,
        start_step: int = 0,
        exclude: Iterable[nn.Parameter] = (),
    ):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA: decay must be in [0, 1), got {decay}")
        if start_step < 0:
            raise ValueError(f"EMA: start_step must be >= 0, got {start_step}")
        self.decay, self.start_step = float(decay), int(start_step)
        try:
            self.shadow = copy.deepcopy(model)
        except Exception as exc:  # modules holding handles (files, locks) can't be copied
            raise TypeError(
                f"EMA: could not deep-copy the model to hold the average ({exc}); "
                f"disable the EMA (ema_decay=None) or make the module copyable"
            ) from exc
        self.shadow.eval().requires_grad_(False)
        excluded = {id(p) for p in exclude}
        shadow_params = dict(self.shadow.named_parameters())
        self._pairs = [
            (shadow_params[name], p)
            for name, p in model.named_parameters()
            if p.requires_grad and id(p) not in excluded
        ]
        shadow_buffers = dict(self.shadow.named_buffers())
        self._buffer_pairs = [
            (shadow_buffers[name], b) for name, b in model.named_buffers() if name in shadow_buffers
        ]

    @torch.no_grad()
    def update(self, model: nn.Module | None = None, step: int = 0) -> None:
        """Average the live weights into the shadow after optimizer step ``step`` (0-based).

        ``model`` is accepted for symmetry with other EMA classes; the pairs were bound at construction.
        """
        if step >= self.start_step:
            weight = 1.0 - self.decay
            for averaged, live in self._pairs:
                averaged.lerp_(live.detach().to(averaged.dtype), weight)
        else:
            for averaged, live in self._pairs:
                averaged.copy_(live.detach())
        for shadow_buffer, live_buffer in self._buffer_pairs:
            shadow_buffer.copy_(live_buffer)

    @property
    def module(self) -> nn.Module:
        """The shadow module (eval mode, EMA weights)."""
        return self.shadow

    def state_dict(self) -> dict:
        return {"decay": self.decay, "start_step": self.start_step, "shadow": self.shadow.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.shadow.load_state_dict(state["shadow"])
