"""One engine for every precision and layer spec: a step on CPU (fp32, bf16) and on GPU (TE bf16, fp8)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from base.tokenizer import NUM_RANKS
from tests.distributed import run_distributed


def random_batches(seq: int, micro_batch: int):
    generator = torch.Generator().manual_seed(0)
    while True:
        rows = torch.randint(0, NUM_RANKS, (micro_batch, seq + 1), generator=generator)
        yield {
            "tokens": rows[:, :-1],
            "labels": rows[:, 1:],
            "loss_mask": torch.ones(micro_batch, seq),
            "position_ids": torch.arange(seq).expand(micro_batch, seq),
        }


def _steps(rank: int, world_size: int, overrides: list[str], steps: int) -> dict:
    from specialize.config import derive, load_config
    from specialize.mcore.distributed import init_distributed, seed_all
    from specialize.train.engine import Engine

    cfg = load_config(
        "configs/base/qwen-nano.yaml",
        [
            "data.seq_length=64",
            "train.micro_batch_size=2",
            "train.global_batch_size=4",
            "schedule.warmup_steps=0",
            *overrides,
        ],
    )
    topo = init_distributed(cfg.parallel)
    seed_all(cfg.train.seed)
    engine = Engine.build(cfg, topo, derive(cfg, topo.world_size))
    iterators = [random_batches(cfg.data.seq_length, cfg.train.micro_batch_size)]
    results = [engine.train_step(iterators, step + 1) for step in range(steps)]
    config = engine.transformer_config
    return {
        "losses": [r.loss for r in results],
        "grad_norms": [r.grad_norm for r in results],
        "bf16_layers": (config.num_layers_at_start_in_bf16, config.num_layers_at_end_in_bf16)
        if config.first_last_layers_bf16
        else None,
        "overlap": engine.model[0].ddp_config.overlap_grad_reduce,
        "param_dtype": str(next(engine.model[0].parameters()).dtype),
        "spec": engine.model[0]
        .module.decoder.layers[0]
        .self_attention.linear_qkv.__class__.__name__,
    }


def test_bf16_step_on_cpu():
    out = run_distributed(_steps, ["precision.dtype=bf16", "model.spec=local"], 3, world_size=1)
    assert out["param_dtype"] == "torch.bfloat16"
    assert all(math.isfinite(x) for x in out["losses"] + out["grad_norms"])
    assert out["losses"][-1] < out["losses"][0]


GPU_PRECISIONS = {
    "bf16": ["precision.dtype=bf16"],
    "fp8": ["precision.dtype=fp8"],
    # Current scaling, first and last layer in BF16 (qwen-nano has two layers: one of each).
    "fp8-tensorwise": ["precision.dtype=fp8", "precision.fp8_recipe=tensorwise"],
}


@pytest.mark.gpu
@pytest.mark.parametrize("precision", list(GPU_PRECISIONS))
def test_te_spec_step_on_gpu(precision):
    out = run_distributed(_steps, [*GPU_PRECISIONS[precision], "model.spec=te"], 3, world_size=1)
    assert out["spec"].startswith("TE"), out["spec"]
    assert out["overlap"]  # the GPU path's overlapped gradient reduce
    assert out["bf16_layers"] == ((1, 1) if precision == "fp8-tensorwise" else None)
    assert out["param_dtype"] == "torch.bfloat16"
    assert all(math.isfinite(x) for x in out["losses"] + out["grad_norms"])
    assert out["losses"][-1] < out["losses"][0]


def _weight_norms(rank: int, world_size: int) -> list[list[float]]:
    import torch.distributed as dist

    from specialize.config import derive, load_config
    from specialize.mcore.distributed import init_distributed, seed_all
    from specialize.train.engine import Engine

    overrides = ["data.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=2"]
    cfg = load_config("configs/base/qwen-nano.yaml", [*overrides, "parallel.tensor=2"])
    topo = init_distributed(cfg.parallel)
    seed_all(cfg.train.seed)
    engine = Engine.build(cfg, topo, derive(cfg, topo.world_size))
    local = sum(float(p.detach().float().pow(2).sum()) for p in engine.model[0].parameters())
    before = engine.weight_norm()
    engine.train_step([random_batches(32, 2)], 1)
    engine.train_step([random_batches(32, 2)], 2)  # step 1 applies LR 0 (warmup)
    norms = [None] * world_size
    dist.all_gather_object(norms, [local, before, engine.weight_norm()])
    return norms


def test_weight_norm_is_the_same_on_every_rank():
    """The spike check stops every rank at the same step only if they all see the same norm."""
    (local0, before0, after0), (local1, before1, after1) = run_distributed(_weight_norms)
    assert local0 != local1  # each tensor-parallel rank holds other shards ...
    assert (before0, after0) == (before1, after1)  # ... yet the norm is the world's
    assert before0 == pytest.approx(math.sqrt(local0 + local1), rel=1e-4)  # fp32 sums
    assert after0 != before0


# ----------------------------------------------------------------------------- GPU-path settings

ROOT = Path(__file__).resolve().parents[3]


def _recipe(path: str, *overrides: str):
    from specialize.config import load_config

    return load_config(ROOT / path, list(overrides))


def test_gpu_recipe_gets_the_settings_of_known_good_h100_runs(tmp_path, monkeypatch):
    """The DDP, optimizer and TransformerConfig arguments the 7B CPT recipe builds on CUDA with
    Transformer Engine and APEX (simulated: nothing CUDA is built)."""
    from base.model import transformer_config_kwargs
    from specialize.train import engine

    monkeypatch.setattr(engine, "resolve_spec", lambda spec: "te")
    monkeypatch.setattr(engine, "fused_wgrad_available", lambda: True)
    cfg = _recipe("configs/code_qwen/7b-cpt.yaml", f"init={tmp_path}")
    perf = engine.performance(cfg, cuda=True, spec="te")
    ddp = engine.ddp_config(cfg, perf)
    assert ddp.overlap_grad_reduce and ddp.overlap_param_gather
    assert not ddp.align_param_gather  # no interleaved schedule
    assert ddp.use_distributed_optimizer and ddp.grad_reduce_in_fp32
    assert not ddp.average_in_collective  # per-token loss: summed, divided once
    optimizer = engine.optimizer_config(cfg, perf)
    assert optimizer.overlap_param_gather and optimizer.use_distributed_optimizer
    kw = transformer_config_kwargs(cfg.model.architecture(), engine.model_options(cfg, perf))
    assert kw["gradient_accumulation_fusion"] and not kw["tp_comm_overlap"]
    assert kw["sequence_parallel"] and kw["tensor_model_parallel_size"] == 2
    assert "recompute_granularity" not in kw  # Flash Attention keeps nothing worth recomputing

    # The interleaved schedule starts every stage's all-gathers together.
    vp = _recipe(
        "configs/code_qwen/7b-cpt.yaml",
        f"init={tmp_path}",
        "parallel.pipeline=2",
        "parallel.virtual_pipeline=2",
    )
    assert engine.ddp_config(vp, engine.performance(vp, cuda=True, spec="te")).align_param_gather


def test_gpu_settings_are_overridable(tmp_path, monkeypatch):
    from specialize.config import ConfigError
    from specialize.train import engine

    monkeypatch.setattr(engine, "fused_wgrad_available", lambda: True)
    recipe = "configs/code_qwen/7b-cpt.yaml"
    off = _recipe(recipe, f"init={tmp_path}", "parallel.overlap_grad_reduce=false")
    perf = engine.performance(off, cuda=True, spec="te")
    assert not perf.overlap_grad_reduce and not perf.overlap_param_gather  # needs the reduce
    no_fusion = _recipe(recipe, f"init={tmp_path}", "model.gradient_accumulation_fusion=false")
    assert not engine.performance(no_fusion, cuda=True, spec="te").gradient_accumulation_fusion
    # Without APEX's extension megatron-core's output layer cannot fuse: off, or an error if asked.
    monkeypatch.setattr(engine, "fused_wgrad_available", lambda: False)
    cfg = _recipe(recipe, f"init={tmp_path}")
    assert not engine.performance(cfg, cuda=True, spec="te").gradient_accumulation_fusion
    asked = _recipe(recipe, f"init={tmp_path}", "model.gradient_accumulation_fusion=true")
    with pytest.raises(ConfigError, match="model.gradient_accumulation_fusion=true: needs"):
        engine.performance(asked, cuda=True, spec="te")


def test_cpu_runs_keep_their_settings():
    from megatron.core.distributed import DistributedDataParallelConfig

    from specialize.train import engine

    for extra in ([], ["parallel.distributed_optimizer=true"]):
        cfg = _recipe("configs/base/qwen-nano.yaml", *extra)
        perf = engine.performance(cfg, cuda=False, spec="local")
        assert perf == engine.Performance()
        assert engine.ddp_config(cfg, perf) == DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
            average_in_collective=False,
            check_for_nan_in_grad=False,
        )
        assert not engine.optimizer_config(cfg, perf).overlap_param_gather


def test_model_options_carry_the_recipes_long_context_as_is():
    """Every ``model.long_context`` field reaches the builder without a line per field; only an
    unset training length becomes the run's ``data.seq_length``."""
    from dataclasses import replace

    from specialize.train import engine

    lc = "model.long_context"
    cfg = _recipe(
        "configs/base/qwen-nano.yaml",
        "data.seq_length=64",
        f"{lc}.rope_scaling=dynamic-ntk",
        f"{lc}.rope_alpha=3",
        f"{lc}.logn_attention=true",
        f"{lc}.layer_windows=[8,null]",
    )
    carried = engine.model_options(cfg).long_context
    assert carried == replace(cfg.model.long_context, train_seq_length=64)
    assert (carried.rope_alpha, carried.layer_windows) == (3.0, [8, None])
    cfg.model.long_context.train_seq_length = 16
    assert engine.model_options(cfg).long_context == cfg.model.long_context


def _overlap_steps(rank: int, world_size: int, overlap: bool) -> dict:
    from specialize.config import derive, load_config
    from specialize.mcore.distributed import init_distributed, seed_all
    from specialize.train.engine import Engine

    flags = ["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true"]
    cfg = load_config(
        "configs/base/qwen-nano.yaml",
        [
            "data.seq_length=32",
            "train.micro_batch_size=1",
            "train.global_batch_size=4",
            "schedule.warmup_steps=0",
            "parallel.distributed_optimizer=true",
            *(flags if overlap else []),
        ],
    )
    topo = init_distributed(cfg.parallel)
    seed_all(cfg.train.seed)
    engine = Engine.build(cfg, topo, derive(cfg, topo.world_size))
    batches = [random_batches(32, 1)]
    norms = [engine.weight_norm()]
    results = []
    for step in range(3):
        results.append(engine.train_step(batches, step + 1))
        norms.append(engine.weight_norm())
    validation = engine.evaluate([random_batches(32, 1)], 1)
    engine.sync_params()
    config = engine.transformer_config
    return {
        "losses": [r.loss for r in results],
        "grad_norms": [r.grad_norm for r in results],
        "validation": validation,
        "norms": norms,
        "params": [p.detach().clone() for p in engine.model[0].parameters()],
        "grad_sync": config.grad_sync_func is not None,
        "overlap": engine.model[0].ddp_config.overlap_param_gather,
    }


def test_overlapped_reduce_and_gather_train_exactly_as_synchronous_ones():
    """The GPU path's overlaps, run for real on gloo: the same numbers, bitwise."""
    sync = run_distributed(_overlap_steps, False)
    overlapped = run_distributed(_overlap_steps, True)
    assert overlapped["overlap"] and overlapped["grad_sync"]
    assert not sync["overlap"] and not sync["grad_sync"]
    assert overlapped["losses"] == sync["losses"]
    assert overlapped["grad_norms"] == sync["grad_norms"]
    assert overlapped["validation"] == sync["validation"]
    for mine, theirs in zip(overlapped["params"], sync["params"], strict=True):
        assert torch.equal(mine, theirs)
    # The norm of the weights comes from the optimizer's main parameters, where each of the two
    # data-parallel replicas holds half: the model's norm once, not twice (ratios are the same).
    for mine, theirs in zip(overlapped["norms"], sync["norms"], strict=True):
        assert theirs == pytest.approx(math.sqrt(2) * mine, rel=1e-5)


# ----------------------------------------------------------------------------- closing


def _closed_engine(rank: int, world_size: int) -> dict:
    import gc
    import weakref

    from specialize.config import derive, load_config
    from specialize.mcore.distributed import init_distributed, seed_all
    from specialize.train.engine import Engine

    overrides = ["data.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=2"]
    cfg = load_config("configs/base/qwen-nano.yaml", overrides)
    topo = init_distributed(cfg.parallel)
    seed_all(cfg.train.seed)
    engine = Engine.build(cfg, topo, derive(cfg, topo.world_size))
    engine.train_step([random_batches(32, 2)], 1)
    config = engine.transformer_config
    refs = [weakref.ref(o) for o in (*engine.model, engine.model[0].module, engine.optimizer)]
    gc.disable()  # only close() may collect
    try:
        engine.close()
        alive = [r() is not None for r in refs]
    finally:
        gc.enable()
    return {
        "alive": alive,
        "hooks": [config.grad_scale_func, config.no_sync_func, config.finalize_model_grads_func],
    }


def test_close_frees_the_model_and_optimizer_at_once():
    """A stage's engine is gone when the next stage builds its own, not at some later GC pass."""
    out = run_distributed(_closed_engine, world_size=1)
    assert out["alive"] == [False, False, False]
    assert out["hooks"] == [None, None, None]


def _gpu_memory_around_an_engine(rank: int, world_size: int) -> dict:
    from specialize.config import derive, load_config
    from specialize.mcore.distributed import init_distributed, seed_all
    from specialize.train.engine import Engine

    cfg = load_config(
        "configs/base/qwen-tiny.yaml",
        [
            "model.spec=te",
            "precision.dtype=bf16",
            "data.seq_length=64",
            "train.global_batch_size=4",
        ],
    )
    topo = init_distributed(cfg.parallel)
    seed_all(cfg.train.seed)
    before = torch.cuda.memory_allocated()
    engine = Engine.build(cfg, topo, derive(cfg, topo.world_size))
    engine.train_step([random_batches(64, cfg.train.micro_batch_size)], 1)
    during = torch.cuda.memory_allocated()
    engine.close()
    return {"before": before, "during": during, "after": torch.cuda.memory_allocated()}


@pytest.mark.gpu
def test_close_returns_the_gpu_memory():
    out = run_distributed(_gpu_memory_around_an_engine, world_size=1)
    assert out["during"] > out["before"] + (64 << 20)  # weights, gradients, Adam states
    assert out["after"] - out["before"] < (out["during"] - out["before"]) * 0.05
