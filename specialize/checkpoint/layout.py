"""The checkpoints of a run directory: where they are, which count, and whether their files are
intact.

Layout of a run directory::

    <dir>/checkpoints/iter_0000020/   megatron torch_dist shards + common.pt
                      .../config.yaml  the resolved config of the run that wrote it
                      .../lineage.json parent checkpoint, data manifests, git commit, layout
    <dir>/checkpoints/latest           name of the newest complete checkpoint

A checkpoint is written to ``.iter_NNNNNNN.partial`` and renamed when every rank has finished, so
an interrupted save never looks complete.

Every checkpoint records the size and SHA-256 of each of its files in ``checksums.json``; every load
verifies them first. ``latest`` is a hint: a run resumes from its newest complete checkpoint whose
files verify, skipping (with a warning) a corrupt newer one, which a later save of that iteration
moves aside to ``iter_NNNNNNN.corrupt-<time>``. A save never overwrites an existing checkpoint.

Nothing here imports the config or megatron-core, and torch only once a warning is logged: the
config names a stage's final checkpoint with ``iteration_dir`` before it exists, and light
commands find and verify checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

LATEST = "latest"
CHECKSUMS = "checksums.json"
# What dist_checkpointing's torch_dist format cannot load without (checked when no checksums exist).
REQUIRED_FILES = ("metadata.json", "common.pt", ".metadata")
_ITERATION_NAME = re.compile(r"iter_(\d+)")  # not .iter_*.partial, not iter_*.corrupt-*
# Written by a staged run into each stage's run directory; lineage records copy it.
STAGE_FILE = "stage.json"
LINEAGE_FILE = "lineage.json"  # written by ``checkpoint.lineage``; read here, without megatron-core
# An imported checkpoint's ``transformers`` generation defaults, copied verbatim from the source.
GENERATION_CONFIG_FILE = "generation_config.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or incompatible."""


def checkpoint_root(run_dir: str | Path) -> Path:
    """Where a run directory keeps its checkpoints."""
    return Path(run_dir) / "checkpoints"


def iteration_dir(run_dir: str | Path, iteration: int) -> Path:
    """The checkpoint of ``iteration`` in a run directory."""
    return checkpoint_root(run_dir) / f"iter_{iteration:07d}"


def _read_json_object(file: Path, what: str) -> dict:
    """``file``'s JSON object (``{}`` when there is no file); a damaged one is a one-line
    ``CheckpointError`` naming it."""
    if not file.is_file():
        return {}
    try:
        record = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{file}: unreadable {what} ({e})") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{file}: not a {what} (not a JSON object)")
    return record


def read_lineage(path: str | Path) -> dict:
    """A checkpoint's lineage record (``{}`` for a checkpoint written without one, e.g. by an
    older version); a damaged record is a one-line ``CheckpointError`` naming the file."""
    return _read_json_object(Path(path) / LINEAGE_FILE, "lineage record")


def read_generation_config(path: str | Path) -> dict:
    """The ``generation_config.json`` an HF import copied into checkpoint ``path`` (``{}``
    without one: a checkpoint trained here has no generation defaults); a damaged file is a
    one-line ``CheckpointError`` naming it."""
    return _read_json_object(Path(path) / GENERATION_CONFIG_FILE, "generation config")


def partial_dir(final: Path) -> Path:
    """Where the checkpoint ``final`` is written until it is complete."""
    return final.parent / f".{final.name}.partial"


def find_latest(run_dir: str | Path) -> Path | None:
    """The checkpoint a run resumes from: its newest complete one whose files verify.

    ``latest`` is only a hint (deleted, or stale after a kill between a save's rename and its
    marker): every complete ``iter_*`` directory counts. A corrupt newer one is skipped with a
    warning, since resuming from an older one re-trains the same steps; if none verifies, the
    newest corrupt one is named in a CheckpointError."""
    root = checkpoint_root(run_dir)
    intact, corrupt = _newest_intact(root)
    if corrupt:
        if intact is None:
            raise CheckpointError(
                f"{corrupt[0][1]}; {root} holds no earlier intact checkpoint to resume from "
                f"(move {corrupt[0][0].name} aside to train from the start)"
            )
        for _, reason in corrupt:
            _warn(f"{reason}; resuming from {intact}, the newest intact checkpoint")
    elif intact is not None:
        _check_marker(root, intact)
    elif (root / LATEST).is_file():
        _warn(f"{root / LATEST} names {_marker(root)}, but {root} holds no complete checkpoint")
    return intact


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its newest complete checkpoint, which must
    verify: a run directory named for init, eval or export never silently means an older one)."""
    path = Path(path)
    if (path / "metadata.json").is_file():
        return path
    root = checkpoint_root(path)
    intact, corrupt = _newest_intact(root) if path.is_dir() else (None, [])
    if corrupt:
        earlier = f"; the previous checkpoint {intact} verifies: name it instead" if intact else ""
        raise CheckpointError(f"{corrupt[0][1]}{earlier}")
    if intact is None:
        raise CheckpointError(
            f"{path}: not a checkpoint (no metadata.json) and no complete checkpoint in {root}"
        )
    _check_marker(root, intact)
    return intact


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's finished checkpoints, newest first (not verified)."""
    return _complete_checkpoints(checkpoint_root(run_dir))


def _complete_checkpoints(root: Path) -> list[Path]:
    """``iter_*`` directories that a save finished (renamed from ``.partial``), newest first."""
    if not root.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in root.iterdir()
        if (match := _ITERATION_NAME.fullmatch(path.name)) and (path / "metadata.json").is_file()
    ]
    return [path for _, path in sorted(found, reverse=True)]


def _newest_intact(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint that verifies, and the (path, reason) of newer corrupt ones."""
    corrupt = []
    for path in _complete_checkpoints(root):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            corrupt.append((path, str(e)))
            continue
        return path, corrupt
    return None, corrupt


def _marker(root: Path) -> str | None:
    marker = root / LATEST
    return marker.read_text().strip() if marker.is_file() else None


def _check_marker(root: Path, found: Path) -> None:
    named = _marker(root)
    if named is None:
        _warn(f"{root / LATEST} is missing; using {found}, the newest complete checkpoint")
    elif named != found.name:
        _warn(f"{root / LATEST} names {named}; using {found}, the newest intact checkpoint")


_warned: set[str] = set()


def _warn(message: str) -> None:
    """Log once per process, on rank 0 (every rank finds the same)."""
    # Here, not at the top: the config imports this module, and `specialize --help` stays
    # free of torch.
    import torch.distributed as dist

    if message in _warned or (dist.is_initialized() and dist.get_rank() != 0):
        return
    _warned.add(message)
    log.warning(message)


# ----------------------------------------------------------------------------- integrity


def write_checksums(path: Path) -> None:
    """Record the size and SHA-256 of every file of a checkpoint directory (written last)."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    record = {
        "algorithm": "sha256",
        "files": {
            str(p.relative_to(path)): {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in files
        },
    }
    (path / CHECKSUMS).write_text(json.dumps(record, indent=2) + "\n")


# Verified checkpoints and the (name, size, mtime, inode) of their files then: each is hashed once
# per process although the resume path reaches it through find_latest and then a load.
_verified: dict[Path, tuple] = {}


def verify_checkpoint(path: str | Path) -> None:
    """Raise CheckpointError naming the checkpoint and its first missing, truncated or altered
    file. One written before checksums were recorded is only checked for its structure."""
    path = Path(path)
    record_file = path / CHECKSUMS
    if not record_file.is_file():
        for name in REQUIRED_FILES:
            if not (path / name).is_file():
                raise CheckpointError(f"{path}: {name} is missing (not a complete checkpoint)")
        _warn(f"{path}: no {CHECKSUMS} (written by an older version); its files are not verified")
        return
    key, signature = path.resolve(), _file_signature(path)
    if _verified.get(key) == signature:
        return
    try:
        files = json.loads(record_file.read_text())["files"]
        recorded = {
            name: (int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()
        }
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{record_file}: unreadable ({type(e).__name__}: {e})") from None
    for name, (size, _) in recorded.items():  # sizes first: a truncation is found without hashing
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if file.stat().st_size != size:
            raise CheckpointError(
                f"{path}: {name} is {file.stat().st_size} bytes, {size} when saved"
            )
    for name, (_, digest) in recorded.items():
        try:
            actual = _sha256(path / name)
        except OSError as e:
            raise CheckpointError(f"{path}: {name} cannot be read ({e.strerror})") from None
        if actual != digest:
            raise CheckpointError(f"{path}: {name} differs from the checksum recorded at save")
    _verified[key] = signature


def _file_signature(path: Path) -> tuple:
    stats = ((p, p.stat()) for p in sorted(path.rglob("*")) if p.is_file())
    return tuple((str(p), s.st_size, s.st_mtime_ns, s.st_ino) for p, s in stats)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ----------------------------------------------------------------------------- a save's way


def _set_aside(path: Path) -> Path:
    """Rename a corrupt checkpoint out of the way of a new save of its iteration (never delete)."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    os.replace(path, target)
    return target


def make_way_for(path: Path) -> str | None:
    """Before a save of an existing iteration (rank 0): set a corrupt or incomplete checkpoint
    there aside; an intact one is never overwritten, so return the refusal."""
    try:
        if not (path / "metadata.json").is_file():
            raise CheckpointError(f"{path}: metadata.json is missing (an incomplete checkpoint)")
        verify_checkpoint(path)
    except CheckpointError as e:
        target = _set_aside(path)
        log.warning("%s; moved it to %s to save this iteration again", e, target)
        return None
    return f"{path} exists; a save never overwrites a checkpoint (resume from it, or move it away)"


def remove_partial_saves(root: Path) -> None:
    """Delete the ``.partial`` directories of interrupted saves (saves are sequential: any there
    when a save starts is from an interrupted run)."""
    for stale in root.glob(".iter_*.partial"):
        shutil.rmtree(stale)


def mark_latest(final: Path) -> None:
    """Point ``latest`` at the checkpoint ``final`` (replaced atomically)."""
    marker = final.parent / LATEST
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(final.name + "\n")
    os.replace(tmp, marker)


def prune(root: Path, keep_last: int, saved: int | None = None) -> None:
    """Keep the newest ``keep_last`` complete checkpoints up to the one just ``saved``; newer ones
    (corrupt, skipped by a resume) wait to be set aside when their iteration is saved again."""
    if keep_last <= 0:
        return
    done = [
        path
        for path in _complete_checkpoints(root)
        if saved is None or int(_ITERATION_NAME.fullmatch(path.name).group(1)) <= saved
    ]
    for old in done[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)
