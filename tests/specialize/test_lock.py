"""One writer per directory: the lock names its holder, and dies with it, not with its children."""

from __future__ import annotations

import multiprocessing
import socket
import time

import pytest

from specialize.lock import LOCK_FILE, LockHeld, exclusive
from tests.locking import held_by_another_process


def test_a_held_directory_is_refused_naming_the_holder(tmp_path):
    with held_by_another_process(tmp_path) as pid:
        with pytest.raises(LockHeld) as refused:
            with exclusive(tmp_path):
                pass
    assert refused.value.holder.startswith(f"pid {pid} on {socket.gethostname()}, since ")
    with exclusive(tmp_path):  # the holder is gone: free again
        assert (tmp_path / LOCK_FILE).read_text().startswith("pid ")


def test_a_killed_holder_leaves_the_directory_free(tmp_path):
    with held_by_another_process(tmp_path):
        pass  # the context kills the holder with SIGKILL
    with exclusive(tmp_path):
        pass


def test_forked_children_do_not_keep_the_lock(tmp_path):
    """A writer process forked during a save must not hold the directory after its run ended."""
    context = multiprocessing.get_context("fork")
    with exclusive(tmp_path):
        child = context.Process(target=time.sleep, args=(60,))
        child.start()
    try:
        assert child.is_alive()
        with held_by_another_process(tmp_path):  # would hang on readline if the child held it
            pass
    finally:
        child.kill()
        child.join()
