"""The Qwen GPTModel: architecture facts from the paper, and the config each path produces."""

from __future__ import annotations

import pytest
import torch

from base.model import ModelOptions, PrecisionError, resolve_spec, transformer_config_kwargs
from base.presets import PRESETS, get_preset


def test_paper_presets():
    rows = {
        name: (
            p.hidden_size,
            p.num_attention_heads,
            p.num_layers,
            p.ffn_hidden_size,
            p.padded_vocab_size,
        )
        for name, p in PRESETS.items()
    }
    assert rows["qwen-1.8b"] == (2048, 16, 24, 5504, 151936)
    assert rows["qwen-7b"] == (4096, 32, 32, 11008, 151936)
    assert rows["qwen-14b"] == (5120, 40, 40, 13696, 152064)
    assert round(get_preset("qwen-7b").num_params() / 1e9, 1) == 7.7
    assert round(get_preset("qwen-14b").num_params() / 1e9, 1) == 14.2
    tiny = get_preset("qwen-tiny")
    assert tiny.padded_vocab_size == 151936
    assert (
        2 * tiny.padded_vocab_size * tiny.hidden_size > 0.9 * tiny.num_params()
    )  # embeddings dominate


def test_local_fp32_mapping():
    kw = transformer_config_kwargs(get_preset("qwen-7b"), ModelOptions(spec="local"))
    assert kw["normalization"] == "RMSNorm" and kw["layernorm_epsilon"] == 1e-6
    assert kw["gated_linear_unit"] and kw["activation_func"] is torch.nn.functional.silu
    assert kw["add_bias_linear"] is False and kw["add_qkv_bias"] is True
    assert kw["num_query_groups"] == kw["num_attention_heads"] == 32  # full MHA in Qwen v1
    assert kw["params_dtype"] == torch.float32 and not kw["bf16"]
    assert (
        kw["use_cpu_initialization"]
        and not kw["apply_rope_fusion"]
        and not kw["bias_activation_fusion"]
    )
    assert kw["hidden_dropout"] == 0.0 and kw["attention_dropout"] == 0.0
    assert "fp8" not in kw


def test_te_bf16_and_fp8_mapping():
    preset = get_preset("qwen-14b")
    bf16 = transformer_config_kwargs(
        preset, ModelOptions(spec="te", dtype="bf16", tensor_parallel=4, sequence_parallel=True)
    )
    assert (
        bf16["bf16"]
        and bf16["params_dtype"] == torch.bfloat16
        and bf16["pipeline_dtype"] == torch.bfloat16
    )
    assert (
        bf16["apply_rope_fusion"]
        and bf16["bias_activation_fusion"]
        and bf16["masked_softmax_fusion"]
    )
    assert (
        not bf16["use_cpu_initialization"]
        and bf16["sequence_parallel"]
        and bf16["tensor_model_parallel_size"] == 4
    )
    fp8 = transformer_config_kwargs(
        preset,
        ModelOptions(
            spec="te",
            dtype="fp8",
            fp8_format="e4m3",
            fp8_recipe="tensorwise",
            fp8_amax_history_len=16,
            fp8_amax_compute_algo="most_recent",
        ),
    )
    assert (
        fp8["fp8"],
        fp8["fp8_recipe"],
        fp8["fp8_amax_history_len"],
        fp8["fp8_amax_compute_algo"],
    ) == ("e4m3", "tensorwise", 16, "most_recent")
    assert fp8["bf16"]  # FP8 GEMMs inside a BF16 model


def test_fp8_bf16_layers_reach_megatron_core():
    """The first and last layer run outside TE's fp8_autocast under current scaling: megatron-core
    0.16.1 accepts the mapping and names exactly those layers BF16."""
    from megatron.core.fp8_utils import is_first_last_bf16_layer
    from megatron.core.transformer import TransformerConfig

    preset = get_preset("qwen-7b")
    te = transformer_config_kwargs(
        preset,
        ModelOptions(spec="te", dtype="fp8", fp8_recipe="tensorwise", fp8_bf16_layers=(1, 1)),
    )
    assert te["first_last_layers_bf16"]
    assert (te["num_layers_at_start_in_bf16"], te["num_layers_at_end_in_bf16"]) == (1, 1)
    # megatron refuses the TE-only fusions on a machine without TE: check the FP8 keys on top of
    # the local mapping.
    fp8 = {k: v for k, v in te.items() if "fp8" in k or "bf16" in k}
    config = TransformerConfig(
        **transformer_config_kwargs(preset, ModelOptions(dtype="bf16")) | fp8
    )
    bf16_layers = [n for n in range(32) if is_first_last_bf16_layer(config, n)]
    assert bf16_layers == [0, 31]
    none = transformer_config_kwargs(preset, ModelOptions(spec="te", dtype="fp8"))
    assert not none["first_last_layers_bf16"]  # delayed scaling: every layer FP8


def test_gpu_fusions_are_passed_through():
    preset = get_preset("qwen-7b")
    kw = transformer_config_kwargs(
        preset,
        ModelOptions(
            spec="te",
            dtype="bf16",
            tensor_parallel=2,
            sequence_parallel=True,
            gradient_accumulation_fusion=True,
            tp_comm_overlap=True,
        ),
    )
    assert kw["gradient_accumulation_fusion"] and kw["tp_comm_overlap"]
    local = transformer_config_kwargs(preset, ModelOptions(spec="local"))
    assert not local["gradient_accumulation_fusion"] and not local["tp_comm_overlap"]


def test_recompute_mapping():
    preset = get_preset("qwen-7b")
    assert (
        transformer_config_kwargs(preset, ModelOptions(recompute="selective"))[
            "recompute_granularity"
        ]
        == "selective"
    )
    full = transformer_config_kwargs(preset, ModelOptions(recompute="full"))
    assert (
        full["recompute_granularity"],
        full["recompute_method"],
        full["recompute_num_layers"],
    ) == ("full", "uniform", 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_fp8_and_te_without_cuda_are_clear_errors():
    with pytest.raises(
        PrecisionError,
        match=r"precision.dtype=fp8 needs the Transformer Engine layer spec .*; no CUDA device$",
    ):
        transformer_config_kwargs(get_preset("qwen-tiny"), ModelOptions(spec="local", dtype="fp8"))
    with pytest.raises(
        PrecisionError, match=r"model.spec=te: Transformer Engine is not usable here \(no CUDA"
    ):
        resolve_spec("te")
    assert resolve_spec("auto") == "local"


def test_resolve_spec_follows_the_one_transformer_engine_check(monkeypatch):
    import base.spec

    monkeypatch.setattr(base.spec, "why_not_te", lambda: "import failed: undefined symbol")
    assert resolve_spec("auto") == "local" and resolve_spec("local") == "local"
    with pytest.raises(PrecisionError) as e:
        resolve_spec("te")
    assert str(e.value) == (
        "model.spec=te: Transformer Engine is not usable here (import failed: undefined symbol); "
        "use model.spec=local or auto on this machine"
    )
    monkeypatch.setattr(base.spec, "why_not_te", lambda: None)
    assert resolve_spec("auto") == resolve_spec("te") == "te"


def _build_nano(rank: int, world_size: int) -> dict:
    from base.model import build_model
    from specialize.config import ParallelConfig
    from specialize.mcore.distributed import init_distributed, seed_all

    init_distributed(ParallelConfig())
    seed_all(0)
    model = build_model(get_preset("qwen-nano"), ModelOptions(spec="local"))
    names = {n: tuple(p.shape) for n, p in model.named_parameters()}
    rotary = model.rotary_pos_emb
    norm = model.decoder.final_layernorm
    return {
        "names": names,
        "count": sum(p.numel() for p in model.parameters()),
        "inv_freq": rotary.inv_freq.clone(),
        "norm_type": type(norm).__name__,
        "norm_eps": getattr(norm, "eps", None),
        "untied": model.output_layer.weight.data_ptr()
        != model.embedding.word_embeddings.weight.data_ptr(),
    }


def test_built_model_has_the_qwen_architecture():
    from tests.distributed import run_distributed

    built = run_distributed(_build_nano, world_size=1)
    preset = get_preset("qwen-nano")
    assert built["count"] == preset.num_params()
    biases = sorted(n for n in built["names"] if n.endswith("bias"))
    assert biases and all("linear_qkv" in n for n in biases), biases  # bias on Q/K/V only
    assert built["names"]["decoder.layers.0.mlp.linear_fc1.weight"] == (
        2 * preset.ffn_hidden_size,
        preset.hidden_size,
    )  # [gate; up]
    assert built["untied"]
    assert built["norm_type"] == "RMSNorm" and built["norm_eps"] == 1e-6
    dim = preset.kv_channels
    expected = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    assert built["inv_freq"].dtype == torch.float32
    torch.testing.assert_close(built["inv_freq"], expected, rtol=0, atol=0)
