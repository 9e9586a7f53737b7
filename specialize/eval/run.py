"""``specialize eval``: one evaluation run of an ``EvalConfig``.

The checkpoint's model is loaded once. Likelihood tasks evaluate it directly; the others prompt it
(``harness.generate_completions``, completions kept beside the results) or take the completions
of ``cfg.score``, and ``harness.score_completions`` grades them. Rank 0 writes the results and
prints what the terminal shows: what a task wrote beside them, a line per task, the results path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from base.tokenizer import QwenTokenizer
from specialize.eval import perplexity  # noqa: F401  (registers the perplexity task)
from specialize.eval.config import EvalConfig
from specialize.eval.harness import (
    generate_completions,
    results_document,
    score_completions,
    summary_line,
    write_results,
)
from specialize.eval.tasks import LikelihoodTask, LoadedModel, Task, TaskError, get_task
from specialize.infer.model import checkpoint_dtype, load_model
from specialize.mcore.distributed import shutdown


def run(cfg: EvalConfig, *, progress: bool = False) -> dict[str, Any] | None:
    """Evaluate ``cfg.tasks`` and write ``cfg.output``; the results document on rank 0, None on
    the other ranks of a TP x PP world. ``progress``: a progress bar while generating."""
    cfg.validate()
    tasks: dict[str, Task] = {name: get_task(name).under(cfg.protocol) for name in cfg.tasks}
    likelihood = [task for task in tasks.values() if isinstance(task, LikelihoodTask)]
    generated = [name for name, task in tasks.items() if not isinstance(task, LikelihoodTask)]
    if likelihood and cfg.checkpoint is None:
        raise TaskError(f"task {likelihood[0].name!r} needs a checkpoint, not --score")
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        loaded = None
        if cfg.checkpoint is not None:
            dtype = cfg.dtype or checkpoint_dtype(cfg.checkpoint)
            model, arch = load_model(cfg.checkpoint, cfg.tp, cfg.pp, dtype=dtype)
            loaded = LoadedModel(model, QwenTokenizer.load(), arch.max_position_embeddings, dtype)
        scores: dict[str, Any] = {}
        for task in likelihood:
            entries = task.evaluate(loaded, cfg)
            scores.update(entries)
            shown = task.write_outputs(entries, cfg) if rank0 else None
            if shown:
                print(shown, end="")
        completions = cfg.score
        if generated and loaded is not None:
            # Kept next to the results, so they can be scored again.
            completions = Path(cfg.output).with_suffix(".completions.jsonl")
            generate_completions(cfg, generated, completions, model=loaded.model, progress=progress)
        if not rank0:
            return None
        if generated:
            scores.update(score_completions(cfg, generated, completions)["tasks"])
        names = [*cfg.tasks, *(name for name in scores if name not in tasks)]
        results = results_document(
            {name: scores[name] for name in names},
            cfg.model_label,
            cfg.checkpoint,
            "scored" if loaded is None else "generated",
            None if loaded is None else loaded.dtype,
        )
        write_results(results, cfg.output)
    finally:
        shutdown()
    for name, result in results["tasks"].items():
        print(summary_line(name, result))
    print(f"results: {cfg.output}")
    return results
