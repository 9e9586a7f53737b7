"""Evaluation tasks: a registry of benchmarks, their data, and the texts training must not contain.

A task knows where its evaluation records come from (a local file, a package that ships them, or a
``datasets`` hub name) and which of their fields are prompts or reference solutions. Domain
packages define and ``register`` their tasks at import time; ``get_task`` finds them through the
``specialize.plugins`` entry points, so this module never names a domain package.

Records are returned in the dataset's published schema (the field names of its official release),
which is also the schema a local file given with ``--data TASK=PATH`` must use.

A task with an evaluation protocol also says, per mode (``base``: few-shot completion of a plain
prompt; ``chat``: a 0-shot ChatML user turn), how its prompts are built (``prompt``), where
generation stops and how long it may run (``protocol``), how a raw completion is cut down to the
part that is graded (``postprocess``), and how completions are graded (``grade``) and summarized
(``metrics``). A generator needs only ``prompts``/``messages`` and ``protocol``; the scorer
(``specialize.eval.harness``) needs the rest.

A ``LikelihoodTask`` is scored from the model itself instead (``evaluate``), so it needs a
checkpoint and has no completions to grade. The engine's own, ``perplexity``, registers when
``specialize.eval.perplexity`` is imported (``specialize.eval.run`` does), not through a plugin:
it needs torch and megatron-core, which looking up the other tasks does not.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from specialize.plugins import load_plugins

if TYPE_CHECKING:
    from specialize.eval.config import EvalConfig

DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json")
# Task names appear in `--tasks a,b` and `--data NAME=PATH`, so they must not contain "," or "=".
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")


MODES = ("base", "chat")
# ``robust``: this project's prompts and graders (the default); ``paper``: byte for byte the script
# behind the published number (Qwen's own, else the harness the field uses for that benchmark).
ROBUST, PAPER = "robust", "paper"
PROTOCOLS = (ROBUST, PAPER)
# Verdicts on one completion; the same words as ``code_sandbox`` uses for program runs.
PASSED, FAILED, TIMEOUT, ERROR = "passed", "failed", "timeout", "error"
STATUSES = (PASSED, FAILED, TIMEOUT, ERROR)
# ``specialize.data.chat.DEFAULT_SYSTEM``, not imported: looking up tasks must not load a tokenizer.
DEFAULT_CHAT_SYSTEM = "You are a helpful assistant."


class TaskError(ValueError):
    """An unknown or clashing task, or evaluation data that cannot be used. Says what and where."""


@dataclass(frozen=True)
class Protocol:
    """How a task is evaluated in one mode: what the generator must do and how it is graded."""

    mode: str
    """``base`` (completion of a plain few-shot prompt) or ``chat`` (ChatML user turn)."""
    shots: int
    """Worked examples in front of each prompt (0 for chat)."""
    stop: tuple[str, ...]
    """Generation stops at the first of these; ``postprocess`` cuts there too."""
    max_new_tokens: int
    """Generation budget per completion."""
    grader: str
    """How completions are judged, e.g. ``sandbox`` or ``math_qwen.graders.gsm8k``."""
    timeout: float | None = None
    """Seconds per program run (code tasks); None when nothing is executed."""
    name: str = ROBUST
    """The protocol's name (``PROTOCOLS``): ``robust``, this project's graders, or ``paper``, the
    reference script behind the published number."""
    reference: str | None = None
    """The script this protocol reproduces, as ``owner/repo:path@commit``; None for ``robust``."""
    max_length: int | None = None
    """Prompt and completion together, in tokens, on top of ``max_new_tokens`` (bigcode's
    ``--max_length_generation``); None: ``max_new_tokens`` alone."""
    repetition_penalty: float | None = 1.0
    """``transformers``' repetition penalty while generating (1: none). None: the checkpoint's
    (its ``generation_config.json``, which an HF import keeps; 1 without one), as the reference
    scripts, which load a model's generation defaults, get it; Qwen's chat scripts force 1."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``stop`` as a list), as written into evaluation results."""
        return {**asdict(self), "stop": list(self.stop)}


@dataclass(frozen=True)
class Grade:
    """The verdict on one completion of one record."""

    status: str
    """``passed``, ``failed``, ``timeout`` (program ran out of time) or ``error`` (the grader or
    sandbox could not judge it; counted as not passed)."""
    answer: str | None = None
    """Gold answer as the grader read it (math); None for code."""
    predicted: str | None = None
    """Answer read from the completion (math); None when it has none, or for code."""
    reason: str | None = None
    """Why it did not pass, when more can be said than ``status``: for a program run, e.g.
    ``failed: AssertionError``, ``failed: killed by signal 9``, ``timed out``, ``error: ...``;
    for a grader that could not read the record, its error."""
    stderr: str | None = None
    """The last lines of the program's stderr (bounded), for a code completion that did not
    pass."""

    @property
    def correct(self) -> bool:
        return self.status == PASSED


def check_mode(mode: str) -> str:
    """``mode`` if it is one of ``MODES``, else a ``TaskError`` listing them."""
    if mode not in MODES:
        raise TaskError(f"evaluation mode {mode!r}: expected one of {', '.join(MODES)}")
    return mode


def truncate(text: str, stops: Iterable[str]) -> str:
    """``text`` up to the earliest occurrence of any of ``stops``."""
    cut = len(text)
    for stop in stops:
        at = text.find(stop)
        if 0 <= at < cut:
            cut = at
    return text[:cut]


@dataclass(frozen=True)
class HubSource:
    """Where ``datasets.load_dataset`` finds a task's records when no local file is given."""

    path: str
    """Hub dataset name, e.g. ``openai/gsm8k``."""
    config: str | None = None
    """Dataset configuration (``name=`` of ``load_dataset``), e.g. ``main``; None for the default."""
    split: str = "test"
    """The split holding the evaluation records."""

    def __str__(self) -> str:
        config = f", config {self.config!r}" if self.config else ""
        return f"{self.path!r} (split {self.split!r}{config})"


@dataclass(frozen=True, kw_only=True)
class Task:
    """One evaluation benchmark. Subclasses (also ``frozen``, ``kw_only`` dataclasses) add
    prompts and graders, or override ``default_path`` / ``reference_texts``."""

    name: str
    """Registry key, lower case, e.g. ``humaneval``."""
    domain: str
    """What the task measures, e.g. ``code`` or ``math``; used to group results."""
    description: str
    """One line for listings: what the records are and how many the published split has."""
    hub: HubSource | None = None
    """Hub dataset used when no local file is given; None when the data ships in a package or
    must be supplied as a file."""
    required_fields: tuple[str, ...] = ()
    """Fields every record must have (published schema); checked on load."""
    reference_fields: tuple[str, ...] = ()
    """String fields holding prompts and reference solutions: the texts for decontamination."""
    id_field: str | None = None
    """Field naming each record in completion files (``task_id``); None: the record's 0-based
    position in the data, as a string."""
    protocols: tuple[str, ...] = (ROBUST,)
    """The protocols (``PROTOCOLS``) this task implements."""
    protocol_name: str = ROBUST
    """The protocol this task object prompts and grades by: set with ``under``; the methods that
    take a ``mode`` follow it."""

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise TaskError(
                f"task name {self.name!r}: use lower-case letters, digits, '_', '-' or '.'"
            )
        if not self.domain:
            raise TaskError(f"task {self.name!r}: domain must not be empty")
        unknown = [p for p in self.protocols if p not in PROTOCOLS] or (
            [] if self.protocol_name in self.protocols else [self.protocol_name]
        )
        if unknown or not self.protocols:
            raise TaskError(
                f"task {self.name!r}: protocols {list(self.protocols)} (in use: "
                f"{self.protocol_name!r}) must be among {', '.join(PROTOCOLS)}"
            )
        extra = [f for f in self.reference_fields if f not in self.required_fields]
        if extra:
            # Otherwise reference_texts could fail on records that passed validation.
            raise TaskError(
                f"task {self.name!r}: reference_fields {extra} must also be required_fields"
            )

    def under(self, protocol: str) -> Task:
        """This task evaluated by ``protocol``; one it does not implement is a ``TaskError``."""
        if protocol not in PROTOCOLS:
            raise TaskError(f"protocol {protocol!r}: must be one of {', '.join(PROTOCOLS)}")
        if protocol not in self.protocols:
            raise TaskError(
                f"task {self.name!r} has no {protocol!r} protocol (it has: "
                f"{', '.join(self.protocols)})"
            )
        return replace(self, protocol_name=protocol)

    def default_path(self) -> str | None:
        """A local data file used when none is given (data shipped in a package), else None."""
        return None

    def data_inputs(self, value: str) -> list[tuple[str, tuple[str, ...] | None]]:
        """What a ``data`` value (``--data TASK=VALUE``) makes the task read, as (path as written,
        the file suffixes read under it when it is a directory; None: every file): a pipeline
        identifies an eval step's inputs by their content with it. Default: the one file named."""
        return [(value, None)]

    def load(self, path: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
        """The evaluation records from ``path``, the packaged data, or the hub, in that order."""
        return load_records(self, path)

    def reference_texts(self, records: Iterable[Mapping[str, Any]]) -> list[str]:
        """Prompts and reference solutions of ``records``, whose n-grams a training corpus must
        not contain. One text per non-blank reference field per record."""
        return [
            text
            for record in records
            for text in (record[field] for field in self.reference_fields)
            if text.strip()
        ]

    # ---- evaluation protocol (override in tasks that can be evaluated) ----

    def record_id(self, record: Mapping[str, Any], index: int) -> str:
        """The id completion files use for ``record``, the ``index``-th of its data."""
        return str(index) if self.id_field is None else str(record[self.id_field])

    def protocol(self, mode: str) -> Protocol:
        """Shots, stop sequences, budget and grader in ``mode`` (``base`` or ``chat``)."""
        raise TaskError(f"task {self.name!r} has no evaluation protocol")

    def prompt(self, record: Mapping[str, Any], mode: str) -> str:
        """The text the model continues: in ``base`` mode the whole few-shot prompt, in ``chat``
        mode the content of the single user turn (render it with ``messages``)."""
        raise TaskError(f"task {self.name!r} has no evaluation protocol")

    def prompts(self, records: Iterable[Mapping[str, Any]], mode: str) -> list[str]:
        """``prompt`` of every record, in order."""
        return [self.prompt(record, mode) for record in records]

    def messages(self, record: Mapping[str, Any]) -> list[dict[str, str]]:
        """The chat-mode conversation of ``record`` (one user turn), for ChatML rendering with
        ``specialize.data.chat.generation_prompt`` (which adds the default system turn)."""
        return [{"role": "user", "content": self.prompt(record, "chat")}]

    def chat_system(self) -> str | None:
        """The chat-mode system turn (``specialize.data.chat.generation_prompt``'s ``system``):
        the engine's default, or None for none (a reference template without one)."""
        return DEFAULT_CHAT_SYSTEM

    def prefill(self, record: Mapping[str, Any]) -> str:
        """Text the chat-mode assistant turn starts with, which the model continues (bigcode's
        HumanEvalPack pre-fills the function's prompt); the completion is what follows it."""
        return ""

    def postprocess(self, record: Mapping[str, Any], completion: str, mode: str) -> str:
        """The part of a raw completion of ``record`` that is graded: here, the text before the
        first stop sequence (a generator that already stopped there gives the same text)."""
        return truncate(completion, self.protocol(mode).stop)

    def grade(
        self,
        records: Sequence[Mapping[str, Any]],
        completions: Sequence[str],
        mode: str,
        workers: int = 2,
    ) -> list[Grade]:
        """Grade post-processed ``completions[i]`` against ``records[i]`` (a record repeats once
        per sample of it); verdicts in input order."""
        raise TaskError(f"task {self.name!r} has no grader")

    def metrics(self, outcomes: Sequence[Sequence[bool]]) -> dict[str, float]:
        """Summary scores from per-record verdicts (one list per record, empty when it has no
        completion, which counts as wrong): ``accuracy``, the mean over records of the fraction
        of correct completions."""
        if not outcomes:
            raise TaskError(f"task {self.name!r}: nothing to score")
        per_record = [sum(o) / len(o) if o else 0.0 for o in outcomes]
        return {"accuracy": sum(per_record) / len(per_record)}


@dataclass(frozen=True)
class LoadedModel:
    """A checkpoint's model as an evaluation runs it (on this rank of its TP x PP world)."""

    model: Any
    """The megatron-core model, weights loaded, in eval mode."""
    tokenizer: Any
    """The Qwen tokenizer."""
    max_position_embeddings: int
    """The longest sequence the checkpoint's architecture was built for."""
    dtype: str
    """``fp32`` or ``bf16``, what it runs in."""


@dataclass(frozen=True, kw_only=True)
class LikelihoodTask(Task):
    """A task scored from the model's own likelihoods (perplexity), not from completions."""

    def evaluate(self, loaded: LoadedModel, cfg: EvalConfig) -> dict[str, dict[str, Any]]:
        """Results entries by name: the task's own, then any it derives (e.g. one per option
        set). Runs on every rank of the model's world."""
        raise TaskError(f"task {self.name!r} has no likelihood evaluation")

    def write_outputs(self, entries: Mapping[str, Any], cfg: EvalConfig) -> str | None:
        """Files written beside ``cfg.output`` from ``entries`` (rank 0), and the text the
        terminal shows about them; None when there are none."""
        return None


class TaskRegistry:
    """Tasks by name. The process-wide one is behind ``register``/``get_task``/``task_names``."""

    def __init__(self) -> None:
        self._tasks: dict[str, Task] = {}

    def register(self, task: Task) -> Task:
        """Add ``task``; a second task with the same name is an error. Returns ``task``."""
        if not isinstance(task, Task):
            raise TypeError(f"expected a Task, got {type(task).__name__}")
        if task.name in self._tasks:
            other = self._tasks[task.name]
            raise TaskError(
                f"task {task.name!r} is already registered ({other.domain}: {other.description})"
            )
        self._tasks[task.name] = task
        return task

    def get(self, name: str) -> Task:
        """The task called ``name``; an unknown name is an error listing the known ones."""
        try:
            return self._tasks[name]
        except KeyError:
            known = ", ".join(self.names()) or "none (no installed plugin registered a task)"
            raise TaskError(f"unknown task {name!r}; known tasks: {known}") from None

    def names(self) -> list[str]:
        """Registered task names, sorted."""
        return sorted(self._tasks)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks


REGISTRY = TaskRegistry()


def register(task: Task) -> Task:
    """Add ``task`` to the process-wide registry (called by domain packages at import)."""
    return REGISTRY.register(task)


def get_task(name: str) -> Task:
    """The registered task ``name``, after loading the installed plugins."""
    load_plugins()
    return REGISTRY.get(name)


def task_names() -> list[str]:
    """All task names the installed plugins register, sorted."""
    load_plugins()
    return REGISTRY.names()


def load_records(task: Task, path: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Read and validate ``task``'s evaluation records.

    ``path`` (``.jsonl``, ``.jsonl.gz``, or ``.json`` holding a list or ``{"data": [...]}``) wins;
    without it the task's packaged file, then its hub dataset is used. Every record must be a JSON
    object with the task's ``required_fields``; errors name the file and line (or record index).
    """
    if path is None:
        path = task.default_path()
    if path is not None:
        located = _read_file(task, Path(path))
    elif task.hub is not None:
        located = _read_hub(task, task.hub)
    else:
        raise TaskError(
            f"task {task.name!r} has no default data source: pass a local file with "
            f"--data {task.name}=PATH ({_suffix_list()}, records with fields "
            f"{', '.join(task.required_fields)})"
        )
    records = [_validate(task, where, record) for where, record in located]
    if not records:
        source = path if path is not None else task.hub
        raise TaskError(f"task {task.name!r}: no records in {source}")
    return records


def _suffix_list() -> str:
    return ", ".join(DATA_SUFFIXES[:-1]) + " or " + DATA_SUFFIXES[-1]


def _read_file(task: Task, path: Path) -> list[tuple[str, Any]]:
    """(location, record) pairs of a local data file; the location is ``file:line`` or
    ``file[index]``."""
    name = path.name.lower()
    if not name.endswith(DATA_SUFFIXES):
        raise TaskError(
            f"task {task.name!r}: {path}: unsupported data file type; expected {_suffix_list()}"
        )
    try:
        if name.endswith(".json"):
            return _read_json(path)
        return list(_read_jsonl(path))
    except OSError as e:
        # Missing file, directory given, truncated or non-gzip ``.gz`` file (BadGzipFile, EOFError).
        raise TaskError(f"task {task.name!r}: cannot read {path}: {e.strerror or e}") from e
    except EOFError as e:
        raise TaskError(f"task {task.name!r}: {path}: truncated gzip file") from e


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TaskError(
                        f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})"
                    ) from e
                yield f"{path}:{lineno}", record
        except UnicodeDecodeError as e:
            # The decoder reads ahead, so only "somewhere after the last good line" is certain.
            raise TaskError(f"{path}: not UTF-8 text after line {lineno} ({e.reason})") from e


def _read_json(path: Path) -> list[tuple[str, Any]]:
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise TaskError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from e
    except UnicodeDecodeError as e:
        raise TaskError(f"{path}: not UTF-8 text ({e.reason})") from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise TaskError(f'{path}: expected a JSON list of records or {{"data": [...]}}')
    return [(f"{path}[{i}]", record) for i, record in enumerate(data)]


def _read_hub(task: Task, hub: HubSource) -> list[tuple[str, Any]]:
    try:
        import datasets  # heavy; only needed when no local file is given

        dataset = datasets.load_dataset(hub.path, hub.config, split=hub.split)
        return [(f"hub dataset {hub} record {i}", r) for i, r in enumerate(dataset)]
    except Exception as e:
        # Offline, unknown name, missing `datasets`, ...: all leave the user with the same fix.
        raise TaskError(
            f"task {task.name!r}: cannot load hub dataset {hub} "
            f"({type(e).__name__}: {e}). Without network access, pass a local copy: "
            f"--data {task.name}=PATH ({_suffix_list()} in the published schema, fields "
            f"{', '.join(task.required_fields)})"
        ) from e


def _validate(task: Task, where: str, record: Any) -> dict[str, Any]:
    if not isinstance(record, Mapping):
        raise TaskError(
            f"{where}: expected a JSON object ({task.name} record), got {type(record).__name__}"
        )
    missing = [f for f in task.required_fields if f not in record]
    if missing:
        raise TaskError(
            f"{where}: {task.name} record is missing field {', '.join(map(repr, missing))} "
            f"(required: {', '.join(task.required_fields)})"
        )
    for field in task.reference_fields:
        if not isinstance(record[field], str):
            raise TaskError(
                f"{where}: {task.name} field {field!r} must be a string, "
                f"got {type(record[field]).__name__}"
            )
    return dict(record)
