"""Process groups and megatron-core parallel state, for torchrun and single-process runs."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from specialize.config import ParallelConfig
from specialize.mcore import cpu_bridge


@dataclass(frozen=True)
class Topology:
    """Where this process sits."""

    rank: int
    world_size: int
    tensor_rank: int
    pipeline_rank: int
    data_rank: int
    data_parallel: int
    device: torch.device


def backend_for(requested: str) -> str:
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("parallel.backend=nccl needs CUDA; use gloo or auto on this machine")
    return requested


def init_distributed(par: ParallelConfig, timeout_minutes: int = 30) -> Topology:
    """Start the process group (torchrun's env, or a single local process) and megatron's groups."""
    cpu_bridge.install()
    if "RANK" not in os.environ:  # plain `python -m specialize train`: a world of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    backend = backend_for(par.backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=par.tensor,
        pipeline_model_parallel_size=par.pipeline,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline,
        distributed_timeout_minutes=timeout_minutes,
    )
    return Topology(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        tensor_rank=parallel_state.get_tensor_model_parallel_rank(),
        pipeline_rank=parallel_state.get_pipeline_model_parallel_rank(),
        data_rank=parallel_state.get_data_parallel_rank(),
        data_parallel=parallel_state.get_data_parallel_world_size(),
        device=device,
    )


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch; megatron's tracker gives each TP rank its own stream."""
    pipeline_offset = 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed + pipeline_offset)
    np.random.seed(seed + pipeline_offset)
    torch.manual_seed(seed + pipeline_offset)
    tensor_parallel.model_parallel_cuda_manual_seed(seed + pipeline_offset)


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
