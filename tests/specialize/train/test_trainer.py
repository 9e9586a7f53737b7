"""Training on real tokens: the loss falls, resume is bitwise exact, NaN and spikes stop the run
before anything is saved, a resume refuses changed data, and a run directory has one run at a
time."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

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
    from specialize.train.run import train

    trainer = train(load_config(recipe, overrides))
    return {
        "losses": trainer.history,
        "validation": trainer.validation,
        "checkpoint": str(trainer.last_checkpoint),
        "spike_checks": trainer.guard.checked,
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
    # The spike check (on by default) compared every step after the first five with its running
    # mean, and a normal run's falling loss never tripped it.
    assert result["spike_checks"] == 25


def _resume_runs(rank: int, world_size: int, tmp: str, shard: str, layout: list[str]) -> dict:
    from specialize.config import load_config
    from specialize.train.run import train

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
    from megatron.core import dist_checkpointing

    resumed = Path(tmp, "split/checkpoints/iter_0000010")
    return {
        "resumed_format": dist_checkpointing.load_common_state_dict(str(resumed))[
            "optimizer_format"
        ]["format"],
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
    if "distributed_optimizer" in layout[0]:  # resumed from the fast per-shard format
        assert result["resumed_format"] == "dp_reshardable"


def _nan_run(rank: int, world_size: int, tmp: str, shard: str) -> str:
    from specialize.config import load_config
    from specialize.train.run import train
    from specialize.train.step import NonFiniteLossError

    overrides = _overrides(f"{tmp}/nan", shard) + [
        "train.steps=5",
        "data.seq_length=32",
        "train.micro_batch_size=2",
        "train.global_batch_size=2",
        "schedule.warmup_steps=0",
        "optimizer.lr=1e30",
        "optimizer.min_lr=0",
        "optimizer.clip_grad=0",
        "train.spike_factor=0",  # the spike check would stop it a step before the NaN
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
    from specialize.train.run import train

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
    # As an HF import leaves it: generation defaults in the checkpoint, under its checksums.
    from specialize.checkpoint.layout import write_checksums

    (parent.last_checkpoint / "generation_config.json").write_text(json.dumps(GENERATION))
    write_checksums(parent.last_checkpoint)
    child_overrides = [*common, f"checkpoint.dir={tmp}/child", f"init={tmp}/parent"]
    child = train(load_config("configs/base/qwen-nano.yaml", [*child_overrides, "train.steps=1"]))
    first_child_ckpt = child.last_checkpoint
    resumed = train(load_config("configs/base/qwen-nano.yaml", [*child_overrides, "train.steps=2"]))
    return {
        "parent": parent.history,
        "child": child.history,
        "parent_ckpt": str(parent.last_checkpoint),
        "child_ckpt": str(first_child_ckpt),
        "resumed_ckpt": str(resumed.last_checkpoint),
    }


GENERATION = {"do_sample": True, "top_p": 0.8, "repetition_penalty": 1.1}


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
    # The init's generation defaults go on into every checkpoint trained from it, resumed or not,
    # so evaluation decodes the child as it decoded its parent.
    from specialize.checkpoint import read_generation_config, verify_checkpoint

    for name in ("child_ckpt", "resumed_ckpt"):
        verify_checkpoint(out[name])  # the file is under the checksums
        assert read_generation_config(out[name]) == GENERATION, name
    assert out["resumed_ckpt"] != out["child_ckpt"]
    latest = (Path(out["resumed_ckpt"]).parent / "latest").read_text().strip()
    assert latest == Path(out["resumed_ckpt"]).name


# ----------------------------------------------------------------------------- spikes

_TINY_STEPS = [
    "data.seq_length=32",
    "train.micro_batch_size=2",
    "train.global_batch_size=2",
    "checkpoint.interval=1",
]


def _max_abs_weight(path: Path) -> float:
    """The largest weight magnitude in a qwen-nano checkpoint (loaded in this process)."""
    from base.model import ModelOptions, build_model
    from base.presets import get_preset
    from specialize.checkpoint.state import load_model_weights

    arch = get_preset("qwen-nano")
    model = build_model(arch, ModelOptions(spec="local", initialize=False))
    load_model_weights(model, path, arch)
    return max(p.detach().abs().max().item() for p in model.parameters())


def _explosion_runs(rank: int, world_size: int, tmp: str, shard: str) -> dict:
    from specialize.config import load_config
    from specialize.train.run import train

    out = {}
    # With warmup, megatron's schedule applies LR 0 at step 1 and 2e5 at step 2; without, 1e6 at
    # step 1. Either way the first update at that LR explodes the weights.
    for name, warmup in (("warmup", []), ("no_warmup", ["schedule.warmup_steps=0"])):
        run_dir = Path(tmp) / name
        overrides = _overrides(str(run_dir), shard) + _TINY_STEPS + warmup
        overrides += ["train.steps=6", "optimizer.lr=1e6", "optimizer.min_lr=0"]
        try:
            train(load_config("configs/base/qwen-nano.yaml", overrides))
            error = "no error"
        except FloatingPointError as e:
            error = f"{type(e).__name__}: {e}"
        saved = sorted(p.name for p in (run_dir / "checkpoints").glob("iter_*"))
        out[name] = {
            "error": error,
            "saved": saved,
            "max_abs": [_max_abs_weight(run_dir / "checkpoints" / ckpt) for ckpt in saved],
        }
    return out


def test_lr_explosion_stops_before_a_checkpoint_of_exploded_weights(tmp_path, stdlib_shard):
    out = run_distributed(_explosion_runs, str(tmp_path), stdlib_shard, world_size=1)
    warmup, no_warmup = out["warmup"], out["no_warmup"]
    # Step 1 (LR 0) is saved with its sane weights (norms start at 1, the rest near 0); the
    # step-2 update is caught before its save.
    assert warmup["saved"] == ["iter_0000001"] and warmup["max_abs"][0] <= 1.0, warmup
    assert warmup["error"].startswith("SpikeError: step 2: the update changed the norm of the ")
    assert "train.spike_factor=10" in warmup["error"]
    assert "Newest checkpoint: " in warmup["error"] and warmup["error"].endswith("iter_0000001")
    # Without warmup the first step explodes: nothing is saved at all.
    assert no_warmup["saved"] == [] and no_warmup["error"].startswith("SpikeError: step 1: ")


def test_cli_reports_a_diverged_run_in_one_line(tmp_path, stdlib_shard):
    root = Path(__file__).resolve().parents[3]
    overrides = _overrides(str(tmp_path / "run"), stdlib_shard) + _TINY_STEPS[:3]
    overrides += ["train.steps=3", "schedule.warmup_steps=0", "optimizer.lr=1e6"]
    out = subprocess.run(
        [sys.executable, "-m", "specialize", "train", "configs/base/qwen-nano.yaml", *overrides],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("training stopped: step 1: the update changed the norm of the weights")
    assert not (tmp_path / "run" / "checkpoints").exists()


def _result(loss: float, grad_norm: float = 1.0):
    from specialize.train.engine import StepResult

    return StepResult(loss=loss, grad_norm=grad_norm, lr=1e-3, num_tokens=64)


def test_spike_guard_stops_on_a_loss_or_grad_norm_spike_naming_step_value_and_mean():
    from specialize.train.trainer import SpikeError, SpikeGuard

    guard = SpikeGuard(factor=3.0, window=4)
    # The first steps have no (meaningful) mean: a large jump there is not a spike.
    for step, loss in enumerate([10.0, 2.0, 50.0, 2.0], start=1):
        guard.check(step, _result(loss), 100.0, 100.0)
    assert guard.checked == 0
    guard.check(5, _result(2.0), 100.0, 100.0)  # window [10, 2, 50, 2]: mean 16
    guard.check(6, _result(2.0), 100.0, 100.0)
    with pytest.raises(SpikeError) as e:  # window [50, 2, 2, 2]: mean 14
        guard.check(7, _result(43.0), 100.0, 100.0)
    assert str(e.value).startswith("step 7: loss 43 is 3.07 times its mean 14 over the previous 4")
    with pytest.raises(SpikeError, match=r"^step 8: gradient norm 40 is 40 times its mean 1 "):
        guard.check(8, _result(2.0, grad_norm=40.0), 100.0, 100.0)
    # The weights' norm is compared from the first step on, growing or shrinking.
    for before, after in ((100.0, 301.0), (100.0, 33.0), (100.0, float("nan"))):
        with pytest.raises(SpikeError, match=r"^step 1: the update "):
            SpikeGuard(factor=3.0, window=4).check(1, _result(2.0), before, after)
    off = SpikeGuard(factor=0.0, window=4)
    for step in range(1, 10):
        off.check(step, _result(10.0**step, grad_norm=10.0**step), 1.0, 10.0**step)


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.spike_factor=0.5", "train.spike_factor=0.5: must be > 1"),
        ("train.spike_factor=-1", "train.spike_factor=-1.0: must be >= 0"),
        ("train.spike_window=0", "train.spike_window=0: must be >= 1"),
    ],
)
def test_spike_settings_are_checked(override, message):
    from specialize.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, ["train.steps=1", override])


def test_checkpointer_refuses_to_save_after_a_diverged_step(monkeypatch):
    from types import SimpleNamespace

    from specialize.train.callbacks import Checkpointer

    saved = []
    monkeypatch.setattr(
        "specialize.train.callbacks.save", lambda *args, **kwargs: saved.append(args)
    )
    trainer = SimpleNamespace(diverged="step 3: loss is nan; stopping", consumed_samples=6)
    with pytest.raises(RuntimeError, match="refusing to save step 3: step 3: loss is nan"):
        Checkpointer()._save(trainer, 3)
    assert saved == []


def test_a_released_stage_closes_its_engine():
    """Between stages the trainer closes its engine (freeing model and optimizer at once)."""
    from types import SimpleNamespace

    from specialize.config import load_config
    from specialize.train.trainer import Trainer

    closed = []
    engine = SimpleNamespace(close=lambda: closed.append(True))
    cfg = load_config("configs/base/qwen-nano.yaml", ["logging.tensorboard=false"])
    trainer = Trainer(cfg, topo=None, derived=None, engine=engine, data=object(), callbacks=[])
    trainer.release()
    assert closed == [True] and trainer.engine is None and trainer.data is None
    trainer.release()  # nothing left to close
    assert closed == [True]


# ----------------------------------------------------------------------------- refused resumes


def _prepare(sources: list[str], out: Path) -> None:
    from base.tokenizer import QwenTokenizer
    from specialize.data.prepare import PrepareOptions, prepare
    from specialize.data.sources import Source, SourceOptions

    prepare(
        [Source("directory", s) for s in sources],
        out,
        QwenTokenizer.load(),
        PrepareOptions(SourceOptions(extensions=(".py",)), filters=(), workers=0),
    )


def _attempt(run) -> str:
    """What a training call did: its error, or how many steps it trained."""
    from specialize.checkpoint import CheckpointError
    from specialize.config import ConfigError

    try:
        trainer = run()
    except (ConfigError, CheckpointError) as e:
        return f"{type(e).__name__}: {e}"
    return f"trained {len(trainer.history)} steps from step {trainer.start_step}"


def _refused_resumes(rank: int, world_size: int, tmp: str, shard: str, other: str) -> dict:
    from specialize.config import load_config
    from specialize.train.run import train

    tmp = Path(tmp)
    data, run_dir = tmp / "data", tmp / "run"
    shutil.copytree(shard, data)

    def run(*extra: str):
        overrides = (
            _overrides(str(run_dir), str(data))
            + _TINY_STEPS
            + ["train.steps=4", "schedule.warmup_steps=1", *extra]
        )
        return lambda: train(load_config("configs/base/qwen-nano.yaml", overrides))

    out = {"first": _attempt(run("train.exit_after_steps=2"))}
    config = (run_dir / "config.yaml").read_text()
    out["other_architecture"] = _attempt(run("model.preset=qwen-tiny", "optimizer.lr=1.5e-3"))
    out["config_after_architecture"] = (run_dir / "config.yaml").read_text() == config
    out["no_resume"] = _attempt(run("checkpoint.resume=false", "optimizer.lr=1.5e-3"))
    out["config_after_no_resume"] = (run_dir / "config.yaml").read_text() == config
    # As if the checkpoint came from a machine where model.spec=auto chose Transformer Engine.
    from specialize.checkpoint import write_checksums

    newest = run_dir / "checkpoints/iter_0000002"
    written = (newest / "lineage.json").read_text()
    out["model_spec"] = json.loads(written)["model_spec"]
    lineage = {**json.loads(written), "model_spec": {"requested": "auto", "resolved": "te"}}
    (newest / "lineage.json").write_text(json.dumps(lineage))
    write_checksums(newest)
    out["other_spec"] = _attempt(run("optimizer.lr=1.5e-3"))
    out["config_after_spec"] = (run_dir / "config.yaml").read_text() == config
    (newest / "lineage.json").write_text(written)
    write_checksums(newest)
    shutil.rmtree(data)  # the data is replaced by other data at the same path
    shutil.copytree(other, data)
    out["changed_data"] = _attempt(run("optimizer.lr=1.5e-3"))
    out["config_after_data"] = (run_dir / "config.yaml").read_text() == config
    out["saved_after_refusals"] = sorted(p.name for p in (run_dir / "checkpoints").glob("iter_*"))
    out["allowed"] = _attempt(run("data.allow_changed=true"))
    out["lineage"] = json.loads((run_dir / "checkpoints/iter_0000004/lineage.json").read_text())
    # Starting another run from this one is not a resume: other data is what init is for.
    child = _overrides(str(tmp / "child"), shard) + _TINY_STEPS
    child += ["train.steps=1", "schedule.warmup_steps=0"]
    out["init"] = _attempt(
        lambda: train(load_config("configs/base/qwen-nano.yaml", [*child, f"init={run_dir}"]))
    )
    return out


@pytest.fixture(scope="module")
def refused_resumes(tmp_path_factory, stdlib_shard) -> dict:
    import sysconfig

    tmp = tmp_path_factory.mktemp("refused")
    other = tmp / "other"
    _prepare([str(Path(sysconfig.get_paths()["stdlib"]) / "json")], other)
    manifests = {
        name: json.loads((Path(path) / "manifest.json").read_text())
        for name, path in (("old", stdlib_shard), ("new", other))
    }
    out = run_distributed(_refused_resumes, str(tmp), stdlib_shard, str(other), world_size=1)
    return {**out, "manifests": manifests, "data": str(tmp / "data")}


def test_resume_refuses_data_replaced_since_the_checkpoint(refused_resumes):
    out = refused_resumes
    old, new = out["manifests"]["old"], out["manifests"]["new"]
    message = out["changed_data"]
    assert message.startswith(f"ConfigError: data.paths: {out['data']} changed: manifest sha256 ")
    assert f"tokens {old['tokens']} -> {new['tokens']}" in message
    assert f"documents {old['documents']} -> {new['documents']}" in message
    assert "iter_0000002 was trained on it; set data.allow_changed=true" in message
    assert "\n" not in message
    assert out["saved_after_refusals"] == ["iter_0000001", "iter_0000002"]
    # Allowed: it continues on the new data, and the new checkpoint records the new manifest.
    assert out["allowed"] == "trained 2 steps from step 2"
    assert out["lineage"]["data_manifests"][out["data"]]["tokens"] == new["tokens"]
    assert out["init"] == "trained 1 steps from step 0"


def test_refused_resume_leaves_the_run_config_alone(refused_resumes):
    out = refused_resumes
    assert out["first"] == "trained 2 steps from step 0"
    assert out["other_architecture"].startswith("CheckpointError: ")
    assert "holds a qwen-nano model but this run builds qwen-tiny" in out["other_architecture"]
    assert out["config_after_architecture"] and out["config_after_data"]


def test_resume_refuses_layers_auto_chose_otherwise_on_another_machine(refused_resumes):
    import torch

    out = refused_resumes
    assert out["model_spec"] == {"requested": "auto", "resolved": "local"}  # what was recorded
    message = out["other_spec"]
    why = "" if torch.cuda.is_available() else " (no CUDA device)"
    assert message.startswith(
        f"ConfigError: model.spec=auto resolves to local on this machine{why}"
    )
    assert message.endswith(
        "iter_0000002 was trained with the te layer spec; resume it where auto resolves to te, or "
        "set model.spec=local to continue with the local layers"
    )
    assert out["config_after_spec"]  # a refused resume leaves the run's records alone


def test_an_explicit_spec_continues_a_checkpoint_of_other_layers(tmp_path, caplog):
    from specialize.config import load_config
    from specialize.train.trainer import check_same_spec

    lineage = {"model_spec": {"requested": "auto", "resolved": "te"}}
    (tmp_path / "lineage.json").write_text(json.dumps(lineage))
    check_same_spec(load_config(None, ["train.steps=1", "model.spec=local"]), tmp_path, warn=True)
    assert f"{tmp_path} was trained with the te layer spec; continuing with model.spec=local" in (
        caplog.text
    )
    (tmp_path / "lineage.json").write_text("{}")  # written before lineage recorded the spec
    check_same_spec(load_config(None, ["train.steps=1"]), tmp_path, warn=True)


def test_fresh_start_over_existing_checkpoints_is_refused_before_training(refused_resumes):
    out = refused_resumes
    assert out["no_resume"].startswith("CheckpointError: checkpoint.resume=false, but ")
    assert "(newest iter_0000002) and a run never overwrites them" in out["no_resume"]
    assert out["config_after_no_resume"]
    assert out["saved_after_refusals"] == ["iter_0000001", "iter_0000002"]
    assert out["lineage"]["preset"] == "qwen-nano"


# ----------------------------------------------------------------------------- one run at a time


def _busy_run(rank: int, world_size: int, tmp: str, shard: str) -> str:
    from specialize.checkpoint import CheckpointError
    from specialize.config import load_config
    from specialize.train.run import train

    signal.alarm(300)  # a rank left waiting for the other would hang the test: kill it instead
    overrides = (
        _overrides(f"{tmp}/busy", shard)
        + _TINY_STEPS
        + ["train.steps=2", "schedule.warmup_steps=0", "train.micro_batch_size=1"]
    )
    try:
        train(load_config("configs/base/qwen-nano.yaml", overrides))
    except CheckpointError as e:
        return str(e)
    raise AssertionError(f"rank {rank} trained in a run directory another process holds")


def test_busy_run_directory_stops_every_rank(tmp_path, stdlib_shard):
    from specialize.train.run import run_directory_lock

    with run_directory_lock(tmp_path / "busy"):
        message = run_distributed(_busy_run, str(tmp_path), stdlib_shard, world_size=2)
    assert message.startswith(
        f"{tmp_path}/busy is in use by another training run (pid {os.getpid()} on "
    )
    assert not (tmp_path / "busy" / "config.yaml").exists()


def test_second_train_on_a_run_directory_fails_fast_naming_the_holder(tmp_path, stdlib_shard):
    root = Path(__file__).resolve().parents[3]
    run_dir = tmp_path / "run"

    def command(lr: str, steps: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "specialize",
            "train",
            "configs/base/qwen-nano.yaml",
            *_overrides(str(run_dir), stdlib_shard),
            *_TINY_STEPS[:3],
            f"train.steps={steps}",
            f"optimizer.lr={lr}",
            "optimizer.min_lr=0",
        ]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        command("1.0e-3", 100_000),
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "config.yaml").is_file():  # written once the first run started
            assert first.poll() is None and time.monotonic() < deadline, (
                "the first run did not start"
            )
            time.sleep(0.5)
        config = (run_dir / "config.yaml").read_text()
        second = subprocess.run(
            command("7.0e-4", 10), cwd=root, env=env, capture_output=True, text=True, timeout=300
        )
        assert first.poll() is None  # the first run was not disturbed
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2
    # One error line; the run's own log lines (the layer spec it resolved) may precede it.
    lines = [line for line in second.stderr.strip().splitlines() if " INFO " not in line]
    assert len(lines) == 1 and lines[0].startswith(
        f"checkpoint error: {run_dir} is in use by another training run (pid {first.pid} on "
    ), second.stderr
    assert (run_dir / "config.yaml").read_text() == config and "lr: 0.001" in config
