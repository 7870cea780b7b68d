"""torch.distributed set-up for data-parallel training under ``torchrun``.

``torchrun --nproc_per_node=N script.py`` sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``
and ``MASTER_PORT``; :func:`init_distributed` reads them and starts the process group (NCCL when CUDA is
available, else gloo). A single process (``WORLD_SIZE`` unset or 1) runs without a process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"fastlatent: environment variable {name} must be an integer, got {value!r}"
        ) from None


def dist_info() -> DistInfo:
    """The current process group's rank and size (an initialised group wins over the environment)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    return DistInfo(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))


def init_distributed(backend: str | None = None, device: torch.device | str | None = None) -> DistInfo:
    """Start the default process group from the torchrun environment when ``WORLD_SIZE > 1``.

    Does nothing when a group already exists or for a single process.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default NCCL on CUDA devices, gloo otherwise.
        device: the device this process trains on (decides the default backend; for CUDA the current
            device is set to it before the group starts, as NCCL requires).
    """
    if dist.is_available() and dist.is_initialized():
        return dist_info()
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError(
            "fastlatent: WORLD_SIZE > 1 but this PyTorch build has no torch.distributed support"
        )
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"fastlatent: WORLD_SIZE={world_size} but {', '.join(missing)} not set; "
            f"launch with torchrun (e.g. `torchrun --nproc_per_node={world_size} train.py`)"
        )
    device = torch.device(device) if device is not None else None
    if backend is None:
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("fastlatent: backend 'nccl' needs CUDA devices; use backend='gloo' on CPU")
        torch.cuda.set_device(
            device if device is not None and device.index is not None else _env_int("LOCAL_RANK", 0)
        )
    dist.init_process_group(backend=backend)
    return dist_info()


def default_device(info: DistInfo) -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        if info.local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"fastlatent: LOCAL_RANK={info.local_rank} but only "
                f"{torch.cuda.device_count()} CUDA devices are visible"
            )
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """In-place average over all processes (no-op without a process group); returns ``tensor``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
        tensor.div_(dist.get_world_size())
    return tensor


def all_reduce_gradients(params: list[torch.nn.Parameter], bucket_bytes: int = 25 * 2**20) -> None:
    """Average ``.grad`` of ``params`` over processes, in flat buckets of about ``bucket_bytes``.

    Used for parameters kept out of DDP (the discriminator, whose gradients come from a second backward
    pass). Every process must pass the same parameters in the same order; a missing gradient counts as 0
    so all processes reduce buffers of the same layout.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.nn.Parameter] = []
    size = 0

    def flush():
        if not bucket:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for p in bucket:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n
        bucket.clear()

    by_dtype: dict[tuple, list] = {}
    for p in params:
        by_dtype.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for group in by_dtype.values():
        for p in group:
            bucket.append(p)
            size += p.grad.numel() * p.grad.element_size()
            if size >= bucket_bytes:
                flush()
                size = 0
        flush()
        size = 0


def broadcast_module_state(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Copy ``tensors`` (parameters/buffers) from process ``src`` to all processes."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        with torch.no_grad():
            for t in tensors:
                dist.broadcast(t.data, src=src)
