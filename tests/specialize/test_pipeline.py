"""``specialize pipeline``: steps in order, finished steps skipped, a killed run resumed to the same
final metrics, lineage linking every checkpoint to its parent, recipe, data and commit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from specialize.config import ConfigError
from specialize.pipeline import load_pipeline, merge_results

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
    tasks: [perplexity]
    data: {{perplexity: "{text}"}}
    lengths: "32"
    limit: 4
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
            "tasks: [gsm8k]}",
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
    assert {s.mode for s in evals} == {"base", "chat"}
