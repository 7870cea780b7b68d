"""Training for both stages: one :class:`Trainer` for any module implementing the training protocol.

Training protocol::

    module.training_step(batch, step: int) -> dict[str, Tensor]
        "loss":      scalar, backpropagated into all trainable parameters except the discriminator's
        "disc_loss": optional scalar, backpropagated into module.discriminator_parameters() by a second
                     AdamW; computed from DETACHED generator outputs
        other keys:  scalar metrics, logged as floats
    module.discriminator_parameters() -> list of Parameters   (optional)

``step`` is the number of optimizer steps already taken (0 on the first call).

- :class:`Trainer`, :class:`TrainerConfig`, :class:`Callback`: AdamW, warm-up + cosine LR, gradient clipping,
  fp32/bf16/fp16 autocast, EMA, atomic checkpoints with exact resume, JSONL metrics and PNG plots, DDP.
- :class:`EMA`, :class:`LRSchedule`, :func:`plot_metrics`, :func:`read_metrics`.
- :mod:`fastlatent.training.distributed`: ``torchrun`` process-group set-up helpers.
- :mod:`fastlatent.training.data_order`: the seeded, resumable, rank-sharded batch order.
"""

from fastlatent.training.checkpoint import list_checkpoints, load_checkpoint, load_latest_checkpoint
from fastlatent.training.config import TrainerConfig
from fastlatent.training.data_order import BatchStream, EpochBatchSampler, epoch_permutation
from fastlatent.training.distributed import DistInfo, dist_info, init_distributed
from fastlatent.training.ema import EMA
from fastlatent.training.logging import MetricsLogger, plot_metrics, read_metrics
from fastlatent.training.schedules import LRSchedule
from fastlatent.training.trainer import Callback, Trainer, seed_everything

__all__ = [
    "Trainer",
    "TrainerConfig",
    "Callback",
    "EMA",
    "LRSchedule",
    "MetricsLogger",
    "plot_metrics",
    "read_metrics",
    "EpochBatchSampler",
    "BatchStream",
    "epoch_permutation",
    "DistInfo",
    "dist_info",
    "init_distributed",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest_checkpoint",
    "seed_everything",
]
