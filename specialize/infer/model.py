"""A checkpoint's model for inference: built from its architecture record at a TP x PP layout in
the dtype it runs in, with its weights loaded.

Generation, the perplexity evaluation, ``convert export`` and ``convert verify`` all load models
through here.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import yaml
from megatron.core import dist_checkpointing, parallel_state

from base.long_context_config import LongContextConfig, read_long_context
from base.model import ModelOptions, build_model, resolve_spec
from base.presets import QwenPreset
from specialize.checkpoint import read_architecture, resolve_checkpoint
from specialize.checkpoint.state import damaged_is_an_error, load_model_weights
from specialize.config import (
    DataConfig,
    ModelConfig,
    ParallelConfig,
    check_layout,
    saved_long_context,
)
from specialize.mcore.distributed import init_distributed, seed_all

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def inference_options(
    arch: QwenPreset,
    tp: int,
    pp: int,
    dtype: str = "fp32",
    long_context: LongContextConfig | None = None,
    spec: str = "auto",
) -> ModelOptions:
    """How ``arch`` is built for inference at TP x PP in ``dtype`` with the ``long_context``
    options: as a training run builds it, without dropout,
    recomputation, sequence parallelism or any of the GPU path's overlaps and fusions. A layout
    that does not fit, or an invalid option, is a ConfigError naming the field."""
    check_layout(
        arch,
        tensor=tp,
        pipeline=pp,
        virtual_pipeline=None,
        sequence_parallel=False,
        # No batches at inference: values that pass the batch rules.
        micro_batch_size=1,
        global_batch_size=1,
        seq_length=1,
        spec=spec,
        dtype=dtype,
        data_format="pretrain",
    )
    context = long_context or LongContextConfig()
    ModelConfig(long_context=context).check_long_context(arch.num_layers)  # names model.* fields
    return ModelOptions(
        spec=resolve_spec(spec),
        dtype=dtype,
        tensor_parallel=tp,
        pipeline_parallel=pp,
        # Unrecorded (an HF import without long-context options): a recipe's default length.
        long_context=context.resolved(DataConfig.seq_length),
    )


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


def stored_long_context(ckpt: str | Path) -> LongContextConfig:
    """The long-context options a checkpoint directory carries: those of the run that saved it
    (its ``config.yaml``; the run's ``data.seq_length`` as the training length unless
    ``model.long_context.train_seq_length`` is set), replaced by a ``long_context.json`` (written by
    the import of a Qwen v1 checkpoint from its ``use_dynamic_ntk`` / ``use_logn_attn`` /
    ``seq_length``) but for a training length it leaves unset."""
    run_config = Path(ckpt, "config.yaml")
    options = saved_long_context(run_config) if run_config.is_file() else LongContextConfig()
    imported = read_long_context(ckpt)
    if imported is None:
        return options
    return replace(imported, train_seq_length=imported.train_seq_length or options.train_seq_length)


def load_model(
    ckpt: str | Path,
    tp: int = 1,
    pp: int = 1,
    long_context: LongContextConfig | None = None,
    dtype: str | None = None,
) -> tuple[torch.nn.Module, QwenPreset]:
    """The model of ``ckpt`` (a checkpoint or run directory) on this rank of a TP x PP world, in
    ``dtype`` (``fp32`` or ``bf16``; default: ``checkpoint_dtype``: an fp32 model on the GPU
    would turn off fused attention and take twice the memory).

    The long-context options are the checkpoint's (``stored_long_context``) unless
    ``long_context`` is given (e.g. ``dataclasses.replace`` of the stored ones); an unset training
    length is a recipe's default ``data.seq_length``."""
    path = resolve_checkpoint(ckpt)
    dtype = dtype or checkpoint_dtype(path)
    if dtype not in INFERENCE_DTYPES:
        raise ValueError(
            f"dtype {dtype!r}: models are evaluated in {' or '.join(INFERENCE_DTYPES)}"
        )
    arch = read_architecture(path)
    options = long_context if long_context is not None else stored_long_context(path)
    model_options = inference_options(arch, tp, pp, dtype, options)
    topo = init_distributed(ParallelConfig(tensor=tp, pipeline=pp))
    if topo.world_size != tp * pp:
        raise WorldSizeError(
            f"run on tp x pp = {tp * pp} processes (torchrun), not {topo.world_size}"
        )
    seed_all(0)
    model = build_model(
        arch,
        model_options,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    ).to(topo.device)
    load_model_weights(model, path, arch)
    return model.eval(), arch
