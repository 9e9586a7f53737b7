"""Checkpoint directory rules: only complete checkpoints count, the newest N are kept, the latest
marker is a hint, checksums name an altered file, and a corrupt newest checkpoint is skipped on
resume."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from specialize.checkpoint.layout import (
    LINEAGE_FILE,
    CheckpointError,
    find_latest,
    iteration_dir,
    prune,
    read_lineage,
    resolve_checkpoint,
)

LOGGER = "specialize.checkpoint.layout"


def _fake_checkpoint(run: Path, iteration: int, checksums: bool = True) -> Path:
    """A directory shaped like a torch_dist checkpoint (what the directory rules look at)."""
    from specialize.checkpoint.layout import write_checksums

    path = iteration_dir(run, iteration)
    path.mkdir(parents=True)
    (path / "metadata.json").write_text("{}")
    (path / "common.pt").write_bytes(b"common")
    (path / ".metadata").write_bytes(b"metadata")
    (path / "__0_0.distcp").write_bytes(bytes(range(256)) * 64)
    if checksums:
        write_checksums(path)
    return path


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_latest_names_only_complete_checkpoints(tmp_path: Path, caplog):
    assert find_latest(tmp_path) is None
    done = _fake_checkpoint(tmp_path, 10)
    (done.parent / ".iter_0000020.partial").mkdir()  # an interrupted save
    (done.parent / "latest").write_text(done.name + "\n")
    assert find_latest(tmp_path) == done
    assert resolve_checkpoint(tmp_path) == done  # a run directory resolves to its newest checkpoint
    assert resolve_checkpoint(done) == done
    (done.parent / "latest").write_text("iter_0000020\n")  # a marker is a hint, not the truth
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert find_latest(tmp_path) == done
    assert any("names iter_0000020" in w and str(done) in w for w in _warnings(caplog))


def test_resolve_rejects_a_directory_without_checkpoints(tmp_path: Path):
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        resolve_checkpoint(tmp_path)


def test_keep_last(tmp_path: Path):
    for iteration in (5, 10, 15, 20):
        _fake_checkpoint(tmp_path, iteration)
    root = iteration_dir(tmp_path, 0).parent
    prune(root, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000015", "iter_0000020"]
    prune(root, keep_last=0)  # 0 keeps everything
    assert len(list(root.iterdir())) == 2


# ----------------------------------------------------------------------------- the latest marker


def test_missing_latest_marker_finds_the_newest_complete_checkpoint(tmp_path: Path, caplog):
    for iteration in (2, 5, 10):
        newest = _fake_checkpoint(tmp_path, iteration)
    root = newest.parent
    (root / ".iter_0000011.partial").mkdir()  # an interrupted save does not count
    (root / "iter_0000012.corrupt-20240101T000000").mkdir()  # nor one set aside
    (root / "iter_0000012.corrupt-20240101T000000" / "metadata.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert find_latest(tmp_path) == newest
        assert resolve_checkpoint(tmp_path) == newest
    assert any(f"{root / 'latest'} is missing" in w for w in _warnings(caplog))


def test_stale_latest_marker_loses_to_a_newer_complete_checkpoint(tmp_path: Path, caplog):
    """A kill between a save's rename and its marker leaves the marker one checkpoint behind; a
    resume from it would reach the newer iteration and have to overwrite it."""
    older = _fake_checkpoint(tmp_path, 5)
    newer = _fake_checkpoint(tmp_path, 10)
    (older.parent / "latest").write_text(older.name + "\n")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert find_latest(tmp_path) == newer
    assert any("names iter_0000005" in w for w in _warnings(caplog))


def test_keep_last_keeps_checkpoints_newer_than_the_one_saved(tmp_path: Path):
    """Resumed from iter_8 past a corrupt iter_10, saving iter_9 must not prune iter_8 and keep
    the corrupt one (it is set aside when iter_10 is saved again)."""
    for iteration in (7, 8, 9, 10):
        _fake_checkpoint(tmp_path, iteration)
    root = iteration_dir(tmp_path, 0).parent
    prune(root, keep_last=2, saved=9)
    assert sorted(p.name for p in root.iterdir()) == [
        "iter_0000008",
        "iter_0000009",
        "iter_0000010",
    ]


# ----------------------------------------------------------------------------- checksums


def test_checksums_name_the_altered_file(tmp_path: Path):
    from specialize.checkpoint.layout import verify_checkpoint

    path = _fake_checkpoint(tmp_path, 1)
    verify_checkpoint(path)
    data = bytearray((path / "__0_0.distcp").read_bytes())
    data[100:200] = bytes(100)  # same size: only the hash tells
    (path / "__0_0.distcp").write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        verify_checkpoint(path)
    assert str(e.value) == f"{path}: __0_0.distcp differs from the checksum recorded at save"


def test_checkpoint_without_checksums_is_used_with_a_warning(tmp_path: Path, caplog):
    from specialize.checkpoint.layout import verify_checkpoint

    path = _fake_checkpoint(tmp_path, 1, checksums=False)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        verify_checkpoint(path)
        assert find_latest(tmp_path) == path
    assert any("no checksums.json" in w and str(path) in w for w in _warnings(caplog))
    (path / ".metadata").unlink()  # still, what cannot load is found before torch's traceback
    with pytest.raises(CheckpointError, match=r"\.metadata is missing"):
        verify_checkpoint(path)


# ----------------------------------------------------------------------------- corrupt newest


@pytest.mark.parametrize("fault", ["truncated distcp", "missing .metadata"])
def test_corrupt_newest_checkpoint_falls_back_on_resume_with_a_warning(
    tmp_path: Path, caplog, fault: str
):
    previous = _fake_checkpoint(tmp_path, 5)
    newest = _fake_checkpoint(tmp_path, 10)
    (newest.parent / "latest").write_text(newest.name + "\n")
    if fault == "truncated distcp":
        os.truncate(newest / "__0_0.distcp", 1000)
    else:
        (newest / ".metadata").unlink()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert find_latest(tmp_path) == previous
    (warning,) = [w for w in _warnings(caplog) if str(newest) in w]
    assert ("__0_0.distcp" if fault == "truncated distcp" else ".metadata") in warning
    assert f"resuming from {previous}" in warning
    # Named explicitly (init=, eval, export), a run directory never silently means an older one.
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint(tmp_path)
    assert str(newest) in str(e.value) and f"previous checkpoint {previous}" in str(e.value)
    assert "\n" not in str(e.value)


def test_corrupt_only_checkpoint_stops_with_one_line_naming_it(tmp_path: Path):
    only = _fake_checkpoint(tmp_path, 10)
    (only / ".metadata").unlink()
    with pytest.raises(CheckpointError) as e:
        find_latest(tmp_path)
    message = str(e.value)
    assert message.startswith(f"{only}: .metadata is missing") and "\n" not in message
    assert "no earlier intact checkpoint" in message


def test_lineage_is_read_in_one_place_and_a_damaged_record_is_one_line(tmp_path: Path):
    ckpt = tmp_path / "iter_0000001"
    ckpt.mkdir()
    assert read_lineage(ckpt) == {}  # written before lineage records existed
    (ckpt / LINEAGE_FILE).write_text('{"init": "runs/base", "data_manifests": {}}')
    assert read_lineage(ckpt) == {"init": "runs/base", "data_manifests": {}}
    (ckpt / LINEAGE_FILE).write_text('{"init": "runs/ba')  # truncated by a full disk
    with pytest.raises(CheckpointError, match=r"lineage\.json: unreadable lineage record \("):
        read_lineage(ckpt)
    (ckpt / LINEAGE_FILE).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a lineage record"):
        read_lineage(ckpt)
