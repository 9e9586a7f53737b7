"""``specialize plan``: the memory and time model, the layout search and the command."""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import pytest

from base.presets import get_preset
from specialize.plan import (
    GPUS,
    GiB,
    PlanError,
    Workload,
    add_parser,
    estimate_memory,
    estimate_time,
    format_plan,
    layer_activation_bytes,
    load_recipe_for_plan,
    plan,
    recommend,
    stage_params,
)

ROOT = Path(__file__).resolve().parents[2]
CPT_7B = ROOT / "configs" / "code_qwen" / "7b-cpt.yaml"


def test_memory_by_hand_for_qwen_nano():
    # qwen-nano: h=32, a=4, L=2, f=96, V=151936, kv=h. Parameters: per layer QKV 32*96 + bias 96,
    # proj 32*32, SwiGLU 3*32*96, two norms 2*32 -> 13,472; x2 layers + 2*V*h + final norm 32.
    p = get_preset("qwen-nano")
    params = 2 * (32 * 96 + 96 + 32 * 32 + 3 * 32 * 96 + 2 * 32) + 2 * 151936 * 32 + 32
    assert params == p.num_params() == 9_750_880
    m = estimate_memory(p, seq_len=32, micro_batch=1, dtype="fp32")
    assert m.params == params
    assert m.weights == 4 * params
    assert m.gradients == 4 * params  # fp32 main_grad
    assert m.optimizer == 8 * params  # fp32: Adam moments only, no master copy
    # Per layer: s*b*e*(6h + 2kv + 3f) + a*s^2*b*e = 32*4*(192+64+288) + 4*32*32*4.
    assert m.activations == 2 * (32 * 4 * 544 + 4 * 32 * 32 * 4)
    # Logits: s*b*V*4 (fp32 softmax, in place) + final norm and output-layer inputs 2*e*s*b*h.
    assert m.logits == 32 * 151936 * 4 + 2 * 4 * 32 * 32
    assert m.temporaries == 151936 * 32 * 4  # the output layer's / embedding's weight gradient
    assert m.runtime == 0
    assert m.total == (
        16 * params + 2 * (32 * 4 * 544 + 4 * 32 * 32 * 4) + 32 * 151936 * 4 + 8192 + 151936 * 128
    )


def test_bf16_and_fp8_bytes_per_parameter():
    p = get_preset("qwen-7b")
    bf16 = estimate_memory(p, 2048, 1, dtype="bf16")
    fp8 = estimate_memory(p, 2048, 1, dtype="fp8")
    n = p.num_params()
    assert (bf16.weights, bf16.gradients, bf16.optimizer) == (2 * n, 4 * n, 12 * n)
    gemm = stage_params(p, 1, 1, 0)[1]
    assert fp8.weights == 2 * n + 2 * gemm  # bf16 weights plus FP8 copies (and transposes)
    assert fp8.activations == bf16.activations


def test_stage_params_add_up_to_the_model():
    p = get_preset("qwen-7b")
    assert stage_params(p, 1, 1, 0)[0] == p.num_params()
    assert sum(stage_params(p, 1, 4, s)[0] for s in range(4)) == p.num_params()
    # TP splits everything but the replicated norms.
    norms = p.num_layers * 2 * p.hidden_size + p.hidden_size
    assert 2 * stage_params(p, 2, 1, 0)[0] - norms == p.num_params()


def test_distributed_optimizer_divides_optimizer_state_by_dp():
    p = get_preset("qwen-7b")
    off = estimate_memory(p, 2048, 1, tp=2, dp=8, distributed_optimizer=False)
    on = estimate_memory(p, 2048, 1, tp=2, dp=8, distributed_optimizer=True)
    assert off.optimizer == 12 * off.params
    assert on.optimizer == math.ceil(off.optimizer / 8)
    assert (on.weights, on.gradients) == (off.weights, off.gradients)
    assert on.activations == off.activations


def test_sequence_parallel_divides_all_activations_by_tp():
    p = get_preset("qwen-7b")
    no_sp = estimate_memory(p, 4096, 1, tp=4, sequence_parallel=False)
    sp = estimate_memory(p, 4096, 1, tp=4, sequence_parallel=True)
    assert sp.activations < no_sp.activations
    one = layer_activation_bytes(p, 4096, 1, 1, "bf16")
    assert layer_activation_bytes(p, 4096, 1, 4, "bf16", sequence_parallel=True) == one // 4
    # Without SP the norm and GEMM inputs (4h per token) stay whole on every TP rank.
    s, h = 4096, p.hidden_size
    expected = 2 * 4 * h * s + (one - 2 * 4 * h * s) // 4
    assert layer_activation_bytes(p, 4096, 1, 4, "bf16") == expected


def test_recompute_reduces_activations():
    p = get_preset("qwen-7b")
    kw = dict(tp=2, sequence_parallel=True)
    none = estimate_memory(p, 8192, 1, recompute="none", **kw)
    selective = estimate_memory(p, 8192, 1, recompute="selective", **kw)
    full = estimate_memory(p, 8192, 1, recompute="full", **kw)
    assert full.activations < selective.activations < none.activations
    # Selective drops exactly the a*s^2*b softmax term; Flash Attention never stores it.
    scores = p.num_layers * p.num_attention_heads * 8192**2 * 2 // 2
    assert none.activations - selective.activations == scores
    flash = estimate_memory(p, 8192, 1, recompute="none", flash_attention=True, **kw)
    assert flash.activations == selective.activations
    # Full: each layer's input (s*b*h*e/t) plus one layer's activations being recomputed.
    layer = layer_activation_bytes(p, 8192, 1, 2, "bf16", sequence_parallel=True)
    assert full.activations == p.num_layers * 8192 * p.hidden_size * 2 // 2 + layer


def test_pipeline_first_stage_holds_pp_micro_batches():
    p = get_preset("qwen-7b")
    m = estimate_memory(p, 2048, 1, pp=4, micro_batches=16)
    per_layer = layer_activation_bytes(p, 2048, 1, 1, "bf16")
    first = estimate_memory(p, 2048, 1, pp=4, micro_batches=1)
    assert m.stage == 0 and m.in_flight == 4
    assert m.activations == 4 * (p.num_layers // 4) * per_layer  # = L layers' worth
    assert first.in_flight == 1


def _workload(preset: str, seq: int, gbs: int = 512) -> Workload:
    return Workload(get_preset(preset), seq, gbs, 100, "bf16", True, False, False)


def test_recommend_picks_a_layout_that_fits():
    work = _workload("qwen-7b", 8192)
    cand = recommend(work, 64, GPUS["h100"])
    lay = cand.layout
    assert cand.fits and cand.memory.total <= 0.9 * 80 * GiB
    assert lay.tp * lay.pp * lay.dp == 64
    assert work.preset.num_attention_heads % lay.tp == 0 and work.preset.num_layers % lay.pp == 0
    assert work.global_batch % (lay.micro_batch * lay.dp) == 0
    # TP=1 without recompute does not fit at 8K context; the fastest layout that does is TP=2.
    assert (lay.tp, lay.pp, lay.recompute) == (2, 1, "none")
    # TP=1: PP=2 (a 1/16 bubble) beats full recompute (a third more FLOPs) at PP=1.
    tp1 = recommend(work, 64, GPUS["h100"], tp=1)
    assert (tp1.layout.pp, tp1.layout.recompute, tp1.time.bubble) == (2, "none", 1 / 16)
    pinned = recommend(work, 64, GPUS["h100"], tp=1, pp=1)
    assert pinned.layout.recompute == "full" and pinned.fits
    assert pinned.time.step_seconds > tp1.time.step_seconds > cand.time.step_seconds


def test_recommend_says_when_nothing_fits():
    with pytest.raises(PlanError, match="nothing fits.*qwen-14b.*GiB per GPU"):
        recommend(_workload("qwen-14b", 2048, gbs=8), 1, GPUS["h100"])


def test_fp8_needs_fp8_hardware():
    p = get_preset("qwen-7b")
    with pytest.raises(PlanError, match="A100 has no FP8"):
        estimate_time(p, 2048, 8, 8, GPUS["a100"], steps=1, dtype="fp8")
    cfg = load_recipe_for_plan(str(CPT_7B))[0]
    with pytest.raises(PlanError, match="A100 has no FP8"):
        plan(cfg, 64, "a100", dtype="fp8")
    a100 = plan(cfg, 64, "a100")  # bf16 plans fine, without FP8 rows
    assert [label for label, _ in a100.times if "fp8" in label] == []


def test_fp8_speeds_up_gemms_only():
    p, h100 = get_preset("qwen-7b"), GPUS["h100"]
    bf16 = estimate_time(p, 8192, 512, 64, h100, steps=10)
    fp8 = estimate_time(p, 8192, 512, 64, h100, steps=10, dtype="fp8")
    assert fp8.fp8_speedup == pytest.approx(1979 / 989 * 0.65)
    assert 1 < bf16.step_seconds / fp8.step_seconds < fp8.fp8_speedup
    attention = 6 * p.num_layers * p.hidden_size * 8192
    gemm = bf16.flops_per_token - attention
    assert fp8.step_seconds / bf16.step_seconds == pytest.approx(
        (gemm / fp8.fp8_speedup + attention) / bf16.flops_per_token
    )


def test_plan_for_code_qwen_7b_cpt_on_64_h100():
    cfg = load_recipe_for_plan(str(CPT_7B))[0]
    result = plan(cfg, 64, "h100")
    tokens_per_step = 512 * 8192
    steps = math.ceil(9.0e10 / tokens_per_step)
    assert steps == 21458
    assert result.requested.layout.tp == 2 and result.requested.layout.sequence_parallel
    assert result.requested.fits and result.recommended.fits
    assert [label for label, _ in result.times][:2] == ["recipe bf16", "recipe fp8"]
    for _, t in result.times:
        assert t.steps == steps and t.total_tokens == steps * tokens_per_step
        assert t.tokens_per_second == pytest.approx(tokens_per_step / t.step_seconds)
        assert t.gpu_hours == pytest.approx(t.total_tokens / t.tokens_per_second / 3600 * 64)
    bf16 = result.times[0][1]
    # 6N + 6Lhs at 40% of 64 x 989 TFLOP/s (the recipe recomputes nothing under Flash Attention).
    p = get_preset("qwen-7b")
    flops = 6 * p.num_params() + 6 * p.num_layers * p.hidden_size * 8192
    assert bf16.step_seconds == pytest.approx(tokens_per_step * flops / (64 * 989e12 * 0.40))
    text = format_plan(result)
    assert "recommended: TP=2" in text and "GPU-hours" in text and "dist-opt off" in text


def test_plan_honours_tp_and_pp():
    cfg = load_recipe_for_plan(str(CPT_7B))[0]
    result = plan(cfg, 64, "h100", tp=4, pp=2)
    assert (result.requested.layout.tp, result.requested.layout.pp) == (4, 2)
    assert (result.recommended.layout.tp, result.recommended.layout.pp) == (4, 2)
    with pytest.raises(PlanError, match="does not divide"):
        plan(cfg, 64, "h100", tp=3)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="specialize")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli(capsys):
    args = _parse(["plan", str(CPT_7B), "--gpus", "64", "--gpu", "h100", "--mfu", "0.5"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "| recipe bf16 |" in out and "recommended: TP=2 PP=1" in out
    assert "MFU 0.50" in out
    args = _parse(["plan", str(CPT_7B), "--gpus", "64", "--gpu", "a100", "--dtype", "fp8"])
    assert args.func(args) == 2
    assert "A100 has no FP8" in capsys.readouterr().err
    args = _parse(["plan", str(CPT_7B), "data.seq_length=2048", "--gpus", "8", "--tp", "1"])
    assert args.func(args) == 0
    assert "seq 2048" in capsys.readouterr().out


def test_recipe_layout_that_does_not_divide_the_gpus_is_a_note():
    cfg = load_recipe_for_plan(str(CPT_7B), ["model.preset=qwen-1.8b"])[0]  # TP=2
    result = plan(cfg, 1, "h100")
    assert result.requested is None and "does not apply to 1 GPU" in result.notes[0]
    assert result.recommended.layout.tp == 1 and result.recommended.fits
    assert "recommended: TP=1" in format_plan(result)


def test_unknown_gpu_and_dtype():
    cfg = load_recipe_for_plan(str(CPT_7B))[0]
    with pytest.raises(PlanError, match="unknown GPU"):
        plan(cfg, 8, "v100")
    with pytest.raises(PlanError, match="dtype"):
        estimate_memory(get_preset("qwen-nano"), 16, 1, dtype="fp16")
    assert dataclasses.is_dataclass(GPUS["h200"]) and GPUS["h200"].memory_bytes == 140 * GiB
