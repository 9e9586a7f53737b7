"""A checkpoint's model for inference: the recipe that builds its architecture at a TP x PP
layout, the dtype it runs in, and the model itself with its weights loaded.

Generation, the perplexity evaluation, ``convert export`` and ``convert verify`` all load models
through here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from megatron.core import dist_checkpointing

from base.hf_checkpoint import matching_preset
from base.long_context import LongContext, stored_options
from base.presets import QwenPreset
from specialize.checkpoint import read_architecture, resolve_checkpoint
from specialize.checkpoint.state import damaged_is_an_error, load_model_weights
from specialize.config import RecipeConfig, architecture_overrides, load_config
from specialize.mcore.distributed import init_distributed, seed_all
from specialize.train.engine import build_model_chunks

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def recipe_model_fields(arch: QwenPreset) -> dict[str, object]:
    """``model.*`` fields of a recipe that builds ``arch``: the preset of its shape and what differs
    from it (so a qwen-nano checkpoint is built, and named, as qwen-nano), else every field."""
    fields = architecture_overrides(arch)
    preset = matching_preset(arch)
    if preset is None:
        return fields
    preset_fields = architecture_overrides(preset)
    return {"preset": preset.name, **{k: v for k, v in fields.items() if preset_fields[k] != v}}


def inference_config(arch: QwenPreset, tp: int, pp: int, dtype: str = "fp32") -> RecipeConfig:
    """A validated config that builds ``arch`` at TP x PP in ``dtype`` (raises ConfigError when
    it does not fit)."""
    overrides = (f"model.{k}={v}" for k, v in recipe_model_fields(arch).items())
    layout = [f"parallel.tensor={tp}", f"parallel.pipeline={pp}", f"precision.dtype={dtype}"]
    return load_config(None, ["train.steps=1", *layout, *overrides])


def stored_dtype(ckpt: Path) -> torch.dtype:
    """The model's dtype: that of its embedding (megatron's plain-PyTorch RMSNorm keeps its weight
    in fp32 whatever the model dtype, so the norms do not say)."""
    with damaged_is_an_error(ckpt):
        metadata = dist_checkpointing.load_tensors_metadata(str(ckpt))
    return metadata["embedding.word_embeddings.weight"].dtype


INFERENCE_DTYPES = ("fp32", "bf16")  # fp8 checkpoints hold bf16 weights; they run in bf16


class WorldSizeError(ValueError):
    """The process count does not match the requested TP x PP layout."""


def checkpoint_dtype(ckpt: str | Path) -> str:
    """The dtype ``ckpt`` (a checkpoint or run directory) is evaluated in: its training run's
    ``precision.dtype`` (``config.yaml``; fp8 runs keep bf16 weights, and inference runs them in
    bf16), else, for an HF import, the dtype of its stored weights (the HF ``torch_dtype``, or
    the import's ``--dtype``)."""
    path = resolve_checkpoint(ckpt)
    config = path / "config.yaml"
    if config.is_file():
        dtype = (yaml.safe_load(config.read_text()).get("precision") or {}).get("dtype", "fp32")
        return "bf16" if dtype == "fp8" else dtype
    return DTYPE_NAMES[stored_dtype(path)]


def load_model(
    ckpt: str | Path,
    tp: int = 1,
    pp: int = 1,
    long_context: Mapping[str, Any] | None = None,
    dtype: str | None = None,
) -> tuple[torch.nn.Module, QwenPreset]:
    """The model of ``ckpt`` (a checkpoint or run directory) on this rank of a TP x PP world, in
    ``dtype`` (``fp32`` or ``bf16``; default: ``checkpoint_dtype``: an fp32 model on the GPU
    would turn off fused attention and take twice the memory).

    Long-context inference options (``ModelConfig`` fields ``rope_scaling``, ``rope_alpha``,
    ``logn_attention``, ``layer_windows``, ``train_seq_length``) come from the checkpoint (its run's
    ``config.yaml``, or ``long_context.json`` of an HF import); ``long_context`` overrides them."""
    path = resolve_checkpoint(ckpt)
    dtype = dtype or checkpoint_dtype(path)
    if dtype not in INFERENCE_DTYPES:
        raise ValueError(
            f"dtype {dtype!r}: models are evaluated in {' or '.join(INFERENCE_DTYPES)}"
        )
    arch = read_architecture(path)
    cfg = inference_config(arch, tp, pp, dtype)
    options = {**stored_options(path), **(long_context or {})}
    LongContext.from_dict(options)  # unknown names are errors
    for key, value in options.items():
        setattr(cfg.model, key, list(value) if key == "layer_windows" and value else value)
    cfg.model.check_long_context(arch.num_layers)
    topo = init_distributed(cfg.parallel)
    if topo.world_size != tp * pp:
        raise WorldSizeError(
            f"run on tp x pp = {tp * pp} processes (torchrun), not {topo.world_size}"
        )
    seed_all(0)
    model = build_model_chunks(cfg, topo.device)[0]
    load_model_weights(model, path, cfg.model.architecture())
    return model.eval(), arch
