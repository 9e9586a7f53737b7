"""The config tree: every shipped recipe loads, every field is documented, errors name the field."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from base.long_context_config import LongContextConfig
from specialize.config import (
    MOVED_KEYS,
    ConfigError,
    RecipeConfig,
    derive,
    describe,
    field_docs,
    load_config,
    resolve_stages,
)
from tests.conftest import shipped_recipes

ROOT = Path(__file__).resolve().parents[2]
# Pipeline files (a top-level ``steps:``) are tested in test_pipeline.py, eval configs in eval/.
RECIPES = shipped_recipes()


def load_shipped(recipe: Path, stand_in: Path, overrides: list[str] = ()) -> RecipeConfig:
    """Load a shipped recipe; an init checkpoint it requires (``???``) or names (the output of an
    earlier demo stage, absent here) is stood in for by an existing directory."""
    try:
        return load_config(recipe, overrides)
    except ConfigError as e:
        if not str(e).startswith("init.checkpoint"):
            raise
    return load_config(recipe, [*overrides, f"init={stand_in}"])


def test_code_qwen_recipes_are_shipped():
    names = {str(p.relative_to(ROOT / "configs")) for p in RECIPES}
    assert {"code_qwen/7b-cpt.yaml", "code_qwen/14b-cpt.yaml", "demo/code-cpt.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_shipped_recipe_loads_and_derives(recipe: Path, tmp_path: Path):
    cfg = load_shipped(recipe, tmp_path)
    world = cfg.parallel.tensor * cfg.parallel.pipeline
    # The smallest world the recipe runs on; a staged recipe derives stage by stage.
    for run in [stage.cfg for stage in resolve_stages(cfg)] if cfg.stages else [cfg]:
        derived = derive(run, world)
        assert derived.steps >= 1
        assert derived.tokens_per_step == run.train.global_batch_size * run.data.seq_length


def test_recipes_exist_for_every_paper_preset():
    names = {p.stem for p in (ROOT / "configs" / "base").glob("*.yaml")}
    assert {"qwen-1.8b", "qwen-7b", "qwen-14b", "qwen-tiny"} <= names


def _all_dataclasses(cls=RecipeConfig):
    yield cls
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        default = getattr(cls(), f.name)
        if is_dataclass(default):
            yield from _all_dataclasses(type(default))
        elif typing.get_origin(hints[f.name]) is list:  # list[StageConfig]
            (item,) = typing.get_args(hints[f.name])
            if is_dataclass(item):
                yield from _all_dataclasses(item)


def test_docstring_check_reaches_the_stage_schema():
    names = {cls.__name__ for cls in _all_dataclasses()}
    assert {"StageConfig", "StageResetConfig", "DataConfig"} <= names


def test_every_field_has_a_docstring():
    for cls in _all_dataclasses():
        docs = field_docs(cls)
        missing = [f.name for f in fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__}: fields without a docstring: {missing}"


def test_derived_numbers_of_the_7b_recipe():
    cfg = load_config(ROOT / "configs/base/qwen-7b.yaml")
    derived = derive(cfg, 64)
    assert derived.tokens_per_step == 2048 * 2048  # 4M tokens (paper)
    assert derived.steps == -(-int(2.4e12) // (2048 * 2048))
    assert derived.data_parallel == 32 and derived.micro_batches == 32


def test_base_chain_and_overrides(tmp_path: Path):
    child = tmp_path / "child.yaml"
    child.write_text(
        f"base: {ROOT / 'configs/base/qwen-tiny.yaml'}\noptimizer:\n  lr: 1.0e-4\n  min_lr: 1.0e-5\n"
    )
    cfg = load_config(child, ["train.steps=7", "init=" + str(tmp_path)])
    assert cfg.optimizer.lr == 1e-4 and cfg.train.steps == 7 and cfg.model.preset == "qwen-tiny"
    assert cfg.init.checkpoint == str(tmp_path)


def test_required_fields_must_be_given(tmp_path: Path):
    for text in ("init:\n  checkpoint: ???\n", "init: ???\n"):
        recipe = tmp_path / "needs-init.yaml"
        recipe.write_text(f"base: {ROOT / 'configs/base/qwen-tiny.yaml'}\n{text}")
        with pytest.raises(ConfigError, match=r"init.checkpoint: required by .*give init=PATH"):
            load_config(recipe)
        assert load_config(recipe, [f"init={tmp_path}"]).init.checkpoint == str(tmp_path)
        assert load_config(recipe, [f"init.checkpoint={tmp_path}"]).init.checkpoint == str(tmp_path)


@pytest.mark.parametrize("size", ["7b", "14b"])
def test_code_qwen_cpt_needs_init(size: str):
    with pytest.raises(ConfigError, match="init.checkpoint: required"):
        load_config(ROOT / f"configs/code_qwen/{size}-cpt.yaml")


def test_code_qwen_cpt_recipes(tmp_path: Path):
    """Paper §4.1 (docs/paper.md §7): 90B tokens at 8192, AdamW 0.9/0.95/1e-8, 3% warmup, no decay."""
    for size, lr, tensor in (("7b", 3.0e-5, 2), ("14b", 6.0e-5, 4)):
        cfg = load_config(ROOT / f"configs/code_qwen/{size}-cpt.yaml", [f"init={tmp_path}"])
        assert cfg.model.preset == f"qwen-{size}" and cfg.model.spec == "te"
        assert cfg.precision.dtype == "bf16" and cfg.data.seq_length == 8192
        assert cfg.optimizer.lr == cfg.optimizer.min_lr == lr
        opt = cfg.optimizer
        assert (opt.adam_beta1, opt.adam_beta2, opt.adam_eps) == (0.9, 0.95, 1e-8)
        assert cfg.schedule.decay == "constant" and cfg.schedule.warmup_fraction == 0.03
        assert cfg.train.tokens == 9.0e10 and cfg.train.global_batch_size == 512
        assert cfg.parallel.tensor == tensor and cfg.parallel.sequence_parallel
        assert len(cfg.data.weights) == len(cfg.data.paths) == 2
        assert cfg.model.hidden_dropout == cfg.model.attention_dropout == 0.0
        derived = derive(cfg, 64)
        assert derived.steps == math.ceil(9.0e10 / (512 * 8192)) == 21458
        assert derived.warmup_steps == round(0.03 * derived.steps)


def test_demo_code_cpt_recipe(tmp_path: Path):
    recipe = ROOT / "configs/demo/code-cpt.yaml"
    # Starts from the engine demo's run directory (its newest checkpoint).
    engine = OmegaConf.load(ROOT / "configs/demo/engine.yaml")
    assert OmegaConf.load(recipe).init.checkpoint == engine.checkpoint.dir
    cfg = load_config(recipe, [f"init={tmp_path}"])
    assert cfg.model.preset == "qwen-tiny" and cfg.model.spec == "local"
    assert cfg.precision.dtype == "fp32" and cfg.parallel.tensor == 2
    assert cfg.data.paths == ["runs/demo/data/code"] and cfg.checkpoint.dir == "runs/demo/code-cpt"
    assert cfg.optimizer.lr == cfg.optimizer.min_lr and cfg.schedule.decay == "constant"
    derived = derive(cfg, 2)
    assert derived.steps == 60 and derived.warmup_steps == 2 and derived.data_parallel == 1


def test_warmup_fraction_rounds_to_steps():
    cfg = load_config(None, ["train.steps=1000", "schedule.warmup_fraction=0.03"])
    assert derive(cfg, 1).warmup_steps == 30


def test_warmup_must_end_before_the_run():
    # megatron-core's scheduler asserts warmup < decay steps; say so before building anything.
    cfg = load_config(None, ["train.steps=5", "schedule.warmup_steps=5"])
    with pytest.raises(ConfigError, match="schedule.warmup_steps=5: must be shorter than the run"):
        derive(cfg, 1)


ERRORS = [
    (["parallel.tensor=3"], "parallel.tensor=3: must divide the 4 attention heads of qwen-tiny"),
    (["parallel.pipeline=3"], "parallel.pipeline=3: must divide the 4 layers of qwen-tiny"),
    (["parallel.tensr=2"], "parallel.tensr"),
    (["model.preset=qwen-3b"], "model.preset: unknown preset 'qwen-3b'"),
    (["precision.dtype=fp16"], "precision.dtype='fp16': must be one of fp32, bf16, fp8"),
    (["train.tokens=1e9"], "set exactly one of train.steps and train.tokens"),
    (
        ["schedule.warmup_steps=5", "schedule.warmup_fraction=0.1"],
        "at most one of warmup_steps and warmup_fraction",
    ),
    (["optimizer.min_lr=1.0"], "optimizer.min_lr=1.0"),
    (["data.paths=[a,b]", "data.weights=[1.0]"], "data.weights has 1 entries for 2 data.paths"),
    (["init=/no/such/checkpoint"], "init.checkpoint='/no/such/checkpoint': no such checkpoint"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel: needs parallel.tensor >= 2"),
    (["train.steps=abc"], "train.steps"),
    (["data.format=chat"], "data.format='chat': must be one of pretrain, sft"),
    (
        ["parallel.overlap_param_gather=true"],
        "parallel.overlap_param_gather: needs parallel.distributed_optimizer",
    ),
    (
        [
            "parallel.distributed_optimizer=true",
            "parallel.overlap_param_gather=true",
            "parallel.overlap_grad_reduce=false",
        ],
        "parallel.overlap_param_gather: needs parallel.overlap_grad_reduce",
    ),
    (
        ["model.spec=local", "parallel.tp_comm_overlap=true"],
        "parallel.tp_comm_overlap: needs Transformer Engine",
    ),
    (
        ["model.spec=te", "parallel.tensor=2", "parallel.tp_comm_overlap=true"],
        "parallel.tp_comm_overlap: needs parallel.sequence_parallel",
    ),
    (["parallel.cuda_device_max_connections=0"], "parallel.cuda_device_max_connections=0"),
    (
        ["model.spec=local", "model.gradient_accumulation_fusion=true"],
        "model.gradient_accumulation_fusion: needs the Transformer Engine layers",
    ),
    (
        ["model.spec=te", "precision.dtype=fp8", "precision.fp8_bf16_layers_at_end=1"],
        "precision.fp8_bf16_layers_at_end=1: delayed scaling cannot keep layers in BF16",
    ),
    (
        [
            "model.spec=te",
            "precision.dtype=fp8",
            "precision.fp8_recipe=tensorwise",
            "parallel.pipeline=2",
            "precision.fp8_bf16_layers_at_start=3",
        ],
        "precision.fp8_bf16_layers_at_start=3: must be between 0 and the 2 layers of a pipeline",
    ),
]


@pytest.mark.parametrize("overrides,message", ERRORS, ids=[m for _, m in ERRORS])
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/base/qwen-tiny.yaml", overrides)
    assert message in str(e.value)


def test_fp8_keeps_first_and_last_layer_in_bf16_with_current_scaling():
    """Megatron-Bridge's bf16_with_fp8_current_scaling_mixed: first and last layer in BF16;
    delayed scaling cannot mix BF16 layers in."""
    fp8 = ["model.spec=te", "precision.dtype=fp8"]
    recipe = ROOT / "configs/base/qwen-tiny.yaml"

    def layers(*overrides: str) -> tuple[int, int]:
        return load_config(recipe, [*fp8, *overrides]).precision.fp8_bf16_layers()

    assert layers("precision.fp8_recipe=tensorwise") == (1, 1)
    assert layers("precision.fp8_recipe=delayed") == (0, 0)
    assert layers("precision.fp8_recipe=tensorwise", "precision.fp8_bf16_layers_at_end=0") == (1, 0)
    bf16 = load_config(recipe, ["precision.dtype=bf16", "precision.fp8_recipe=tensorwise"])
    assert bf16.precision.fp8_bf16_layers() == (0, 0)


def test_world_size_checks():
    cfg = load_config(ROOT / "configs/base/qwen-tiny.yaml", ["parallel.tensor=2"])
    with pytest.raises(ConfigError, match="tensor x pipeline = 2 does not divide the 3 processes"):
        derive(cfg, 3)
    cfg = load_config(ROOT / "configs/base/qwen-tiny.yaml", ["train.global_batch_size=6"])
    with pytest.raises(
        ConfigError,
        match="global_batch_size=6: must be a multiple of micro_batch_size x data-parallel size = 4 x 2",
    ):
        derive(cfg, 2)


def test_unknown_key_in_a_recipe_names_the_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimizer:\n  learning_rate: 1.0\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert str(bad) in str(e.value) and "learning_rate" in str(e.value)


def test_cli_rejects_missing_init_with_exit_code_2():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "specialize",
            "train",
            "configs/base/qwen-tiny.yaml",
            "init=/no/such/ckpt",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "no such checkpoint" in out.stderr and "random weights" in out.stderr


def test_cli_dry_run_prints_derived_numbers():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "specialize",
            "train",
            "configs/base/qwen-7b.yaml",
            "--dry-run",
            "--world-size",
            "64",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "tokens_per_step: 4194304" in out.stdout and "warmup_steps: 2000" in out.stdout


def test_cli_dry_run_of_code_qwen_7b_cpt(tmp_path: Path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "specialize",
            "train",
            "configs/code_qwen/7b-cpt.yaml",
            f"init={tmp_path}",
            "--dry-run",
            "--world-size",
            "64",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    steps = math.ceil(9.0e10 / (512 * 8192))
    lines = set(out.stdout.splitlines())
    assert {"tokens_per_step: 4194304", f"steps: {steps}", "data_parallel: 32"} <= lines
    assert f"warmup_steps: {round(0.03 * steps)}" in lines
    assert {"  decay: constant", "  lr: 3.0e-05", "  min_lr: 3.0e-05"} <= lines
    missing = subprocess.run(
        [sys.executable, "-m", "specialize", "train", "configs/code_qwen/7b-cpt.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "init.checkpoint: required" in missing.stderr


def test_training_without_data_is_a_clear_error():
    out = subprocess.run(
        [sys.executable, "-m", "specialize", "train", "configs/base/qwen-nano.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "data.paths: no training data" in out.stderr


def test_architecture_overrides():
    cfg = load_config(
        None,
        [
            "train.steps=1",
            "model.preset=qwen-7b",
            "model.num_query_groups=4",
            "model.rotary_base=1000000",
        ],
    )
    arch = cfg.model.architecture()
    assert arch.name == "qwen-7b+custom" and arch.query_groups == 4 and arch.rotary_base == 1e6
    assert arch.hidden_size == 4096
    assert (
        load_config(None, ["train.steps=1", "model.hidden_size=128"]).model.architecture().name
        == "qwen-tiny"
    )
    with pytest.raises(
        ConfigError, match="model.num_query_groups=3: must divide the 32 attention heads"
    ):
        load_config(None, ["train.steps=1", "model.preset=qwen-7b", "model.num_query_groups=3"])
    with pytest.raises(ConfigError, match="must divide the 2 key/value heads"):
        load_config(
            None,
            [
                "train.steps=1",
                "model.preset=qwen-7b",
                "model.num_query_groups=2",
                "parallel.tensor=4",
            ],
        )


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "data.paths=[x",
            "override 'data.paths=[x': cannot read the value '[x' (while parsing a flow "
            "sequence: did not find expected ',' or ']')",
        ),
        ("optimizer={lr", "override 'optimizer={lr': cannot read the value '{lr'"),
        ("data.cache_dir=${nope}", "data.cache_dir: Interpolation key 'nope' not found"),
    ],
)
def test_malformed_override_is_a_config_error_naming_it(override: str, message: str):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/base/qwen-nano.yaml", [override])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    out = subprocess.run(
        [sys.executable, "-m", "specialize", "config", "configs/base/qwen-nano.yaml", override],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and out.stderr == f"config error: {e.value}\n"


def _dry_run(argv: list[str], capsys) -> tuple[int, str, str]:
    from specialize.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", *argv, "--dry-run"])
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def _machine(monkeypatch, why_not_te: str | None) -> None:
    """Simulate a machine where Transformer Engine is usable (None) or not, for the reason given."""
    import base.spec

    monkeypatch.setattr(base.spec, "why_not_te", lambda: why_not_te)


def test_dry_run_refuses_fp8_this_machine_cannot_run(monkeypatch, capsys):
    _machine(monkeypatch, "import failed: undefined symbol")
    code, _, err = _dry_run(["configs/base/qwen-nano.yaml", "precision.dtype=fp8"], capsys)
    assert code == 2 and err == (
        "config error: precision.dtype=fp8: needs Transformer Engine on CUDA; model.spec=auto "
        "resolves to local on this machine (import failed: undefined symbol); use bf16 or fp32 "
        "here\n"
    )
    local = ["configs/base/qwen-nano.yaml", "precision.dtype=fp8", "model.spec=local"]
    code, _, err = _dry_run(local, capsys)
    assert code == 2 and "precision.dtype=fp8: needs the Transformer Engine layer spec" in err
    # A recipe that names the te spec is planned for a GPU machine from anywhere.
    gpu = ["configs/base/qwen-7b.yaml", "precision.dtype=fp8", "--world-size", "8"]
    code, out, _ = _dry_run(gpu, capsys)
    assert code == 0 and "  dtype: fp8" in out and "\ntokens_per_step: " in out
    # Where Transformer Engine runs, auto resolves to it and fp8 is planned.
    _machine(monkeypatch, None)
    code, out, _ = _dry_run(["configs/base/qwen-nano.yaml", "precision.dtype=fp8"], capsys)
    assert code == 0 and "  dtype: fp8" in out and "\nlayer_spec: te (model.spec=auto)\n" in out


def test_model_spec_te_on_a_machine_without_it_says_why(monkeypatch):
    from specialize.config import check_machine

    _machine(monkeypatch, "transformer_engine 2.13.0 is outside megatron-core 0.16.1's range")
    cfg = load_config(ROOT / "configs/base/qwen-7b.yaml")
    check_machine(cfg, planning=True)  # a GPU recipe is planned anywhere
    with pytest.raises(ConfigError) as e:
        check_machine(cfg)
    assert str(e.value) == (
        "model.spec=te: Transformer Engine is not usable on this machine (transformer_engine "
        "2.13.0 is outside megatron-core 0.16.1's range); use model.spec=local or auto"
    )


@pytest.mark.parametrize(
    "why_not_te, spec",
    [(None, "te"), ("no CUDA device", "local"), ("import failed: undefined symbol", "local")],
)
def test_auto_resolves_once_and_every_reader_sees_it(monkeypatch, tmp_path, why_not_te, spec):
    from types import SimpleNamespace

    from specialize.checkpoint.lineage import lineage_record
    from specialize.data.pretrain import document_attention
    from specialize.data.sft import sft_attention
    from specialize.plan import workload
    from specialize.train.dry_run import summary
    from specialize.train.engine import model_options

    _machine(monkeypatch, why_not_te)
    overrides = ["train.steps=1", "train.micro_batch_size=1", "data.reset_attention_mask=true"]
    cfg = load_config(None, [*overrides, f"checkpoint.dir={tmp_path}"])
    assert cfg.model.spec == "auto" and cfg.model.resolved_spec() == spec
    assert model_options(cfg).spec == spec
    attention = {"te": "thd", "local": "mask"}[spec]
    assert sft_attention(cfg) == document_attention(cfg) == attention
    # The parallel layout a lineage records needs process groups.
    monkeypatch.setattr("specialize.checkpoint.lineage.parallel_layout", lambda: {})
    engine = SimpleNamespace(cfg=cfg, preset=cfg.model.architecture())
    record = lineage_record(engine, iteration=1, consumed_samples=8, parent=None)
    assert record["model_spec"] == {"requested": "auto", "resolved": spec}
    note = "" if why_not_te is None else f"; Transformer Engine not used: {why_not_te}"
    assert f"\nlayer_spec: {spec} (model.spec=auto{note})\n" in summary(cfg, derive(cfg, 1), 1)
    # A plan is for GPUs with Transformer Engine, wherever it is made: auto is te there.
    assert workload(cfg).flash_attention
    assert not workload(load_config(None, ["train.steps=1", "model.spec=local"])).flash_attention


def _sft_data(path: Path, pack: bool) -> Path:
    path.mkdir()
    manifest = {"format": "sft-1", "options": {"pack": pack, "seq_length": 2048}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_thd_batches_hold_one_sequence_checked_at_validation(monkeypatch, tmp_path, capsys):
    packed, unpacked = _sft_data(tmp_path / "p", True), _sft_data(tmp_path / "u", False)
    sft = ["train.steps=1", "data.format=sft", "train.micro_batch_size=2"]
    documents = ["train.steps=1", "data.reset_attention_mask=true", "train.micro_batch_size=4"]
    _machine(monkeypatch, None)
    with pytest.raises(ConfigError) as e:
        load_config(None, [*sft, f"data.paths=[{unpacked},{packed}]"])
    assert str(e.value) == (
        f"train.micro_batch_size=2: packed SFT data ({packed}) with model.spec=auto (te on this "
        "machine) keeps samples apart in the THD layout, one packed sequence per micro-batch; set "
        "it to 1"
    )
    code, _, err = _dry_run(["configs/base/qwen-nano.yaml", *documents], capsys)
    assert code == 2 and err == (
        "config error: train.micro_batch_size=4: data.reset_attention_mask with model.spec=auto "
        "(te on this machine) keeps documents apart in the THD layout, one sequence per "
        "micro-batch; set it to 1 (raise global_batch_size instead)\n"
    )
    with pytest.raises(ConfigError, match="with model.spec=te keeps documents apart"):
        load_config(None, [*documents, "model.spec=te"])
    # One sequence per micro-batch, unpacked samples and data not written yet are fine.
    load_config(None, [*sft[:-1], f"data.paths=[{packed}]", "train.micro_batch_size=1"])
    load_config(None, [*sft, f"data.paths=[{unpacked},{tmp_path / 'later'}]"])
    # The local spec's dense masks take any micro-batch size.
    _machine(monkeypatch, "no CUDA device")
    load_config(None, [*sft, f"data.paths=[{packed}]"])
    load_config(None, documents)


def test_dry_run_plans_with_an_init_not_yet_imported(tmp_path: Path, capsys):
    missing = tmp_path / "imported/qwen-7b"
    recipe, world = "configs/code_qwen/7b-cpt.yaml", ["--world-size", "64"]
    code, out, _ = _dry_run([recipe, f"init={missing}", *world], capsys)
    assert code == 0
    assert f"# MISSING init.checkpoint={missing}: does not exist yet; the run refuses" in out
    assert "tokens_per_step: 4194304" in out
    # The run itself still refuses it.
    with pytest.raises(ConfigError, match="no such checkpoint. Refusing to start from random"):
        load_config(recipe, [f"init={missing}"])
    code, out, _ = _dry_run([recipe, f"init={tmp_path}", *world], capsys)
    assert code == 0 and "MISSING" not in out


def test_overrides_that_build_another_preset_are_named_after_it():
    from base.presets import get_preset
    from specialize.config import architecture_overrides

    nano = get_preset("qwen-nano")
    shape = [f"model.{k}={v}" for k, v in architecture_overrides(nano).items()]
    cfg = load_config(None, ["train.steps=1", "model.preset=qwen-tiny", *shape])
    assert cfg.model.architecture() == nano and cfg.model.architecture().name == "qwen-nano"
    # Stating a preset's own shape (its query groups, implicit in Qwen v1) keeps its name.
    same = load_config(None, ["train.steps=1", "model.num_query_groups=4"])
    assert same.model.architecture().name == "qwen-tiny"
    # A shape no preset has stays custom.
    other = load_config(
        None, ["train.steps=1", "model.preset=qwen-tiny", *shape[:1], "model.num_layers=6"]
    )
    assert other.model.architecture().name == "qwen-tiny+custom"


def test_every_long_context_option_is_under_model_long_context():
    """A long-context option is one field of ``LongContextConfig``: the recipe tree (and
    ``specialize config``) shows it under ``model.long_context``, and its old flat key maps."""
    names = [f.name for f in fields(LongContextConfig)]
    rows = {key: doc for key, _, doc in describe()}
    assert {k for k in rows if k.startswith("model.long_context.")} == {
        f"model.long_context.{name}" for name in names
    }
    assert all(rows[f"model.long_context.{name}"] for name in names)
    assert MOVED_KEYS == {f"model.{name}": f"model.long_context.{name}" for name in names}
    assert not {f"model.{name}" for name in names} & set(rows)  # no longer flat


def test_old_flat_long_context_keys_are_read_at_their_new_place(tmp_path: Path):
    """A run directory's ``config.yaml`` written before ``model.long_context`` (loadable as a
    recipe), an old recipe and an old override all set ``model.long_context.*``."""
    old = tmp_path / "config.yaml"
    old.write_text(
        f"base: {ROOT / 'configs/base/qwen-nano.yaml'}\n"
        "model:\n  rope_scaling: dynamic-ntk\n  rope_alpha: null\n  logn_attention: true\n"
        "  layer_windows: [8, null]\n  train_seq_length: 16\ntrain:\n  steps: 1\n"
    )
    lc = load_config(old).model.long_context
    assert lc == LongContextConfig("dynamic-ntk", None, True, [8, None], 16)
    overrides = [
        "model.rope_scaling=dynamic-ntk",
        "model.logn_attention=true",
        "model.layer_windows=[8,null]",
        "model.train_seq_length=16",
    ]
    cfg = load_config(ROOT / "configs/base/qwen-nano.yaml", ["train.steps=1", *overrides])
    assert cfg.model.long_context == lc
    with pytest.raises(ConfigError, match="model.long_context.layer_windows: has 3 entries"):
        load_config(old, ["model.layer_windows=[8,8,8]"])  # errors name the new key


def test_a_long_context_option_set_twice_in_one_recipe_is_an_error(tmp_path: Path):
    recipe = tmp_path / "both.yaml"
    recipe.write_text(
        "model:\n  logn_attention: true\n  long_context:\n    logn_attention: false\n"
        "train:\n  steps: 1\n"
    )
    with pytest.raises(
        ConfigError, match="model.logn_attention: also set as model.long_context.logn_attention"
    ):
        load_config(recipe)
