"""Build a Qwen base model as a megatron-core ``GPTModel``.

Architecture (paper §2.3, docs/paper.md §2): pre-norm RMSNorm (eps 1e-6), SwiGLU MLP, RoPE (base 10000, FP32
inverse frequencies), bias on the Q/K/V projection only, untied input embedding and output layer.
The layer spec is the only thing that differs between a CPU run (``local``: plain PyTorch) and a
GPU run (``te``: Transformer Engine fused kernels, needed for FP8). Training-free long-context
options (dynamic NTK RoPE, LogN attention, layer-wise windows) are off by default; see
``base.long_context``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec

from base import spec as layer_specs
from base.long_context import install_dynamic_ntk, with_long_context
from base.long_context_config import QWEN_SEQ_LENGTH, LongContextConfig
from base.presets import QwenPreset


class PrecisionError(RuntimeError):
    """A precision the machine cannot run (e.g. FP8 without CUDA and Transformer Engine)."""


def transformer_engine_available() -> bool:
    return layer_specs.transformer_engine_available()


def resolve_spec(spec: str) -> str:
    """``auto`` → ``te`` where CUDA and a usable Transformer Engine are present, else ``local``;
    ``te`` on a machine that cannot run it is an error saying why (``base.spec.why_not_te``)."""
    resolved = layer_specs.resolve_spec(spec)
    if resolved == "te" and (problem := layer_specs.why_not_te()) is not None:
        raise PrecisionError(
            f"model.spec=te: Transformer Engine is not usable here ({problem}); use "
            "model.spec=local or auto on this machine"
        )
    return resolved


@dataclass(frozen=True)
class ModelOptions:
    """What the builder needs besides the preset; filled from the run config by the engine."""

    spec: str = "local"
    """Resolved layer spec: ``te`` or ``local``."""
    dtype: str = "fp32"
    """fp32 | bf16 | fp8."""
    fp8_format: str = "hybrid"
    fp8_recipe: str = "delayed"
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"
    fp8_bf16_layers: tuple[int, int] = (0, 0)
    """(first, last) transformer layers that run in BF16 under FP8 (resolved by the engine)."""
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    recompute: str = "none"
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline: int | None = None
    sequence_parallel: bool = False
    gradient_accumulation_fusion: bool = False
    """Fused wgrad accumulation into ``main_grad`` (TE layers, APEX for the output layer)."""
    tp_comm_overlap: bool = False
    """TE userbuffers overlap of tensor-parallel communication (``initialize_ub`` must have run)."""
    init_method_std: float = 0.02
    initialize: bool = True
    """Randomly initialize weights; off when a checkpoint will overwrite them anyway."""
    long_context: LongContextConfig = field(default_factory=LongContextConfig)
    """Training-free long-context options (``base.long_context``); an unset ``train_seq_length``
    is ``QWEN_SEQ_LENGTH`` (the engine sets the run's ``data.seq_length``)."""


def transformer_config(preset: QwenPreset, opts: ModelOptions) -> TransformerConfig:
    """Map a preset and run options onto megatron-core's ``TransformerConfig``."""
    return TransformerConfig(**transformer_config_kwargs(preset, opts))


def transformer_config_kwargs(preset: QwenPreset, opts: ModelOptions) -> dict:
    """The ``TransformerConfig`` arguments, as data (megatron validates TE-only flags on construction,
    so the GPU mapping is checkable on machines without Transformer Engine this way)."""
    if opts.spec not in ("te", "local"):
        raise ValueError(f"spec must be resolved to te or local, got {opts.spec!r}")
    if opts.dtype == "fp8" and opts.spec != "te":
        why = layer_specs.why_not_te() or "the local spec has no FP8 GEMMs"
        raise PrecisionError(
            "precision.dtype=fp8 needs the Transformer Engine layer spec on CUDA "
            f"(model.spec=te, pip install -e '.[gpu]'); {why}"
        )
    on_gpu = opts.spec == "te"
    low_precision = opts.dtype in ("bf16", "fp8")
    params_dtype = torch.bfloat16 if low_precision else torch.float32
    recompute = {
        "none": {},
        "selective": {"recompute_granularity": "selective"},
        "full": {
            "recompute_granularity": "full",
            "recompute_method": "uniform",
            "recompute_num_layers": 1,
        },
    }[opts.recompute]
    fp8 = {}
    if opts.dtype == "fp8":
        start, end = opts.fp8_bf16_layers
        fp8 = {
            "fp8": opts.fp8_format,
            "fp8_recipe": opts.fp8_recipe,
            "fp8_amax_history_len": opts.fp8_amax_history_len,
            "fp8_amax_compute_algo": opts.fp8_amax_compute_algo,
            # megatron-core enters TE's fp8_autocast per layer for non-delayed recipes and leaves
            # these layers out of it (fp8_utils.get_fp8_context, TransformerBlock.forward).
            "first_last_layers_bf16": bool(start or end),
            "num_layers_at_start_in_bf16": start,
            "num_layers_at_end_in_bf16": end,
        }
    return dict(
        num_layers=preset.num_layers,
        hidden_size=preset.hidden_size,
        num_attention_heads=preset.num_attention_heads,
        num_query_groups=preset.query_groups,
        ffn_hidden_size=preset.ffn_hidden_size,
        kv_channels=preset.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=preset.norm_epsilon,
        gated_linear_unit=True,  # SwiGLU: linear_fc1 = [gate; up]
        activation_func=F.silu,
        add_bias_linear=False,  # no biases except Q/K/V
        add_qkv_bias=True,
        hidden_dropout=opts.hidden_dropout,
        attention_dropout=opts.attention_dropout,
        init_method_std=opts.init_method_std,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=opts.tensor_parallel,
        pipeline_model_parallel_size=opts.pipeline_parallel,
        virtual_pipeline_model_parallel_size=opts.virtual_pipeline,
        sequence_parallel=opts.sequence_parallel,
        params_dtype=params_dtype,
        bf16=low_precision,
        pipeline_dtype=params_dtype,
        # Fused kernels exist only on the GPU path; the local spec uses the plain PyTorch versions.
        use_cpu_initialization=not on_gpu,
        perform_initialization=opts.initialize,
        bias_activation_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=on_gpu,
        persist_layer_norm=False,
        gradient_accumulation_fusion=opts.gradient_accumulation_fusion,
        tp_comm_overlap=opts.tp_comm_overlap,
        cross_entropy_loss_fusion=on_gpu,
        deallocate_pipeline_outputs=on_gpu,
        **recompute,
        **fp8,
    )


def layer_spec(spec: str, opts: ModelOptions | None = None) -> ModuleSpec:
    """megatron's layer spec for ``spec``; with long-context options its core attention is swapped
    for ``base.long_context.LongContextCoreAttention`` (windows, LogN), else it is megatron's own."""
    base = (
        get_gpt_layer_with_transformer_engine_spec()
        if spec == "te"
        else get_gpt_layer_local_spec(normalization="RMSNorm")
    )
    if opts is None:
        return base
    options = opts.long_context.resolved(QWEN_SEQ_LENGTH)
    logn_length = options.train_seq_length if options.logn_attention else None
    return with_long_context(base, options.layer_windows, logn_length)


def build_model(
    preset: QwenPreset,
    opts: ModelOptions,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
) -> GPTModel:
    """One model chunk for this rank's pipeline stage (call after parallel state is initialized)."""
    opts.long_context.check(preset.num_layers)
    config = transformer_config(preset, opts)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(opts.spec, opts),
        vocab_size=preset.padded_vocab_size,
        max_sequence_length=preset.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=False,  # Qwen unties input and output embeddings
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(preset.rotary_base),
        vp_stage=vp_stage,
    )
    options = opts.long_context.resolved(QWEN_SEQ_LENGTH)
    if options.rope_scaling == "dynamic-ntk":
        install_dynamic_ntk(model, preset.rotary_base, options.train_seq_length, options.rope_alpha)
    return model
