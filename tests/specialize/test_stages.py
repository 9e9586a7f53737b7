"""Multi-stage recipes: one file declares the stages, each starts from its predecessor's final
checkpoint with a fresh optimizer and its own schedule, finished stages are skipped and an
interrupted one resumes bitwise."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from specialize.config import (
    ConfigError,
    derive,
    describe,
    load_config,
    resolve_stages,
    stage_configs,
)
from tests.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]
NANO = ROOT / "configs/base/qwen-nano.yaml"

STAGED = f"""\
base: {NANO}
name: staged
data:
  paths: [DATA]
  split: "95,5,0"
  seq_length: 64
train:
  micro_batch_size: 2
  global_batch_size: 2
logging:
  progress: false
  tensorboard: false
stages:
  - name: code
    train: {{steps: 6}}
    schedule: {{warmup_steps: 2}}
  - name: chat
    train: {{steps: 6}}
    optimizer: {{lr: 1.0e-3, min_lr: 1.0e-4}}
    schedule: {{warmup_steps: 3, decay: linear}}
"""


def _recipe(tmp_path: Path, data: str = "data/none", extra: str = "") -> Path:
    path = tmp_path / "staged.yaml"
    path.write_text(STAGED.replace("DATA", data) + extra)
    return path


def _sft_dir(tmp_path: Path, sequences: int) -> Path:
    out = tmp_path / "sft"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"sequences": sequences}))
    return out


# ----------------------------------------------------------------------------- config


def test_stage_sections_merge_field_by_field(tmp_path: Path):
    cfg = load_config(_recipe(tmp_path), [f"checkpoint.dir={tmp_path}/run"])
    assert [s.name for s in cfg.stages] == ["code", "chat"]
    code, chat = stage_configs(cfg)
    assert code.optimizer.lr == 2.0e-3 and chat.optimizer.lr == 1.0e-3  # recipe vs stage
    assert chat.optimizer.weight_decay == cfg.optimizer.weight_decay  # untouched fields stay
    assert chat.schedule.decay == "linear" and code.schedule.decay == "cosine"
    assert code.schedule.warmup_steps == 2 and chat.schedule.warmup_steps == 3
    assert code.data == chat.data == cfg.data
    assert code.stages == chat.stages == []
    assert (code.name, chat.name) == ("staged/code", "staged/chat")


def test_stage_directories_and_inits(tmp_path: Path):
    init = tmp_path / "base-ckpt"
    init.mkdir()
    cfg = load_config(_recipe(tmp_path), [f"checkpoint.dir={tmp_path}/run", f"init={init}"])
    code, chat = resolve_stages(cfg)
    assert code.cfg.checkpoint.dir == f"{tmp_path}/run/stages/1-code"
    assert chat.cfg.checkpoint.dir == f"{tmp_path}/run/stages/2-chat"
    assert code.cfg.init.checkpoint == str(init)
    # Stage 2 starts from stage 1's last checkpoint, which need not exist yet.
    assert chat.cfg.init.checkpoint == f"{tmp_path}/run/stages/1-code/checkpoints/iter_0000006"
    assert chat.cfg.init.checkpoint == str(code.final_checkpoint)
    assert (code.steps, chat.steps, chat.start_step) == (6, 6, 0)


def test_lengths_alternatives_and_epochs(tmp_path: Path):
    sft = _sft_dir(tmp_path, sequences=100)
    overrides = [
        "train.tokens=1e6",  # every stage's default length ...
        "stages[0].train.steps=null",  # ... which stage 1 now takes
        "schedule.warmup_steps=null",
        "schedule.warmup_fraction=0.1",
        "stages[1].data.format=sft",
        f"stages[1].data.paths=[{sft}]",
        "stages[1].train.steps=null",
        "stages[1].epochs=0.3",
    ]
    cfg = load_config(_recipe(tmp_path), overrides)
    code, chat = resolve_stages(cfg)
    assert code.steps == derive(code.cfg, 1).steps == -(-int(1e6) // 128)
    assert code.cfg.schedule.warmup_fraction is None  # the stage's warmup_steps replaced it
    assert derive(code.cfg, 1).warmup_steps == 2
    # 0.3 x 100 sequences / 2 per step: exactly 15 (not 16 from 0.3 * 100 = 30.000000000000004).
    assert chat.steps == chat.cfg.train.steps == 15 and chat.cfg.train.tokens is None
    assert "epochs" in chat.length


def test_stage_errors_name_the_stage(tmp_path: Path):
    recipe = _recipe(tmp_path)
    cases = [
        (["stages[1].optimizer.min_lr=1.0"], "stages[1].optimizer.min_lr=1.0: must be in [0"),
        (["stages[1].data.pathz=[a]"], "stages[1].data.pathz: Key 'pathz' not in 'DataConfig'"),
        (["stages[1].name=code"], "stages[1].name='code': already the name of stages[0]"),
        (["stages[0].name=''"], "stages[0].name: required"),
        (["stages[1].train.steps=null"], "stages[1]: no length"),
        (["stages[0].data.format=sfx"], "stages[0].data.format='sfx': must be one of"),
        (["stages[1].epochs=2"], "stages[1].epochs: exclusive with stages[1].train.steps"),
        (
            ["stages[1].train.steps=null", "stages[1].epochs=2"],
            "stages[1].epochs: needs data.format=sft",
        ),
        (
            ["stages[1].reset.scheduler=false"],
            "stages[1].reset: scheduler=false with iteration=true",
        ),
        (
            ["stages[1].reset.scheduler=false", "stages[1].reset.iteration=false"],
            "stages[1].reset: scheduler=false needs optimizer=false",
        ),
        (
            ["stages[0].reset.optimizer=false"],
            "stages[0].reset.optimizer=false: there is no optimizer",
        ),
        (["stages[3].epochs=1"], "no stages[3]; the recipe declares 2 stage(s)"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError) as e:
            load_config(recipe, overrides)
        assert message in str(e.value), (overrides, str(e.value))
        if "override" not in message and "no stages[3]" not in message:
            assert str(e.value).startswith(f"{recipe}: ")  # the file that declares the stage
    cfg = load_config(recipe, ["stages[1].train.global_batch_size=3"])
    code, chat = resolve_stages(cfg)
    with pytest.raises(
        ConfigError, match=r"^stages\[1\].train.global_batch_size=3: must be a multiple"
    ):
        chat.derive(1)
    with pytest.raises(ConfigError, match="derive each of resolve_stages"):
        derive(cfg, 1)


def test_epochs_need_sft_manifests(tmp_path: Path, stdlib_manifest_dir: Path):
    overrides = ["stages[1].data.format=sft", "stages[1].train.steps=null", "stages[1].epochs=1"]
    cfg = load_config(_recipe(tmp_path, str(stdlib_manifest_dir)), overrides)
    with pytest.raises(
        ConfigError, match=r"stages\[1\].epochs: .* is pretraining data .*train.steps"
    ):
        resolve_stages(cfg)
    cfg = load_config(_recipe(tmp_path, str(tmp_path / "nowhere")), overrides)
    with pytest.raises(ConfigError, match=r"stages\[1\].epochs: .* has no manifest.json"):
        resolve_stages(cfg)


@pytest.fixture
def stdlib_manifest_dir(tmp_path: Path) -> Path:
    """A directory with a pretraining manifest (documents and tokens, no sequences)."""
    out = tmp_path / "pretrain"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"documents": 3, "tokens": 999}))
    return out


def test_config_listing_documents_stage_fields():
    rows = {key: doc for key, _, doc in describe()}
    for key in ("stages", "stages[].name", "stages[].epochs", "stages[].reset.optimizer"):
        assert rows[key], key
    assert rows["data.format"].startswith("pretrain: documents cut into seq_length windows")


def test_dry_run_lists_the_stages(tmp_path: Path):
    sft = _sft_dir(tmp_path, sequences=100)
    overrides = [
        f"checkpoint.dir={tmp_path}/run",
        "stages[1].data.format=sft",
        f"stages[1].data.paths=[{sft}]",
        "stages[1].train.steps=null",
        "stages[1].epochs=0.5",
        "stages[1].reset.optimizer=false",
    ]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "specialize",
            "train",
            str(_recipe(tmp_path)),
            *overrides,
            "--dry-run",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    blocks = re.split(r"^stage \d/2: ", out.split("# 2 stages")[1], flags=re.M)[1:]
    assert [b.splitlines()[0] for b in blocks] == ["code", "chat"]
    code, chat = blocks
    assert "  steps: 6 (train.steps)" in code and "  warmup_steps: 2" in code
    assert "  steps: 25 (epochs: 0.5 x 100 sequences / 2 per step)" in chat
    assert "  warmup_steps: 3" in chat and "  tokens_per_step: 128" in chat
    assert "  init: none (random initialization)" in code
    assert f"  init: {tmp_path}/run/stages/1-code/checkpoints/iter_0000006" in chat
    assert "resets: optimizer, scheduler, iteration" in code
    assert "resets: scheduler, iteration (keeps the optimizer state)" in chat
    # The LR curve of stage 2 starts at its own warmup: 1e-3 x 1/3 after its first step.
    assert "    step 1: 3.333333e-04 (first)" in chat
    assert "    step 3: 1.000000e-03 (end of warmup)" in chat
    assert "    step 25: 1.000000e-04 (last)" in chat
    assert "    step 6: 2.000000e-04 (last)" in code


# ----------------------------------------------------------------------------- training


def _adam_steps(engine) -> list[float]:
    inner = [
        o.optimizer for o in getattr(engine.optimizer, "chained_optimizers", [engine.optimizer])
    ]
    return sorted({float(s["step"]) for o in inner for s in o.state.values() if "step" in s})


def _stage_runs(rank: int, world_size: int, recipe: str, tmp: str) -> dict:
    from specialize.train.dry_run import lr_curve
    from specialize.train.run import train_stages

    def run(name: str, *overrides: str) -> list:
        # One sample-index cache for all runs: GPTDataset builds each distinct index once.
        common = [f"checkpoint.dir={tmp}/{name}", f"data.cache_dir={tmp}/cache"]
        return train_stages(load_config(recipe, [*common, *overrides]))

    def summary(runs) -> list[dict]:
        return [
            {
                "name": r.stage.name,
                "skipped": r.trainer is None,
                "losses": r.trainer and r.trainer.history,
                "lrs": r.trainer and r.trainer.lrs,
                "start": r.trainer and r.trainer.start_step,
                "curve": [
                    lr
                    for _, lr in lr_curve(
                        r.stage.cfg, r.derived, range(r.stage.start_step + 1, r.stage.steps + 1)
                    )
                ],
            }
            for r in runs
        ]

    straight = run("straight")
    adam = {r.stage.name: _adam_steps(r.trainer.engine) for r in straight[-1:]}
    again = run("straight")
    split_first = run("split", "stages[1].train.exit_after_steps=3")
    split_second = run("split")
    return {
        "straight": summary(straight),
        "adam": adam,
        "again": summary(again),
        "split_first": summary(split_first),
        "split_second": summary(split_second),
    }


def test_two_stages_train_skip_and_resume(tmp_path: Path, stdlib_shard: str):
    # A third stage keeps stage 2's optimizer state; a fourth continues stage 3 outright. Each
    # has its own LR, which must win over the one stored in the optimizer state it loads.
    extra = """\
  - name: keep
    train: {steps: 2}
    optimizer: {lr: 5.0e-4, min_lr: 5.0e-4}
    schedule: {warmup_steps: 0, decay: constant}
    reset: {optimizer: false}
  - name: more
    train: {steps: 2}
    optimizer: {lr: 3.0e-4, min_lr: 3.0e-4}
    schedule: {warmup_steps: 0, decay: constant}
    reset: {optimizer: false, scheduler: false, iteration: false}
"""
    recipe = _recipe(tmp_path, stdlib_shard, extra)
    out = run_distributed(_stage_runs, str(recipe), str(tmp_path), world_size=1)
    code, chat, keep, more = out["straight"]
    assert [s["name"] for s in out["straight"]] == ["code", "chat", "keep", "more"]
    assert [len(s["losses"]) for s in out["straight"]] == [6, 6, 2, 2]
    # Every logged LR is the dry-run curve, exactly.
    for stage in out["straight"]:
        assert stage["lrs"] == stage["curve"], stage["name"]
    # Stage 2 starts at its own warmup (1e-3 / 3), not at stage 1's last LR (its min_lr 2e-4).
    assert chat["lrs"][0] == pytest.approx(1.0e-3 / 3) and code["lrs"][-1] == pytest.approx(2.0e-4)
    assert chat["lrs"][2] == pytest.approx(1.0e-3) and chat["lrs"][-1] == pytest.approx(1.0e-4)
    # Stage 2 starts from stage 1's weights: on the same first batch, a random init (the same
    # seed) would score exactly stage 1's first loss.
    assert chat["losses"][0] < code["losses"][0] - 0.1
    # Stage 4 continues stage 3's step count and optimizer: Adam counted 6 + 2 + 2 steps there,
    # so stage 2's optimizer (fresh: 6 steps) was carried into stage 3 and on.
    assert more["start"] == 2 and out["adam"] == {"more": [10.0]}

    # Re-running the finished recipe trains nothing.
    assert [s["skipped"] for s in out["again"]] == [True] * 4

    # Interrupted in stage 2 after 3 of its steps, then re-run: stage 1 is skipped, stage 2 resumes
    # and the rest follows, bitwise as without the interruption.
    first, second = out["split_first"], out["split_second"]
    assert [s["name"] for s in first] == ["code", "chat"] and len(first[1]["losses"]) == 3
    assert first[0]["losses"] == code["losses"]
    assert [s["skipped"] for s in second] == [True, False, False, False]
    assert second[1]["start"] == 3
    assert first[1]["losses"] + second[1]["losses"] == chat["losses"]
    assert first[1]["lrs"] + second[1]["lrs"] == chat["lrs"]
    assert second[2]["losses"] == keep["losses"] and second[3]["losses"] == more["losses"]

    # Lineage: the first checkpoint of stage 2 names stage 1's final checkpoint as its parent.
    stages = tmp_path / "straight" / "stages"
    lineage = json.loads((stages / "2-chat/checkpoints/iter_0000006/lineage.json").read_text())
    assert lineage["parent"] == str(stages / "1-code/checkpoints/iter_0000006")
    assert lineage["stage"]["name"] == "chat" and lineage["stage"]["index"] == 2
    assert lineage["stage"]["reset"] == {"optimizer": True, "scheduler": True, "iteration": True}
    resumed = tmp_path / "split/stages/2-chat/checkpoints"
    lineage = json.loads((resumed / "iter_0000006/lineage.json").read_text())
    assert lineage["parent"] == str(resumed / "iter_0000003")
    more_lineage = json.loads((stages / "4-more/checkpoints/iter_0000004/lineage.json").read_text())
    assert more_lineage["parent"] == str(stages / "3-keep/checkpoints/iter_0000002")


def test_dry_run_of_stages_marks_an_init_not_yet_imported(tmp_path: Path):
    missing = tmp_path / "imported"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "specialize",
            "train",
            str(_recipe(tmp_path)),
            f"init={missing}",
            "--dry-run",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert f"  init: {missing} (MISSING: does not exist yet; the run refuses" in out.stdout
    assert f"# MISSING init.checkpoint={missing}: does not exist yet" in out.stdout


SHORT_STAGES = [
    "data.seq_length=32",
    "stages[0].train.steps=2",
    "stages[0].schedule.warmup_steps=0",
    "stages[1].train.steps=2",
    "stages[1].schedule.warmup_steps=0",
]


def _changed_stage_runs(rank: int, world_size: int, recipe: str, tmp: str, other: str) -> dict:
    import shutil

    from specialize.checkpoint import CheckpointError
    from specialize.train.run import train_stages

    tmp_dir = Path(tmp)
    run_dir = tmp_dir / "run"

    def attempt(*overrides: str) -> str:
        cfg = load_config(recipe, [f"checkpoint.dir={run_dir}", *SHORT_STAGES, *overrides])
        try:
            runs = train_stages(cfg)
        except (ConfigError, CheckpointError) as e:
            return f"{type(e).__name__}: {e}"
        return " ".join("skipped" if r.trainer is None else "trained" for r in runs)

    def records() -> dict[str, str]:
        files = [run_dir / "config.yaml", *sorted(run_dir.glob("stages/*/stage.json"))]
        files += sorted(run_dir.glob("stages/*/config.yaml"))
        return {str(f.relative_to(run_dir)): f.read_text() for f in files}

    out = {"first": attempt()}
    before = records()
    # Stage 2 is longer now (so it resumes) on another model: its checkpoint refuses it.
    out["other_model"] = attempt("model.preset=qwen-tiny", "stages[1].train.steps=3")
    out["records_kept"] = records() == before and len(before) == 5
    shutil.rmtree(tmp_dir / "data")
    shutil.copytree(other, tmp_dir / "data")
    out["changed_data"] = attempt()
    out["records_kept_after_data"] = records() == before
    out["allowed"] = attempt("data.allow_changed=true")
    return out


def test_stages_refuse_changed_data_and_keep_their_records(tmp_path: Path, stdlib_shard: str):
    import shutil
    import sysconfig

    from tests.specialize.train.test_trainer import _prepare

    data = tmp_path / "data"
    shutil.copytree(stdlib_shard, data)
    other = tmp_path / "other"
    _prepare([str(Path(sysconfig.get_paths()["stdlib"]) / "json")], other)
    recipe = _recipe(tmp_path, str(data))
    out = run_distributed(_changed_stage_runs, str(recipe), str(tmp_path), str(other), world_size=1)
    assert out["first"] == "trained trained"
    assert out["other_model"].startswith("CheckpointError: ")
    assert "holds a qwen-nano model but this run builds qwen-tiny" in out["other_model"]
    # The refused launches rewrote neither the recipe's config.yaml nor a stage's records.
    assert out["records_kept"] and out["records_kept_after_data"]
    # A finished stage is kept only on the data it was trained on.
    assert out["changed_data"].startswith(
        f"ConfigError: stage 1/2 'code': data.paths: {data} changed: manifest sha256 "
    )
    assert "set data.allow_changed=true" in out["changed_data"]
    assert out["allowed"] == "skipped skipped"
