"""Atomic checkpoint files: write, list, load (``weights_only=True``), prune.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed over its
final name with :func:`os.replace` (atomic on POSIX and Windows). A process killed at any moment therefore
leaves either the complete new file or no file under that name, and the previous checkpoints are only
pruned after the new one is in place.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{8,})\.pt$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not possible (nor needed) on Windows.
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, write) -> None:
    """Call ``write(file_object)`` on a temporary file next to ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def save_checkpoint(state: dict[str, Any], folder: str | os.PathLike, step: int) -> Path:
    """Atomically write ``state`` as ``folder/step_XXXXXXXX.pt`` and return the path."""
    path = Path(folder) / checkpoint_name(step)
    atomic_write_bytes(path, lambda f: torch.save(state, f))
    return path


def list_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``folder`` as ``(step, path)``, oldest first (temporary files are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = CHECKPOINT_PATTERN.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with ``torch.load(weights_only=True)``: tensors and plain containers only, never code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"{path} is not a fastlatent training checkpoint (no 'step' entry)")
    return state


def load_latest_checkpoint(
    folder: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``folder`` that loads; unreadable newer files are skipped with a warning.

    Returns ``None`` when the folder holds no checkpoint at all.
    """
    candidates = list_checkpoints(folder)
    errors = []
    for _, path in reversed(candidates):
        try:
            return path, load_checkpoint(path, map_location)
        except Exception as exc:  # corrupt or foreign file: fall back to the one before
            errors.append(f"{path.name}: {type(exc).__name__}: {exc}")
            warnings.warn(
                f"fastlatent: checkpoint {path} could not be loaded ({type(exc).__name__}: {exc}); "
                f"trying the previous one",
                RuntimeWarning,
                stacklevel=2,
            )
    if candidates:
        raise RuntimeError(
            f"fastlatent: none of the checkpoints in {folder} could be loaded:\n  " + "\n  ".join(errors)
        )
    return None


def prune_checkpoints(folder: str | os.PathLike, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints (``keep <= 0`` keeps all)."""
    folder = Path(folder)
    checkpoints = list_checkpoints(folder)
    for _, path in checkpoints[:-keep] if keep > 0 else []:
        path.unlink(missing_ok=True)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete ``.step_*.tmp`` files that a process killed mid-write left behind."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for entry in folder.glob(".step_*.tmp"):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
