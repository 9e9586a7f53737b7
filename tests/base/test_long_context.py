"""Training-free long context (dynamic NTK RoPE, LogN attention, layer-wise windows): Qwen v1's
exact rules, bit-identity up to the training length, windows that ignore what lies outside them,
KV-cache generation equal to recomputation, the TE spec, config validation and HF config keys."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from base.long_context import (
    LongContextCoreAttention,
    logn_factors,
    ntk_alpha,
    ntk_inv_freq,
    scale_query_logn,
    window_size,
)
from base.long_context_config import LongContextConfig
from base.model import ModelOptions, layer_spec, transformer_config_kwargs
from base.presets import get_preset
from base.tokenizer import VOCAB_SIZE
from tests.distributed import run_distributed

TRAIN = 16  # train_seq_length of the model tests: short, so a 20-40 token prompt is "long"


def _qwen_get_ntk_alpha(true_seq_len: int, seq_length: int) -> int:
    """Verbatim from Qwen v1 modeling_qwen.py ``QWenModel.get_ntk_alpha``."""
    context_value = math.log(true_seq_len / seq_length, 2) + 1
    ntk_alpha = 2 ** math.ceil(context_value) - 1
    ntk_alpha = max(ntk_alpha, 1)
    return ntk_alpha


def test_ntk_alpha_is_qwens_rule():
    for length in range(1, 200):
        assert ntk_alpha(length, TRAIN) == _qwen_get_ntk_alpha(length, TRAIN)
    assert {ntk_alpha(n, TRAIN) for n in range(1, TRAIN + 1)} == {1}
    assert (ntk_alpha(17, TRAIN), ntk_alpha(32, TRAIN), ntk_alpha(33, TRAIN)) == (3, 3, 7)


def test_ntk_inverse_frequencies_closed_form():
    dim, base = 8, 10000.0
    for alpha in (1, 3, 7):
        new_base = base * alpha ** (dim / (dim - 2))
        expected = torch.tensor([1.0 / new_base ** (i / dim) for i in range(0, dim, 2)])
        torch.testing.assert_close(ntk_inv_freq(base, dim, alpha), expected, rtol=1e-6, atol=0)
    plain = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    assert torch.equal(ntk_inv_freq(10000, dim, 1), plain)


def test_logn_factors_are_qwens_list():
    qwen = [math.log(i, TRAIN) if i > TRAIN else 1 for i in range(1, 100)]  # modeling_qwen.py
    torch.testing.assert_close(
        logn_factors(0, 99, TRAIN), torch.tensor(qwen, dtype=torch.float32), rtol=1e-6, atol=0
    )
    assert torch.equal(logn_factors(0, TRAIN, TRAIN), torch.ones(TRAIN))  # exactly 1, not ~1


def test_query_scaling_uses_absolute_positions():
    query = torch.ones(3, 2, 4, 8)  # [sq, b, np, hn]
    assert scale_query_logn(query, TRAIN, TRAIN) is query  # nothing past the training length
    prefill = scale_query_logn(query, 3, TRAIN)
    assert torch.equal(prefill, query)
    decode = scale_query_logn(query[:1], 40, TRAIN)  # KV-cache step: the query is position 40
    assert torch.allclose(decode, torch.full_like(decode, math.log(40) / math.log(TRAIN)))
    tail = scale_query_logn(query, 18, TRAIN)  # positions 16, 17, 18
    expected = [1.0, math.log(17, TRAIN), math.log(18, TRAIN)]
    torch.testing.assert_close(tail[:, 0, 0, 0], torch.tensor(expected))


class _Recorder(torch.nn.Module):
    """Stands in for a core attention class: records what it was built with."""

    def __init__(self, config, layer_number, **kwargs):
        super().__init__()
        self.config, self.layer_number, self.kwargs = config, layer_number, kwargs


def test_window_builder_sets_megatron_window_size_per_layer():
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(num_layers=3, hidden_size=8, num_attention_heads=2)
    builder = LongContextCoreAttention(_Recorder, layer_windows=(4, None, 0))
    built = [builder(config=config, layer_number=i, attn_mask_type=None) for i in (1, 2, 3)]
    assert built[0].config.window_size == window_size(4) == (3, 0)  # itself + 3 before it
    assert built[1].config.window_size is None and built[2].config.window_size is None
    assert config.window_size is None  # the shared config is untouched
    logn = LongContextCoreAttention(_Recorder, logn_train_length=TRAIN)(
        config=config, layer_number=1
    )
    assert type(logn).__name__ == "LogN_Recorder" and logn.logn_train_length == TRAIN


def test_te_spec_carries_windows_and_logn(monkeypatch):
    """The TE layer spec is megatron's with its ``TEDotProductAttention`` wrapped by the builder;
    built here from the local spec's shape because TE's spec provider needs TE installed."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    import base.model as model_mod

    def te_like_spec():
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
        spec.submodules.self_attention.submodules.core_attention = TEDotProductAttention
        return spec

    monkeypatch.setattr(model_mod, "get_gpt_layer_with_transformer_engine_spec", te_like_spec)
    opts = ModelOptions(
        spec="te",
        long_context=LongContextConfig(
            logn_attention=True, layer_windows=[8, None], train_seq_length=TRAIN
        ),
    )
    core = layer_spec("te", opts).submodules.self_attention.submodules.core_attention
    assert isinstance(core, LongContextCoreAttention)
    assert core.base is TEDotProductAttention
    assert (core.window(1), core.window(2)) == (8, None) and core.logn_train_length == TRAIN
    plain = layer_spec("te", ModelOptions(spec="te")).submodules.self_attention.submodules
    assert plain.core_attention is TEDotProductAttention  # off by default: megatron's spec as is
    # RoPE and windows are per layer / per forward, not global TransformerConfig settings.
    kw = transformer_config_kwargs(get_preset("qwen-nano"), opts)
    assert "window_size" not in kw and kw["apply_rope_fusion"]


@pytest.mark.gpu
def test_te_core_attention_gets_the_window():
    from base.model import build_model
    from specialize.config import ParallelConfig
    from specialize.mcore.distributed import init_distributed

    init_distributed(ParallelConfig())
    opts = ModelOptions(
        spec="te",
        long_context=LongContextConfig(
            layer_windows=[8, None], logn_attention=True, rope_scaling="dynamic-ntk"
        ),
    )
    model = build_model(get_preset("qwen-nano"), opts)
    cores = [layer.self_attention.core_attention for layer in model.decoder.layers]
    assert cores[0].config.window_size == (7, 0) and cores[1].config.window_size is None
    assert type(model.rotary_pos_emb).__name__ == "DynamicNTKRotaryEmbedding"


def test_config_fields_and_errors():
    from specialize.config import ConfigError, load_config
    from specialize.train.engine import model_options

    base = ["train.steps=1", "data.seq_length=32"]
    cfg = load_config("configs/base/qwen-nano.yaml", base)
    opts = model_options(cfg).long_context
    assert (opts.rope_scaling, opts.logn_attention, opts.layer_windows) == ("none", False, None)
    assert opts.train_seq_length == 32  # defaults to the length trained at
    cfg = load_config(
        "configs/base/qwen-nano.yaml",
        [
            *base,
            "model.long_context.rope_scaling=dynamic-ntk",
            "model.long_context.logn_attention=true",
            "model.long_context.layer_windows=[8,null]",
            "model.long_context.train_seq_length=16",
        ],
    )
    opts = model_options(cfg).long_context
    assert (opts.rope_scaling, opts.logn_attention) == ("dynamic-ntk", True)
    assert (opts.layer_windows, opts.train_seq_length) == ([8, None], 16)
    lc = "model.long_context"
    for override, message in (
        (f"{lc}.layer_windows=[8,8,8]", f"{lc}.layer_windows: has 3 entries for 2 layers"),
        (f"{lc}.rope_scaling=yarn", f"{lc}.rope_scaling: 'yarn'"),
        (f"{lc}.rope_alpha=3", f"{lc}.rope_alpha: 3.0: needs rope_scaling=dynamic-ntk"),
        (f"{lc}.layer_windows=[-2,8]", f"{lc}.layer_windows"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config("configs/base/qwen-nano.yaml", [*base, override])


def _v1_config(**extra) -> dict:
    return {
        "architectures": ["QWenLMHeadModel"],
        "model_type": "qwen",
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "intermediate_size": 192,
        "vocab_size": 151936,
        **extra,
    }


def test_hf_v1_keys_round_trip(tmp_path):
    from base.hf_checkpoint import qwen_v1_long_context_config, read_config

    (tmp_path / "config.json").write_text(
        json.dumps(_v1_config(use_dynamic_ntk=True, use_logn_attn=True, seq_length=2048))
    )
    model = read_config(tmp_path)
    assert model.long_context == LongContextConfig("dynamic-ntk", None, True, None, 2048)
    exported = qwen_v1_long_context_config(model.long_context, model.arch)
    assert exported == {"use_dynamic_ntk": True, "use_logn_attn": True, "seq_length": 2048}
    (tmp_path / "config.json").write_text(json.dumps(_v1_config()))
    off = read_config(tmp_path).long_context
    assert (off.rope_scaling, off.logn_attention, off.enabled) == ("none", False, False)
    assert qwen_v1_long_context_config(None, model.arch)["use_dynamic_ntk"] is False


# ----------------------------------------------------------------------------- the model


def _model_checks(rank: int, world_size: int, run_dir: str) -> dict:
    from base.model import build_model
    from specialize.config import ParallelConfig
    from specialize.infer.generate import _CachedDecoder, generate_ids
    from specialize.infer.logits import full_logits
    from specialize.mcore.distributed import init_distributed, seed_all

    init_distributed(ParallelConfig())
    seed_all(0)
    preset = get_preset("qwen-nano")
    plain = build_model(
        preset, ModelOptions(spec="local", long_context=LongContextConfig(train_seq_length=TRAIN))
    ).eval()

    def variant(**options) -> torch.nn.Module:
        options = LongContextConfig(train_seq_length=TRAIN, **options)
        model = build_model(preset, ModelOptions(spec="local", long_context=options)).eval()
        model.load_state_dict(plain.state_dict())
        return model

    everything = dict(rope_scaling="dynamic-ntk", logn_attention=True, layer_windows=[TRAIN, None])
    models = {
        "ntk": variant(rope_scaling="dynamic-ntk"),
        "logn": variant(logn_attention=True),
        "windows": variant(layer_windows=[4, TRAIN]),
        "all": variant(**everything),
    }
    out: dict = {}
    gen = torch.Generator().manual_seed(0)
    short = torch.randint(0, 150000, (2, TRAIN), generator=gen)
    reference = full_logits(plain, short)
    out["identical_short"] = {
        name: torch.equal(full_logits(m, short), reference)
        for name, m in models.items()
        if name != "windows"
    }
    four = short[:, :4]  # windows: identical up to the window
    out["identical_within_window"] = torch.equal(
        full_logits(models["windows"], four), full_logits(plain, four)
    )

    long = torch.randint(0, 150000, (1, 40), generator=gen)
    plain_long = full_logits(plain, long)
    ntk = models["ntk"]
    full_logits(ntk, long)
    out["alpha_at_40"] = ntk.rotary_pos_emb.current_alpha
    out["emb_40"] = ntk.rotary_pos_emb(40)[:, 0, 0, : preset.kv_channels // 2].clone()
    out["ntk_changes_long"] = not torch.equal(full_logits(ntk, long), plain_long)
    logn_long = full_logits(models["logn"], long)
    out["logn_prefix_same"] = torch.equal(logn_long[:, :TRAIN], plain_long[:, :TRAIN])
    out["logn_tail_differs"] = not torch.allclose(logn_long[:, TRAIN:], plain_long[:, TRAIN:])
    scaled = []  # the query factors the core attention applied, via its input/output
    core = models["logn"].decoder.layers[0].self_attention.core_attention
    handle = core.register_forward_pre_hook(lambda m, args: scaled.append(args[0].clone()))
    full_logits(models["logn"], long)
    handle.remove()
    out["logn_query_len"] = scaled[0].shape[0]

    # Windows: layer 0 with a window of 4 sees positions p-3..p at p; its output at p ignores p-4.
    p = 30
    far, near = long.clone(), long.clone()
    far[0, p - 4] = (far[0, p - 4] + 1) % 150000  # the 5th token back counting p: outside
    near[0, p - 3] = (near[0, p - 3] + 1) % 150000  # the 4th: inside
    one = variant(layer_windows=[4, None])
    first = []
    hook = one.decoder.layers[0].register_forward_hook(
        lambda m, args, output: first.append(output[0].detach().clone())
    )
    for tokens in (long, far, near):
        full_logits(one, tokens)
    hook.remove()
    out["window_far_same"] = torch.equal(first[0][p], first[1][p])
    out["window_near_differs"] = not torch.equal(first[0][p], first[2][p])
    out["window_far_differs_before"] = not torch.equal(first[0][p - 1], first[1][p - 1])

    # KV-cache generation == recomputation with every option, on a prompt past the training
    # length (20 + 10 new tokens stay within one alpha bucket, 17..32 -> alpha 3).
    prompts = [torch.randint(0, 150000, (20,), generator=gen).tolist()]
    prompts.append(torch.randint(0, 150000, (20,), generator=gen).tolist())
    model = variant(**{**everything, "layer_windows": [8, 4]})
    cached = generate_ids(model, prompts, 10, stop_ids=(), vocab_size=VOCAB_SIZE, kv_cache=True)
    recomputed = generate_ids(
        model, prompts, 10, stop_ids=(), vocab_size=VOCAB_SIZE, kv_cache=False
    )
    out["kv_equal"] = cached == recomputed
    out["kv_tokens"] = cached
    # Past the bucket the cache keeps the prefill alpha (Qwen v1); recomputation uses the length.
    decoder = _CachedDecoder(model, 1, 40)
    decoder(torch.tensor(prompts[:1]), 0)
    for step in range(15):
        decoder(torch.tensor([[step]]), 20 + step)
    out["kept_alpha"] = model.rotary_pos_emb.current_alpha
    out["kv_offset"] = decoder.context.sequence_len_offset

    # Perplexity by length: non-overlapping windows of length + 1 tokens, loss over every position.
    import numpy as np

    from specialize.infer.likelihood import perplexity_by_length

    stream = np.random.default_rng(0).integers(0, 150000, size=60)
    out["ppl"] = perplexity_by_length(plain, stream, [8, 16], max_windows=2, batch_size=2)
    window = torch.from_numpy(stream[17:34]).view(1, 17)  # the second window of 16 (+1)
    logits = full_logits(plain, window[:, :-1])[0]
    second = torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
    window = torch.from_numpy(stream[:17]).view(1, 17)
    logits = full_logits(plain, window[:, :-1])[0]
    first = torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
    out["ppl_16_manual"] = math.exp((first + second) / 32)

    # Per checkpoint: a saved run's config carries the options; load_model's argument overrides.
    from specialize.checkpoint.state import save
    from specialize.config import derive, load_config
    from specialize.infer.model import load_model, stored_long_context
    from specialize.train.engine import Engine

    cfg = load_config(
        "configs/base/qwen-nano.yaml",
        [
            "train.steps=1",
            "schedule.warmup_steps=0",
            f"checkpoint.dir={run_dir}",
            f"data.seq_length={TRAIN}",
            "model.long_context.logn_attention=true",
        ],
    )
    engine = Engine.build(cfg, init_distributed(cfg.parallel), derive(cfg, 1))
    ckpt = save(engine, iteration=1, consumed_samples=0)
    options = dataclasses.replace(stored_long_context(ckpt), rope_scaling="dynamic-ntk")
    loaded, _ = load_model(ckpt, long_context=options)
    core = loaded.decoder.layers[0].self_attention.core_attention
    out["loaded"] = (
        type(loaded.rotary_pos_emb).__name__,
        loaded.rotary_pos_emb.train_seq_length,
        type(core).__name__,
        core.logn_train_length,
    )
    return out


@pytest.fixture(scope="module")
def checks(tmp_path_factory) -> dict:
    return run_distributed(_model_checks, str(tmp_path_factory.mktemp("lc") / "run"), world_size=1)


def test_options_are_bit_identical_up_to_the_training_length(checks):
    assert checks["identical_short"] == {"ntk": True, "logn": True, "all": True}
    assert checks["identical_within_window"]


def test_dynamic_ntk_past_the_training_length(checks):
    dim = get_preset("qwen-nano").kv_channels
    assert checks["alpha_at_40"] == ntk_alpha(40, TRAIN) == 7
    positions = torch.arange(40, dtype=torch.float32)[:, None]
    expected = positions * ntk_inv_freq(10000.0, dim, 7)[None, :]
    torch.testing.assert_close(checks["emb_40"], expected, rtol=1e-6, atol=1e-6)
    assert checks["ntk_changes_long"]


def test_logn_past_the_training_length(checks):
    assert checks["logn_prefix_same"] and checks["logn_tail_differs"]
    assert checks["logn_query_len"] == 40


def test_window_layer_ignores_tokens_outside_its_window(checks):
    assert checks["window_far_same"]  # p-4 with a window of 4 (p-3..p): invisible
    assert checks["window_near_differs"]  # p-3: inside the window
    assert checks["window_far_differs_before"]  # the same token is inside p-1's window


def test_kv_cache_generation_matches_recomputation(checks):
    assert checks["kv_equal"], checks["kv_tokens"]
    assert checks["kv_offset"] == 35
    assert checks["kept_alpha"] == 3  # prompt of 20 -> alpha 3, kept at 35 (recompute: 7)


def test_load_model_takes_checkpoint_and_argument_options(checks):
    assert checks["loaded"] == (
        "DynamicNTKRotaryEmbedding",
        TRAIN,
        "LogNDotProductAttention",
        TRAIN,
    )


def test_perplexity_by_length(checks):
    assert set(checks["ppl"]) == {8, 16}
    assert checks["ppl"][16] == pytest.approx(checks["ppl_16_manual"], rel=1e-5)
    assert checks["ppl"][8] > 1000  # random init over a 152k vocabulary


@pytest.mark.parametrize("data", ["data.format=sft", "data.reset_attention_mask=true"])
def test_windows_with_document_masks_are_refused(data):
    from specialize.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.long_context.layer_windows: window attention"):
        nano = Path(__file__).resolve().parents[2] / "configs/base/qwen-nano.yaml"
        load_config(nano, ["model.long_context.layer_windows=[64,null]", data])
