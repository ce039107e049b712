"""One run at a time in a run directory: an advisory `flock` on a file inside it.

The kernel drops a `flock` when the process that holds it ends, however it ends (SIGKILL, OOM killer, a node
reboot on a local disk), so a killed run never leaves its directory stuck and there is no stale-lock cleanup to get
wrong (on NFS, Linux maps `flock` to the server's byte-range locks, which a dead client also loses). The lock file also names its holder (pid, host, start time) for the refusal message. It is taken before
anything in the directory is read or written, and held until the process exits."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from kasa.run_dir import CHOOSE_ANOTHER_RUN_DIR, LOCK_FILE


class RunDirLocked(FileExistsError):
    """Another live process holds the run directory."""


class RunLock:
    """Holds the lock of one run directory from `acquire()` until `release()` or the end of the process."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        """Take the lock or raise RunDirLocked naming the holder; creates the run directory if needed."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirLocked(
                f"{self.path.parent} is in use by another kasa run ({self.holder()}): wait for it to end, or "
                f"{CHOOSE_ANOTHER_RUN_DIR}"
            ) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    def holder(self) -> str:
        """Who holds the lock, as the holder wrote it (best effort: it may be mid-write)."""
        try:
            info = json.loads(self.path.read_text())
            return f"pid {info['pid']} on {info['host']}, since {info['since']}"
        except (OSError, ValueError, KeyError):
            return "holder unknown"

    def release(self) -> None:
        """Drop the lock; the file stays (removing it would race with a process that just opened it)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None
