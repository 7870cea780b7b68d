"""One trainer for both stages: any module implementing the training protocol.

Protocol (see the package docstring): ``module.training_step(batch, step) -> dict`` with a scalar ``"loss"``
(backpropagated into every trainable parameter except the discriminator's), optionally ``"disc_loss"``
(backpropagated into ``module.discriminator_parameters()`` by a second AdamW) and any scalar metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from fastlatent.training import checkpoint as ckpt
from fastlatent.training.config import DATA_ORDER_FIELDS, PRECISIONS, TrainerConfig
from fastlatent.training.data_order import BatchStream, EpochBatchSampler
from fastlatent.training.distributed import (
    DistInfo,
    all_reduce_gradients,
    all_reduce_mean,
    broadcast_module_state,
    default_device,
    dist_info,
    init_distributed,
)
from fastlatent.training.ema import EMA
from fastlatent.training.fingerprint import fingerprint_differences, run_fingerprint
from fastlatent.training.logging import MetricsLogger, plot_metrics
from fastlatent.training.run_lock import RunDirectoryBusy, RunLock
from fastlatent.training.schedules import LRSchedule

CHECKPOINT_FORMAT = 1


@dataclasses.dataclass
class Callback:
    """A function run every ``every`` steps (and at the end when ``at_end``) with the trainer.

    ``fn(trainer)`` may return a dict of scalars; it is logged as a record with ``"kind": "eval"`` and
    the current step (e.g. reconstruction PSNR of ``trainer.ema_model()`` on held-out data, or a sample
    grid written to ``trainer.out_dir``). It runs on rank 0 only unless ``all_ranks`` (needed when it
    uses collectives). Callbacks run with their own copy of the RNG state, so evaluating or sampling
    never changes the training run's random stream: a run's loss curve does not depend on its callbacks.
    """

    fn: Callable[[Trainer], Mapping[str, Any] | None]
    every: int
    at_end: bool = True
    all_ranks: bool = False

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"Callback: fn must be callable, got {type(self.fn).__name__}")
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 1:
            raise ValueError(f"Callback: every must be an int >= 1, got {self.every!r}")


class _TrainingStepModule(nn.Module):
    """Makes ``training_step`` the forward of a module, so DistributedDataParallel can wrap it."""

    def __init__(self, task: nn.Module):
        super().__init__()
        self.task = task

    def forward(self, batch, step: int):
        return self.task.training_step(batch, step)


def _to_device(batch, device: torch.device, non_blocking: bool):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_to_device(b, device, non_blocking) for b in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device, non_blocking) for b in batch)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device, non_blocking) for k, v in batch.items()}
    return batch


def _autocast_supported(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when autocast to ``dtype`` (and, for fp16, a GradScaler) works on ``device``, else why not."""
    try:
        if not torch.amp.autocast_mode.is_autocast_available(device.type):
            return f"autocast is not available for device type {device.type!r}"
        if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            return f"{torch.cuda.get_device_name(device)} has no bf16 support"
        with torch.autocast(device.type, dtype=dtype):
            probe = torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)
        if probe.dtype != dtype:
            return f"autocast on {device.type} computed a matmul in {probe.dtype}, not {dtype}"
        if dtype == torch.float16:
            torch.amp.GradScaler(device.type)
    except Exception as exc:  # the build or device decides; report its words
        return f"{type(exc).__name__}: {exc}"
    return None


def _rng_state() -> dict:
    numpy_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # numpy's key array as a tensor: weights_only loading accepts tensors, not ndarrays.
        "numpy": {
            "name": numpy_state[0],
            "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "pos": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
        else:
            warnings.warn(
                f"fastlatent: the checkpoint holds RNG states for {len(cuda_states)} CUDA devices, "
                f"this process sees {torch.cuda.device_count()}; CUDA random streams are not "
                f"restored",
                RuntimeWarning,
                stacklevel=3,
            )


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class Trainer:
    """Trains any module that implements the training protocol.

    Example::

        trainer = Trainer(model, out_dir="runs/ae", steps=5000, batch_size=64, lr=2e-4, warmup_steps=200,
                          precision="bf16", ema_decay=0.999, checkpoint_every=500)
        trainer.fit(DigitsDataset(split="train"))
        ema = trainer.ema_model()

    Under ``torchrun --nproc_per_node=N`` the trainer starts the process group from the environment (NCCL
    on GPUs, gloo on CPU), wraps the module in DistributedDataParallel, shards each global batch over the
    processes, averages the logged metrics over them, and writes files only on rank 0.

    A killed run restarted with the same arguments resumes from the newest complete checkpoint in
    ``out_dir/checkpoints`` with the same data order, weights, optimizer, scaler, EMA and RNG states; on
    the CPU its loss curve is identical to an uninterrupted run's (CUDA kernels are not all deterministic).

    Args:
        module: the task module (``training_step``; optional ``discriminator_parameters``).
        config: a :class:`TrainerConfig`; keyword arguments override its fields or, without a config,
            make one (``out_dir`` and ``steps`` are then required).
        callbacks: :class:`Callback` objects, or ``(every, fn)`` pairs.
        device: default ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU.
    """

    def __init__(
        self,
        module: nn.Module,
        config: TrainerConfig | None = None,
        *,
        callbacks: Iterable[Callback | tuple[int, Callable]] = (),
        device: torch.device | str | None = None,
        **overrides,
    ):
        if config is None:
            missing = [name for name in ("out_dir", "steps") if name not in overrides]
            if missing:
                raise TypeError(
                    f"Trainer: pass a TrainerConfig or at least {' and '.join(missing)} as keyword arguments"
                )
            config = TrainerConfig(**overrides)
        elif not isinstance(config, TrainerConfig):
            raise TypeError(f"Trainer: config must be a TrainerConfig, got {type(config).__name__}")
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.out_dir = Path(config.out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"

        if not isinstance(module, nn.Module):
            raise TypeError(f"Trainer: module must be a torch.nn.Module, got {type(module).__name__}")
        if not callable(getattr(module, "training_step", None)):
            raise TypeError(
                f"Trainer: {type(module).__name__} has no training_step(batch, step) method; the "
                f"trainer trains task modules implementing the training protocol (training_step "
                f"returning a dict with a 'loss')"
            )
        self.module = module
        self.callbacks = [_as_callback(c) for c in callbacks]

        # Device and process group.
        env = dist_info()
        if device is None:
            device = default_device(env)
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"Trainer: device={str(device)!r} but CUDA is not available; use device='cpu'")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", env.local_rank if env.enabled else torch.cuda.current_device())
        self.device = device
        self.dist: DistInfo = init_distributed(device=device)

        self.autocast_dtype = PRECISIONS[config.precision]
        if self.autocast_dtype is not None:
            problem = _autocast_supported(device, self.autocast_dtype)
            if problem is not None:
                raise ValueError(
                    f"Trainer: precision={config.precision!r} is not supported on {device} with "
                    f"this PyTorch build ({problem}); use precision='bf16' or 'fp32'"
                )

        module.to(device)
        self.disc_params = self._discriminator_parameters(module)
        disc_ids = {id(p) for p in self.disc_params}
        self.params = [p for p in module.parameters() if p.requires_grad and id(p) not in disc_ids]
        if not self.params:
            raise ValueError(
                f"Trainer: {type(module).__name__} has no trainable parameters besides the "
                f"discriminator (all have requires_grad=False)"
            )

        fused = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            self._param_groups(self.params, config.weight_decay),
            lr=config.lr,
            betas=config.betas,
            fused=fused,
        )
        self.disc_optimizer = None
        if self.disc_params:
            disc_wd = config.weight_decay if config.disc_weight_decay is None else config.disc_weight_decay
            self.disc_optimizer = torch.optim.AdamW(
                self._param_groups(self.disc_params, disc_wd),
                lr=config.disc_lr or config.lr,
                betas=config.disc_betas or config.betas,
                fused=fused,
            )
        self.schedule = LRSchedule(config.schedule, config.steps, config.warmup_steps, config.min_lr_ratio)
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
        # what this run trains, stored in each checkpoint: a resume of a different run is refused
        self.fingerprint = run_fingerprint(module, config.to_dict())
        self.ema = (
            EMA(module, config.ema_decay, config.ema_start, exclude=self.disc_params)
            if config.ema_decay is not None
            else None
        )

        self.ddp = None
        if self.dist.enabled:
            self._wrap_ddp()

        self.step = 0  # optimizer steps done
        self.epoch = 0
        self.history: list[dict] = []
        self._elapsed_before = 0.0  # training seconds of earlier (interrupted) runs

    # ------------------------------------------------------------------ set-up helpers

    @staticmethod
    def _discriminator_parameters(module: nn.Module) -> list[nn.Parameter]:
        getter = getattr(module, "discriminator_parameters", None)
        if getter is None:
            return []
        params = list(getter())
        owned = {id(p) for p in module.parameters()}
        seen = set()
        result = []
        for i, p in enumerate(params):
            if not isinstance(p, nn.Parameter):
                raise TypeError(
                    f"Trainer: {type(module).__name__}.discriminator_parameters() must return "
                    f"Parameters, item {i} is a {type(p).__name__}"
                )
            if id(p) not in owned:
                raise ValueError(
                    f"Trainer: {type(module).__name__}.discriminator_parameters() item {i} is "
                    f"not a parameter of the module (register the discriminator as a "
                    f"submodule)"
                )
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                result.append(p)
        return result

    def _param_groups(self, params: list[nn.Parameter], weight_decay: float) -> list[dict]:
        if self.config.decay_all_params or weight_decay == 0:
            return [{"params": params, "weight_decay": weight_decay}]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        return [
            g
            for g in (
                {"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            )
            if g["params"]
        ]

    def _wrap_ddp(self) -> None:
        wrapper = _TrainingStepModule(self.module)
        if self.disc_params:
            # The discriminator gets its gradient from a second backward pass, which DDP's once-per-forward
            # reducer can't take; its gradients are averaged by hand (all_reduce_gradients). DDP's documented
            # workaround for excluding parameters (pytorch issue 43690) is this static method.
            disc_ids = {id(p) for p in self.disc_params}
            ignored = [name for name, p in wrapper.named_parameters() if id(p) in disc_ids]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(wrapper, ignored)
            broadcast_module_state(self.disc_params)
        self.ddp = DistributedDataParallel(
            wrapper,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=self.config.find_unused_parameters,
        )

    # ------------------------------------------------------------------ public helpers

    def ema_model(self) -> nn.Module:
        """The module holding the EMA weights (eval mode), or the live module when the EMA is off."""
        return self.ema.module if self.ema is not None else self.module

    @property
    def global_batch_size(self) -> int:
        return self.config.batch_size * self.dist.world_size * self.config.grad_accum_steps

    def lr_at(self, step: int) -> float:
        """Learning rate of the main optimizer for update ``step`` (0-based)."""
        return self.config.lr * self.schedule.factor(step)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self, stream: BatchStream | None = None) -> dict:
        """Everything needed to continue the run (tensors and plain containers only)."""
        position = (
            stream.position()
            if stream is not None
            else {"epoch": self.epoch, "batch_in_epoch": 0, "samples_in_epoch": 0}
        )
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "data": {
                **position,
                "num_samples": stream.sampler.num_samples if stream is not None else None,
                "world_size": self.dist.world_size,
            },
            "module_class": type(self.module).__name__,
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "disc_optimizer": self.disc_optimizer.state_dict() if self.disc_optimizer is not None else None,
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "lr_schedule": self.schedule.state_dict(),
            "config": self.config.to_dict(),
            "fingerprint": self.fingerprint,
            "elapsed": self._elapsed_before + self._elapsed_this_run(),
        }

    def _elapsed_this_run(self) -> float:
        start = getattr(self, "_run_start", None)
        return 0.0 if start is None else time.perf_counter() - start

    def save_checkpoint(self, stream: BatchStream | None = None) -> Path | None:
        """Write ``checkpoints/step_XXXXXXXX.pt`` (rank 0; every rank must call it for the RNG gather)."""
        rng = _rng_state()
        if self.dist.enabled:
            gathered: list = [None] * self.dist.world_size
            dist.all_gather_object(gathered, rng)
            rngs = gathered
        else:
            rngs = [rng]
        path = None
        if self.dist.is_main:
            state = self.state_dict(stream)
            state["rng"] = rngs
            path = ckpt.save_checkpoint(state, self.checkpoint_dir, self.step)
            ckpt.prune_checkpoints(self.checkpoint_dir, self.config.keep_checkpoints)
        if self.dist.enabled:
            dist.barrier()
        return path

    def _find_resume_checkpoint(self) -> dict | None:
        """Rank 0 picks the newest loadable checkpoint; every rank loads that same file."""
        chosen = None
        if self.dist.is_main:
            ckpt.remove_stale_temporaries(self.checkpoint_dir)
            found = ckpt.load_latest_checkpoint(self.checkpoint_dir)
            chosen = str(found[0]) if found is not None else None
        if self.dist.enabled:
            box = [chosen]
            dist.broadcast_object_list(box, src=0)
            chosen = box[0]
        if chosen is None:
            return None
        return ckpt.load_checkpoint(chosen)

    def load_state_dict(self, state: dict, dataset_len: int | None = None) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` (module, optimizers, scaler, EMA, RNG)."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"Trainer: checkpoint format {state.get('format')!r} is not {CHECKPOINT_FORMAT}")
        if state.get("module_class") != type(self.module).__name__:
            raise ValueError(
                f"Trainer: the checkpoint was written for a {state.get('module_class')}, this "
                f"trainer trains a {type(self.module).__name__}; use another out_dir or "
                f"resume=False"
            )
        saved = state.get("config", {})
        changed = [
            f"{name}: {saved.get(name)!r} -> {getattr(self.config, name)!r}"
            for name in DATA_ORDER_FIELDS
            if saved.get(name) != getattr(self.config, name)
        ]
        if changed:
            raise ValueError(
                f"Trainer: cannot resume from the checkpoint in {self.checkpoint_dir}: settings "
                f"that decide the data order changed ({'; '.join(changed)}); use another "
                f"out_dir, or resume=False to start over"
            )
        if "fingerprint" in state:
            differences = fingerprint_differences(state["fingerprint"], self.fingerprint)
            if differences:
                raise ValueError(
                    f"Trainer: cannot resume from the checkpoint in {self.checkpoint_dir}: it "
                    f"was written by a different run ({'; '.join(differences)}); use another "
                    f"out_dir, or resume=False to start over"
                )
        if saved.get("steps") != self.config.steps:
            warnings.warn(
                f"fastlatent: resuming with steps={self.config.steps} (checkpoint run had "
                f"{saved.get('steps')}); the learning-rate schedule now follows the new length",
                RuntimeWarning,
                stacklevel=3,
            )
        data = state["data"]
        if dataset_len is not None and data.get("num_samples") not in (None, dataset_len):
            warnings.warn(
                f"fastlatent: the dataset has {dataset_len} samples, the checkpointed run had "
                f"{data['num_samples']}; the data order differs from the interrupted run",
                RuntimeWarning,
                stacklevel=3,
            )
        try:
            self.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.disc_optimizer is not None:
                if state.get("disc_optimizer") is None:
                    raise ValueError(
                        "the checkpoint has no discriminator optimizer state but the module "
                        "has a discriminator"
                    )
                self.disc_optimizer.load_state_dict(state["disc_optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ValueError(
                f"Trainer: the checkpoint in {self.checkpoint_dir} does not fit this module and "
                f"optimizer (architecture, frozen parameters or weight_decay changed?): {exc}; "
                f"use another out_dir or resume=False"
            ) from exc
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
            else:
                warnings.warn(
                    "fastlatent: the checkpoint has no EMA weights; the EMA restarts from the "
                    "current weights",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self.ema.update(self.module, step=-1)  # a copy: step -1 is before any start step
        self.step = int(state["step"])
        self.epoch = int(data["epoch"])
        self._elapsed_before = float(state.get("elapsed", 0.0))
        rngs = state.get("rng") or []
        if len(rngs) == self.dist.world_size:
            _set_rng_state(rngs[self.dist.rank])
        else:
            warnings.warn(
                f"fastlatent: the checkpoint was written by {len(rngs)} processes, this run has "
                f"{self.dist.world_size}; random streams are re-seeded, not restored",
                RuntimeWarning,
                stacklevel=3,
            )
            seed_everything(self.config.seed + self.dist.rank + 1_000_003 * self.step)

    # ------------------------------------------------------------------ training

    def _split_outputs(self, out) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        name = type(self.module).__name__
        if not isinstance(out, Mapping):
            raise TypeError(
                f"Trainer: {name}.training_step must return a dict of tensors with a 'loss' "
                f"entry, got {type(out).__name__}"
            )
        if "loss" not in out:
            raise ValueError(
                f"Trainer: {name}.training_step returned no 'loss' entry (keys: {sorted(out)}); "
                f"the protocol needs the scalar loss to backpropagate under 'loss'"
            )
        loss = out["loss"]
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = list(loss.shape) if isinstance(loss, torch.Tensor) else ""
            raise ValueError(
                f"Trainer: {name}.training_step()['loss'] must be a scalar tensor, got "
                f"{type(loss).__name__}{shape}"
            )
        if not loss.requires_grad:
            raise ValueError(
                f"Trainer: {name}.training_step()['loss'] does not require grad: no trainable "
                f"parameter contributed to it (is the module frozen, or computed under "
                f"no_grad?)"
            )
        disc_loss = out.get("disc_loss")
        if disc_loss is not None:
            if not self.disc_params:
                raise ValueError(
                    f"Trainer: {name}.training_step returned a 'disc_loss' but the module has "
                    f"no discriminator_parameters() (or they are all frozen)"
                )
            scalar = isinstance(disc_loss, torch.Tensor) and disc_loss.numel() == 1
            if not (scalar and disc_loss.requires_grad):
                raise ValueError(
                    f"Trainer: {name}.training_step()['disc_loss'] must be a scalar tensor that requires grad"
                )
        metrics = {}
        for key, value in out.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(
                        f"Trainer: {name}.training_step()[{key!r}] must be a scalar to be "
                        f"logged, got shape {list(value.shape)}"
                    )
                metrics[key] = value.detach().reshape(()).float()
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[key] = torch.tensor(float(value), device=self.device)
            else:
                raise ValueError(
                    f"Trainer: {name}.training_step()[{key!r}] must be a scalar tensor or "
                    f"number, got {type(value).__name__}"
                )
        return loss.reshape(()), (disc_loss.reshape(()) if disc_loss is not None else None), metrics

    def _set_lr(self) -> float:
        factor = self.schedule.factor(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * factor
        if self.disc_optimizer is not None:
            for group in self.disc_optimizer.param_groups:
                group["lr"] = (self.config.disc_lr or self.config.lr) * factor
        return factor

    def _train_step(self, stream: BatchStream) -> dict[str, torch.Tensor]:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns detached metric tensors."""
        config = self.config
        accum = config.grad_accum_steps
        self._set_lr()
        totals: dict[str, torch.Tensor] = {}
        disc_stepped = False
        forward = self.ddp if self.ddp is not None else self.module.training_step
        for micro in range(accum):
            batch = _to_device(next(stream), self.device, non_blocking=self.device.type == "cuda")
            accumulating = self.ddp is not None and micro < accum - 1
            sync = self.ddp.no_sync() if accumulating else contextlib.nullcontext()
            with sync:
                with torch.autocast(
                    self.device.type,
                    dtype=self.autocast_dtype or torch.float32,
                    enabled=self.autocast_dtype is not None,
                ):
                    out = forward(batch, self.step)
                loss, disc_loss, metrics = self._split_outputs(out)
                # The generator loss reaches the discriminator's weights too (through D(fake)); those
                # gradients must not train the discriminator, so they are dropped after this backward.
                held = [p.grad for p in self.disc_params]
                for p in self.disc_params:
                    p.grad = None
                self.scaler.scale(loss / accum).backward()
                for p, g in zip(self.disc_params, held):
                    p.grad = g
                if disc_loss is not None:
                    self.scaler.scale(disc_loss / accum).backward(inputs=self.disc_params)
                    disc_stepped = True
            for key, value in metrics.items():
                totals[key] = totals[key] + value / accum if key in totals else value / accum

        if disc_stepped and self.dist.enabled:
            all_reduce_gradients(self.disc_params)
        self.scaler.unscale_(self.optimizer)
        totals["grad_norm"] = _clip(self.params, config.grad_clip)
        self.scaler.step(self.optimizer)
        if disc_stepped:
            self.scaler.unscale_(self.disc_optimizer)
            clip = config.disc_grad_clip if config.disc_grad_clip is not None else config.grad_clip
            totals["disc_grad_norm"] = _clip(self.disc_params, clip)
            self.scaler.step(self.disc_optimizer)
        if self.scaler.is_enabled():
            totals["loss_scale"] = torch.tensor(self.scaler.get_scale(), device=self.device)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.disc_optimizer is not None:
            self.disc_optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.module, self.step)
        self.step += 1
        return totals

    def _reduce_metrics(self, totals: dict[str, torch.Tensor]) -> dict[str, float]:
        keys = sorted(totals)
        values = torch.stack([totals[k].to(self.device, torch.float32) for k in keys])
        all_reduce_mean(values)
        return dict(zip(keys, values.tolist()))

    def _run_callbacks(self, at_end: bool, logger: MetricsLogger | None) -> None:
        for callback in self.callbacks:
            due = self.step % callback.every == 0 or (at_end and callback.at_end)
            if not due or not (callback.all_ranks or self.dist.is_main):
                continue
            devices = [self.device] if self.device.type == "cuda" else []
            python_state, numpy_state = random.getstate(), np.random.get_state()
            try:
                with torch.random.fork_rng(devices=devices):
                    result = callback.fn(self)
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)
            self.module.train()
            if result and logger is not None:
                record = {"step": self.step, "kind": "eval"}
                record.update({k: float(v) for k, v in dict(result).items()})
                logger.log(record)

    def fit(self, dataset) -> dict:
        """Train until ``config.steps`` optimizer steps are done, resuming from ``out_dir`` when allowed.

        The run holds ``out_dir`` exclusively while it trains: a second run into the same folder raises
        :class:`~fastlatent.training.run_lock.RunDirectoryBusy` naming the live process, before touching any
        file.

        Args:
            dataset: a map-style dataset (``__len__``, ``__getitem__``) whose items collate into the batches
                ``module.training_step`` expects.

        Returns:
            The last training metrics record (``{}`` when the run was already complete).
        """
        lock = RunLock(self.out_dir, "training run") if self.dist.is_main else None
        busy = None
        if lock is not None:
            try:
                lock.acquire()
            except RunDirectoryBusy as exc:
                busy = exc
        if self.dist.enabled:  # every rank refuses together (no rank left waiting in a collective)
            box = [None if busy is None else str(busy)]
            dist.broadcast_object_list(box, src=0)
            busy = busy or (RunDirectoryBusy(box[0]) if box[0] is not None else None)
        if busy is not None:
            raise busy
        try:
            return self._fit(dataset)
        finally:
            if lock is not None:
                lock.release()

    def _fit(self, dataset) -> dict:
        config = self.config
        try:
            num_samples = len(dataset)
        except TypeError:
            raise TypeError(
                f"Trainer.fit: dataset must be a map-style dataset with __len__, got {type(dataset).__name__}"
            ) from None
        if num_samples == 0:
            raise ValueError("Trainer.fit: the dataset is empty")
        sampler = EpochBatchSampler(
            num_samples,
            config.batch_size,
            seed=config.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            shuffle=config.shuffle,
        )

        state = self._find_resume_checkpoint() if config.resume else None
        if state is not None:
            self.load_state_dict(state, num_samples)
            data = state["data"]
            batch_in_epoch = int(data["samples_in_epoch"]) // sampler.global_batch
            resume_step = self.step
            del state
        else:
            seed_everything(config.seed + self.dist.rank)
            batch_in_epoch = 0
            resume_step = None
        stream = BatchStream(
            dataset,
            sampler,
            num_workers=config.num_workers,
            pin_memory=self.device.type == "cuda",
            epoch=self.epoch,
            batch_in_epoch=batch_in_epoch,
        )

        logger = None
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            payload = json.dumps(config.to_dict(), indent=2).encode()
            ckpt.atomic_write_bytes(self.out_dir / "trainer_config.json", lambda f: f.write(payload))
            logger = MetricsLogger(self.out_dir, resume_step=resume_step if resume_step is not None else None)
            self.history = logger.records

        if self.step >= config.steps:
            if logger is not None:
                logger.close()
            return {}

        progress = None
        if config.progress and self.dist.is_main and sys.stderr.isatty():
            progress = tqdm(total=config.steps, initial=self.step, desc="train", dynamic_ncols=True)

        self.module.train()
        self._run_start = time.perf_counter()
        last_log_time, last_log_step = self._run_start, self.step
        last_record: dict = {}
        try:
            while self.step < config.steps:
                totals = self._train_step(stream)
                self.epoch = stream.epoch
                final = self.step >= config.steps
                if progress is not None:
                    progress.update(1)
                if self.step % config.log_every == 0 or final:
                    values = self._reduce_metrics(totals)
                    now = time.perf_counter()
                    record = {"step": self.step, "epoch": stream.epoch, "lr": self.lr_at(self.step - 1)}
                    if self.disc_optimizer is not None:
                        disc_lr = config.disc_lr or config.lr
                        record["disc_lr"] = disc_lr * self.schedule.factor(self.step - 1)
                    record.update(values)
                    record["time"] = self._elapsed_before + (now - self._run_start)
                    record["samples_per_s"] = (
                        (self.step - last_log_step) * self.global_batch_size / max(now - last_log_time, 1e-9)
                    )
                    last_log_time, last_log_step = now, self.step
                    self._check_finite(record)
                    if logger is not None:
                        logger.log(record)
                    if progress is not None:
                        progress.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{record['lr']:.3g}")
                    last_record = record
                overhead_start = time.perf_counter()
                self._run_callbacks(at_end=final, logger=logger)
                if self.step % config.checkpoint_every == 0 or final:
                    self.save_checkpoint(stream)
                    if logger is not None and config.plots and config.plot_every is None:
                        logger.plot()
                if (
                    logger is not None
                    and config.plots
                    and config.plot_every is not None
                    and (self.step % config.plot_every == 0 or final)
                ):
                    logger.plot()
                # Throughput counts training only, not evaluation callbacks, checkpoints or plots.
                last_log_time += time.perf_counter() - overhead_start
        finally:
            stream.close()
            if progress is not None:
                progress.close()
            if logger is not None:
                logger.close()
        return last_record

    def _check_finite(self, record: dict) -> None:
        # fp16 overflows are the GradScaler's business (it skips those steps); elsewhere a non-finite
        # loss means the weights are gone, and continuing would only overwrite good checkpoints.
        if self.autocast_dtype == torch.float16:
            return
        if not math.isfinite(record["loss"]):
            good = ckpt.list_checkpoints(self.checkpoint_dir)
            where = f"the last checkpoint is {good[-1][1]}" if good else "no checkpoint was written yet"
            raise FloatingPointError(
                f"Trainer: the loss is {record['loss']} at step {self.step} ({where}); "
                f"lower lr, raise warmup_steps, set grad_clip, or train in fp32"
            )

    def plot(self, path: str | None = None) -> None:
        """Draw the logged curves to ``path`` (default ``out_dir/metrics.png``)."""
        plot_metrics(self.history, path or self.out_dir / "metrics.png")


def _clip(params: list[nn.Parameter], max_norm: float | None) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if max_norm is None:
        return torch.nn.utils.get_total_norm(grads).detach()
    return torch.nn.utils.clip_grad_norm_(params, max_norm).detach()


def _as_callback(item) -> Callback:
    if isinstance(item, Callback):
        return item
    if isinstance(item, tuple) and len(item) == 2:
        return Callback(fn=item[1], every=item[0])
    raise TypeError(f"Trainer: callbacks must be Callback objects or (every, fn) pairs, got {item!r}")
