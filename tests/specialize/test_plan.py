"""``specialize plan``: the memory and time model, the layout search and the command."""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from pathlib import Path

import pytest

from base.presets import get_preset
from specialize.cli import build_parser
from specialize.config import ConfigError, derive
from specialize.plan import (
    GPUS,
    GiB,
    PlanError,
    Workload,
    estimate_comm,
    estimate_memory,
    estimate_time,
    format_plan,
    layer_activation_bytes,
    load_recipe_for_plan,
    make_layout,
    plan,
    recommend,
    stage_params,
    time_of,
    workload,
)
from tests.conftest import shipped_recipes

ROOT = Path(__file__).resolve().parents[2]
CPT_7B = ROOT / "configs" / "code_qwen" / "7b-cpt.yaml"
SFT_7B = ROOT / "configs" / "code_qwen" / "7b-chat-sft.yaml"


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


def test_chunked_output_loss_holds_one_chunk_of_logits():
    p = get_preset("qwen-nano")
    m = estimate_memory(p, seq_len=32, micro_batch=4, dtype="fp32", chunk_tokens=8)
    # One chunk's fp32 logits, the output-layer inputs, and the hidden-state gradient computed
    # in the forward; fp32 weights need no separate accumulator of the weight gradient.
    assert m.logits == 8 * 151936 * 4 + 2 * 4 * 128 * 32 + 4 * 128 * 32
    big = get_preset("qwen-7b")
    unfused = estimate_memory(big, 8192, 1, tp=2, dtype="bf16")
    chunked = estimate_memory(big, 8192, 1, tp=2, dtype="bf16", chunk_tokens=64)
    vocab = big.padded_vocab_size // 2
    assert unfused.logits - chunked.logits == (
        (8192 - 64) * vocab * 6 - 2 * 8192 * big.hidden_size - vocab * big.hidden_size * 4
    )
    # 3.6 GiB of logits per rank in the 7B CPT plan against 1.4 GiB, most of it the fp32
    # accumulator of the output weight's gradient
    assert chunked.logits < unfused.logits / 2


def test_a_recipe_with_the_chunked_loss_plans_it():
    from specialize.config import load_config
    from specialize.plan import workload

    assert workload(load_config("configs/base/qwen-nano.yaml", [])).chunk_tokens is None  # auto
    cfg = load_config(
        "configs/base/qwen-nano.yaml",
        ["train.chunked_cross_entropy=true", "train.cross_entropy_chunk_tokens=32"],
    )
    assert workload(cfg).chunk_tokens == 32


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
    assert bf16.compute_seconds == pytest.approx(tokens_per_step * flops / (64 * 989e12 * 0.40))
    # TP=2 over NVLink: (32 layers x 4 + embedding + output layer) all-reduces of s*b*h bf16 per
    # micro-batch, 16 micro-batches of 8192 tokens per DP rank, bus factor 2(t-1)/t = 1.
    tp_bytes = (32 * 4 + 2) * 2 * (512 * 8192 // 32) * p.hidden_size
    assert bf16.comm.tp == pytest.approx(tp_bytes / 450e9)
    # The overlapped DP reduce-scatter and all-gather hide under a micro-batch's compute.
    assert bf16.comm.grad > 0 and bf16.comm.param > 0 and bf16.dp_exposed_seconds == 0
    assert bf16.step_seconds == pytest.approx(bf16.compute_seconds + bf16.comm.tp)
    text = format_plan(result)
    assert "recommended: TP=2" in text and "GPU-hours" in text and "dist-opt off" in text
    assert "| TP comm | DP comm exposed / total |" in text and "| 0.31 s | 0.00 / 0.11 s |" in text


def test_plan_honours_tp_and_pp():
    cfg = load_recipe_for_plan(str(CPT_7B))[0]
    result = plan(cfg, 64, "h100", tp=4, pp=2)
    assert (result.requested.layout.tp, result.requested.layout.pp) == (4, 2)
    assert (result.recommended.layout.tp, result.recommended.layout.pp) == (4, 2)
    with pytest.raises(PlanError, match="no valid layout.*parallel.tensor=3: must divide the 32"):
        plan(cfg, 64, "h100", tp=3)


def _parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def test_cli(capsys):
    args = _parse(["plan", str(CPT_7B), "--gpus", "64", "--gpu", "h100", "--mfu", "0.5"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "| recipe bf16 |" in out and "recommended: TP=2 PP=1" in out
    assert "recommended overrides: parallel.tensor=2 parallel.pipeline=1" in out
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
    assert result.requested is None
    assert "would refuse the recipe's layout on 1 GPU(s): TP=2" in result.notes[0]
    assert result.recommended.layout.tp == 1 and result.recommended.fits
    assert "recommended: TP=1" in format_plan(result)


def test_unknown_gpu_and_dtype():
    cfg = load_recipe_for_plan(str(CPT_7B))[0]
    with pytest.raises(PlanError, match="unknown GPU"):
        plan(cfg, 8, "v100")
    with pytest.raises(PlanError, match="dtype"):
        estimate_memory(get_preset("qwen-nano"), 16, 1, dtype="fp16")
    assert dataclasses.is_dataclass(GPUS["h200"]) and GPUS["h200"].memory_bytes == 140 * GiB


# ----------------------------------------------------------------------------- shared validation

# Layouts the trainer refuses: as recipe overrides for the trainer's validation, and as the
# planner's candidate (TP, PP, micro-batch, SP, VP, GPUs) on the recipe's workload with the same
# non-layout changes. Both must refuse them, with the same message.
REFUSED = [
    (CPT_7B, ["parallel.tensor=3"], {}, (3, 1, 1, False, None, 48), "divide the 32 attention"),
    (CPT_7B, ["parallel.pipeline=5"], {}, (2, 5, 1, True, None, 40), "divide the 32 layers"),
    (CPT_7B, ["train.micro_batch_size=3"], {}, (2, 1, 3, True, None, 64), "multiple of micro"),
    (CPT_7B, ["parallel.tensor=8"], {}, (8, 1, 1, True, None, 12), "divide the 12 processes"),
    (
        CPT_7B,
        ["data.seq_length=8191"],
        {"seq_len": 8191},
        (2, 1, 1, True, None, 64),
        "data.seq_length=8191 must be a multiple of parallel.tensor=2",
    ),
    (
        CPT_7B,
        ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "train.global_batch_size=6"],
        {"global_batch": 6},
        (2, 2, 1, True, 2, 8),
        "needs micro-batches per step (3 = global_batch_size",
    ),
    (SFT_7B, ["train.micro_batch_size=2"], {}, (2, 1, 2, True, None, 16), "packed SFT with the te"),
    (
        CPT_7B,
        ["model.spec=local", "parallel.sequence_parallel=false", "precision.dtype=fp8"],
        {"spec": "local", "dtype": "fp8"},
        (2, 1, 1, False, None, 64),
        "precision.dtype=fp8: needs the Transformer Engine",
    ),
    (CPT_7B, ["model.spec=local"], {"spec": "local"}, (2, 1, 1, True, None, 64), "the te spec"),
]


@pytest.mark.parametrize(
    "recipe,overrides,changes,layout,message", REFUSED, ids=[r[-1] for r in REFUSED]
)
def test_planner_and_trainer_refuse_the_same_layouts(recipe, overrides, changes, layout, message):
    tp, pp, mb, sp, vp, gpus = layout
    with pytest.raises(ConfigError, match=re.escape(message)) as trainer:
        for cfg in load_recipe_for_plan(str(recipe), overrides):
            derive(cfg, gpus)
    work = dataclasses.replace(workload(load_recipe_for_plan(str(recipe))[0]), **changes)
    with pytest.raises(PlanError) as planner:
        make_layout(work, gpus, tp, pp, mb, "none", sp, True, vp)
    reason = str(planner.value).split(": ", 1)[1]  # after the candidate's label
    assert str(trainer.value).endswith(reason)  # a staged recipe's error also names the stage


def test_sequence_parallel_is_tried_off_when_the_spec_cannot_shard():
    cfg = load_recipe_for_plan(
        str(CPT_7B), ["model.spec=local", "parallel.sequence_parallel=false"]
    )[0]
    rec = plan(cfg, 64, "h100").recommended.layout
    assert rec.tp > 1 and not rec.sequence_parallel


def test_recommended_layout_passes_the_trainers_validation_for_every_recipe():
    planned, loaded = 0, {}
    for recipe in shipped_recipes():
        for i, cfg in enumerate(load_recipe_for_plan(str(recipe))):
            for gpus in (1, 8, 64):
                try:
                    result = plan(cfg, gpus, "h100")
                except PlanError as e:
                    # Out of memory everywhere, or (a CPU demo's tiny global batch on 64 GPUs)
                    # too few sequences per step for any layout of that many GPUs.
                    too_few = cfg.train.global_batch_size < gpus and "no valid layout" in str(e)
                    assert "nothing fits" in str(e) or too_few, (recipe, gpus, e)
                    continue
                key = (recipe, tuple(result.overrides))
                if key not in loaded:  # the recipe as the trainer loads it with the overrides
                    loaded[key] = load_recipe_for_plan(str(recipe), result.overrides)
                again = loaded[key][i]
                derived = derive(again, gpus)  # the trainer's validation, with the GPU count
                rec = result.recommended.layout
                assert (again.parallel.tensor, again.train.micro_batch_size) == (
                    rec.tp,
                    rec.micro_batch,
                )
                assert derived.data_parallel == rec.dp
                planned += 1
    assert planned >= 40  # of 54 (18 recipe configs x 3 GPU counts; the 7B/14B need > 1 GPU)


def test_packed_sft_is_not_recommended_at_micro_batch_2():
    # 16 H100s: mb=2 would be fastest and fits, but the te spec's THD layout needs mb=1.
    stage = load_recipe_for_plan(str(SFT_7B))[0]
    result = plan(stage, 16, "h100")
    assert result.recommended.layout.micro_batch == 1
    pretrain = load_recipe_for_plan(str(SFT_7B), ["data.format=pretrain"])[0]
    assert plan(pretrain, 16, "h100").recommended.layout.micro_batch == 2
    # The recipe row with --micro-batch 2 is the trainer's refusal, not a layout.
    refused = plan(stage, 16, "h100", micro_batch=2)
    assert refused.requested is None and "packed SFT with the te spec" in refused.notes[0]


# ----------------------------------------------------------------------------- communication


def test_communication_is_zero_without_tp_and_dp_and_grows_with_dp():
    p, h100 = get_preset("qwen-7b"), GPUS["h100"]
    kw = dict(dtype="bf16", distributed_optimizer=True)
    alone = estimate_comm(p, 2048, 64, h100, tp=1, pp=1, dp=1, **kw)
    assert (alone.tp, alone.grad, alone.param) == (0, 0, 0)
    assert estimate_comm(p, 2048, 64, h100, tp=1, pp=4, dp=1, **kw).tp == 0
    grads = [estimate_comm(p, 2048, 64, h100, tp=1, dp=d, **kw).grad for d in (2, 4, 8, 16, 64)]
    assert grads == sorted(grads) and len(set(grads)) == len(grads)
    # By hand, within a node: reduce-scatter of the fp32 grads, all-gather of the bf16 params.
    n = p.num_params()
    eight = estimate_comm(p, 2048, 64, h100, tp=1, dp=8, **kw)
    assert eight.grad == pytest.approx(4 * n * 7 / 8 / 450e9)
    assert eight.param == pytest.approx(2 * n * 7 / 8 / 450e9)
    # Without the distributed optimizer: an all-reduce (twice the bytes) and no all-gather.
    ddp = estimate_comm(p, 2048, 64, h100, tp=1, dp=8, distributed_optimizer=False)
    assert (ddp.grad, ddp.param) == (pytest.approx(2 * eight.grad), 0)
    # Across nodes a DP rank with 7 TP peers shares its node's NICs with them: 50 GB/s.
    wide = estimate_comm(p, 2048, 64, h100, tp=8, dp=8, **kw)
    assert wide.grad == pytest.approx(4 * stage_params(p, 8, 1, 0)[0] * 7 / 8 / 50e9)
    assert wide.tp > 0


def test_overlap_hides_dp_communication_and_off_adds_it_fully():
    # TP=8 x DP=8: each DP group spans the 8 nodes with one rank per node (one NIC), and 8 short
    # micro-batches per step leave a backward window shorter than the gradient reduce-scatter.
    work = _workload("qwen-7b", 2048, gbs=64)
    h100 = GPUS["h100"]
    layout = make_layout(work, 64, 8, 1, 1, "none", True, True)
    on = time_of(work, layout, 64, h100, "bf16")
    off = time_of(
        dataclasses.replace(work, overlap_grad_reduce=False, overlap_param_gather=False),
        layout,
        64,
        h100,
        "bf16",
    )
    comm = off.comm.grad + off.comm.param
    assert off.dp_exposed_seconds == pytest.approx(comm)
    assert off.step_seconds == pytest.approx(off.compute_seconds + off.comm.tp + comm)
    assert 0 < on.dp_exposed_seconds < off.dp_exposed_seconds
    assert on.step_seconds < off.step_seconds
    # Overlapped: what outlasts one micro-batch's backward (grads) and forward (parameters).
    per_micro_batch = on.compute_seconds / 8
    forward = per_micro_batch * (on.model_flops_per_token / 3) / on.flops_per_token
    assert on.dp_exposed_seconds == pytest.approx(
        max(0, on.comm.grad - (per_micro_batch - forward)) + max(0, on.comm.param - forward)
    )


def test_plan_reads_the_recipes_overlap_settings():
    cfg = load_recipe_for_plan(str(CPT_7B))[0]
    assert cfg.parallel.overlap_grad_reduce is None  # unset: on for a GPU plan
    on = plan(cfg, 64, "h100").times[0][1]
    off_cfg = load_recipe_for_plan(
        str(CPT_7B), ["parallel.overlap_grad_reduce=false", "parallel.overlap_param_gather=false"]
    )[0]
    result = plan(off_cfg, 64, "h100")
    off = result.times[0][1]
    assert on.dp_exposed_seconds == 0
    assert off.dp_exposed_seconds == pytest.approx(off.comm.grad + off.comm.param)
    assert off.step_seconds > on.step_seconds
    assert "gradient reduction not overlapped" in format_plan(result)


# ----------------------------------------------------------------------------- margin


def test_recommended_layout_leaves_the_headroom_margin_free():
    h100 = GPUS["h100"]
    work = _workload("qwen-7b", 8192)
    default = recommend(work, 64, h100)
    assert default.memory.total <= 0.90 * h100.memory_bytes
    assert default.memory.runtime == 3 * GiB  # CUDA context and NCCL buffers, counted in
    # A tighter margin moves the recommendation to a layout that needs less memory.
    tight = recommend(work, 64, h100, headroom=0.6)
    assert tight.memory.total <= 0.6 * h100.memory_bytes < default.memory.total
    with pytest.raises(PlanError, match="--headroom 1.2"):
        recommend(work, 64, h100, headroom=1.2)
    cfg = load_recipe_for_plan(str(CPT_7B))[0]
    text = format_plan(plan(cfg, 64, "h100", headroom=0.75))
    assert "fits = total <= 75% of HBM (60.00 GiB), leaving 20.00 GiB free" in text
