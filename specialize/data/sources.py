"""Where ``specialize data prepare`` reads documents: source trees, JSONL, Parquet, ``datasets``.

A source is one of
- a directory: every file whose extension names a known language (or is in ``extensions``) is a
  document, walked in sorted order;
- a single file: one document, whatever its extension;
- ``*.jsonl`` / ``*.jsonl.gz``: one document per line, text in ``text_field``;
- ``*.parquet``: one document per row, read through ``datasets``;
- ``hf:NAME[:CONFIG][@SPLIT]``: a ``datasets`` dataset (a hub name, needs the network, or a local
  dataset directory), streamed.

Directories and files may also be ``fsspec`` URLs (``s3://bucket/corpus/``, ``gs://...``,
``file:///...``; the protocol's package, e.g. ``s3fs``, must be installed): they are listed and read
through fsspec, in the same order and under the same names as a local path.

Documents come out in a fixed order with a stable name (``<source index>/<where>``) that manifests
and logs use. Input that cannot be used is yielded as a reference carrying the reason, so the
pipeline counts it like any other removal.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import posixpath
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Optional

UNKNOWN_LANGUAGE = "unknown"
_LANGUAGES: dict[str, str] = {}  # file extension -> language; filled by domain plugins


def register_languages(extensions: dict[str, str]) -> None:
    """Name the language of files by extension (``{".py": "python"}``)."""
    _LANGUAGES.update(extensions)


def language_of(path: str) -> str:
    return _LANGUAGES.get(os.path.splitext(path)[1], UNKNOWN_LANGUAGE)


def known_extensions() -> tuple[str, ...]:
    return tuple(sorted(_LANGUAGES))


class SourceError(ValueError):
    """A source that cannot be read at all (as opposed to single bad documents, which are counted)."""


@dataclass(frozen=True)
class DocumentRef:
    """One document to process: a file for the worker to read, or text already read."""

    name: str
    language: str
    path: Optional[str] = None
    text: Optional[str] = None
    error: Optional[tuple[str, str]] = None  # (reason, detail) of input that is not a document


@dataclass(frozen=True)
class SourceOptions:
    """How sources are read (part of the output's fingerprint)."""

    extensions: Optional[tuple[str, ...]] = None
    """Directory sources: file extensions to take; None takes every known language's."""
    exclude_dirs: tuple[str, ...] = ("site-packages", "dist-packages", "__pycache__", ".git")
    """Directory names never descended into (installed packages, caches)."""
    text_field: str = "text"
    """JSONL/Parquet/datasets sources: the field holding the document text."""
    language_field: Optional[str] = None
    """Row sources: the field naming the language (else the language of a ``path`` field's
    extension, else "unknown")."""


@dataclass(frozen=True)
class Source:
    kind: str  # directory | file | jsonl | parquet | hub
    location: str

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "location": self.location}


def is_url(location: str) -> bool:
    """Whether ``location`` is an fsspec URL rather than a local path."""
    return "://" in location


def open_binary(location: str) -> BinaryIO:
    """A local path or an fsspec URL, opened for reading bytes."""
    if is_url(location):
        import fsspec

        return fsspec.open(location, "rb").open()
    return open(location, "rb")


def exists(location: str) -> bool:
    """Whether a local path or an fsspec URL exists (as this machine sees it)."""
    if is_url(location):
        import fsspec

        fs, path = fsspec.core.url_to_fs(location)
        return fs.exists(path)
    return os.path.exists(location)


def _kind_of_file(name: str) -> str:
    name = name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "file"


def _parse_url(spec: str) -> Source:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(spec)
        if fs.isdir(path):
            return Source("directory", spec.rstrip("/"))
        if fs.isfile(path):
            return Source(_kind_of_file(posixpath.basename(path)), spec)
    except (ImportError, ValueError, OSError) as e:  # an unknown protocol names its package
        raise SourceError(f"source {spec}: cannot read it through fsspec: {e}") from None
    raise SourceError(f"source not found: {spec} (no such file or directory)")


def parse_source(spec: str) -> Source:
    if is_url(spec):
        return _parse_url(spec)
    if spec.startswith("hf:"):
        if len(spec) == 3:
            raise SourceError(f"source {spec!r}: expected hf:NAME[:CONFIG][@SPLIT]")
        return Source("hub", spec[3:])
    path = Path(spec).expanduser()
    if path.is_dir():
        return Source("directory", str(path.resolve()))
    if path.is_file():
        return Source(_kind_of_file(path.name), str(path.resolve()))
    raise SourceError(
        f"source not found: {spec} (not a file or directory; datasets are named hf:NAME)"
    )


def iter_documents(sources: list[Source], options: SourceOptions) -> Iterator[DocumentRef]:
    """Every document of every source, in order."""
    for index, source in enumerate(sources):
        if source.kind == "directory" and is_url(source.location):
            yield from _walk_url(index, source.location, options)
        elif source.kind == "directory":
            yield from _walk(index, Path(source.location), options)
        elif source.kind == "file":
            name = posixpath.basename(source.location.replace(os.sep, "/"))
            yield DocumentRef(f"{index}/{name}", language_of(name), path=source.location)
        else:
            yield from _rows(index, source.location, iter_rows(source), options)


def _walk(index: int, root: Path, options: SourceOptions) -> Iterator[DocumentRef]:
    extensions = options.extensions if options.extensions is not None else known_extensions()
    errors: list[OSError] = []
    top = str(root)

    def unlistable() -> Iterator[DocumentRef]:
        # A directory that cannot be listed: one counted entry, named like the documents
        # (relative to the source), and the walk goes on.
        while errors:
            err = errors.pop()
            where = os.path.relpath(err.filename or top, top).replace(os.sep, "/")
            yield DocumentRef(
                f"{index}/{'' if where == '.' else where}",
                UNKNOWN_LANGUAGE,
                error=("unreadable", f"directory: {err}"),
            )

    for dirpath, dirnames, filenames in os.walk(top, onerror=errors.append):
        yield from unlistable()
        dirnames[:] = sorted(d for d in dirnames if d not in options.exclude_dirs)
        # Plain string joins: pathlib objects per file cost more than the rest of the walk.
        rel = os.path.relpath(dirpath, top)
        prefix = f"{index}/" if rel == "." else f"{index}/{rel.replace(os.sep, '/')}/"
        for name in sorted(filenames):
            if name.endswith(extensions):
                yield DocumentRef(
                    prefix + name, language_of(name), path=os.path.join(dirpath, name)
                )
    yield from unlistable()  # the source directory itself, or the last one listed


def _walk_url(index: int, url: str, options: SourceOptions) -> Iterator[DocumentRef]:
    """``_walk`` through fsspec: the same order (a directory's files sorted, then its
    subdirectories sorted, depth first; symlinked directories not followed) and names."""
    import fsspec

    extensions = options.extensions if options.extensions is not None else known_extensions()
    fs, root = fsspec.core.url_to_fs(url)

    def visit(directory: str, rel: str) -> Iterator[DocumentRef]:
        try:
            entries = fs.ls(directory, detail=True)
        except OSError as e:
            yield DocumentRef(  # named as ``_walk`` names it: "0/" for the source, "0/sub"
                f"{index}/{rel.rstrip('/')}",
                UNKNOWN_LANGUAGE,
                error=("unreadable", f"directory: {e}"),
            )
            return
        files, subdirs = [], []
        for entry in entries:
            full = entry["name"].rstrip("/")
            name = posixpath.basename(full)
            if entry["type"] == "directory":
                if not entry.get("islink"):  # as os.walk: listed, not descended into
                    subdirs.append((name, full))
            else:
                files.append((name, full))
        for name, full in sorted(files):
            if name.endswith(extensions):
                yield DocumentRef(
                    f"{index}/{rel}{name}", language_of(name), path=fs.unstrip_protocol(full)
                )
        for name, full in sorted(subdirs):
            if name not in options.exclude_dirs:
                yield from visit(full, f"{rel}{name}/")

    yield from visit(root.rstrip("/"), "")


class RowError(ValueError):
    """A JSONL line that is not a record; ``reason`` is how it is counted."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason  # unreadable | undecodable | invalid_json


def iter_rows(source: Source) -> Iterator[tuple[str, Any]]:
    """(where, record) of a JSONL, Parquet or datasets source; a line that is not a record comes
    as (where, RowError) so the caller can count it and go on."""
    if source.kind == "jsonl":
        return _jsonl_rows(source.location)
    if source.kind in ("parquet", "hub"):
        return _datasets_rows(source)
    raise SourceError(f"{source.location}: a {source.kind} source has no records")


def _jsonl_rows(location: str) -> Iterator[tuple[str, Any]]:
    # Read here rather than through `datasets`: its JSON builder fails a whole file on one bad
    # line and does not say which, while a corpus tool must count the line and go on. Bytes are
    # split into lines before decoding: a text-mode reader loses its buffered lines (and the
    # line count) on the first bad byte.
    line_number = 0
    try:
        with _open_rows(location) as f:
            for line_number, raw in enumerate(f, 1):
                if raw.isspace():
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield f"{line_number}", RowError("undecodable", f"byte {e.start}: {e.reason}")
                    continue
                try:
                    yield f"{line_number}", json.loads(line)
                except json.JSONDecodeError as e:
                    message = f"invalid JSON: {e.msg} at column {e.colno}"
                    yield f"{line_number}", RowError("invalid_json", message)
    except (OSError, EOFError, zlib.error) as e:
        # A truncated or corrupt .gz, or an I/O error: the lines before it were read and count.
        stop = line_number + 1
        detail = f"reading {location} stopped at line {stop}: {e} (the lines before were read)"
        yield f"{stop}", RowError("unreadable", detail)


@contextlib.contextmanager
def _open_rows(location: str) -> Iterator[BinaryIO]:
    with open_binary(location) as raw:
        if location.lower().endswith(".gz"):
            with gzip.open(raw, "rb") as f:  # closing a GzipFile leaves ``raw`` open
                yield f
        else:
            yield raw


def _datasets_rows(source: Source) -> Iterator[tuple[str, Any]]:
    import datasets

    if source.kind == "parquet":
        dataset = datasets.load_dataset(
            "parquet", data_files=source.location, split="train", streaming=True
        )
    else:
        name, _, split = source.location.partition("@")
        name, _, config = name.partition(":")
        try:
            dataset = datasets.load_dataset(
                name, config or None, split=split or "train", streaming=True
            )
        except Exception as e:
            raise SourceError(f"source hf:{source.location}: cannot load it: {e}") from e
    for row_number, row in enumerate(dataset):
        yield f"row {row_number}", row


def _rows(
    index: int, location: str, rows: Iterator[tuple[str, Any]], options: SourceOptions
) -> Iterator[DocumentRef]:
    field = options.text_field
    first = True
    for where, row in rows:
        name = f"{index}/{os.path.basename(location)}:{where}"
        if isinstance(row, RowError):
            reason = "malformed" if row.reason == "invalid_json" else row.reason
            yield DocumentRef(name, UNKNOWN_LANGUAGE, error=(reason, str(row)))
            continue
        if first and isinstance(row, dict) and field not in row:
            # A wrong field name would otherwise drop every row, found out after hours.
            raise SourceError(
                f"{location}:{where}: no field {field!r} in the first record (fields: "
                f"{', '.join(map(str, row))}); choose the text field with --text-field"
            )
        first = False
        detail = _not_a_document(row, field)
        if detail:
            yield DocumentRef(name, UNKNOWN_LANGUAGE, error=("malformed", detail))
            continue
        language = None
        if options.language_field:
            language = row.get(options.language_field)
        if not isinstance(language, str) or not language:
            path = row.get("path")
            language = language_of(path) if isinstance(path, str) else UNKNOWN_LANGUAGE
        yield DocumentRef(name, language, text=row[field])


def _not_a_document(row: Any, field: str) -> str:
    """Why ``row`` holds no text in ``field`` ("" if it does)."""
    if not isinstance(row, dict):
        return f"not a JSON object but {_json_type(row)}"
    if field not in row:
        return f"no field {field!r} (fields: {', '.join(map(str, row)) or 'none'})"
    if not isinstance(row[field], str):
        return f"{field!r} is {_json_type(row[field])}, not a string"
    return ""


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"
