"""Run a test body in N gloo processes, each a new process with a clean interpreter state.

The body is a module-level function ``fn(rank, world_size, *args)``; what rank 0 returns comes back
to the test. A failure on any rank fails the test with that rank's traceback.

The processes come from a fork server that has imported torch, megatron-core and the trainer once
(5 s of imports a process, against a fraction of a second to fork; the suite starts many). They
get the test's environment, working directory and ``sys.path`` as spawned ones would.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import socket
import tempfile
import traceback
from pathlib import Path

import torch.multiprocessing as mp

# Imported by the fork server before it forks any test process (a failed import is skipped there).
PRELOAD = ["torch", "torch.distributed", "megatron.core", "specialize.train.run", "transformers"]
multiprocessing.set_forkserver_preload(PRELOAD)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(
    rank: int, world_size: int, port: int, out_dir: str, environ: dict, fn, args: tuple
) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.clear()  # the fork server's is the one it started with
    os.environ.update(environ)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        result = fn(rank, world_size, *args)
        outcome = ("ok", result)
    except BaseException:  # report to the parent instead of hanging the other rank
        outcome = ("error", traceback.format_exc())
    Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(outcome))
    if outcome[0] == "error":
        os._exit(1)
    from specialize.mcore.distributed import shutdown

    shutdown()


def run_distributed(fn, *args, world_size: int = 2):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return rank 0's result."""
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _entry,
            args=(world_size, _free_port(), out_dir, dict(os.environ), fn, args),
            nprocs=world_size,
            join=False,
            start_method="forkserver",
        )
        try:
            while not ctx.join(timeout=600):
                pass
        except mp.ProcessRaisedException:
            pass
        except mp.ProcessExitedException:
            pass
        errors = []
        results = {}
        for rank in range(world_size):
            path = Path(out_dir, f"rank{rank}.pkl")
            if not path.exists():
                errors.append(f"rank {rank}: exited without a result")
                continue
            status, value = pickle.loads(path.read_bytes())
            if status == "error":
                errors.append(f"rank {rank}:\n{value}")
            results[rank] = value
        if errors:
            raise AssertionError("distributed test failed\n" + "\n".join(errors))
        return results[0]
