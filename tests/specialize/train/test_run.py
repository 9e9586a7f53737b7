"""``specialize train`` set-up: what every rank must agree on before a model is built, and the
CUDA environment set before CUDA starts (only on the GPU path)."""

from __future__ import annotations

import pytest

from specialize.config import ParallelConfig
from specialize.train.run import cuda_environment
from tests.distributed import run_distributed


def _layer_specs(rank: int, world_size: int) -> dict[str, str]:
    import base.spec
    from specialize.config import ConfigError, load_config
    from specialize.mcore.distributed import init_distributed
    from specialize.train.run import check_layer_spec

    # Rank 1's node has a Transformer Engine built for another torch; rank 0's works.
    why = None if rank == 0 else "import failed: undefined symbol"
    base.spec.why_not_te = lambda: why
    out = {}
    topo = None
    for spec in ("auto", "local"):
        cfg = load_config(None, ["train.steps=1", f"model.spec={spec}"])
        topo = topo or init_distributed(cfg.parallel)
        try:
            check_layer_spec(cfg, topo)
            out[spec] = "agreed"
        except ConfigError as e:
            out[spec] = str(e)
    return out


def test_ranks_that_resolve_auto_differently_are_refused() -> None:
    out = run_distributed(_layer_specs, world_size=2)
    assert out["auto"] == (
        "model.spec=auto resolves to te on rank 0 but to local on rank 1 (rank 1: import failed: "
        "undefined symbol); install the same Transformer Engine on every node, or set "
        "model.spec=local"
    )
    assert out["local"] == "agreed"


def test_gpu_runs_get_one_connection_with_tp_and_expandable_segments():
    env = cuda_environment(ParallelConfig(tensor=2), cuda=True, environ={})
    assert env == {
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
    }
    # Without tensor parallelism nothing waits on one hardware queue.
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in cuda_environment(
        ParallelConfig(tensor=1), cuda=True, environ={}
    )


def test_cpu_runs_set_nothing():
    assert cuda_environment(ParallelConfig(tensor=2), cuda=False, environ={}) == {}


def test_the_launch_environment_wins_over_defaults_and_fields_win_over_it():
    launched = {
        "CUDA_DEVICE_MAX_CONNECTIONS": "8",
        "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512,expandable_segments:False",
    }
    assert cuda_environment(ParallelConfig(tensor=2), cuda=True, environ=launched) == {}
    fields = ParallelConfig(tensor=2, cuda_device_max_connections=1, expandable_segments=True)
    assert cuda_environment(fields, cuda=True, environ=launched) == {
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",
        "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512,expandable_segments:True",
    }
    # Other allocator settings are kept when expandable segments are added to them.
    env = cuda_environment(
        ParallelConfig(), cuda=True, environ={"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}
    )
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512,expandable_segments:True"


def _environment_before_cuda(rank: int, world_size: int) -> dict:
    import os

    import torch

    from specialize.config import load_config
    from specialize.train.run import set_cuda_environment

    # What `specialize train` does before its process groups: load the recipe (which checks the
    # machine), then set the environment.
    cfg = load_config("configs/base/qwen-nano.yaml", ["model.spec=te", "parallel.tensor=1"])
    started = torch.cuda.is_initialized()
    set_cuda_environment(cfg.parallel)
    return {"started": started, "conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}


@pytest.mark.gpu
def test_nothing_starts_cuda_before_the_environment_is_set():
    from tests.distributed import run_distributed

    out = run_distributed(_environment_before_cuda, world_size=1)
    assert not out["started"]
    assert "expandable_segments" in out["conf"]
