"""Checkpoint directory rules: only complete checkpoints count, the newest N are kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from specialize.checkpoint import (
    CheckpointError,
    _prune,
    find_latest,
    iteration_dir,
    resolve_checkpoint,
)


def _fake_checkpoint(run: Path, iteration: int) -> Path:
    path = iteration_dir(run, iteration)
    path.mkdir(parents=True)
    (path / "metadata.json").write_text("{}")
    return path


def test_latest_names_only_complete_checkpoints(tmp_path: Path):
    assert find_latest(tmp_path) is None
    done = _fake_checkpoint(tmp_path, 10)
    (done.parent / ".iter_0000020.partial").mkdir()  # an interrupted save
    (done.parent / "latest").write_text(done.name + "\n")
    assert find_latest(tmp_path) == done
    assert resolve_checkpoint(tmp_path) == done  # a run directory resolves to its newest checkpoint
    assert resolve_checkpoint(done) == done
    (done.parent / "latest").write_text("iter_0000020\n")
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        find_latest(tmp_path)


def test_resolve_rejects_a_directory_without_checkpoints(tmp_path: Path):
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        resolve_checkpoint(tmp_path)


def test_keep_last(tmp_path: Path):
    for iteration in (5, 10, 15, 20):
        _fake_checkpoint(tmp_path, iteration)
    root = iteration_dir(tmp_path, 0).parent
    _prune(root, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000015", "iter_0000020"]
    _prune(root, keep_last=0)  # 0 keeps everything
    assert len(list(root.iterdir())) == 2


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path: Path):
    from base.presets import get_preset
    from specialize.checkpoint import check_architecture, write_architecture

    write_architecture(tmp_path, get_preset("qwen-nano"))
    check_architecture(tmp_path, get_preset("qwen-nano"))
    with pytest.raises(CheckpointError) as e:
        check_architecture(tmp_path, get_preset("qwen-tiny"))
    message = str(e.value)
    assert "holds a qwen-nano model but this run builds qwen-tiny" in message
    assert "hidden_size: 32 in the checkpoint, 128 here" in message and "model.preset" in message
