"""``specialize train``: config → process groups → data, engine → trainer.

A staged recipe runs its stages in order in one process group, each with its own engine (fresh
optimizer and schedule), data and trainer. A stage whose final checkpoint exists is skipped; an
interrupted one resumes from its own newest checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from base import spec as layer_specs
from base.tokenizer import QwenTokenizer
from specialize import checkpoint, lock
from specialize.config import (
    ConfigError,
    Derived,
    ParallelConfig,
    RecipeConfig,
    Stage,
    derive,
    resolve_stages,
    spec_note,
    to_yaml,
)
from specialize.data.pretrain import PretrainData
from specialize.mcore.distributed import Topology, init_distributed, seed_all
from specialize.train.callbacks import default_callbacks
from specialize.train.engine import Engine
from specialize.train.trainer import Trainer, check_same_data

log = logging.getLogger("specialize")

LOCK_FILE = lock.LOCK_FILE


@contextlib.contextmanager
def run_directory_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold the run directory's lock (``specialize.lock``): a second run on it fails at once,
    naming the process that holds it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with lock.exclusive(run_dir):
            yield
    except lock.LockHeld as e:
        raise checkpoint.CheckpointError(
            f"{run_dir} is in use by another training run ({e.holder}); wait for it to end or "
            "set checkpoint.dir to another directory"
        ) from None


@contextlib.contextmanager
def exclusive_run(run_dir: str | Path, topo: Topology) -> Iterator[None]:
    """``run_directory_lock`` held by rank 0 for the whole run (ranks on other nodes share the
    directory, so one holder is enough); the outcome is broadcast, so when rank 0 cannot take the
    lock every rank raises the same error instead of waiting for it in a collective."""
    with contextlib.ExitStack() as stack:
        refusal = [None]
        if topo.rank == 0:
            try:
                stack.enter_context(run_directory_lock(run_dir))
            except (checkpoint.CheckpointError, OSError) as e:
                refusal = [
                    str(e) if isinstance(e, checkpoint.CheckpointError) else f"{run_dir}: {e}"
                ]
        dist.broadcast_object_list(refusal, src=0)
        if refusal[0] is not None:
            raise checkpoint.CheckpointError(refusal[0])
        yield


def cuda_environment(par: ParallelConfig, cuda: bool, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables a training process sets before CUDA starts. As Megatron-Bridge launches its
    H100 recipes (NVIDIA-NeMo/Megatron-Bridge src/megatron/bridge/perf_recipes/llama/h100/llama3.py
    ``env_vars`` at 067f987df03b8355b03192d88d70f1709fedf51a): ``PYTORCH_CUDA_ALLOC_CONF=
    expandable_segments:True`` always, ``CUDA_DEVICE_MAX_CONNECTIONS=1`` with tensor (or context)
    parallelism, which megatron's training asserts before Blackwell (NVIDIA/Megatron-LM
    megatron/training/arguments.py, core_v0.16.1). An unset field sets nothing without CUDA, nor
    over the environment's own value."""
    env = {}
    if par.cuda_device_max_connections is not None:
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = str(par.cuda_device_max_connections)
    elif cuda and par.tensor > 1 and "CUDA_DEVICE_MAX_CONNECTIONS" not in environ:
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    entries = [
        e.strip() for e in environ.get("PYTORCH_CUDA_ALLOC_CONF", "").split(",") if e.strip()
    ]
    others = [e for e in entries if e.split(":")[0].strip() != "expandable_segments"]
    expandable = par.expandable_segments
    if expandable is None and cuda and len(others) == len(entries):
        expandable = True
    if expandable is not None:
        env["PYTORCH_CUDA_ALLOC_CONF"] = ",".join([*others, f"expandable_segments:{expandable}"])
    return env


def set_cuda_environment(par: ParallelConfig) -> None:
    """Apply ``cuda_environment`` to this process; CUDA reads these when it starts (the first
    ``torch.cuda.set_device`` in ``init_distributed``)."""
    env = cuda_environment(par, torch.cuda.is_available(), os.environ)
    changed = sorted(k for k, v in env.items() if os.environ.get(k) != v)
    if changed and torch.cuda.is_initialized():
        log.warning(
            "CUDA started before %s could be set; set them in the launch environment", changed
        )
    os.environ.update(env)


def check_layer_spec(cfg: RecipeConfig, topo: Topology) -> None:
    """Every rank must build the same layers: ``model.spec=auto`` is resolved by each rank on its
    own machine, so a node whose Transformer Engine is missing or broken in a te world is an error
    naming it, not a model built two ways. Rank 0 logs the spec, as a warning when ``auto`` left
    Transformer Engine out on a CUDA machine."""
    spec = cfg.model.resolved_spec()
    why = layer_specs.why_not_te() if spec == "local" and cfg.model.spec == "auto" else None
    ranks: list = [None] * topo.world_size
    dist.all_gather_object(ranks, (spec, why))
    other = next((r for r, (s, _) in enumerate(ranks) if s != ranks[0][0]), None)
    if other is not None:  # only `auto` differs between machines
        local = 0 if ranks[0][0] == "local" else other  # the rank that left TE out
        raise ConfigError(
            f"model.spec=auto resolves to {ranks[0][0]} on rank 0 but to {ranks[other][0]} on "
            f"rank {other} (rank {local}: {ranks[local][1]}); install the same Transformer "
            "Engine on every node, or set model.spec=local"
        )
    if topo.rank == 0:
        left_out = cfg.model.spec == "auto" and spec == "local" and torch.cuda.is_available()
        log.log(logging.WARNING if left_out else logging.INFO, "layer spec: %s", spec_note(cfg))


def build_data(cfg: RecipeConfig, topo: Topology, derived: Derived, tokenizer: QwenTokenizer):
    """This rank's training data, by ``data.format``: ``train_iterators(consumed_samples)`` and
    ``validation_iterators()``."""
    if cfg.data.format == "sft":
        from specialize.data.sft import SFTData  # only SFT runs need it

        return SFTData(cfg, topo, derived, tokenizer)
    return PretrainData(cfg, topo, derived, tokenizer)


def check_data_and_vocab(cfg: RecipeConfig, tokenizer: QwenTokenizer) -> None:
    if not cfg.data.paths:
        prepare = "prepare-sft FILE" if cfg.data.format == "sft" else "prepare DIR"
        raise ConfigError(
            f"data.paths: no training data; tokenize some with `specialize data {prepare} -o OUT`"
        )
    padded = cfg.model.architecture().padded_vocab_size
    if tokenizer.vocab_size > padded:
        raise ConfigError(
            f"model.tokenizer: {tokenizer.vocab_file} has {tokenizer.vocab_size} tokens, more than the "
            f"{padded}-entry embedding of {cfg.model.preset}"
        )


def _run(
    cfg: RecipeConfig,
    topo: Topology,
    derived: Derived,
    tokenizer: QwenTokenizer,
    stage: Stage | None = None,
    on_accepted: Callable[[], None] | None = None,
) -> Trainer:
    """Train one recipe (or stage) to its end, resuming from its own checkpoints.

    The run directory's ``config.yaml`` (and ``stage.json``) are written, and ``on_accepted``
    called on rank 0, only once the restore accepted the run's checkpoint: a refused resume
    leaves the records of the run that wrote the checkpoints."""
    # Seeded per stage: a stage starts the same whether or not its predecessor ran in this launch.
    seed_all(cfg.train.seed)
    if topo.rank == 0:
        log.info(
            "%s: %s on %d process(es) (TP=%d PP=%d DP=%d), %d steps of %d tokens",
            stage.label if stage is not None else cfg.name,
            cfg.model.architecture().name,
            topo.world_size,
            cfg.parallel.tensor,
            cfg.parallel.pipeline,
            derived.data_parallel,
            derived.steps - (stage.start_step if stage is not None else 0),
            derived.tokens_per_step,
        )
    engine = Engine.build(cfg, topo, derived)
    data = build_data(cfg, topo, derived, tokenizer)
    trainer = Trainer(cfg, topo, derived, engine, data, default_callbacks(cfg), stage=stage)
    trainer.restore()
    if topo.rank == 0:
        run_dir = Path(cfg.checkpoint.dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        if stage is not None:
            (run_dir / checkpoint.STAGE_FILE).write_text(json.dumps(_stage_record(stage), indent=2))
        if on_accepted is not None:
            on_accepted()
    trainer.fit()
    return trainer


def train(cfg: RecipeConfig) -> Trainer | None:
    """Run a whole training job in this process (one rank of a torchrun world).

    Returns the trainer; for a staged recipe the trainer of the last stage that ran (None when
    every stage had finished in an earlier launch; ``train_stages`` gives them all)."""
    if cfg.stages:
        trained = [run.trainer for run in train_stages(cfg) if run.trainer is not None]
        return trained[-1] if trained else None
    set_cuda_environment(cfg.parallel)
    tokenizer = QwenTokenizer.load(cfg.model.tokenizer)
    check_data_and_vocab(cfg, tokenizer)
    topo = init_distributed(cfg.parallel)
    check_layer_spec(cfg, topo)
    derived = derive(cfg, topo.world_size)
    with exclusive_run(cfg.checkpoint.dir, topo):
        return _run(cfg, topo, derived, tokenizer)


@dataclass
class StageRun:
    """What one launch did with one stage."""

    stage: Stage
    derived: Derived
    trainer: Trainer | None
    """None: the stage had finished in an earlier launch and was skipped."""


def train_stages(cfg: RecipeConfig) -> list[StageRun]:
    """Run the stages of a recipe in order; stops after a stage that stopped early
    (``train.exit_after_steps``), since the next one starts from its final checkpoint."""
    set_cuda_environment(cfg.parallel)
    stages = resolve_stages(cfg)
    tokenizer = QwenTokenizer.load(cfg.model.tokenizer)
    for stage in stages:
        with stage.errors():
            check_data_and_vocab(stage.cfg, tokenizer)
    topo = init_distributed(cfg.parallel)
    check_layer_spec(cfg, topo)
    # Every stage's numbers are checked before the first one trains for hours.
    derived = [stage.derive(topo.world_size) for stage in stages]
    with exclusive_run(cfg.checkpoint.dir, topo):
        return _train_stages(cfg, stages, derived, topo, tokenizer)


def _train_stages(
    cfg: RecipeConfig,
    stages: list[Stage],
    derived: list[Derived],
    topo: Topology,
    tokenizer: QwenTokenizer,
) -> list[StageRun]:
    def write_recipe() -> None:  # once the first stage to train accepted its start
        (Path(cfg.checkpoint.dir) / "config.yaml").write_text(to_yaml(cfg))

    runs: list[StageRun] = []
    for stage, stage_derived in zip(stages, derived):
        latest = _checked_latest(stage)
        if latest is not None and latest == stage.final_checkpoint:
            # Skipping is keeping what the stage trained: on the data the recipe names now.
            check_same_data(stage.cfg, latest, warn=topo.rank == 0, what=stage.label)
            if topo.rank == 0:
                log.info("%s: finished earlier (%s); skipping", stage.label, latest)
            runs.append(StageRun(stage, stage_derived, None))
            continue
        if runs and runs[-1].trainer is not None:
            runs[-1].trainer.release()
        first = not any(run.trainer is not None for run in runs)
        trainer = _run(
            stage.cfg, topo, stage_derived, tokenizer, stage, write_recipe if first else None
        )
        runs.append(StageRun(stage, stage_derived, trainer))
        if not trainer.finished:
            if topo.rank == 0:
                log.info("%s: stopped at step %d of %d", stage.label, trainer.step, stage.steps)
            break
    return runs


def _stage_record(stage: Stage) -> dict:
    """What ``stage.json`` (and so each stage checkpoint's lineage) says about the stage."""
    return {
        "name": stage.name,
        "index": stage.index,
        "count": stage.count,
        "init": stage.cfg.init.checkpoint,
        "reset": dataclasses.asdict(stage.reset),
        "start_step": stage.start_step,
        "steps": stage.steps,
    }


def _checked_latest(stage: Stage) -> Path | None:
    """The stage's newest checkpoint, after checking it belongs to the stage as now declared."""
    if not stage.cfg.checkpoint.resume:
        return None
    latest = checkpoint.find_latest(stage.cfg.checkpoint.dir)
    if latest is None:
        return None
    recorded = checkpoint.read_lineage(latest).get("init")
    expected = stage.cfg.init.checkpoint
    if _resolved(recorded) != _resolved(expected):
        raise checkpoint.CheckpointError(
            f"{stage.label}: {latest} was trained from {recorded}, but the recipe now starts the "
            f"stage from {expected}; remove {stage.cfg.checkpoint.dir} to train it again"
        )
    iteration = int(re.fullmatch(r"iter_(\d+)", latest.name).group(1))
    if iteration > stage.steps:
        raise checkpoint.CheckpointError(
            f"{stage.label}: {latest} is past the stage's last step {stage.steps}; remove "
            f"{stage.cfg.checkpoint.dir} to train it again"
        )
    return latest


def _resolved(path: str | None) -> Path | None:
    return None if path is None else Path(path).resolve()
