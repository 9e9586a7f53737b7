"""The architecture record of a checkpoint, ``arch.json``: the preset of the model it holds.

Every checkpoint is written with one; loads compare it with the model they build (the context
length may differ), and inference and export build the model it describes. This module is the only
reader and writer of the file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from base.presets import QwenPreset
from specialize.checkpoint.layout import CheckpointError

ARCH_FILE = "arch.json"
# Fields that must agree between a checkpoint and the model loading it (the context length may not).
_MUST_MATCH = (
    "hidden_size",
    "num_attention_heads",
    "num_layers",
    "ffn_hidden_size",
    "padded_vocab_size",
    "query_groups",
    "rotary_base",
    "norm_epsilon",
)


def _record(arch: QwenPreset) -> dict[str, Any]:
    # With query_groups resolved (num_query_groups None is one group per head), which loads compare.
    return {**dataclasses.asdict(arch), "query_groups": arch.query_groups}


def write_architecture(path: Path, arch: QwenPreset) -> None:
    """Write ``arch.json`` into the checkpoint directory ``path``."""
    (path / ARCH_FILE).write_text(json.dumps(_record(arch), indent=2) + "\n")


def _read_record(path: Path) -> dict[str, Any]:
    record_file = path / ARCH_FILE
    try:
        record = json.loads(record_file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{record_file}: not an architecture record ({e})") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{record_file}: not an architecture record (not a JSON object)")
    return record


def read_architecture(path: Path) -> QwenPreset:
    """The architecture of the checkpoint ``path`` (a CheckpointError when it has no valid
    record)."""
    record_file = path / ARCH_FILE
    if not record_file.is_file():
        raise CheckpointError(f"{path}: no {ARCH_FILE}; cannot tell the architecture")
    record = _read_record(path)
    record.pop("query_groups", None)
    try:
        return QwenPreset(**record)
    except TypeError as e:  # missing or unknown fields
        raise CheckpointError(f"{record_file}: not an architecture record ({e})") from None


def check_architecture(path: Path, arch: QwenPreset) -> None:
    """Refuse a checkpoint of another shape with a message saying what differs."""
    if not (path / ARCH_FILE).is_file():
        return  # written elsewhere: dist_checkpointing's own shape checks still apply
    saved = _read_record(path)
    ours = _record(arch)
    diffs = [
        f"{k}: {saved.get(k)} in the checkpoint, {ours[k]} here"
        for k in _MUST_MATCH
        if saved.get(k) != ours[k]
    ]
    if diffs:
        raise CheckpointError(
            f"{path} holds a {saved.get('name')} model but this run builds {arch.name} ({'; '.join(diffs)}). "
            "Set model.preset (or the model.* overrides) to the checkpoint's architecture."
        )
