"""The long-context options as one value: its checks name each invalid field, the training length
resolves, and the per-checkpoint record keeps its file name and keys."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

from base.long_context_config import (
    LONG_CONTEXT_FILE,
    LongContextConfig,
    LongContextError,
    read_long_context,
    write_long_context,
)


def test_defaults_are_off_and_valid():
    options = LongContextConfig()
    assert not options.enabled
    options.check(num_layers=2)
    assert LongContextConfig(layer_windows=[8, None]).enabled


@pytest.mark.parametrize(
    "options, message",
    [
        (LongContextConfig(rope_scaling="yarn"), "rope_scaling: 'yarn': must be one of"),
        (LongContextConfig(rope_alpha=3), "rope_alpha: 3: needs rope_scaling=dynamic-ntk"),
        (LongContextConfig(rope_scaling="dynamic-ntk", rope_alpha=0.5), "rope_alpha: 0.5: must"),
        (LongContextConfig(logn_attention=True, train_seq_length=1), "train_seq_length: 1: must"),
        (LongContextConfig(layer_windows=[8, 8, 8]), "layer_windows: has 3 entries for 2 layers"),
        (LongContextConfig(layer_windows=[-2, 8]), r"layer_windows: \[-2\]: windows must be >= 1"),
    ],
)
def test_check_names_the_field(options, message):
    with pytest.raises(LongContextError, match=f"^x.{message}"):
        options.check(num_layers=2, where="x.")


def test_check_names_every_invalid_field():
    with pytest.raises(LongContextError) as error:
        LongContextConfig(rope_scaling="yarn", layer_windows=[1]).check(num_layers=2)
    assert str(error.value).startswith("rope_scaling: 'yarn'")
    assert "; layer_windows: has 1 entries for 2 layers" in str(error.value)


def test_a_training_length_is_only_needed_by_ntk_and_logn():
    LongContextConfig(train_seq_length=1).check(num_layers=2)
    LongContextConfig(rope_scaling="dynamic-ntk", train_seq_length=2).check(num_layers=2)


def test_resolved_fills_only_an_unset_training_length():
    assert LongContextConfig().resolved(64).train_seq_length == 64
    assert LongContextConfig(train_seq_length=16).resolved(64).train_seq_length == 16
    options = LongContextConfig(logn_attention=True)
    assert options.resolved(64) == LongContextConfig(logn_attention=True, train_seq_length=64)
    assert options.train_seq_length is None  # a copy


def test_record_keeps_its_file_and_keys(tmp_path):
    assert read_long_context(tmp_path) is None
    options = LongContextConfig("dynamic-ntk", 3.0, True, [4, None], 2048)
    write_long_context(tmp_path, options)
    record = json.loads((tmp_path / "long_context.json").read_text())
    assert LONG_CONTEXT_FILE == "long_context.json"
    assert record == {
        "rope_scaling": "dynamic-ntk",
        "rope_alpha": 3.0,
        "logn_attention": True,
        "layer_windows": [4, None],
        "train_seq_length": 2048,
    }
    assert read_long_context(tmp_path) == options
    assert set(record) == {f.name for f in fields(LongContextConfig)}  # every option is recorded


def test_a_record_written_before_reads_back(tmp_path):
    """The file an import of a Qwen v1 checkpoint has always written."""
    (tmp_path / LONG_CONTEXT_FILE).write_text(
        '{"rope_scaling": "dynamic-ntk", "rope_alpha": null, "logn_attention": true, '
        '"layer_windows": null, "train_seq_length": 2048}'
    )
    assert read_long_context(tmp_path) == LongContextConfig(
        rope_scaling="dynamic-ntk", logn_attention=True, train_seq_length=2048
    )


def test_unknown_options_are_errors():
    with pytest.raises(LongContextError, match=r"unknown long-context option\(s\) \['yarn'\]"):
        LongContextConfig.from_dict({"yarn": 1})
