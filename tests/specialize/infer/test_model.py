"""A checkpoint's long-context options: its run's ``config.yaml`` (older runs' flat keys too), an
import's ``long_context.json`` over it."""

from __future__ import annotations

import pytest

from base.long_context_config import LongContextConfig, write_long_context
from specialize.config import ConfigError
from specialize.infer.model import stored_long_context


def test_checkpoint_options_are_stored_and_read(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert stored_long_context(ckpt) == LongContextConfig()
    (ckpt / "config.yaml").write_text(
        "model:\n  long_context:\n    logn_attention: true\n    layer_windows: [4, null]\n"
        "data:\n  seq_length: 64\n"
    )
    assert stored_long_context(ckpt) == LongContextConfig(
        logn_attention=True, layer_windows=[4, None], train_seq_length=64
    )
    write_long_context(ckpt, LongContextConfig(rope_scaling="dynamic-ntk", train_seq_length=2048))
    assert stored_long_context(ckpt) == LongContextConfig("dynamic-ntk", train_seq_length=2048)
    write_long_context(ckpt, LongContextConfig(rope_scaling="dynamic-ntk"))
    assert stored_long_context(ckpt).train_seq_length == 64  # the run's, the record has none


def test_a_run_saved_with_flat_keys_keeps_its_options(tmp_path):
    """Runs saved before ``model.long_context`` wrote the options flat in ``model``."""
    (tmp_path / "config.yaml").write_text(
        "model:\n  preset: qwen-nano\n  rope_scaling: dynamic-ntk\n  logn_attention: true\n"
        "  layer_windows: [4, null]\n  train_seq_length: null\ndata:\n  seq_length: 64\n"
    )
    assert stored_long_context(tmp_path) == LongContextConfig(
        rope_scaling="dynamic-ntk",
        logn_attention=True,
        layer_windows=[4, None],
        train_seq_length=64,
    )


def test_a_bad_saved_option_names_the_file(tmp_path):
    (tmp_path / "config.yaml").write_text("model:\n  long_context:\n    logn_attention: maybe\n")
    with pytest.raises(
        ConfigError, match=r"config.yaml: model.long_context.logn_attention: Value 'maybe'"
    ):
        stored_long_context(tmp_path)
