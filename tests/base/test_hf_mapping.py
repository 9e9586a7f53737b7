"""The megatron-core Qwen model against transformers' Qwen2 on the same weights (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from base.hf_mapping import fuse_qkv, hf_to_megatron, megatron_to_hf, qwen2_config, split_qkv
from base.presets import QwenPreset, get_preset
from base.tokenizer import NUM_RANKS
from tests.distributed import run_distributed

GQA = QwenPreset("test-gqa", 32, 4, 2, 96, 151936, num_query_groups=2, max_position_embeddings=2048)


def hf_model(arch: QwenPreset, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        **qwen2_config(arch),
        attn_implementation="eager",
        initializer_range=0.25,  # large enough that attention is far from uniform
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # transformers zero-initializes biases; make them matter
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def test_qkv_fusion_round_trips_and_groups_rows():
    arch = GQA
    d, heads, groups = arch.kv_channels, arch.num_attention_heads, arch.query_groups
    q = torch.arange(heads * d).float().unsqueeze(1)
    k = 1000 + torch.arange(groups * d).float().unsqueeze(1)
    v = 2000 + torch.arange(groups * d).float().unsqueeze(1)
    fused = fuse_qkv(q, k, v, arch)
    # group 0: query heads 0-1, then key head 0, then value head 0
    assert fused[: 2 * d].squeeze().tolist() == list(range(2 * d))
    assert fused[2 * d : 3 * d].squeeze().tolist() == [1000.0 + i for i in range(d)]
    for a, b in zip(split_qkv(fused, arch), (q, k, v)):
        assert torch.equal(a, b)


def _megatron_logits(
    rank: int, world_size: int, arch: QwenPreset, weights: dict, tokens: torch.Tensor
):
    from base.model import ModelOptions, build_model
    from specialize.config import ParallelConfig
    from specialize.mcore.distributed import init_distributed, seed_all

    init_distributed(ParallelConfig())
    seed_all(0)
    model = build_model(arch, ModelOptions(spec="local"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (
        missing,
        unexpected,
    )
    model.eval()
    with torch.no_grad():
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        return model(tokens, positions, None)


@pytest.mark.parametrize("arch", [get_preset("qwen-nano"), GQA], ids=["mha", "gqa"])
def test_megatron_matches_transformers_qwen2(arch):
    reference = hf_model(arch)
    hf_weights = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    weights = dict(hf_to_megatron(hf_weights, arch))
    tokens = torch.randint(0, NUM_RANKS, (2, 40), generator=torch.Generator().manual_seed(1))
    ours = run_distributed(_megatron_logits, arch, weights, tokens, world_size=1)
    with torch.no_grad():
        theirs = reference(tokens).logits
    diff = (ours - theirs).abs().max().item()
    print(f"{arch.name}: max |Δlogit| megatron vs transformers = {diff:.2e}")
    assert diff <= 1e-4, f"max |Δlogit| {diff}"
    # And back: HF → megatron → HF is bit-exact for every tensor.
    back = dict(megatron_to_hf(weights, arch))
    assert back.keys() == hf_weights.keys()
    for name, tensor in hf_weights.items():
        assert torch.equal(back[name], tensor), name
