"""Checkpoints with megatron-core ``dist_checkpointing``: atomic, resumable, reshardable.

Layout of a run directory::

    <dir>/checkpoints/iter_0000020/   megatron torch_dist shards + common.pt
                      .../config.yaml  the resolved config of the run that wrote it
                      .../lineage.json parent checkpoint, data manifests, git commit, layout
    <dir>/checkpoints/latest           name of the newest complete checkpoint

A checkpoint is written to ``.iter_NNNNNNN.partial`` and renamed when every rank has finished, so
an interrupted save never looks complete. Model and optimizer tensors are saved as sharded tensors
(any TP/PP/DP can load them); RNG states are per (PP, TP) rank and restored when the layout matches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from base.presets import QwenPreset
from specialize import config as config_mod
from specialize.config import checkpoint_root, iteration_dir  # layout shared with stages
from specialize.engine import Engine

log = logging.getLogger(__name__)

# megatron-core's default 'fully_sharded_model_space' optimizer format fails to save in 0.16.1 and
# the non-mem-efficient reshardable path calls .cuda(); this one saves, loads and reshards.
OPTIMIZER_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "distrib_optim_fully_reshardable_mem_efficient": True,
}
LATEST = "latest"
ARCH_FILE = "arch.json"
# Written by a staged run into each stage's run directory; lineage records copy it.
STAGE_FILE = "stage.json"
# Fields that must agree between a checkpoint and the model loading it (the context length may not).
_ARCH_MUST_MATCH = (
    "hidden_size",
    "num_attention_heads",
    "num_layers",
    "ffn_hidden_size",
    "padded_vocab_size",
    "query_groups",
    "rotary_base",
    "norm_epsilon",
)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or incompatible."""


def find_latest(run_dir: str | Path) -> Path | None:
    root = checkpoint_root(run_dir)
    marker = root / LATEST
    if not marker.is_file():
        return None
    path = root / marker.read_text().strip()
    if not (path / "metadata.json").is_file():
        raise CheckpointError(f"{marker} names {path}, which is not a complete checkpoint")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its newest checkpoint)."""
    path = Path(path)
    if (path / "metadata.json").is_file():
        return path
    latest = find_latest(path) if path.is_dir() else None
    if latest is None:
        raise CheckpointError(
            f"{path}: not a checkpoint (no metadata.json) and no {checkpoint_root(path) / LATEST}"
        )
    return latest


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


def _layout() -> dict:
    return {
        "tensor": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline": parallel_state.get_pipeline_model_parallel_world_size(),
        "data": parallel_state.get_data_parallel_world_size(),
    }


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


def _sharded_state(engine: Engine, iteration: int, consumed_samples: int, is_loading: bool) -> dict:
    state: dict[str, Any] = _model_state(engine)
    state["optimizer"] = engine.optimizer.sharded_state_dict(
        state, is_loading=is_loading, metadata=OPTIMIZER_METADATA
    )
    state["scheduler"] = engine.scheduler.state_dict()
    state["rng_state"] = _rng_sharded_object()
    state["progress"] = {"iteration": iteration, "consumed_samples": consumed_samples}
    state["layout"] = _layout()
    return state


# ----------------------------------------------------------------------------- save


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def data_manifest_records(paths: list[str]) -> dict:
    """What pins the data of each ``data.paths`` entry, as lineage records it."""
    manifests = {}
    for data_path in paths:
        path = Path(data_path) / "manifest.json"  # a `data prepare(-sft)` directory; else None
        if not path.is_file():
            manifests[data_path] = None
            continue
        text = path.read_bytes()
        manifest = json.loads(text)
        # The manifest's own hash pins the data (it holds the input hashes and counts) whatever
        # its kind; a few fields are copied for people reading the lineage.
        manifests[data_path] = {
            "manifest_sha256": hashlib.sha256(text).hexdigest(),
            "format": manifest.get("format"),
            "documents": manifest.get("documents"),
            "sequences": manifest.get("sequences"),
            "tokens": manifest.get("tokens"),
            "tokenizer_sha256": (manifest.get("tokenizer") or {}).get("sha256"),
        }
    return manifests


def lineage_record(
    engine: Engine, iteration: int, consumed_samples: int, parent: str | None
) -> dict:
    manifests = data_manifest_records(engine.cfg.data.paths)
    stage_file = Path(engine.cfg.checkpoint.dir) / STAGE_FILE
    return {
        "name": engine.cfg.name,
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "parent": parent,
        "init": engine.cfg.init.checkpoint,
        "stage": json.loads(stage_file.read_text()) if stage_file.is_file() else None,
        "data_manifests": manifests,
        "git_commit": git_commit(),
        "layout": _layout(),
        "preset": engine.cfg.model.preset,
    }


def save(engine: Engine, iteration: int, consumed_samples: int, parent: str | None = None) -> Path:
    """Write a complete checkpoint of ``engine`` at ``iteration``; returns its directory."""
    run_dir = engine.cfg.checkpoint.dir
    final = iteration_dir(run_dir, iteration)
    partial = final.parent / f".{final.name}.partial"
    rank0 = dist.get_rank() == 0
    if rank0:
        # Saves are sequential: any partial directory here is from an interrupted run.
        for stale in final.parent.glob(".iter_*.partial"):
            shutil.rmtree(stale)
        partial.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(
        _sharded_state(engine, iteration, consumed_samples, is_loading=False), str(partial)
    )
    dist.barrier()
    if rank0:
        (partial / "config.yaml").write_text(config_mod.to_yaml(engine.cfg))
        write_architecture(partial, engine.preset)
        record = lineage_record(engine, iteration, consumed_samples, parent)
        (partial / "lineage.json").write_text(json.dumps(record, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        _write_atomic(final.parent / LATEST, final.name + "\n")
        _prune(final.parent, engine.cfg.checkpoint.keep_last)
    dist.barrier()
    return final


def save_weights(
    model: torch.nn.Module, out: Path, arch: QwenPreset, report: dict, extra_files: list[Path]
) -> Path:
    """A weights-only checkpoint of a single-process model (conversion), written atomically."""
    out = Path(out)
    partial = out.parent / f".{out.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    module = getattr(model, "module", model)
    dist_checkpointing.save({"model": module.sharded_state_dict()}, str(partial))
    write_architecture(partial, arch)
    (partial / "conversion.json").write_text(json.dumps(report, indent=2) + "\n")
    lineage = {"parent": report.get("source"), "git_commit": git_commit(), "conversion": report}
    (partial / "lineage.json").write_text(json.dumps(lineage, indent=2) + "\n")
    for file in extra_files:
        shutil.copyfile(file, partial / Path(file).name)
    if out.exists():
        out.rmdir()  # empty (checked by the caller)
    os.replace(partial, out)
    return out


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    done = sorted(p for p in root.glob("iter_*") if (p / "metadata.json").is_file())
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- load


def write_architecture(path: Path, arch: QwenPreset) -> None:
    record = {**dataclasses.asdict(arch), "query_groups": arch.query_groups}
    (path / ARCH_FILE).write_text(json.dumps(record, indent=2) + "\n")


def check_architecture(path: Path, arch: QwenPreset) -> None:
    """Refuse a checkpoint of another shape with a message saying what differs."""
    record_file = path / ARCH_FILE
    if not record_file.is_file():
        return  # written elsewhere: dist_checkpointing's own shape checks still apply
    saved = json.loads(record_file.read_text())
    ours = {**dataclasses.asdict(arch), "query_groups": arch.query_groups}
    diffs = [
        f"{k}: {saved.get(k)} in the checkpoint, {ours[k]} here"
        for k in _ARCH_MUST_MATCH
        if saved.get(k) != ours[k]
    ]
    if diffs:
        raise CheckpointError(
            f"{path} holds a {saved.get('name')} model but this run builds {arch.name} ({'; '.join(diffs)}). "
            "Set model.preset (or the model.* overrides) to the checkpoint's architecture."
        )


def load_for_resume(engine: Engine, path: Path) -> tuple[int, int]:
    """Restore model, optimizer, scheduler, RNG; returns (iteration, consumed_samples)."""
    check_architecture(path, engine.preset)
    common = dist_checkpointing.load_common_state_dict(str(path))
    same_layout = common.get("layout") == _layout()
    state = _sharded_state(engine, 0, 0, is_loading=True)
    if not same_layout:
        # RNG streams are per (PP, TP) rank and cannot be remapped; weights and optimizer can.
        state.pop("rng_state")
        log.warning(
            "resuming %s at another layout %s -> %s: RNG states start fresh",
            path,
            common.get("layout"),
            _layout(),
        )
    loaded = dist_checkpointing.load(state, str(path), strict="assume_ok_unexpected")
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
    check_architecture(path, engine.preset)
    common = dist_checkpointing.load_common_state_dict(str(path))
    if "scheduler" not in common:  # written by save(), not by save_weights()
        raise CheckpointError(
            f"{path}: holds no optimizer state (a weights-only checkpoint?); a stage starting "
            "from it must reset its optimizer (reset.optimizer: true)"
        )
    state: dict[str, Any] = _model_state(engine)
    state["optimizer"] = engine.optimizer.sharded_state_dict(
        state, is_loading=True, metadata=OPTIMIZER_METADATA
    )
    loaded = dist_checkpointing.load(state, str(path), strict="assume_ok_unexpected")
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
    engine.optimizer.load_state_dict(state)
    for group, own in zip(engine.optimizer.param_groups, settings, strict=True):
        group.update(own)


def load_weights(engine: Engine, path: Path) -> None:
    """Load only the model weights of a checkpoint (``init``): optimizer and schedule start fresh."""
    check_architecture(path, engine.preset)
    state = _model_state(engine)
    loaded = dist_checkpointing.load(state, str(path), strict="assume_ok_unexpected")
    _load_model(engine, loaded)


def load_model_weights(model: torch.nn.Module, path: Path, arch: QwenPreset) -> None:
    """Load a checkpoint's weights into one single-process model (conversion, export)."""
    check_architecture(path, arch)
    module = getattr(model, "module", model)
    loaded = dist_checkpointing.load(
        {"model": module.sharded_state_dict()}, str(path), strict="assume_ok_unexpected"
    )
    module.load_state_dict(loaded["model"], strict=True)


def _load_model(engine: Engine, loaded: dict) -> None:
    if len(engine.model) == 1:
        engine.model[0].module.load_state_dict(loaded["model"], strict=True)
    else:
        for i, chunk in enumerate(engine.model):
            chunk.module.load_state_dict(loaded[f"model{i}"], strict=True)
