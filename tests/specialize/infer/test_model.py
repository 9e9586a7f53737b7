"""How a checkpoint's model is built for inference: as a training run of its architecture at that
layout and dtype builds it, and a layout or option that does not fit is an error naming the
field."""

from __future__ import annotations

import dataclasses

import pytest

from base.presets import get_preset
from specialize.config import ConfigError, architecture_overrides, load_config
from specialize.infer.model import inference_options
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
    fields = {**architecture_overrides(arch), **long_context}
    recipe = load_config(
        None,
        [
            "train.steps=1",
            f"parallel.tensor={tp}",
            f"parallel.pipeline={pp}",
            f"precision.dtype={dtype}",
            *(f"model.{k}={v}".replace("None", "null") for k, v in fields.items()),
        ],
    )
    assert architecture_overrides(recipe.model.architecture()) == architecture_overrides(arch)
    assert inference_options(arch, tp, pp, dtype, long_context) == model_options(recipe)


def test_a_layout_or_option_that_does_not_fit_names_the_field():
    with pytest.raises(ConfigError, match=r"^parallel\.tensor=3: must divide the 4 attention"):
        inference_options(NANO, 3, 1)
    with pytest.raises(ConfigError, match=r"^parallel\.pipeline=4: must divide the 2 layers"):
        inference_options(NANO, 1, 4)
    with pytest.raises(ConfigError, match=r"^model\.layer_windows: has 1 entries for 2 layers"):
        inference_options(NANO, 1, 1, long_context={"layer_windows": [8]})
    with pytest.raises(ValueError, match="unknown long-context option"):
        inference_options(NANO, 1, 1, long_context={"rope": "ntk"})
