"""Evaluation tasks: a registry of benchmarks, their data, and the texts training must not contain.

A task knows where its evaluation records come from (a local file, a package that ships them, or a
``datasets`` hub name) and which of their fields are prompts or reference solutions. Domain
packages define and ``register`` their tasks at import time; ``get_task`` finds them through the
``specialize.plugins`` entry points, so this module never names a domain package.

Records are returned in the dataset's published schema (the field names of its official release),
which is also the schema a local file given with ``--data TASK=PATH`` must use.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specialize.plugins import load_plugins

DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json")
# Task names appear in `--tasks a,b` and `--data NAME=PATH`, so they must not contain "," or "=".
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")


class TaskError(ValueError):
    """An unknown or clashing task, or evaluation data that cannot be used. Says what and where."""


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

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise TaskError(
                f"task name {self.name!r}: use lower-case letters, digits, '_', '-' or '.'"
            )
        if not self.domain:
            raise TaskError(f"task {self.name!r}: domain must not be empty")
        extra = [f for f in self.reference_fields if f not in self.required_fields]
        if extra:
            # Otherwise reference_texts could fail on records that passed validation.
            raise TaskError(
                f"task {self.name!r}: reference_fields {extra} must also be required_fields"
            )

    def default_path(self) -> str | None:
        """A local data file used when none is given (data shipped in a package), else None."""
        return None

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
