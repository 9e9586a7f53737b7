"""Training on real tokens: the loss falls, resume is bitwise exact, NaN stops the run."""

from __future__ import annotations

import pytest

from tests.distributed import run_distributed


def _overrides(run_dir: str, shard: str) -> list[str]:
    return [
        f"checkpoint.dir={run_dir}",
        f"data.paths=[{shard}]",
        "data.split=95,5,0",
        "logging.progress=false",
        "logging.tensorboard=false",
    ]


def _train(rank: int, world_size: int, recipe: str, overrides: list[str]) -> dict:
    from specialize.config import load_config
    from specialize.run import train

    trainer = train(load_config(recipe, overrides))
    return {
        "losses": trainer.history,
        "validation": trainer.validation,
        "checkpoint": str(trainer.last_checkpoint),
    }


def test_qwen_tiny_loss_falls_on_stdlib(tmp_path, stdlib_shard):
    overrides = _overrides(str(tmp_path / "run"), stdlib_shard) + [
        "train.steps=30",
        "data.seq_length=128",
        "train.micro_batch_size=4",
        "train.global_batch_size=4",
        "train.eval_interval=30",
        "train.eval_steps=2",
    ]
    result = run_distributed(_train, "configs/base/qwen-tiny.yaml", overrides, world_size=1)
    losses = result["losses"]
    print(
        f"qwen-tiny 30 steps: loss {losses[0]:.3f} -> {losses[-1]:.3f}; validation {result['validation']}"
    )
    assert len(losses) == 30
    assert losses[0] > 11.0  # ~ln(151936) from a random init
    # Validated before the first step and at the end, on held-out files.
    (first_step, first), (last_step, last) = result["validation"]
    assert (first_step, last_step) == (0, 30) and last < first - 2.0
    assert sum(losses[-5:]) / 5 < losses[0] - 3.0


def _resume_runs(rank: int, world_size: int, tmp: str, shard: str, layout: list[str]) -> dict:
    from specialize.config import load_config
    from specialize.run import train

    common = _overrides("", shard)[1:] + [
        "train.steps=20",
        "data.seq_length=64",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
        "schedule.warmup_steps=3",
        *layout,
    ]
    straight = train(
        load_config("configs/base/qwen-nano.yaml", [*common, f"checkpoint.dir={tmp}/straight"])
    )
    first = train(
        load_config(
            "configs/base/qwen-nano.yaml",
            [*common, f"checkpoint.dir={tmp}/split", "train.exit_after_steps=10"],
        )
    )
    second = train(
        load_config("configs/base/qwen-nano.yaml", [*common, f"checkpoint.dir={tmp}/split"])
    )
    inner = [
        o.optimizer
        for o in getattr(second.engine.optimizer, "chained_optimizers", [second.engine.optimizer])
    ]
    steps = [state["step"] for opt in inner for state in opt.state.values() if "step" in state]
    return {
        "adam_steps": sorted({float(s) for s in steps}),
        "distinct_step_tensors": len({id(s) for s in steps}) == len(steps),
        "straight": straight.history,
        "first": first.history,
        "second": second.history,
        "second_start": second.start_step,
    }


@pytest.mark.parametrize(
    "layout",
    [["parallel.tensor=2"], ["parallel.pipeline=2"], ["parallel.distributed_optimizer=true"]],
    ids=["tp2", "pp2", "dp2-distributed-optimizer"],
)
def test_resume_is_bitwise_exact(tmp_path, stdlib_shard, layout):
    result = run_distributed(_resume_runs, str(tmp_path), stdlib_shard, layout)
    assert result["second_start"] == 10
    assert len(result["first"]) == 10 and len(result["second"]) == 10
    # Every parameter's Adam step counts the 20 optimizer steps once (megatron_fixes.py).
    assert result["adam_steps"] == [20.0]
    assert result["distinct_step_tensors"]
    # Bitwise: float equality, not a tolerance.
    assert result["first"] + result["second"] == result["straight"]


def _nan_run(rank: int, world_size: int, tmp: str, shard: str) -> str:
    from specialize.config import load_config
    from specialize.run import train
    from specialize.step import NonFiniteLossError

    overrides = _overrides(f"{tmp}/nan", shard) + [
        "train.steps=5",
        "data.seq_length=32",
        "train.micro_batch_size=2",
        "train.global_batch_size=2",
        "schedule.warmup_steps=0",
        "optimizer.lr=1e30",
        "optimizer.min_lr=0",
        "optimizer.clip_grad=0",
    ]
    try:
        train(load_config("configs/base/qwen-nano.yaml", overrides))
    except NonFiniteLossError as e:
        return str(e)
    return "no error"


def test_non_finite_loss_stops_the_run(tmp_path, stdlib_shard):
    message = run_distributed(_nan_run, str(tmp_path), stdlib_shard, world_size=1)
    assert message.startswith("step ") and ("nan" in message or "inf" in message), message


def _init_runs(rank: int, world_size: int, tmp: str, shard: str) -> dict:
    from specialize.config import load_config
    from specialize.run import train

    common = _overrides("", shard)[1:] + [
        "data.seq_length=64",
        "train.micro_batch_size=2",
        "train.global_batch_size=2",
        "schedule.warmup_steps=0",
    ]
    parent = train(
        load_config(
            "configs/base/qwen-nano.yaml",
            [*common, "train.steps=15", f"checkpoint.dir={tmp}/parent"],
        )
    )
    child = train(
        load_config(
            "configs/base/qwen-nano.yaml",
            [*common, "train.steps=1", f"checkpoint.dir={tmp}/child", f"init={tmp}/parent"],
        )
    )
    return {
        "parent": parent.history,
        "child": child.history,
        "parent_ckpt": str(parent.last_checkpoint),
        "child_ckpt": str(child.last_checkpoint),
    }


def test_init_loads_weights_and_records_lineage(tmp_path, stdlib_shard):
    import json
    from pathlib import Path

    out = run_distributed(_init_runs, str(tmp_path), stdlib_shard, world_size=1)
    # The child's first batch is the parent's first batch: trained weights score it far better.
    assert out["child"][0] < out["parent"][0] - 0.3
    lineage = json.loads((Path(out["child_ckpt"]) / "lineage.json").read_text())
    assert lineage["parent"] == out["parent_ckpt"] and lineage["init"] == f"{tmp_path}/parent"
    from base.tokenizer import QwenTokenizer

    manifest = lineage["data_manifests"][stdlib_shard]
    assert manifest["tokenizer_sha256"] == QwenTokenizer.load().sha256 and manifest["tokens"] > 0
    assert len(lineage["git_commit"]) in (7, 40) or lineage["git_commit"] == "unknown"
    assert (Path(out["child_ckpt"]) / "config.yaml").is_file()
    latest = (Path(out["child_ckpt"]).parent / "latest").read_text().strip()
    assert latest == Path(out["child_ckpt"]).name
