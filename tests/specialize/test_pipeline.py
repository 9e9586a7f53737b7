"""``specialize pipeline``: steps in order, finished steps skipped, a killed run resumed to the same
final metrics, lineage linking every checkpoint to its parent, recipe, data and commit."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from specialize.cli import main
from specialize.config import ConfigError
from specialize.pipeline import Pipeline, StepFailed, load_pipeline, merge_results

ROOT = Path(__file__).resolve().parents[2]
NANO = ROOT / "configs/base/qwen-nano.yaml"


def _pipeline(tmp_path: Path, data: str, run_dir: Path) -> Path:
    """Two nano trainings (the second from the first), perplexity of both, a report."""
    text = tmp_path / "heldout.txt"
    if not text.exists():
        import json as json_module

        text.write_text(Path(json_module.__file__).read_text() * 3)
    path = tmp_path / f"{run_dir.name}.yaml"
    common = (
        f'"data.paths=[{data}]", data.seq_length=64, train.micro_batch_size=2, '
        "train.global_batch_size=2, checkpoint.interval=2, logging.tensorboard=false, "
        "logging.progress=false, train.eval_interval=0, schedule.warmup_steps=1"
    )
    path.write_text(
        f"""\
name: test
dir: {run_dir}
nproc: 1
steps:
  - name: note
    kind: run
    command: [python, -c, "import pathlib; pathlib.Path('{run_dir}/note.txt').write_text('x')"]
  - name: first
    recipe: {NANO}
    overrides: [{common}, train.steps=4]
  - name: second
    recipe: {NANO}
    init: first
    overrides: [{common}, train.steps=8, optimizer.lr=1.0e-3]
  - name: scores
    kind: eval
    models: {{first: first, second: second}}
    eval: {{tasks: [perplexity], data: {{perplexity: "{text}"}}, lengths: [32], limit: 4}}
  - name: report
    kind: compare
"""
    )
    return path


def _launch(path: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "specialize", "pipeline", str(path)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kwargs,
    )


def _metrics(run_dir: Path) -> dict:
    return {
        label: json.loads((run_dir / "scores" / f"{label}.json").read_text())["tasks"][
            "perplexity"
        ]["metrics"]
        for label in ("first", "second")
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory, stdlib_shard) -> tuple[Path, Path, str]:
    tmp = tmp_path_factory.mktemp("pipeline")
    path = _pipeline(tmp, stdlib_shard, tmp / "reference")
    done = _launch(path)
    out, _ = done.communicate(timeout=600)
    assert done.returncode == 0, out
    return tmp, tmp / "reference", out


def test_steps_run_in_order_and_write_a_report_and_lineage(reference):
    _, run_dir, out = reference
    assert (run_dir / "note.txt").read_text() == "x"
    report = (run_dir / "report" / "report.md").read_text()
    assert "| second |" in report and "perplexity" in report
    assert (run_dir / "report" / "chart-perplexity.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Scores" in out  # the table is printed at the end
    lineage = json.loads((run_dir / "lineage.json").read_text())
    steps = {s["name"]: s for s in lineage["steps"]}
    assert all(s["finished"] for s in steps.values())
    first, second = steps["first"], steps["second"]
    assert first["checkpoint"].endswith("first/checkpoints/iter_0000004")
    assert second["parent"] == "first" and second["parent_checkpoint"] == first["checkpoint"]
    assert second["checkpoint"].endswith("second/checkpoints/iter_0000008")
    assert second["recipe"] == str(NANO) and "optimizer.lr=1.0e-3" in second["overrides"]
    (manifest,) = second["data_manifests"].values()
    assert len(manifest["manifest_sha256"]) == 64
    assert second["git_commit"] and lineage["git_commit"]
    metrics = _metrics(run_dir)
    assert set(metrics["second"]) == {"perplexity", "perplexity@32"}


def test_rerun_skips_finished_steps(reference):
    tmp, run_dir, _ = reference
    started = time.monotonic()
    again = _launch(tmp / "reference.yaml")
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    assert out.count("finished earlier; skipping") == 5
    assert time.monotonic() - started < 60


def test_killed_pipeline_resumes_to_the_same_final_metrics(reference, stdlib_shard):
    tmp, reference_dir, _ = reference
    run_dir = tmp / "killed"
    path = _pipeline(tmp, stdlib_shard, run_dir)
    running = _launch(path)
    first_checkpoint = run_dir / "second" / "checkpoints" / "iter_0000002"
    deadline = time.monotonic() + 300
    while not first_checkpoint.is_dir() and time.monotonic() < deadline:
        assert running.poll() is None, running.communicate()[0]
        time.sleep(0.05)
    # A crash: the pipeline, torchrun and its workers (which torchrun puts in sessions of their
    # own) all killed at once, mid-step "second".
    tree = psutil.Process(running.pid)
    processes = [tree, *tree.children(recursive=True)]
    for process in processes:
        process.kill()
    psutil.wait_procs(processes, timeout=30)
    running.wait()
    assert not (run_dir / ".pipeline" / "second.json").exists()
    assert not (run_dir / "second" / "checkpoints" / "iter_0000008").exists()

    resumed = _launch(path)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "resumed from" in out
    assert _metrics(run_dir) == _metrics(reference_dir)


def test_changed_step_is_an_error_not_reused(reference, tmp_path):
    tmp, run_dir, _ = reference
    changed = tmp_path / "changed.yaml"
    changed.write_text(
        (tmp / "reference.yaml").read_text().replace("write_text('x')", "write_text('y')")
    )
    done = _launch(changed)
    out, _ = done.communicate(timeout=120)
    assert done.returncode != 0
    assert "step note: its declaration changed" in out


@pytest.mark.parametrize(
    "steps, message",
    [
        ("  - {name: a, kind: bake}", "kind 'bake' must be one of"),
        ("  - {name: a, kind: run}", "a run step needs a command"),
        ("  - {name: a, kind: train}", "a train step needs a recipe"),
        (
            "  - {name: a, kind: run, command: [x]}\n  - {name: a, kind: run, command: [y]}",
            "unique",
        ),
        (
            "  - {name: a, kind: run, command: [x]}\n  - {name: b, kind: eval, models: {m: a}, "
            "eval: {tasks: [gsm8k]}}",
            "model m=a is not a train step",
        ),
        ("  - {name: r, kind: compare, results: [nothing]}", "not an earlier eval step"),
    ],
)
def test_bad_pipelines_name_the_step(tmp_path, steps, message):
    path = tmp_path / "p.yaml"
    path.write_text(f"dir: {tmp_path}/run\nsteps:\n{steps}\n")
    with pytest.raises(ConfigError, match=message):
        load_pipeline(path)


def test_missing_dir_and_variables(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("steps:\n  - {name: a, kind: run, command: [echo, '${word}']}\n")
    with pytest.raises(ConfigError, match="dir"):
        load_pipeline(path, ["word=hi"])
    cfg = load_pipeline(path, ["word=hi", f"dir={tmp_path}"])
    assert cfg.steps[0].command == ["echo", "hi"]


def test_results_of_one_model_from_two_steps_merge(tmp_path):
    def results(name: str, label: str, task: str) -> Path:
        path = tmp_path / name
        doc = {
            "format": "specialize-eval-1",
            "model": {"label": label},
            "tasks": {task: {"metrics": {"accuracy": 0.5}}},
        }
        path.write_text(json.dumps(doc))
        return path

    merged = merge_results([results("1.json", "m", "gsm8k"), results("2.json", "m", "math401")])
    assert set(merged["m"]["tasks"]) == {"gsm8k", "math401"}
    with pytest.raises(ConfigError, match="m has results for gsm8k already"):
        merge_results([results("1.json", "m", "gsm8k"), results("3.json", "m", "gsm8k")])


@pytest.mark.parametrize("name", ["code-qwen-7b", "code-qwen-14b", "math-qwen-7b", "math-qwen-14b"])
def test_paper_pipelines_resolve_to_the_paper_recipes(name, tmp_path):
    from omegaconf import OmegaConf

    from specialize.config import derive
    from specialize.pipeline import Pipeline

    path = ROOT / "configs" / "pipelines" / f"{name}.yaml"
    node = OmegaConf.load(path)
    required = [k for k in node if OmegaConf.is_missing(node, k)]
    with pytest.raises(ConfigError, match="give it on the command line"):
        load_pipeline(path)
    cfg = load_pipeline(path, [f"{k}={tmp_path / k}" for k in required] + [f"dir={tmp_path}"])
    size = name.rsplit("-", 1)[1]
    for made_earlier in ("base", "code-qwen"):  # by the import step / the CPT step
        (tmp_path / made_earlier).mkdir()
    pipeline = Pipeline(cfg)
    trains = [s for s in cfg.steps if s.kind == "train"]
    assert trains[0].init == f"{tmp_path}/base"  # the imported checkpoint
    for step in trains:
        recipe = pipeline._recipe(step)
        assert recipe.model.preset == f"qwen-{size}"
        assert recipe.checkpoint.dir == str(tmp_path / step.name)
        if not recipe.stages:
            assert derive(recipe, 64).steps > 0
    if name.startswith("code"):
        cpt = pipeline._recipe(trains[0])
        assert cpt.data.seq_length == 8192 and cpt.optimizer.lr == (3e-5 if size == "7b" else 6e-5)
        chat = pipeline._recipe(trains[1])
        assert chat.init.checkpoint == str(tmp_path / "code-qwen") and len(chat.stages) == 2
    else:
        assert pipeline._recipe(trains[0]).data.seq_length == 1024
    evals = [s for s in cfg.steps if s.kind == "eval"]
    assert {s.eval.mode for s in evals} == {"base", "chat"}


# ---- references checked before anything runs


def _bad_pipeline(tmp_path: Path, steps: str) -> Path:
    path = tmp_path / "p.yaml"
    note = tmp_path / "ran.txt"
    path.write_text(
        f"dir: {tmp_path}/run\nsteps:\n"
        f"  - {{name: note, kind: run, command: [touch, {note}]}}\n{steps}\n"
    )
    return path


@pytest.mark.parametrize(
    "steps, message",
    [
        (
            f"  - {{name: a, recipe: {NANO}, init: nothing}}",
            r"steps\[1\] \(a\): init 'nothing' is no earlier step \(note\)",
        ),
        (
            f"  - {{name: a, recipe: {NANO}, init: b}}\n  - {{name: b, recipe: {NANO}, init: a}}",
            r"steps\[1\] \(a\): init 'b' is a later step",
        ),
        (f"  - {{name: a, recipe: {NANO}, init: a}}", r"\(a\): init 'a' is the step itself"),
        (
            "  - {name: e, kind: eval, models: {m: later}, eval: {tasks: [gsm8k]}}\n"
            f"  - {{name: later, recipe: {NANO}}}",
            r"steps\[1\] \(e\): model m 'later' is a later step",
        ),
        (
            "  - {name: e, kind: eval, models: {m: typo}, eval: {tasks: [gsm8k]}}",
            r"\(e\): model m 'typo' is no earlier step",
        ),
        (
            "  - {name: e, kind: eval, models: {m: ./ckpt}, eval: {tasks: [gsm8k], limit: 0}}",
            r"\(e\): eval: --limit 0: must be at least 1",
        ),
        (
            "  - {name: e, kind: eval, models: {m: ./ckpt}, eval: {tasks: [gsm8k], dtype: fp16}}",
            r"\(e\): eval: --dtype 'fp16': must be fp32 or bf16",
        ),
    ],
)
def test_init_or_model_naming_a_missing_or_later_step_is_rejected_before_anything_runs(
    tmp_path, capsys, steps, message
):
    path = _bad_pipeline(tmp_path, steps)
    with pytest.raises(ConfigError, match=message):
        load_pipeline(path)
    with pytest.raises(SystemExit) as exited:
        main(["pipeline", str(path)])
    assert exited.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "ran.txt").exists()  # the first step did not run


def test_an_eval_step_runs_its_models_in_its_dtype(tmp_path, monkeypatch):
    model = f"models: {{m: {tmp_path}/ckpt}}"
    steps = (
        f"  - {{name: e, kind: eval, {model}, eval: {{tasks: [gsm8k], dtype: bf16}}}}\n"
        f"  - {{name: f, kind: eval, {model}, eval: {{tasks: [gsm8k]}}}}"
    )
    pipeline = Pipeline(load_pipeline(_bad_pipeline(tmp_path, steps)))
    configs = []
    monkeypatch.setattr(
        Pipeline, "_exec", lambda self, step, words: configs.append(_eval_config(words))
    )
    for step in pipeline.cfg.steps[1:]:
        pipeline._eval(step)
    given, default = configs
    assert given.dtype == "bf16"
    assert default.dtype is None  # each checkpoint's own


def test_an_eval_step_runs_each_model_with_its_own_config_under_torchrun_when_parallel(
    tmp_path, monkeypatch
):
    (tmp_path / "a").mkdir()
    eval_step = "{tasks: [gsm8k], data: {gsm8k: g.jsonl}, mode: chat, tp: 2, limit: 3}"
    steps = f"  - {{name: e, kind: eval, models: {{a: {tmp_path}/a, b: ./b}}, eval: {eval_step}}}"
    pipeline = Pipeline(load_pipeline(_bad_pipeline(tmp_path, steps)))
    commands = []
    monkeypatch.setattr(Pipeline, "_exec", lambda self, step, words: commands.append(words))
    pipeline._eval(pipeline.cfg.steps[1])
    for words, label, checkpoint in zip(commands, "ab", [f"{tmp_path}/a", "b"]):
        assert words[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
        cfg = _eval_config(words)
        assert (cfg.label, cfg.checkpoint) == (label, checkpoint)
        assert cfg.output == str(tmp_path / "run" / "e" / f"{label}.json")
        assert (cfg.tasks, cfg.data, cfg.mode, cfg.tp, cfg.limit) == (
            ["gsm8k"],
            {"gsm8k": "g.jsonl"},
            "chat",
            2,
            3,
        )


def test_eval_settings_outside_eval_name_their_new_place(tmp_path):
    steps = "  - {name: e, kind: eval, models: {m: ./ckpt}, tasks: [gsm8k], limit: 2}"
    with pytest.raises(
        ConfigError,
        match=r"steps\[1\] \(e\): tasks, limit go under eval: now "
        r"\(eval: \{tasks: \.\.\., limit: \.\.\.\}\)$",
    ):
        load_pipeline(_bad_pipeline(tmp_path, steps))


def test_an_eval_steps_checkpoint_label_and_output_are_the_pipelines(tmp_path):
    steps = "  - {name: e, kind: eval, models: {m: ./ckpt}, eval: {tasks: [gsm8k], label: x}}"
    with pytest.raises(
        ConfigError, match=r"\(e\): eval.label: set by the pipeline, one per model$"
    ):
        load_pipeline(_bad_pipeline(tmp_path, steps))


def test_checkpoint_paths_stay_allowed_as_init_and_models(tmp_path):
    (tmp_path / "base").mkdir()
    steps = (
        f"  - {{name: a, recipe: {NANO}, init: {tmp_path}/made-by-a-run-step}}\n"
        f"  - {{name: e, kind: eval, models: {{b: {tmp_path}/base, a: a}}, "
        "eval: {tasks: [gsm8k]}}"
    )
    cfg = load_pipeline(_bad_pipeline(tmp_path, steps))
    assert cfg.steps[1].init == f"{tmp_path}/made-by-a-run-step"


# ---- changed inputs: steps run by stand-ins (the bookkeeping is what is tested, not training)


def _eval_config(words: list[str]):
    """The config an eval step runs `specialize eval --config FILE` with."""
    from specialize.eval.config import load_eval_config

    assert words[-4:-1] == ["specialize", "eval", "--config"], words
    return load_eval_config(words[-1])


class FakeSteps:
    """Stands in for torchrun and `specialize eval`: a training writes a final checkpoint whose
    bytes differ per training (as a real retraining's do), an eval writes a results file whose
    score depends on the checkpoint; `run` and `compare` steps run for real."""

    def __init__(self, monkeypatch) -> None:
        self.trainings: dict[str, int] = {}
        self.evaluated: list[str] = []
        self.fail_eval_of: str | None = None
        real_exec = Pipeline._exec

        def fake_exec(pipeline, step, words):
            if step.kind == "train":
                return self.train(pipeline, step)
            if step.kind == "eval":
                return self.eval(words)
            return real_exec(pipeline, step, words)

        monkeypatch.setattr(Pipeline, "_exec", fake_exec)
        monkeypatch.setattr("specialize.pipeline.signal.signal", lambda *args: None)

    def train(self, pipeline, step) -> None:
        from specialize.checkpoint import iteration_dir
        from specialize.config import derive

        cfg = pipeline._recipe(step)
        final = iteration_dir(cfg.checkpoint.dir, derive(cfg, 1).steps)
        final.mkdir(parents=True)
        count = self.trainings[step.name] = self.trainings.get(step.name, 0) + 1
        (final / "metadata.json").write_text(json.dumps({"training": count}))
        (final / "weights.distcp").write_bytes(os.urandom(64))
        (final / "lineage.json").write_text(json.dumps({"init": cfg.init.checkpoint}))

    def eval(self, words: list[str]) -> None:
        cfg = _eval_config(words)
        label = cfg.label
        if label == self.fail_eval_of:
            raise StepFailed(f"eval of {label} killed")
        checkpoint = Path(cfg.checkpoint)
        score = len((checkpoint / "weights.distcp").read_bytes()) + sum(os.urandom(1))
        out = Path(cfg.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "format": "specialize-eval-1",
            "model": {"label": label, "checkpoint": str(checkpoint)},
            "tasks": {"perplexity": {"metrics": {"perplexity": float(score)}}},
        }
        out.write_text(json.dumps(doc))
        self.evaluated.append(label)


def _small_pipeline(tmp_path: Path) -> Path:
    """data (a run step writing a manifest) -> first -> second (from first) -> eval -> report."""
    run_dir = tmp_path / "run"
    source = tmp_path / "source.txt"
    source.write_text("version 1")
    write_manifest = (
        "import pathlib, sys; out = pathlib.Path(sys.argv[2]); out.mkdir(parents=True); "
        "(out / 'manifest.json').write_text(pathlib.Path(sys.argv[1]).read_text())"
    )
    data = run_dir / "data"
    common = (
        f'"data.paths=[{data}]", train.steps=2, train.micro_batch_size=2, '
        "train.global_batch_size=2, schedule.warmup_steps=1"
    )
    path = tmp_path / "p.yaml"
    path.write_text(
        f"""\
dir: {run_dir}
steps:
  - {{name: data, kind: run, command: [python, -c, "{write_manifest}", {source}, {data}]}}
  - {{name: first, recipe: {NANO}, overrides: [{common}]}}
  - {{name: second, recipe: {NANO}, init: first, overrides: [{common}]}}
  - {{name: scores, kind: eval, models: {{first: first, second: second}},
     eval: {{tasks: [perplexity]}}}}
  - {{name: report, kind: compare, paper: false}}
"""
    )
    return path


def _run(path: Path) -> Pipeline:
    pipeline = Pipeline(load_pipeline(path), rerun=f"specialize pipeline {path}")
    pipeline.run()
    return pipeline


def _remove(pipeline, name: str) -> None:
    """What the error messages say to do before running a step again."""
    import shutil

    shutil.rmtree(pipeline.root / name)
    (pipeline.root / ".pipeline" / f"{name}.json").unlink()


def test_retrained_parent_stops_each_step_that_used_it_until_that_step_is_run_again(
    tmp_path, monkeypatch
):
    fake = FakeSteps(monkeypatch)
    path = _small_pipeline(tmp_path)
    pipeline = _run(path)
    assert fake.trainings == {"first": 1, "second": 1} and fake.evaluated == ["first", "second"]
    first = pipeline.root / "first" / "checkpoints" / "iter_0000002"
    second = pipeline.root / "second"

    _remove(pipeline, "first")  # first trained again: second was trained from the old one
    with pytest.raises(ConfigError) as error:
        _run(path)
    message = str(error.value)
    assert fake.trainings == {"first": 2, "second": 1}  # second neither skipped nor retrained
    assert message.startswith("step second: its inputs changed since it finished (init first is ")
    assert re.search(
        rf"now {first} sha256:[0-9a-f]{{12}}, was {first} sha256:[0-9a-f]{{12}}\)", message
    )
    assert message.endswith(
        f"to run it again: rm -r {second} {pipeline.root}/.pipeline/second.json && "
        f"specialize pipeline {path}"
    )
    assert "\n" not in message

    _remove(pipeline, "second")  # as told; now the eval of the old checkpoints is stale
    with pytest.raises(
        ConfigError,
        match=r"step scores: its inputs changed since it finished "
        r"\(model first=first is now .*; model second=second is now ",
    ):
        _run(path)
    assert fake.trainings == {"first": 2, "second": 2} and len(fake.evaluated) == 2

    _remove(pipeline, "scores")  # and then the report of the old scores
    with pytest.raises(
        ConfigError,
        match=r"step report: its inputs changed since it finished "
        rf"\(results {pipeline.root}/scores/first.json is now ",
    ):
        _run(path)
    assert len(fake.evaluated) == 4

    _remove(pipeline, "report")
    _run(path)
    lineage = json.loads((pipeline.root / "lineage.json").read_text())
    steps = {s["name"]: s for s in lineage["steps"]}
    assert steps["second"]["inputs"]["init first"] == steps["scores"]["inputs"]["model first=first"]
    _run(path)  # everything finished and consistent: all skipped
    assert fake.trainings == {"first": 2, "second": 2} and len(fake.evaluated) == 4


def test_changed_training_data_manifest_is_an_error_naming_the_step(tmp_path, monkeypatch):
    FakeSteps(monkeypatch)
    path = _small_pipeline(tmp_path)
    pipeline = _run(path)
    (tmp_path / "source.txt").write_text("version 2")
    _remove(pipeline, "data")  # the data prepared again from a changed source
    with pytest.raises(
        ConfigError,
        match=rf"step first: its inputs changed since it finished "
        rf"\(data {pipeline.root}/data is now .*/manifest.json sha256:",
    ):
        _run(path)


def test_touched_or_moved_inputs_are_the_same_inputs(tmp_path, monkeypatch):
    import shutil

    fake = FakeSteps(monkeypatch)
    path = _small_pipeline(tmp_path)
    pipeline = _run(path)
    for file in pipeline.root.rglob("*"):
        os.utime(file, (1, 1))
    _run(path)
    # The whole directory moved elsewhere and run from there.
    moved = tmp_path / "moved"
    shutil.move(pipeline.root, moved)
    Pipeline(load_pipeline(path, [f"dir={moved}"])).run()
    assert fake.trainings == {"first": 1, "second": 1} and len(fake.evaluated) == 2


def test_interrupted_step_whose_input_changed_is_an_error_not_resumed(tmp_path, monkeypatch):
    fake = FakeSteps(monkeypatch)
    path = _small_pipeline(tmp_path)
    fake.fail_eval_of = "second"  # scores stops after writing the results of first
    with pytest.raises(StepFailed):
        _run(path)
    fake.fail_eval_of = None
    pipeline = Pipeline(load_pipeline(path))
    _remove(pipeline, "second")  # second trained again while scores was half done
    with pytest.raises(
        ConfigError,
        match=r"step scores: its inputs changed since it started "
        r"\(model second=second is now .*\); to run it again: rm -r "
        rf"{pipeline.root}/scores {pipeline.root}/.pipeline/scores.started.json",
    ):
        _run(path)
    assert fake.evaluated == ["first"]


def test_step_finished_before_inputs_were_recorded_is_skipped_with_a_warning(
    tmp_path, monkeypatch, caplog
):
    fake = FakeSteps(monkeypatch)
    path = _small_pipeline(tmp_path)
    pipeline = _run(path)
    marker = pipeline.root / ".pipeline" / "second.json"
    marker.write_text(
        json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "inputs"})
    )
    _run(path)
    assert "step second: finished before inputs were recorded; not checked" in caplog.text
    assert fake.trainings == {"first": 1, "second": 1}


@pytest.mark.slow
def test_parent_retrained_as_advised_makes_its_finished_child_an_error(tmp_path, stdlib_shard):
    """Real training: the parent's declaration changes, its error says to remove and re-run it;
    done so, the child trained from the old parent is not skipped as "finished earlier"."""
    import shutil

    run_dir = tmp_path / "run"
    common = (
        f'"data.paths=[{stdlib_shard}]", data.seq_length=32, train.micro_batch_size=2, '
        "train.global_batch_size=2, checkpoint.interval=2, logging.tensorboard=false, "
        "logging.progress=false, train.eval_interval=0, schedule.warmup_steps=1, train.steps=2"
    )
    path = tmp_path / "p.yaml"
    text = f"""\
dir: {run_dir}
steps:
  - {{name: first, recipe: {NANO}, overrides: [{common}]}}
  - {{name: second, recipe: {NANO}, init: first, overrides: [{common}]}}
"""
    path.write_text(text)
    done = _launch(path)
    out, _ = done.communicate(timeout=600)
    assert done.returncode == 0, out
    child = run_dir / "second" / "checkpoints" / "iter_0000002" / "metadata.json"
    child_bytes = child.read_bytes()

    path.write_text(
        text.replace(
            f"{common}]}}\n  - {{name: second",
            f"{common}, optimizer.lr=5.0e-4]}}\n  - {{name: second",
        )
    )
    done = _launch(path)
    out, _ = done.communicate(timeout=300)
    assert done.returncode == 2 and "step first: its declaration changed" in out
    advice = out.split("to run it again: ", 1)[1].splitlines()[0]
    assert advice == (
        f"rm -r {run_dir}/first {run_dir}/.pipeline/first.json && specialize pipeline {path}"
    )
    shutil.rmtree(run_dir / "first")
    (run_dir / ".pipeline" / "first.json").unlink()

    done = _launch(path)
    out, _ = done.communicate(timeout=600)
    assert done.returncode == 2, out
    parent = run_dir / "first" / "checkpoints" / "iter_0000002"
    assert "step first (train): starting" in out and (parent / "metadata.json").is_file()
    assert (
        f"config error: step second: its inputs changed since it finished (init first is now {parent} sha256:"
        in out
    )
    assert "finished earlier; skipping" not in out
    assert child.read_bytes() == child_bytes  # the child's checkpoint is left as it was


def test_changed_eval_text_is_an_error_but_an_added_pycache_is_not(tmp_path, monkeypatch):
    fake = FakeSteps(monkeypatch)
    path = _small_pipeline(tmp_path)
    texts = [tmp_path / "texts-a", tmp_path / "texts-b"]
    for text in texts:
        text.mkdir()
        (text / "module.py").write_text("x = 1\n")
    spec = ",".join(map(str, texts))
    path.write_text(
        path.read_text().replace(
            "tasks: [perplexity]}", f'tasks: [perplexity], data: {{perplexity: "{spec}"}}}}'
        )
    )
    _run(path)
    (texts[1] / "__pycache__").mkdir()  # an import of the held-out code writes bytecode
    (texts[1] / "__pycache__" / "module.cpython-311.pyc").write_bytes(b"\x00" * 16)
    _run(path)
    assert len(fake.evaluated) == 2
    (texts[1] / "module.py").write_text("x = 2\n")
    with pytest.raises(
        ConfigError,
        match=rf"step scores: its inputs changed since it finished \(data perplexity={texts[1]} ",
    ):
        _run(path)


def test_env_reaches_every_step_and_is_recorded_in_the_lineage(tmp_path):
    run_dir = tmp_path / "run"
    path = tmp_path / "env.yaml"
    write = (
        "import os, pathlib, sys; "
        "pathlib.Path(sys.argv[1]).write_text(os.environ['MKL_CBWR'] + os.environ['OMP_NUM_THREADS'])"
    )
    text = f"""\
dir: {run_dir}
env: {{MKL_CBWR: AVX2, OMP_NUM_THREADS: "1"}}
steps:
  - name: shell
    kind: run
    command: [sh, -c, "python -c \\"{write}\\" {run_dir}/shell.txt"]
  - name: direct
    kind: run
    command: [python, -c, "{write}", "{run_dir}/direct.txt"]
    env: {{OMP_NUM_THREADS: "2"}}
"""
    path.write_text(text)
    Pipeline(load_pipeline(path)).run()
    assert (run_dir / "shell.txt").read_text() == "AVX21"
    assert (run_dir / "direct.txt").read_text() == "AVX22"  # the step's own over the pipeline's
    lineage = json.loads((run_dir / "lineage.json").read_text())
    assert lineage["env"] == {"MKL_CBWR": "AVX2", "OMP_NUM_THREADS": "1"}
    assert lineage["steps"][1]["env"] == {"OMP_NUM_THREADS": "2"}
    # How a step runs is not what it is: another thread count does not make it a changed step.
    path.write_text(text.replace('env: {OMP_NUM_THREADS: "2"}', 'env: {OMP_NUM_THREADS: "3"}'))
    Pipeline(load_pipeline(path)).run()
    assert (run_dir / "direct.txt").read_text() == "AVX22"  # finished earlier: skipped


def test_checkpoint_identity_follows_every_byte_its_checksums_recorded(tmp_path):
    from specialize.checkpoint import write_checksums

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "metadata.json").write_text("{}")
    shard = ckpt / "__0_0.distcp"
    shard.write_bytes(bytes(6 << 20))
    write_checksums(ckpt)
    pipeline = Pipeline(load_pipeline(_small_pipeline(tmp_path)))
    before = pipeline._checkpoint_identity(str(ckpt))
    data = bytearray(shard.read_bytes())
    data[3 << 20] = 1  # the middle of a large shard: its first and last MiB alone would miss it
    shard.write_bytes(bytes(data))
    write_checksums(ckpt)  # as a save records it
    after = pipeline._checkpoint_identity(str(ckpt))
    assert before.split(" sha256:")[1] != after.split(" sha256:")[1]


def test_a_second_pipeline_on_the_same_directory_is_refused_naming_the_holder(tmp_path):
    from tests.locking import held_by_another_process

    run_dir = tmp_path / "run"
    path = tmp_path / "p.yaml"
    path.write_text(
        f"dir: {run_dir}\nsteps:\n  - {{name: note, kind: run, command: [python, -c, pass]}}\n"
    )
    with held_by_another_process(run_dir) as pid:
        with pytest.raises(
            ConfigError, match=rf"{run_dir} is in use by another pipeline \(pid {pid} "
        ):
            Pipeline(load_pipeline(path)).run()
    assert not (run_dir / ".pipeline" / "note.json").exists()
    Pipeline(load_pipeline(path)).run()
    assert (run_dir / ".pipeline" / "note.json").is_file()
