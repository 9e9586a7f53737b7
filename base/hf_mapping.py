"""Tensor-name and layout mapping between transformers' Qwen2 and megatron-core's GPTModel.

A Qwen v1 model is a Qwen2 model with ``num_key_value_heads == num_attention_heads``. megatron-core
fuses Q, K and V into ``linear_qkv`` with rows grouped per query group — [the group's query heads;
its key head; its value head] — and the SwiGLU input projections into ``linear_fc1`` as [gate; up].
These functions work on whole (unsharded) tensors, one at a time, so a converter can stream them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

from base.presets import QwenPreset


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: QwenPreset) -> torch.Tensor:
    """Q ``[heads*d, ...]``, K and V ``[groups*d, ...]`` → megatron ``linear_qkv`` rows."""
    groups, d = arch.query_groups, arch.kv_channels
    per_group = arch.num_attention_heads // groups
    tail = q.shape[1:]
    q = q.reshape(groups, per_group * d, *tail)
    k = k.reshape(groups, d, *tail)
    v = v.reshape(groups, d, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def split_qkv(
    qkv: torch.Tensor, arch: QwenPreset
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``fuse_qkv``."""
    groups, d = arch.query_groups, arch.kv_channels
    per_group = arch.num_attention_heads // groups
    tail = qkv.shape[1:]
    grouped = qkv.reshape(groups, (per_group + 2) * d, *tail)
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def qwen2_config(arch: QwenPreset) -> dict:
    """The transformers ``Qwen2Config`` fields of an architecture (also its ``config.json`` core)."""
    return {
        "vocab_size": arch.padded_vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.ffn_hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.query_groups,
        "max_position_embeddings": arch.max_position_embeddings,
        "rms_norm_eps": arch.norm_epsilon,
        "rope_theta": arch.rotary_base,
        "tie_word_embeddings": False,
    }


def _layer_names(i: int) -> dict[str, str]:
    hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
    return {
        f"{hf}input_layernorm.weight": f"{mg}input_layernorm.weight",
        f"{hf}self_attn.o_proj.weight": f"{mg}self_attention.linear_proj.weight",
        f"{hf}post_attention_layernorm.weight": f"{mg}pre_mlp_layernorm.weight",
        f"{hf}mlp.down_proj.weight": f"{mg}mlp.linear_fc2.weight",
    }


def megatron_sources(
    arch: QwenPreset,
) -> dict[str, tuple[tuple[str, ...], Callable[..., torch.Tensor]]]:
    """For each megatron parameter: the Qwen2 tensors it is made of and how they combine."""

    def same(t: torch.Tensor) -> torch.Tensor:
        return t

    def qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return fuse_qkv(q, k, v, arch)

    def gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return torch.cat([gate, up], dim=0)

    sources = {"embedding.word_embeddings.weight": (("model.embed_tokens.weight",), same)}
    for i in range(arch.num_layers):
        p, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        for hf_name, mg_name in _layer_names(i).items():
            sources[mg_name] = ((hf_name,), same)
        for kind in ("weight", "bias"):
            names = tuple(f"{p}self_attn.{x}_proj.{kind}" for x in "qkv")
            sources[f"{mg}self_attention.linear_qkv.{kind}"] = (names, qkv)
        sources[f"{mg}mlp.linear_fc1.weight"] = (
            (f"{p}mlp.gate_proj.weight", f"{p}mlp.up_proj.weight"),
            gate_up,
        )
    sources["decoder.final_layernorm.weight"] = (("model.norm.weight",), same)
    sources["output_layer.weight"] = (("lm_head.weight",), same)
    return sources


def hf_to_megatron(
    hf: Mapping[str, torch.Tensor], arch: QwenPreset
) -> Iterator[tuple[str, torch.Tensor]]:
    """(megatron name, tensor) for every parameter of the GPTModel, from Qwen2 tensors."""
    for mg_name, (names, combine) in megatron_sources(arch).items():
        yield mg_name, combine(*(hf[n] for n in names))


def megatron_to_hf(
    mg: Mapping[str, torch.Tensor], arch: QwenPreset
) -> Iterator[tuple[str, torch.Tensor]]:
    """(Qwen2 name, tensor) for every tensor of a Qwen2ForCausalLM state dict."""
    yield "model.embed_tokens.weight", mg["embedding.word_embeddings.weight"]
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        for hf_name, mg_name in _layer_names(i).items():
            yield hf_name, mg[mg_name]
        for kind in ("weight", "bias"):
            q, k, v = split_qkv(mg[f"decoder.layers.{i}.self_attention.linear_qkv.{kind}"], arch)
            yield from ((f"{p}self_attn.{x}_proj.{kind}", t) for x, t in zip("qkv", (q, k, v)))
        gate, up = torch.chunk(mg[f"decoder.layers.{i}.mlp.linear_fc1.weight"], 2, dim=0)
        yield f"{p}mlp.gate_proj.weight", gate
        yield f"{p}mlp.up_proj.weight", up
    yield "model.norm.weight", mg["decoder.final_layernorm.weight"]
    yield "lm_head.weight", mg["output_layer.weight"]
