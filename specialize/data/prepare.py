"""Tokenize source trees into a Megatron indexed dataset (``.bin``/``.idx``) plus a manifest.

Every matching file is one document followed by ``<|endoftext|>``. Files that cannot be used are
counted per reason in the manifest and logged; they never stop the run. Outputs are written under
temporary names and renamed at the end, the ``.idx`` last: an interrupted run leaves no shard that
megatron-core would open.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from base.tokenizer import QwenTokenizer

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
SKIP_REASONS = ("unreadable", "undecodable", "empty")
MAX_LISTED_SKIPS = 1000  # the counts are always complete; the per-file list is capped
# Directory names never descended into: installed third-party packages inside a stdlib tree, caches.
DEFAULT_EXCLUDE_DIRS = ("site-packages", "dist-packages", "__pycache__", ".git")
BATCH_BYTES = 32 << 20  # text held in memory between tokenizer calls


def bin_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.bin")


def idx_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.idx")


def manifest_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.manifest.json")


def read_manifest(prefix: str | os.PathLike) -> dict:
    """The manifest written next to the shard ``prefix`` by ``prepare_directory``."""
    path = manifest_path(prefix)
    if not path.is_file():
        raise FileNotFoundError(f"no manifest for dataset prefix {os.fspath(prefix)}: {path}")
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def tool_version() -> str:
    try:
        return importlib.metadata.version("qwen-specialize")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class _Skips:
    def __init__(self) -> None:
        self.counts = dict.fromkeys(SKIP_REASONS, 0)
        self.files: list[dict[str, str]] = []

    def add(self, name: str, reason: str, detail: str = "") -> None:
        self.counts[reason] += 1
        if len(self.files) < MAX_LISTED_SKIPS:
            self.files.append({"path": name, "reason": reason, "detail": detail})


def _walk(
    sources: list[Path],
    extensions: tuple[str, ...],
    skips: _Skips,
    exclude_dirs: tuple[str, ...] = (),
) -> Iterator[tuple[Path, str]]:
    """(file, name) in a fixed order; a name is ``<source index>/<path relative to the source>``."""
    for i, source in enumerate(sources):
        if source.is_file():  # named explicitly: taken whatever its extension
            yield source, f"{i}/{source.name}"
            continue

        def on_error(err: OSError, i: int = i, source: Path = source) -> None:
            where = Path(err.filename or source)
            rel = where.relative_to(source).as_posix() if where.is_relative_to(source) else where
            skips.add(f"{i}/{rel}", "unreadable", f"directory: {err.strerror or err}")

        for dirpath, dirnames, filenames in os.walk(source, onerror=on_error):
            dirnames[:] = sorted(d for d in dirnames if d not in exclude_dirs)
            for name in sorted(filenames):
                if name.endswith(extensions):
                    path = Path(dirpath) / name
                    yield path, f"{i}/{path.relative_to(source).as_posix()}"


def prepare_directory(
    sources: list[Path],
    out_prefix: Path,
    tokenizer: QwenTokenizer,
    extensions: tuple[str, ...] = (".py",),
    num_threads: int = 2,
    batch_size: int = 512,
    exclude_dirs: tuple[str, ...] = DEFAULT_EXCLUDE_DIRS,
) -> dict:
    """Tokenize every file under ``sources`` whose name ends with one of ``extensions``.

    Writes ``{out_prefix}.bin``, ``.idx`` (int32 token ids, one document per file) and
    ``.manifest.json``, and returns the manifest.
    """
    sources = [Path(s).expanduser().resolve() for s in sources]
    out_prefix = Path(out_prefix).expanduser().resolve()
    if not sources:
        raise ValueError("no sources given")
    if not extensions:
        raise ValueError("no file extensions given")
    for source in sources:
        if not source.exists():
            raise FileNotFoundError(f"source not found: {source}")
    out_prefix.parent.mkdir(parents=True, exist_ok=True)

    suffix = f".tmp{os.getpid()}"
    tmp_bin = Path(f"{bin_path(out_prefix)}{suffix}")
    tmp_idx = Path(f"{idx_path(out_prefix)}{suffix}")
    tmp_manifest = Path(f"{manifest_path(out_prefix)}{suffix}")
    skips = _Skips()
    hashes: list[tuple[str, str]] = []
    files = documents = tokens = 0
    builder = IndexedDatasetBuilder(str(tmp_bin), dtype=numpy.int32)  # ids exceed uint16
    try:
        pending: list[str] = []
        pending_bytes = 0

        def flush() -> None:
            nonlocal documents, tokens, pending_bytes
            for ids in tokenizer.encode_batch(pending, num_threads=num_threads):
                ids.append(tokenizer.eod)
                builder.add_document(numpy.asarray(ids, dtype=numpy.int32), [len(ids)])
                documents += 1
                tokens += len(ids)
            pending.clear()
            pending_bytes = 0

        for path, name in _walk(sources, tuple(extensions), skips, tuple(exclude_dirs)):
            files += 1
            try:
                data = path.read_bytes()
            except OSError as e:
                skips.add(name, "unreadable", e.strerror or str(e))
                continue
            hashes.append((name, hashlib.sha256(data).hexdigest()))
            if not data:
                skips.add(name, "empty")
                continue
            try:
                pending.append(data.decode("utf-8"))
            except UnicodeDecodeError as e:
                skips.add(name, "undecodable", f"byte {e.start}: {e.reason}")
                continue
            pending_bytes += len(data)
            if len(pending) >= batch_size or pending_bytes >= BATCH_BYTES:
                flush()
        flush()
        builder.finalize(str(tmp_idx))

        skipped = sum(skips.counts.values())
        if skipped:
            detail = ", ".join(f"{n} {r}" for r, n in skips.counts.items() if n)
            logger.warning(
                "skipped %d of %d files (%s); listed in %s",
                skipped,
                files,
                detail,
                manifest_path(out_prefix),
            )
        if documents == 0:
            raise ValueError(
                f"no documents to write: {files} files matched {', '.join(extensions)} under "
                f"{', '.join(map(str, sources))}, skipped: {skips.counts}"
            )

        inputs_hash = hashlib.sha256()
        for name, digest in sorted(hashes):
            inputs_hash.update(f"{name}\t{digest}\n".encode())
        manifest = {
            "format": MANIFEST_FORMAT,
            "inputs": {
                "sources": [str(s) for s in sources],
                "extensions": list(extensions),
                "exclude_dirs": list(exclude_dirs),
                "files": files,
                "sha256": inputs_hash.hexdigest(),
            },
            "documents": documents,
            "tokens": tokens,
            "dtype": "int32",
            "skipped": skips.counts,
            "skipped_files": skips.files,
            "tokenizer": {
                "class": type(tokenizer).__name__,
                "sha256": tokenizer.sha256,
                "vocab_size": tokenizer.vocab_size,
                "eod": tokenizer.eod,
            },
            "tool": {"name": "qwen-specialize", "version": tool_version()},
        }
        tmp_manifest.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")

        # The .idx is what makes a prefix a dataset: remove the old one first, publish the new last.
        idx_path(out_prefix).unlink(missing_ok=True)
        os.replace(tmp_bin, bin_path(out_prefix))
        os.replace(tmp_manifest, manifest_path(out_prefix))
        os.replace(tmp_idx, idx_path(out_prefix))
    finally:
        builder.data_file.close()
        for tmp in (tmp_bin, tmp_idx, tmp_manifest):
            tmp.unlink(missing_ok=True)
    logger.info(
        "wrote %s: %d documents, %d tokens from %d files", out_prefix, documents, tokens, files
    )
    return manifest
