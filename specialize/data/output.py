"""The output directory of ``data prepare`` and ``data prepare-sft``: one writer at a time, and
errors that name the directory instead of a traceback."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from pathlib import Path

from specialize.lock import LOCK_FILE, LockHeld, exclusive

LOCK = LOCK_FILE


class OutputError(ValueError):
    """The output directory cannot be written; the message names it and says why."""


def describe(out_dir: Path, error: OSError) -> str:
    """One line for an OSError met while writing ``out_dir``."""
    where = error.filename or out_dir
    what = error.strerror or str(error)
    if error.errno == errno.ENOSPC:
        return (
            f"cannot write {where}: {what}; free space and run the same command again "
            "(finished work is kept)"
        )
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {where}: {what}; choose a writable output directory (-o)"
    return f"cannot write {where}: {what}"


@contextlib.contextmanager
def writing(out_dir: Path) -> Iterator[None]:
    """Turn an OSError of the enclosed writes into an OutputError naming ``out_dir``."""
    try:
        yield
    except OSError as e:
        raise OutputError(describe(out_dir, e)) from None


@contextlib.contextmanager
def locked(out_dir: Path, command: str) -> Iterator[None]:
    """Create ``out_dir`` if needed and hold its lock (``specialize.lock``) while writing it."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"output {out_dir} is a file, not a directory; choose a directory (-o)")
    with writing(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        try:
            with writing(out_dir):  # the lock file is the first write
                stack.enter_context(exclusive(out_dir))
        except LockHeld as e:
            raise OutputError(
                f"{out_dir} is being written by another `{command}` ({e.holder}; it holds "
                f"{out_dir / LOCK}); wait for it to finish or write elsewhere"
            ) from None
        yield
