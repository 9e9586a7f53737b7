"""Saving and loading with a real model: every load refuses an altered file, a save never
overwrites a checkpoint and sets a corrupt one aside, a killed save leaves no writer process behind,
the optimizer's formats and what they resume, and init weights that survive the first BF16 step."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[3]
NANO = str(ROOT / "configs/base/qwen-nano.yaml")
LOGGER = "specialize.checkpoint"


# ----------------------------------------------------------------------------- with a real model


def _nano_engine(run_dir: str):
    from specialize.config import derive, load_config
    from specialize.mcore.distributed import init_distributed
    from specialize.train.engine import Engine

    cfg = load_config(NANO, [f"checkpoint.dir={run_dir}", "data.paths=[unused]", "train.steps=20"])
    topo = init_distributed(cfg.parallel)
    return Engine.build(cfg, topo, derive(cfg, topo.world_size))


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _loads_of_altered_checkpoints(rank: int, world_size: int, tmp: str, shard: str) -> dict:
    from specialize import checkpoint
    from specialize.checkpoint import state

    warnings = _Collect()
    logging.getLogger(LOGGER).addHandler(warnings)
    trainer = _train(_common(f"{tmp}/run", shard), "train.steps=1")
    engine, saved = trainer.engine, trainer.last_checkpoint
    converted = state.save_weights(
        engine.model[0],
        Path(tmp, "converted"),
        engine.preset,
        {"source": "test"},
        [],
        write_extra=lambda directory: (directory / "long_context.json").write_text("{}"),
    )
    loads = {
        "load_for_resume": lambda: state.load_for_resume(engine, saved),
        "load_weights": lambda: state.load_weights(engine, saved),
        "load_weights_and_optimizer": lambda: state.load_weights_and_optimizer(engine, saved),
        "load_model_weights": lambda: state.load_model_weights(
            engine.model[0], saved, engine.preset
        ),
        "load_model_weights converted": lambda: state.load_model_weights(
            engine.model[0], converted, engine.preset
        ),
    }
    for load in loads.values():  # intact, each loads
        load()
    recorded = {
        p.name: sorted(json.loads((p / "checksums.json").read_text())["files"])
        for p in (saved, converted)
    }
    altered = {}
    for path in (saved, converted):
        largest = max(path.glob("*.distcp"), key=lambda p: p.stat().st_size)
        with open(largest, "r+b") as f:  # 4 MB of garbage in the middle, the size unchanged
            f.seek(largest.stat().st_size // 2 - (2 << 20))
            f.write(os.urandom(4 << 20))
        altered[path.name] = largest.name
    errors = {}
    for name, load in loads.items():
        try:
            load()
            errors[name] = None
        except checkpoint.CheckpointError as e:
            errors[name] = str(e)
    # One written before checksums existed still loads, with a warning.
    older = state.save(engine, 2, trainer.consumed_samples)
    (older / "checksums.json").unlink()
    state.load_weights(engine, older)
    return {
        "saved": str(saved),
        "converted": str(converted),
        "recorded": recorded,
        "altered": altered,
        "errors": errors,
        "warnings": warnings.messages,
    }


def test_altered_distcp_is_refused_by_every_load(tmp_path: Path, stdlib_shard):
    out = run_distributed(_loads_of_altered_checkpoints, str(tmp_path), stdlib_shard, world_size=1)
    saved, converted = out["saved"], out["converted"]
    for load, error in out["errors"].items():
        path = converted if load.endswith("converted") else saved
        altered = out["altered"][Path(path).name]
        assert error == f"{path}: {altered} differs from the checksum recorded at save", load
    # Every file of the directory is covered, the metadata and lineage as well as the shards.
    for name in (Path(saved).name, Path(converted).name):
        files = set(out["recorded"][name])
        assert {".metadata", "common.pt", "metadata.json", "lineage.json", "arch.json"} <= files
        assert sum(f.endswith(".distcp") for f in files) >= 1
    assert "config.yaml" in out["recorded"][Path(saved).name]
    assert "long_context.json" in out["recorded"][Path(converted).name]
    older = str(Path(saved).parent / "iter_0000002")
    assert any(older in w and "no checksums.json" in w for w in out["warnings"])


def _train(common: list[str], *overrides: str):
    from specialize.config import load_config
    from specialize.train.run import train

    return train(load_config(NANO, [*common, *overrides]))


def _common(run_dir: str, shard: str) -> list[str]:
    return [
        f"checkpoint.dir={run_dir}",
        f"data.paths=[{shard}]",
        "data.split=95,5,0",
        "data.seq_length=32",
        "train.micro_batch_size=2",
        "train.global_batch_size=2",
        "schedule.warmup_steps=0",
        "checkpoint.interval=1",
        "logging.progress=false",
        "logging.tensorboard=false",
    ]


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _runs_without_latest_marker(rank: int, world_size: int, tmp: str, shard: str) -> dict:
    from specialize import checkpoint
    from specialize.checkpoint import state

    common = _common(f"{tmp}/run", shard) + ["checkpoint.keep_last=0"]
    _train(common, "train.steps=3")
    root = checkpoint.checkpoint_root(f"{tmp}/run")
    (root / checkpoint.LATEST).unlink()
    before = _files(root)
    second = _train(common, "train.steps=4")
    after = _files(root)
    try:
        state.save(second.engine, 2, second.consumed_samples)
        refused = None
    except checkpoint.CheckpointError as e:
        refused = str(e)
    return {
        "start": second.start_step,
        "unchanged": all(after.get(name) == stat for name, stat in before.items()),
        "checkpoints": sorted(p.name for p in root.glob("iter_*")),
        "refused": refused,
        "iter2": str(root / "iter_0000002"),
    }


def test_deleted_latest_marker_resumes_and_never_overwrites(tmp_path: Path, stdlib_shard):
    out = run_distributed(_runs_without_latest_marker, str(tmp_path), stdlib_shard, world_size=1)
    assert out["start"] == 3  # resumed from iter_3, not step 1 again
    assert out["unchanged"]  # iter_1..3 are the same files as before
    assert out["checkpoints"] == [f"iter_{i:07d}" for i in (1, 2, 3, 4)]
    assert out["refused"] is not None and out["refused"].startswith(f"{out['iter2']} exists")
    assert "never overwrites" in out["refused"]


def _resume_past_a_corrupt_checkpoint(rank: int, world_size: int, tmp: str, shard: str) -> dict:
    from specialize import checkpoint

    warnings = _Collect()
    logging.getLogger(LOGGER).addHandler(warnings)
    common = _common(f"{tmp}/run", shard) + ["checkpoint.keep_last=2"]
    first = _train(common, "train.steps=3")
    root = checkpoint.checkpoint_root(f"{tmp}/run")
    shard_file = max((root / "iter_0000003").glob("*.distcp"), key=lambda p: p.stat().st_size)
    size = shard_file.stat().st_size
    os.truncate(shard_file, size // 2)
    second = _train(common, "train.steps=3")
    aside = sorted(root.glob("iter_0000003.corrupt-*"))
    checkpoint.verify_checkpoint(root / "iter_0000003")  # the new one is intact
    return {
        "first": first.history,
        "second": second.history,
        "start": second.start_step,
        "resumed_from": str(second.resumed_from),
        "checkpoints": sorted(p.name for p in root.glob("iter_*")),
        "aside_shard_size": (aside[0] / shard_file.name).stat().st_size if aside else None,
        "truncated_size": size // 2,
        "warnings": warnings.messages,
        "root": str(root),
        "shard": shard_file.name,
    }


def test_corrupt_newest_checkpoint_resumes_from_previous_and_is_set_aside(
    tmp_path: Path, stdlib_shard
):
    out = run_distributed(
        _resume_past_a_corrupt_checkpoint, str(tmp_path), stdlib_shard, world_size=1
    )
    root = Path(out["root"])
    assert out["start"] == 2 and out["resumed_from"] == str(root / "iter_0000002")
    assert out["second"] == out["first"][2:]  # step 3 again, bit for bit
    corrupt = str(root / "iter_0000003")
    assert any(
        w.startswith(f"{corrupt}: {out['shard']} is ") and "resuming from" in w
        for w in out["warnings"]
    )
    # The corrupt checkpoint is kept under another name, as it was; the pruning kept iter_2.
    (aside,) = [n for n in out["checkpoints"] if ".corrupt-" in n]
    assert out["aside_shard_size"] == out["truncated_size"]
    assert sorted(set(out["checkpoints"]) - {aside}) == ["iter_0000002", "iter_0000003"]
    assert any(aside in w and "moved it" in w for w in out["warnings"])


# ----------------------------------------------------------------------------- a killed save


def _save_held_in_its_writers(run_dir: str, pids_dir: str) -> None:
    """Run in a subprocess: a save whose writer processes record their pid and wait."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import (
        FileSystemWriterAsync,
    )

    from specialize.checkpoint import state

    write = FileSystemWriterAsync.write_preloaded_data

    def held(*args, **kwargs):
        Path(pids_dir, str(os.getpid())).write_text("")
        time.sleep(300)
        return write(*args, **kwargs)

    FileSystemWriterAsync.write_preloaded_data = staticmethod(held)
    state.save(_nano_engine(run_dir), 1, 0)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_killed_save_leaves_no_writer_process(tmp_path: Path):
    import psutil

    pids_dir = tmp_path / "writers"
    pids_dir.mkdir()
    code = (
        "from tests.specialize.checkpoint.test_state import _save_held_in_its_writers as f; "
        f"f({str(tmp_path / 'run')!r}, {str(pids_dir)!r})"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    saver = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env)
    descendants: set[int] = set()
    try:
        deadline = time.monotonic() + 300
        while not any(pids_dir.iterdir()):
            assert saver.poll() is None, "the saving process ended before its writers started"
            assert time.monotonic() < deadline, "no writer started"
            time.sleep(0.2)
        descendants = {p.pid for p in psutil.Process(saver.pid).children(recursive=True)}
        os.kill(saver.pid, signal.SIGKILL)
        saver.wait()
        writers = {int(p.name) for p in pids_dir.iterdir()}  # with any forked after the listing
        assert saver.pid not in writers  # the writes run in processes of their own
        descendants |= writers
        deadline = time.monotonic() + 10
        while any(map(_alive, descendants)) and time.monotonic() < deadline:
            time.sleep(0.2)
        survivors = [pid for pid in descendants if _alive(pid)]
        assert not survivors, f"processes of the killed save still run: {survivors}"
    finally:
        for pid in descendants | {saver.pid}:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


# ----------------------------------------------------------------------------- optimizer formats


def test_final_checkpoints_are_fully_reshardable_and_the_others_fast():
    from specialize.checkpoint.state import DP_RESHARDABLE, FULLY_RESHARDABLE, optimizer_format
    from specialize.config import load_config

    cfg = load_config(NANO, ["train.steps=20"])
    assert optimizer_format(cfg, 10, 20) == DP_RESHARDABLE  # resumed by this run only
    assert optimizer_format(cfg, 20, 20) == FULLY_RESHARDABLE  # loaded by later runs and stages
    always = load_config(NANO, ["train.steps=20", "parallel.reshardable_optimizer_state=true"])
    assert optimizer_format(always, 10, 20) == FULLY_RESHARDABLE
    never = load_config(NANO, ["train.steps=20", "parallel.reshardable_optimizer_state=false"])
    assert optimizer_format(never, 20, 20) == DP_RESHARDABLE


def _dist_opt_engine(run_dir: str, *overrides: str):
    from specialize.config import derive, load_config
    from specialize.mcore.distributed import init_distributed, seed_all
    from specialize.train.engine import Engine

    cfg = load_config(
        NANO,
        [
            f"checkpoint.dir={run_dir}",
            "data.paths=[unused]",
            "train.steps=20",
            "parallel.distributed_optimizer=true",
            "data.seq_length=32",
            "train.micro_batch_size=1",
            "train.global_batch_size=2",
            *overrides,
        ],
    )
    topo = init_distributed(cfg.parallel)
    seed_all(cfg.train.seed)
    return Engine.build(cfg, topo, derive(cfg, topo.world_size))


def _resumes_at_another_layout(rank: int, world_size: int, tmp: str) -> dict:
    from megatron.core import dist_checkpointing

    from specialize import checkpoint
    from specialize.checkpoint import state
    from tests.specialize.train.test_engine import random_batches

    engine = _dist_opt_engine(f"{tmp}/dp2")  # DP=2
    engine.train_step([random_batches(32, 1)], 1)  # an optimizer state to save
    between = state.save(engine, 10, 40)
    final = state.save(engine, 20, 80)
    formats = {
        p.name: dist_checkpointing.load_common_state_dict(str(p))["optimizer_format"]["format"]
        for p in (between, final)
    }
    record = dist_checkpointing.load_common_state_dict(str(between))["optimizer_format"]
    errors = {}
    try:  # another bucket layout at the same TP/PP
        other = dict(record, buckets={key: [] for key in record["buckets"]})
        state.loadable_optimizer_format(between, other, engine)
    except checkpoint.CheckpointError as e:
        errors["buckets"] = str(e)
    weights = [p.detach().clone() for p in engine.model[0].parameters()]
    tp2 = _dist_opt_engine(f"{tmp}/tp2", "parallel.tensor=2")  # DP=1
    for path in (between, final):
        try:
            state.load_for_resume(tp2, path)
            errors[path.name] = None
        except checkpoint.CheckpointError as e:
            errors[path.name] = str(e)
    return {"formats": formats, "errors": errors, "weights": weights}


def _resumes_with_one_data_parallel_rank(rank: int, world_size: int, tmp: str) -> dict:
    from specialize.checkpoint import state

    engine = _dist_opt_engine(f"{tmp}/dp1", "train.global_batch_size=1")
    iteration, _ = state.load_for_resume(engine, Path(tmp, "dp2/checkpoints/iter_0000010"))
    inner = [o.optimizer for o in engine.optimizer.chained_optimizers]
    return {
        "iteration": iteration,
        "adam_steps": sorted({float(s["step"]) for o in inner for s in o.state.values()}),
        "weights": [p.detach().clone() for p in engine.model[0].parameters()],
    }


def test_fast_optimizer_checkpoints_change_only_the_data_parallel_size(tmp_path: Path):
    out = run_distributed(_resumes_at_another_layout, str(tmp_path))
    assert out["formats"] == {"iter_0000010": "dp_reshardable", "iter_0000020": "fully_reshardable"}
    dp1 = run_distributed(_resumes_with_one_data_parallel_rank, str(tmp_path), world_size=1)
    assert dp1["iteration"] == 10 and dp1["adam_steps"] == [1.0]
    assert all(torch.equal(a, b) for a, b in zip(dp1["weights"], out["weights"], strict=True))
    errors = out["errors"]
    assert errors["iter_0000020"] is None  # the final checkpoint resumes at TP=2
    between = errors["iter_0000010"]
    assert between.startswith(f"{tmp_path}/dp2/checkpoints/iter_0000010: its optimizer state")
    assert "resumes at TP=1 PP=1 only, not at TP=2 PP=1" in between and "\n" not in between
    assert "parallel.reshardable_optimizer_state=true" in between
    assert "parallel.overlap_grad_reduce" in errors["buckets"]


def _bf16_init(rank: int, world_size: int, tmp: str) -> dict:
    from specialize.checkpoint import state
    from specialize.config import derive, load_config
    from specialize.mcore.distributed import init_distributed, seed_all
    from specialize.train.engine import Engine
    from tests.specialize.train.test_engine import random_batches

    def build(seed: int) -> Engine:
        cfg = load_config(
            NANO,
            [
                "precision.dtype=bf16",
                "parallel.distributed_optimizer=true",
                f"train.seed={seed}",
                f"checkpoint.dir={tmp}/run",
                "data.seq_length=32",
                "train.micro_batch_size=1",
                "train.global_batch_size=1",
                "schedule.warmup_steps=2",  # the first step applies LR 0
            ],
        )
        topo = init_distributed(cfg.parallel)
        seed_all(seed)
        return Engine.build(cfg, topo, derive(cfg, topo.world_size))

    source = build(1)
    saved = state.save_weights(source.model[0], Path(tmp, "init"), source.preset, {}, [])
    weights = [p.detach().clone() for p in source.model[0].parameters()]
    engine = build(2)
    state.load_weights(engine, saved)
    engine.train_step([random_batches(32, 1)], 1)
    after = [p.detach() for p in engine.model[0].parameters()]
    return {"kept": all(torch.equal(a, b) for a, b in zip(weights, after, strict=True))}


def test_init_weights_survive_the_first_bf16_step(tmp_path: Path):
    """BF16 steps fp32 copies of the weights: an init that did not refresh them would be undone by
    the first step, silently training the random initialization."""
    assert run_distributed(_bf16_init, str(tmp_path), world_size=1)["kept"]
