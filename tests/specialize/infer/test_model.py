"""How a checkpoint's model is built for inference: as a training run of its architecture at that
layout and dtype builds it, with the long-context options the checkpoint carries (its run's
``config.yaml``, older runs' flat keys too; an import's ``long_context.json`` over it); a layout or
option that does not fit is an error naming the field."""

from __future__ import annotations

import dataclasses

import pytest

from base.long_context_config import LongContextConfig, write_long_context
from base.presets import get_preset
from specialize.config import ConfigError, architecture_overrides, load_config
from specialize.infer.model import inference_options, stored_long_context
from specialize.train.engine import model_options

NANO = get_preset("qwen-nano")
OTHER = dataclasses.replace(NANO, name="custom", hidden_size=64, rotary_base=1e6)


@pytest.mark.parametrize("arch", [NANO, OTHER], ids=["preset", "custom"])
@pytest.mark.parametrize(
    "long_context",
    [
        {},  # an HF import without long-context options: the recipe default training length
        {"train_seq_length": 64},
        {
            "rope_scaling": "dynamic-ntk",
            "rope_alpha": 3.0,
            "logn_attention": True,
            "layer_windows": [16, None],
            "train_seq_length": 32,
        },
    ],
)
@pytest.mark.parametrize("tp, pp, dtype", [(1, 1, "fp32"), (2, 1, "bf16"), (1, 2, "fp32")])
def test_options_equal_those_of_a_training_recipe_at_that_layout(arch, long_context, tp, pp, dtype):
    """The same options as a one-step training recipe of the architecture at that layout: the
    same model, and so the same numbers, without a recipe."""
    recipe = load_config(
        None,
        [
            "train.steps=1",
            f"parallel.tensor={tp}",
            f"parallel.pipeline={pp}",
            f"precision.dtype={dtype}",
            *(f"model.{k}={v}" for k, v in architecture_overrides(arch).items()),
            *(
                f"model.long_context.{k}={v}".replace("None", "null")
                for k, v in long_context.items()
            ),
        ],
    )
    assert architecture_overrides(recipe.model.architecture()) == architecture_overrides(arch)
    options = LongContextConfig(**long_context)
    assert inference_options(arch, tp, pp, dtype, options) == model_options(recipe)


def test_a_layout_or_option_that_does_not_fit_names_the_field():
    with pytest.raises(ConfigError, match=r"^parallel\.tensor=3: must divide the 4 attention"):
        inference_options(NANO, 3, 1)
    with pytest.raises(ConfigError, match=r"^parallel\.pipeline=4: must divide the 2 layers"):
        inference_options(NANO, 1, 4)
    windows = LongContextConfig(layer_windows=[8])
    with pytest.raises(
        ConfigError, match=r"^model\.long_context\.layer_windows: has 1 entries for 2 layers"
    ):
        inference_options(NANO, 1, 1, long_context=windows)


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
