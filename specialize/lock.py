"""One writer per directory: a training run, a data preparation, a pipeline.

``exclusive(directory)`` holds a POSIX record lock (``lockf``) on ``directory/.lock`` and writes
who holds it (pid, host, start time) into the file. A record lock belongs to the process alone:
the processes megatron-core forks to write checkpoints, or ``data prepare --processes`` forks to
tokenize, do not inherit it, so an orphaned child cannot keep the directory locked; the kernel
releases it when the process ends, so a killed run leaves nothing to clean up. NFS implements it
across nodes. The file stays: removing it would let a second run lock a new file while a third
still holds the old one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".lock"


class LockHeld(RuntimeError):
    """Another process holds the directory; ``holder`` says who (from the lock file)."""

    def __init__(self, directory: Path, holder: str) -> None:
        super().__init__(f"{directory} is locked by {holder}")
        self.directory, self.holder = directory, holder


@contextlib.contextmanager
def exclusive(directory: str | os.PathLike[str]) -> Iterator[None]:
    """Hold ``directory``'s lock (the directory must exist); raises LockHeld at once if another
    process holds it."""
    directory = Path(directory)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            raise LockHeld(directory, holder) from None
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
