"""An exclusive lock on a run directory, so that a second run into the same folder cannot corrupt the first.

The lock is an ``flock`` on ``<folder>/.fastlatent.lock``: the kernel drops it when the holder exits,
however it exits (SIGKILL included), so a crashed run never leaves a stale lock. The file records who
holds it (pid, host, start time, command line) for the refusal message.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".fastlatent.lock"


class RunDirectoryBusy(RuntimeError):
    """Another live process holds the run directory."""


class RunLock:
    """``with RunLock(folder): ...`` holds ``folder`` exclusively (the folder is created if needed).

    Raises :class:`RunDirectoryBusy` naming the live holder when another process has it. POSIX only
    (``fcntl``); elsewhere the lock is not taken.
    """

    def __init__(self, folder: str | os.PathLike, what: str = "run"):
        self.folder = Path(folder)
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0))
            os.close(fd)
            raise RunDirectoryBusy(
                f"{self.folder} is in use by another {self.what} ({holder}); wait for "
                f"it to finish or stop it, or use another output folder"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:500],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(raw: bytes) -> str:
    try:
        info = json.loads(raw.decode())
        return (
            f"process {info['pid']} on {info['host']}, started {info['started']}: "
            f"{info.get('command') or '?'}"
        )
    except (ValueError, KeyError, UnicodeDecodeError):
        return "a process that has not yet recorded itself"
