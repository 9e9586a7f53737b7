"""Generation from checkpoints: greedy equals step-by-step argmax, at TP=1, TP=2 and PP=2, and a
batch of prompts of different lengths equals each prompt alone; a checkpoint runs in its
training precision unless told otherwise."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from base.tokenizer import IM_START_ID, VOCAB_SIZE
from tests.distributed import run_distributed

PENALTY = 3.0  # strong enough that the untrained model's greedy choices change
PROMPTS = [[IM_START_ID, 872, 198, 13048], [9707, 11, 1879], [9707, 11, 1879, 0, 1, 2]]


def _save(rank: int, world_size: int, run_dir: str, overrides: tuple[str, ...] = ()) -> str:
    from specialize.checkpoint.state import save
    from specialize.config import derive, load_config
    from specialize.mcore.distributed import init_distributed, seed_all
    from specialize.train.engine import Engine

    cfg = load_config(
        "configs/base/qwen-nano.yaml",
        ["train.steps=1", "schedule.warmup_steps=0", f"checkpoint.dir={run_dir}", *overrides],
    )
    topo = init_distributed(cfg.parallel)
    seed_all(cfg.train.seed)
    engine = Engine.build(cfg, topo, derive(cfg, topo.world_size))
    return str(save(engine, iteration=1, consumed_samples=0))


def _generate(rank: int, world_size: int, ckpt: str, tp: int, pp: int) -> dict:
    from base.tokenizer import QwenTokenizer
    from specialize.infer.generate import generate_ids, generate_text, greedy
    from specialize.infer.logits import full_logits
    from specialize.infer.model import load_model

    model, _ = load_model(ckpt, tp, pp)
    out = {"greedy": greedy(model, PROMPTS, 6, stop_ids=(), vocab_size=VOCAB_SIZE)}
    # The same by hand: full logits of the whole sequence, argmax of the last position.
    naive = []
    for prompt in PROMPTS:
        tokens = torch.tensor([prompt])
        for _ in range(6):
            logits = full_logits(model, tokens)[0, -1, :VOCAB_SIZE]
            tokens = torch.cat([tokens, logits.argmax().view(1, 1)], dim=1)
        naive.append(tokens[0, len(prompt) :].tolist())
    out["naive"] = naive
    # transformers' own repetition penalty on the full logits, step by step. Each prompt starts
    # with its own first greedy token, which the penalty then has to discourage.
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    repeating = [row[:1] + prompt for row, prompt in zip(out["greedy"], PROMPTS)]
    out["repeating_greedy"] = greedy(model, repeating, 6, stop_ids=(), vocab_size=VOCAB_SIZE)

    penalty = RepetitionPenaltyLogitsProcessor(PENALTY)
    naive_penalized = []
    for prompt in repeating:
        tokens = torch.tensor([prompt])
        for _ in range(6):
            logits = full_logits(model, tokens)[:, -1, :VOCAB_SIZE]
            tokens = torch.cat([tokens, penalty(tokens, logits).argmax(-1, keepdim=True)], dim=1)
        naive_penalized.append(tokens[0, len(prompt) :].tolist())
    out["naive_penalized"] = naive_penalized
    penalized = dict(stop_ids=(), vocab_size=VOCAB_SIZE, repetition_penalty=PENALTY)
    out["penalized"] = greedy(model, repeating, 6, **penalized)
    out["penalized_one_by_one"] = greedy(model, repeating, 6, batch_size=1, **penalized)
    out["penalized_recomputed"] = greedy(model, repeating, 6, kv_cache=False, **penalized)
    out["recomputed"] = greedy(
        model, PROMPTS, 6, stop_ids=(), vocab_size=VOCAB_SIZE, kv_cache=False
    )
    out["one_by_one"] = greedy(model, PROMPTS, 6, stop_ids=(), vocab_size=VOCAB_SIZE, batch_size=1)
    out["short_budget"] = greedy(model, PROMPTS, 2, stop_ids=(), vocab_size=VOCAB_SIZE)
    # Prompt and completion together: 7 positions leave 3, 4 and 1 new tokens; 5 leave none
    # to the 6-token prompt.
    out["max_length_7"] = greedy(
        model, PROMPTS, 6, stop_ids=(), vocab_size=VOCAB_SIZE, max_length=7
    )
    out["max_length_5"] = greedy(
        model, PROMPTS, 6, stop_ids=(), vocab_size=VOCAB_SIZE, max_length=5
    )
    out["sampled"] = generate_ids(model, PROMPTS, 6, stop_ids=(), temperature=1.0, seed=3)
    out["sampled_recomputed"] = generate_ids(
        model, PROMPTS, 6, stop_ids=(), temperature=1.0, seed=3, kv_cache=False
    )
    out["sampled_again"] = generate_ids(model, PROMPTS, 6, stop_ids=(), temperature=1.0, seed=3)
    out["nucleus_of_one"] = generate_ids(
        model, PROMPTS, 6, stop_ids=(), vocab_size=VOCAB_SIZE, temperature=1.0, top_p=1e-9
    )
    first = out["greedy"][0][2]
    out["stopped_at_id"] = greedy(model, PROMPTS[:1], 6, stop_ids=(first,), vocab_size=VOCAB_SIZE)
    tokenizer = QwenTokenizer.load()
    text = tokenizer.decode(out["greedy"][0])
    out["text"] = text
    stop = text[len(text) // 2 :][:2] or text
    out["stop"] = stop
    out["cut"] = generate_text(model, tokenizer, PROMPTS[:1], 6, stop=[stop])[0]
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return run_distributed(_save, str(tmp_path_factory.mktemp("gen") / "run"), world_size=1)


@pytest.fixture(scope="module")
def single(ckpt) -> dict:
    return run_distributed(_generate, ckpt, 1, 1, world_size=1)


def test_greedy_sampling_and_stops(single) -> None:
    out = single
    assert out["greedy"] == out["naive"] == out["recomputed"]  # KV cache == recomputation
    # Prompts of lengths 3, 4 and 6 in one batch == each alone: padding is never attended.
    assert out["greedy"] == out["one_by_one"]
    assert out["short_budget"] == [row[:2] for row in out["greedy"]]
    assert out["max_length_7"] == [row[: 7 - len(p)] for row, p in zip(out["greedy"], PROMPTS)]
    assert out["max_length_5"] == [out["greedy"][0][:1], out["greedy"][1][:2], []]
    assert out["sampled"] == out["sampled_recomputed"]
    assert out["sampled"] == out["sampled_again"] and out["sampled"] != out["greedy"]
    assert out["nucleus_of_one"] == out["greedy"]
    assert out["stopped_at_id"] == [out["greedy"][0][:2]]
    assert out["cut"] == out["text"][: out["text"].index(out["stop"])]


def test_repetition_penalty_is_transformers(single) -> None:
    """The penalty equals transformers' ``RepetitionPenaltyLogitsProcessor`` over prompt and
    completion, batched or one prompt at a time, cached or recomputed; and it changes tokens."""
    out = single
    assert out["penalized"] == out["naive_penalized"]
    assert out["penalized"] == out["penalized_one_by_one"] == out["penalized_recomputed"]
    assert out["penalized"] != out["repeating_greedy"]


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_parallel_layouts_generate_the_same(ckpt, single, tp, pp) -> None:
    parallel = run_distributed(_generate, ckpt, tp, pp, world_size=2)
    assert parallel["greedy"] == single["greedy"] == parallel["naive"]
    assert parallel["penalized"] == single["penalized"]


def test_a_checkpoint_runs_in_its_training_precision(tmp_path):
    from specialize.infer.model import checkpoint_dtype

    for precision, expected in (("fp32", "fp32"), ("bf16", "bf16"), ("fp8", "bf16")):
        ckpt = tmp_path / precision / "iter_0000001"
        ckpt.mkdir(parents=True)
        (ckpt / "metadata.json").write_text("{}")
        (ckpt / "config.yaml").write_text(f"precision:\n  dtype: {precision}\n")
        assert checkpoint_dtype(ckpt) == expected, precision


def test_a_bf16_evaluation_builds_the_gpu_model_in_bf16():
    from base.model import transformer_config_kwargs
    from base.presets import get_preset
    from specialize.infer.model import inference_options

    arch = get_preset("qwen-14b")
    for dtype, params_dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        options = dataclasses.replace(inference_options(arch, 2, 1, dtype), spec="te")
        kwargs = transformer_config_kwargs(arch, options)
        assert (kwargs["params_dtype"], kwargs["bf16"]) == (params_dtype, dtype == "bf16")


def _bf16_eval(rank: int, world_size: int, run_dir: str, text: str) -> dict:
    from specialize.cli import main
    from specialize.infer.model import load_model

    ckpt = _save(rank, world_size, run_dir, ("precision.dtype=bf16",))
    out = {}
    for name, flags in (("default", []), ("fp32", ["--dtype", "fp32"])):
        results = Path(run_dir) / f"{name}.json"
        argv = ["eval", ckpt, "--tasks", "perplexity", "--data", f"perplexity={text}"]
        try:
            main([*argv, "--lengths", "32", "--limit", "2", "-o", str(results), *flags])
        except SystemExit as e:
            assert e.code == 0, e.code
        doc = json.loads(results.read_text())
        out[name] = (doc["model"]["dtype"], doc["tasks"]["perplexity"]["metrics"]["perplexity"])
    model, _ = load_model(ckpt)
    out["loaded"] = str(model.embedding.word_embeddings.weight.dtype)
    return out


def test_a_bf16_trained_checkpoint_evaluates_in_bf16_unless_dtype_says_fp32(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(Path(json.__file__).read_text())
    out = run_distributed(_bf16_eval, str(tmp_path / "run"), str(text), world_size=1)
    assert out["loaded"] == "torch.bfloat16"
    (default, bf16_perplexity), (override, fp32_perplexity) = out["default"], out["fp32"]
    assert (default, override) == ("bf16", "fp32")  # recorded in the results
    assert bf16_perplexity != fp32_perplexity  # and really run in that precision
