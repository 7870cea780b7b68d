"""Deterministic, resumable data order for training.

Epoch ``e`` visits the dataset in the order ``torch.randperm(N)`` drawn from a generator seeded by
``(seed, e)``, so the order is a function of the seed and the epoch alone: no global RNG is consumed, and
a resumed run replays exactly the batches the interrupted one would have seen. The permutation is cut into
*global* batches of ``batch_size * world_size`` samples (an incomplete last one is dropped, so every process
always gets a full batch); process ``rank`` takes the ``rank``-th slice of ``batch_size`` samples of each.
A DDP run therefore sees, step for step, the same global batches as a single process with
``batch_size * world_size``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for ``(seed, epoch)`` with well-mixed bits (numpy's SeedSequence)."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, epoch]).generate_state(1, np.uint64)
    return int(state[0] >> 1)


def epoch_permutation(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The visiting order of epoch ``epoch``: int64 ``[num_samples]``."""
    if not shuffle:
        return torch.arange(num_samples)
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(num_samples, generator=generator)


class EpochBatchSampler(Sampler[list[int]]):
    """Yields this process's batches of one epoch, from global batch ``start_batch`` on.

    Set :attr:`epoch` and :attr:`start_batch` before each ``iter()`` (a DataLoader calls ``iter`` on its
    batch sampler each time it is iterated).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"EpochBatchSampler: batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"EpochBatchSampler: rank must be in [0, world_size={world_size}), got {rank}")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = num_samples // self.global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the dataset has {num_samples} samples, fewer than one global batch "
                f"(batch_size {batch_size} x {world_size} processes = {self.global_batch}); "
                f"lower batch_size or use more data"
            )
        self.epoch = 0
        self.start_batch = 0

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_permutation(self.num_samples, self.seed, self.epoch, self.shuffle)
        offset = self.rank * self.batch_size
        for b in range(self.start_batch, self.batches_per_epoch):
            start = b * self.global_batch + offset
            yield order[start : start + self.batch_size].tolist()


def _seed_worker(worker_id: int) -> None:
    # DataLoader seeds torch in each worker from its generator; give numpy and random the same seed so
    # datasets that use them are as reproducible as the loader's own order.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class BatchStream:
    """An endless iterator of batches across epochs that knows its position ``(epoch, batch_in_epoch)``.

    ``batch_in_epoch`` counts the global batches already *consumed* by the caller (not the ones a worker
    prefetched), which is what a checkpoint must record. Before each epoch the dataset's ``set_epoch(epoch)``
    is called when it has one (for per-epoch augmentation that stays reproducible).
    """

    def __init__(
        self,
        dataset: Dataset,
        sampler: EpochBatchSampler,
        num_workers: int = 0,
        pin_memory: bool = False,
        collate_fn=None,
        epoch: int = 0,
        batch_in_epoch: int = 0,
    ):
        self.dataset, self.sampler = dataset, sampler
        self.num_workers, self.pin_memory, self.collate_fn = num_workers, pin_memory, collate_fn
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch
        self._iterator = None
        self._normalise()

    def _normalise(self) -> None:
        if self.batch_in_epoch >= self.sampler.batches_per_epoch:
            self.epoch += self.batch_in_epoch // self.sampler.batches_per_epoch
            self.batch_in_epoch %= self.sampler.batches_per_epoch

    def _start_epoch(self) -> None:
        self.sampler.epoch, self.sampler.start_batch = self.epoch, self.batch_in_epoch
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(self.epoch)
        # The loader's own generator (seeded by epoch) keeps worker seeding off the global RNG, which the
        # training step owns and the checkpoint restores.
        generator = torch.Generator().manual_seed(epoch_seed(self.sampler.seed + 1, self.epoch))
        loader = DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=generator,
            worker_init_fn=_seed_worker if self.num_workers > 0 else None,
            **({"collate_fn": self.collate_fn} if self.collate_fn is not None else {}),
        )
        self._iterator = iter(loader)

    def __iter__(self):
        return self

    def __next__(self):
        if self._iterator is None:
            self._start_epoch()
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.epoch += 1
            self.batch_in_epoch = 0
            self._start_epoch()
            batch = next(self._iterator)
        self.batch_in_epoch += 1
        return batch

    def position(self) -> dict:
        return {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "samples_in_epoch": self.batch_in_epoch * self.sampler.global_batch,
        }

    def close(self) -> None:
        self._iterator = None  # shuts DataLoader workers down
