"""The architecture record: a checkpoint of another shape is refused, saying what differs."""

from __future__ import annotations

from pathlib import Path

import pytest

from specialize.checkpoint import CheckpointError


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path: Path):
    from base.presets import get_preset
    from specialize.checkpoint.architecture import check_architecture, write_architecture

    write_architecture(tmp_path, get_preset("qwen-nano"))
    check_architecture(tmp_path, get_preset("qwen-nano"))
    with pytest.raises(CheckpointError) as e:
        check_architecture(tmp_path, get_preset("qwen-tiny"))
    message = str(e.value)
    assert "holds a qwen-nano model but this run builds qwen-tiny" in message
    assert "hidden_size: 32 in the checkpoint, 128 here" in message and "model.preset" in message
