"""One run at a time in a run directory (and one kasa-eval of a checkpoint's split at a time in the folder where it
writes its outputs): an advisory `flock` on a file inside it.

The kernel drops a `flock` when the process that holds it ends, however it ends (SIGKILL, OOM killer, a node
reboot on a local disk), so a killed run never leaves its directory stuck and there is no stale-lock cleanup to get
wrong (on NFS, Linux maps `flock` to the server's byte-range locks, which a dead client also loses). The lock file
also names its holder (pid, host, start time) for the refusal message. It is taken before anything in the directory
is read or written, and held until the process exits."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from kasa.run_dir import CHOOSE_ANOTHER_RUN_DIR, LOCK_FILE, remove_if_empty


LOCK_ATTEMPTS = 20  # the races above resolve in one or two


class RunDirLocked(FileExistsError):
    """Another live process holds the run directory."""


class RunLock:
    """Holds the lock of one run directory from `acquire()` until `release()` or the end of the process; `holders`
    and `way_out` word the refusal for a folder of another kind (kasa-eval's outputs of one split)."""

    def __init__(self, run_dir: str | Path, holders: str = "kasa run", way_out: str = CHOOSE_ANOTHER_RUN_DIR) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.holders, self.way_out = holders, way_out
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        """Take the lock or raise RunDirLocked naming the holder; creates the run directory if needed."""
        for _ in range(LOCK_ATTEMPTS):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # a refused start removed its empty directory in between: make it again
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunDirLocked(
                    f"{self.path.parent} is in use by another {self.holders} ({self.holder()}): wait for it to end, "
                    f"or {self.way_out}"
                ) from None
            if self._names_file_of(fd):
                break
            os.close(fd)  # locked a file that a refused start had just removed (`release`): lock the new one
        else:  # a folder that takes no new file (/proc) fails every time: it looped forever at full CPU
            raise ValueError(f"cannot create {self.path}: {self.path.parent} takes no new files; {self.way_out}")
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    def _names_file_of(self, fd: int) -> bool:
        """Whether the lock file's path still names the file open as `fd`."""
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            return False

    def holder(self) -> str:
        """Who holds the lock, as the holder wrote it (best effort: it may be mid-write)."""
        try:
            info = json.loads(self.path.read_text())
            return f"pid {info['pid']} on {info['host']}, since {info['since']}"
        except (OSError, ValueError, KeyError):
            return "holder unknown"

    def release(self, discard_empty: bool = False) -> None:
        """Drop the lock. The file stays (a process that opened it meanwhile locks the same file), except with
        `discard_empty` when the directory holds nothing else (a start refused before writing anything): the file
        and the directory then go while the lock is still held (a process that opens the file a moment later makes
        a new one, and the directory stays)."""
        if self._fd is not None:
            if discard_empty and [p.name for p in self.path.parent.iterdir()] == [LOCK_FILE]:
                self.path.unlink()
                remove_if_empty(self.path.parent)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None
