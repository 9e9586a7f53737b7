"""``specialize.eval.run``: one evaluation run of an ``EvalConfig``, dispatching on the kind of
each task: a likelihood task evaluates the loaded model and may write files beside the results."""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from specialize.eval import run as run_module
from specialize.eval.config import EvalConfig
from specialize.eval.run import run
from specialize.eval.tasks import LikelihoodTask, TaskError, TaskRegistry, get_task, task_names


def _entry(value: float) -> dict:
    return {
        "protocol": {"grader": "perplexity"},
        "data": {"tokens": 10},
        "metrics": {"perplexity": value},
        "counts": {"total": 1},
        "samples": [],
    }


@dataclass(frozen=True, kw_only=True)
class Toy(LikelihoodTask):
    """Scores the model's max_position_embeddings, and derives a second entry from ``limit``."""

    def evaluate(self, loaded, cfg):
        entries = {self.name: _entry(float(loaded.max_position_embeddings))}
        entries[f"{self.name}[limit]"] = _entry(float(cfg.limit))
        return entries

    def write_outputs(self, entries, cfg):
        return f"{len(entries)} entries beside {cfg.output}\n"


def test_perplexity_is_a_registered_likelihood_task():
    assert isinstance(get_task("perplexity"), LikelihoodTask)
    assert "perplexity" in task_names()


def test_a_likelihood_task_cannot_score_a_completions_file(tmp_path):
    cfg = EvalConfig(score="c.jsonl", tasks=["perplexity"], output=str(tmp_path / "r.json"))
    with pytest.raises(TaskError, match=r"^task 'perplexity' needs a checkpoint, not --score$"):
        run(cfg)


def test_likelihood_tasks_evaluate_the_loaded_model_and_write_beside_the_results(
    tmp_path, monkeypatch, capsys
):
    task_names()  # the plugins register into the real registry, not the stand-in below
    registry = TaskRegistry()
    registry.register(Toy(name="toy", domain="language", description="toy"))
    monkeypatch.setattr("specialize.eval.tasks.REGISTRY", registry)
    arch = SimpleNamespace(max_position_embeddings=64)
    loads = []
    monkeypatch.setattr(run_module, "checkpoint_dtype", lambda ckpt: "bf16")
    monkeypatch.setattr(
        run_module, "load_model", lambda *args, **kwargs: loads.append((args, kwargs)) or (0, arch)
    )
    out = tmp_path / "r.json"
    results = run(EvalConfig(checkpoint="ckpt", tasks=["toy"], output=str(out), limit=3))
    assert loads == [(("ckpt", 1, 1), {"dtype": "bf16"})]
    assert list(results["tasks"]) == ["toy", "toy[limit]"]
    assert results["tasks"]["toy[limit]"]["metrics"] == {"perplexity": 3.0}
    assert results["tasks"]["toy"]["metrics"] == {"perplexity": 64.0}
    assert results["model"] == {
        "label": "ckpt",
        "checkpoint": "ckpt",
        "source": "generated",
        "dtype": "bf16",
    }
    assert json.loads(out.read_text()) == results
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"2 entries beside {out}"
    assert printed[1].startswith("toy: perplexity 64.0000 [10 tokens, 1 windows]")
    assert printed[-1] == f"results: {out}"


def test_each_task_says_which_files_its_data_value_reads():
    """A pipeline fingerprints an eval step's data through the task: one file for a records task,
    the text files of each comma-separated path for perplexity."""
    assert get_task("gsm8k").data_inputs("data/gsm8k.jsonl") == [("data/gsm8k.jsonl", None)]
    read = get_task("perplexity").data_inputs("held-out/, notes.md")
    assert [path for path, _ in read] == ["held-out/", "notes.md"]
    assert all(".py" in suffixes and ".pyc" not in suffixes for _, suffixes in read)
