"""A checkpoint's tensors and training state with megatron-core ``dist_checkpointing``: save and
load of an engine (model, optimizer, scheduler, RNG, progress) or of a single model.

Model and optimizer tensors are saved as sharded tensors (any TP/PP/DP can load them; the optimizer
state in one of two formats, below); RNG states are per (PP, TP) rank and restored when the layout
matches. Where the files go, and which checkpoints count, is ``specialize.checkpoint.layout``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import pickle
import queue
import random
import shutil
import signal
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies import filesystem_async

from base.presets import QwenPreset
from specialize import config as config_mod
from specialize.checkpoint.architecture import check_architecture, write_architecture
from specialize.checkpoint.layout import (
    GENERATION_CONFIG_FILE,
    REQUIRED_FILES,
    CheckpointError,
    iteration_dir,
    make_way_for,
    mark_latest,
    partial_dir,
    prune,
    remove_partial_saves,
    verify_checkpoint,
    write_checksums,
)
from specialize.checkpoint.lineage import (
    conversion_record,
    lineage_record,
    parallel_layout,
    write_lineage,
)
from specialize.train.engine import Engine

log = logging.getLogger(__name__)

# The distributed optimizer's two checkpoint formats in megatron-core 0.16.1 (its default,
# 'fully_sharded_model_space', fails to save there). DP_RESHARDABLE: each rank saves and loads its
# own shard, per gradient bucket; only the data-parallel size may change. FULLY_RESHARDABLE: any
# layout resumes it, but the save gathers each TP/PP shard's state on its data-parallel rank 0 and
# every rank's load holds that whole shard in host memory: 12 bytes (fp32 weight and Adam moments)
# per parameter / (TP x PP), ~43 GiB per GPU for Qwen-7B at TP=2. Megatron-LM saves DP_RESHARDABLE
# unless told otherwise and refuses a TP/PP change on it (megatron/training/checkpointing.py,
# core_v0.16.1); here a run's final checkpoint, which other runs load, is fully reshardable
# (``parallel.reshardable_optimizer_state``).
DP_RESHARDABLE = "dp_reshardable"
FULLY_RESHARDABLE = "fully_reshardable"
_OPTIMIZER_METADATA = {
    DP_RESHARDABLE: {"distrib_optim_sharding_type": DP_RESHARDABLE},
    # The mem-efficient exchange gathers over gloo; the other one calls .cuda() in 0.16.1.
    FULLY_RESHARDABLE: {
        "distrib_optim_sharding_type": FULLY_RESHARDABLE,
        "distrib_optim_fully_reshardable_mem_efficient": True,
    },
}


# ----------------------------------------------------------------------------- writer processes

# dist_checkpointing's torch_dist save forks one writer process per file and hosts their results
# queue in a spawned Manager process. Killed mid-save, the trainer left both behind (the writers
# with the trainer's memory, blocked forever on a queue lock). Saves here are synchronous, so the
# results are put and read in this very process and need no Manager (the queue is megatron-core
# 0.16.1's ``filesystem_async._results_queue``); the writers are told to die with the trainer.
_PR_SET_PDEATHSIG = 1
_saving_pid: int | None = None  # set while this process runs a save: its forks are its writers
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def _die_with_saving_parent() -> None:
    """In a child forked during a save (a writer): be killed when the saving process dies."""
    global _saving_pid
    parent, _saving_pid = _saving_pid, None
    if parent is None or _prctl is None:
        return
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


os.register_at_fork(after_in_child=_die_with_saving_parent)


@contextlib.contextmanager
def _writers_die_with_this_process() -> Iterator[None]:
    global _saving_pid
    filesystem_async._results_queue = queue.Queue()
    _saving_pid = os.getpid()
    try:
        yield
    finally:
        _saving_pid = None


# ----------------------------------------------------------------------------- state


def _rng_state() -> dict:
    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object() -> ShardedObject:
    return ShardedObject(
        "rng_state",
        _rng_state(),
        (
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_world_size(),
        ),
        (
            parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_rank(),
        ),
        replica_id=parallel_state.get_data_parallel_rank(),
    )


def _model_state(engine: Engine) -> dict:
    if len(engine.model) == 1:
        return {"model": engine.model[0].module.sharded_state_dict()}
    return {f"model{i}": chunk.module.sharded_state_dict() for i, chunk in enumerate(engine.model)}


def optimizer_format(cfg: config_mod.RecipeConfig, iteration: int, steps: int) -> str:
    """The format a save at ``iteration`` of a ``steps``-step run writes the optimizer in."""
    reshardable = cfg.parallel.reshardable_optimizer_state
    if reshardable is None:
        reshardable = iteration >= steps  # the final checkpoint: other runs load it
    return FULLY_RESHARDABLE if reshardable else DP_RESHARDABLE


def _buckets(engine: Engine) -> list:
    """This rank's gradient buckets (dtypes and parameters per bucket), the layout of its
    dp_reshardable optimizer state."""
    record = []
    for optimizer in getattr(engine.optimizer, "chained_optimizers", [engine.optimizer]):
        buffers = getattr(optimizer, "per_bucket_numel_unpadded", None) or []
        record.append([[str(k), list(v)] for buffer in buffers for k, v in buffer.items()])
    return record


def _stage_key() -> str:
    """This rank's (pipeline, tensor) coordinates; its data-parallel peers share its buckets."""
    return (
        f"pp{parallel_state.get_pipeline_model_parallel_rank()}"
        f".tp{parallel_state.get_tensor_model_parallel_rank()}"
    )


def _optimizer_record(engine: Engine, fmt: str) -> dict:
    """What a load must know about a checkpoint's optimizer state before it asks for it (saved
    with the common state, which rank 0 writes: the buckets of every (PP, TP) rank are in it)."""
    buckets = [None] * dist.get_world_size()
    dist.all_gather_object(buckets, (_stage_key(), _buckets(engine)))
    layout = parallel_layout()
    return {
        "format": fmt,
        "tensor": layout["tensor"],
        "pipeline": layout["pipeline"],
        "buckets": dict(buckets),
    }


def loadable_optimizer_format(path: Path, record: dict | None, engine: Engine) -> str:
    """The optimizer format of checkpoint ``path`` (``record``: what its save wrote; older
    checkpoints were fully reshardable), or a CheckpointError (on every rank) when this run
    cannot load it."""
    if record is None or not engine.cfg.parallel.distributed_optimizer:
        return FULLY_RESHARDABLE  # a plain optimizer's state reshards anyway
    if record["format"] != DP_RESHARDABLE:
        return record["format"]
    here = parallel_layout()
    if (record["tensor"], record["pipeline"]) != (here["tensor"], here["pipeline"]):
        raise CheckpointError(
            f"{path}: its optimizer state is saved per data-parallel shard (dp_reshardable), "
            f"which resumes at TP={record['tensor']} PP={record['pipeline']} only, not at "
            f"TP={here['tensor']} PP={here['pipeline']}; resume at that layout, or start from "
            "its weights with init=PATH (parallel.reshardable_optimizer_state=true saves "
            "checkpoints any layout resumes)"
        )
    same = record["buckets"].get(_stage_key()) == _buckets(engine)
    agree = torch.tensor(int(same), device=engine.topo.device)
    dist.all_reduce(agree, op=dist.ReduceOp.MIN)
    if not agree.item():
        raise CheckpointError(
            f"{path}: its optimizer state is saved per gradient bucket (dp_reshardable) and this "
            "run buckets the gradients otherwise; resume with the parallel.overlap_grad_reduce "
            "it was saved with (overlapping makes 40M-parameter buckets, else one)"
        )
    return DP_RESHARDABLE


def _sharded_state(
    engine: Engine, iteration: int, consumed_samples: int, is_loading: bool, fmt: str
) -> dict:
    state: dict[str, Any] = _model_state(engine)
    state["optimizer"] = engine.optimizer.sharded_state_dict(
        state, is_loading=is_loading, metadata=_OPTIMIZER_METADATA[fmt]
    )
    state["scheduler"] = engine.scheduler.state_dict()
    state["rng_state"] = _rng_sharded_object()
    state["progress"] = {"iteration": iteration, "consumed_samples": consumed_samples}
    state["layout"] = parallel_layout()
    return state


# ----------------------------------------------------------------------------- save


def save(
    engine: Engine,
    iteration: int,
    consumed_samples: int,
    parent: str | None = None,
    generation: dict | None = None,
) -> Path:
    """Write a complete checkpoint of ``engine`` at ``iteration``; returns its directory.

    ``generation``: the generation defaults the run inherited (``generation_config.json`` of its
    init checkpoint, e.g. an HF import's), written along so that evaluation decodes the trained
    model as it decoded the one it came from."""
    run_dir = engine.cfg.checkpoint.dir
    final = iteration_dir(run_dir, iteration)
    partial = partial_dir(final)
    rank0 = dist.get_rank() == 0
    refusal = [make_way_for(final) if rank0 and final.exists() else None]
    dist.broadcast_object_list(refusal, src=0)  # every rank stops, or none
    if refusal[0] is not None:
        raise CheckpointError(refusal[0])
    if rank0:
        remove_partial_saves(final.parent)
        partial.mkdir(parents=True)
    dist.barrier()
    engine.sync_params()  # the overlapped parameter all-gather of the last step
    fmt = optimizer_format(engine.cfg, iteration, engine.derived.steps)
    state = _sharded_state(engine, iteration, consumed_samples, is_loading=False, fmt=fmt)
    state["optimizer_format"] = _optimizer_record(engine, fmt)
    with _writers_die_with_this_process():
        dist_checkpointing.save(state, str(partial))
    dist.barrier()
    if rank0:
        (partial / "config.yaml").write_text(config_mod.to_yaml(engine.cfg))
        if generation:
            text = json.dumps(generation, indent=2) + "\n"
            (partial / GENERATION_CONFIG_FILE).write_text(text)
        write_architecture(partial, engine.preset)
        write_lineage(partial, lineage_record(engine, iteration, consumed_samples, parent))
        write_checksums(partial)
        os.replace(partial, final)
        mark_latest(final)
        prune(final.parent, engine.cfg.checkpoint.keep_last, iteration)
    dist.barrier()
    return final


def save_weights(
    model: torch.nn.Module,
    out: Path,
    arch: QwenPreset,
    report: dict,
    extra_files: list[Path],
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """A weights-only checkpoint of a single-process model (conversion), written atomically.

    ``write_extra(directory)`` may add files (e.g. ``long_context.json``) before the checksums,
    which cover every file, are recorded."""
    out = Path(out)
    partial = partial_dir(out)
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    module = getattr(model, "module", model)
    with _writers_die_with_this_process():
        dist_checkpointing.save({"model": module.sharded_state_dict()}, str(partial))
    write_architecture(partial, arch)
    (partial / "conversion.json").write_text(json.dumps(report, indent=2) + "\n")
    write_lineage(partial, conversion_record(report))
    for file in extra_files:
        shutil.copyfile(file, partial / Path(file).name)
    if write_extra is not None:
        write_extra(partial)
    write_checksums(partial)
    if out.exists():
        out.rmdir()  # empty (checked by the caller)
    os.replace(partial, out)
    return out


# ----------------------------------------------------------------------------- load


def load_for_resume(engine: Engine, path: Path) -> tuple[int, int]:
    """Restore model, optimizer, scheduler, RNG; returns (iteration, consumed_samples)."""
    _check_before_load(path, engine.preset)
    common = _load_common(path)
    same_layout = common.get("layout") == parallel_layout()
    fmt = loadable_optimizer_format(path, common.get("optimizer_format"), engine)
    state = _sharded_state(engine, 0, 0, is_loading=True, fmt=fmt)
    if not same_layout:
        # RNG streams are per (PP, TP) rank and cannot be remapped; weights and optimizer can.
        state.pop("rng_state")
        log.warning(
            "resuming %s at another layout %s -> %s: RNG states start fresh",
            path,
            common.get("layout"),
            parallel_layout(),
        )
    loaded = _load(state, path)
    _load_model(engine, loaded)
    _load_optimizer_state(engine, loaded["optimizer"])
    engine.scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    progress = loaded["progress"]
    return int(progress["iteration"]), int(progress["consumed_samples"])


def load_weights_and_optimizer(engine: Engine, path: Path) -> None:
    """Load a checkpoint's weights and optimizer state (AdamW moments and step counts), for a
    stage that keeps its predecessor's optimizer. The schedule, iteration and RNG start fresh, and
    the optimizer's settings (LR bounds, betas, eps, weight decay) stay this run's own."""
    _check_before_load(path, engine.preset)
    common = _load_common(path)
    if "scheduler" not in common:  # written by save(), not by save_weights()
        raise CheckpointError(
            f"{path}: holds no optimizer state (a weights-only checkpoint?); a stage starting "
            "from it must reset its optimizer (reset.optimizer: true)"
        )
    fmt = loadable_optimizer_format(path, common.get("optimizer_format"), engine)
    state: dict[str, Any] = _model_state(engine)
    state["optimizer"] = engine.optimizer.sharded_state_dict(
        state, is_loading=True, metadata=_OPTIMIZER_METADATA[fmt]
    )
    loaded = _load(state, path)
    _load_model(engine, loaded)
    _load_optimizer_state(engine, loaded["optimizer"])
    engine.scheduler.step(increment=0)  # this run's LR and weight decay at its step 0


def _load_optimizer_state(engine: Engine, state: dict) -> None:
    """Load optimizer state, keeping this run's settings in the param groups.

    Loading replaces each param group's settings with the checkpoint's, and megatron-core's
    scheduler reads ``max_lr``/``min_lr`` from the param groups first: a run whose recipe changed
    the LR (a later stage, or a resume with a new lr) would silently follow the old one."""
    settings = [
        {k: v for k, v in group.items() if k not in ("params", "step")}
        for group in engine.optimizer.param_groups
    ]
    _drop_bucket_steps(state)
    # dp_reshardable copies into fp32 main parameters that are views of the model's leaf
    # parameters (fp32 training), which only works without autograd (megatron-core 0.16.1).
    with torch.no_grad():
        engine.optimizer.load_state_dict(state)
    for group, own in zip(engine.optimizer.param_groups, settings, strict=True):
        group.update(own)


def _drop_bucket_steps(state: Any) -> None:
    """Remove torch Adam's per-parameter ``step`` from dp_reshardable bucket states. megatron-core
    0.16.1 hands them back as the live, not the loaded, tensors and copies them over the step it
    restored from the param groups (a resume would restart bias correction at 0)."""
    if not isinstance(state, dict):
        return
    for value in state.values():
        _drop_bucket_steps(value)
    if state.get("param_state_sharding_type") != DP_RESHARDABLE:
        return
    for key, buffer in state["param_state"].items():
        if isinstance(key, int):  # gradient buffers; the rest is bucket metadata
            for buckets in buffer.values():
                for bucket in buckets:
                    for entry in bucket:
                        entry.pop("step", None)


def load_weights(engine: Engine, path: Path) -> None:
    """Load only the model weights of a checkpoint (``init``): optimizer and schedule start fresh."""
    _check_before_load(path, engine.preset)
    loaded = _load(_model_state(engine), path)
    _load_model(engine, loaded)
    # BF16 training steps fp32 main copies of the weights, made when the optimizer was built, and
    # writes them back: refresh them, or the first step restores the random initialization (as
    # NVIDIA/Megatron-LM megatron/training/checkpointing.py load_checkpoint does, core_v0.16.1).
    engine.optimizer.reload_model_params()


def load_model_weights(model: torch.nn.Module, path: Path, arch: QwenPreset) -> None:
    """Load a checkpoint's weights into one single-process model (conversion, export)."""
    _check_before_load(path, arch)
    module = getattr(model, "module", model)
    loaded = _load({"model": module.sharded_state_dict()}, path)
    module.load_state_dict(loaded["model"], strict=True)


def _check_before_load(path: Path, arch: QwenPreset) -> None:
    verify_checkpoint(path)
    check_architecture(path, arch)


def _load_common(path: Path) -> dict:
    with damaged_is_an_error(path):
        return dist_checkpointing.load_common_state_dict(str(path))


def _load(state: dict, path: Path) -> dict:
    with damaged_is_an_error(path):
        return dist_checkpointing.load(state, str(path), strict="assume_ok_unexpected")


# What a truncated, missing or garbled checkpoint file raises inside megatron/torch loading.
_DAMAGED = (OSError, EOFError, pickle.UnpicklingError, json.JSONDecodeError)


@contextlib.contextmanager
def damaged_is_an_error(path: Path) -> Iterator[None]:
    """Turn what a damaged checkpoint raises while megatron/torch read it into a CheckpointError
    naming the checkpoint; other errors (ours) pass through with their traceback. Checksums find
    most damage before this; it covers checkpoints written without them."""
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint import CheckpointException

    for name in REQUIRED_FILES:  # megatron fails on a missing common.pt with an AttributeError
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: {name} is missing (not a complete checkpoint)")
    if not zipfile.is_zipfile(path / "common.pt"):  # a torch.save archive; truncation breaks it
        raise CheckpointError(f"{path}: common.pt is truncated or corrupt")
    try:
        yield
    except CheckpointException as e:  # torch's per-rank wrapper (a BaseException) around them
        causes = [error for error, _ in e.failures.values()]
        if not causes or not all(isinstance(c, _DAMAGED) for c in causes):
            raise
        raise CheckpointError(f"{path}: cannot read its tensors ({_describe(causes[0])})") from None
    except (*_DAMAGED, CheckpointingException) as e:
        raise CheckpointError(f"{path}: cannot be loaded ({_describe(e)})") from None


def _describe(error: BaseException) -> str:
    text = " ".join(str(error).split())  # one line
    hint = "; a file is truncated" if isinstance(error, EOFError) else ""
    return f"{type(error).__name__}: {text}{hint}" if text else f"{type(error).__name__}{hint}"


def _load_model(engine: Engine, loaded: dict) -> None:
    if len(engine.model) == 1:
        engine.model[0].module.load_state_dict(loaded["model"], strict=True)
    else:
        for i, chunk in enumerate(engine.model):
            chunk.module.load_state_dict(loaded[f"model{i}"], strict=True)
