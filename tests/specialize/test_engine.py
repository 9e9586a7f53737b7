"""One engine for every precision and layer spec: a step on CPU (fp32, bf16) and on GPU (TE bf16, fp8)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.distributed import run_distributed


def random_batches(seq: int, micro_batch: int):
    generator = torch.Generator().manual_seed(0)
    while True:
        rows = torch.randint(0, 151643, (micro_batch, seq + 1), generator=generator)
        yield {
            "tokens": rows[:, :-1],
            "labels": rows[:, 1:],
            "loss_mask": torch.ones(micro_batch, seq),
            "position_ids": torch.arange(seq).expand(micro_batch, seq),
        }


def _steps(rank: int, world_size: int, overrides: list[str], steps: int) -> dict:
    from specialize.config import derive, load_config
    from specialize.distributed import init_distributed, seed_all
    from specialize.engine import Engine

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
    return {
        "losses": [r.loss for r in results],
        "grad_norms": [r.grad_norm for r in results],
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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_te_spec_step_on_gpu(dtype):
    out = run_distributed(_steps, [f"precision.dtype={dtype}", "model.spec=te"], 3, world_size=1)
    assert out["spec"].startswith("TE"), out["spec"]
    assert out["param_dtype"] == "torch.bfloat16"
    assert all(math.isfinite(x) for x in out["losses"] + out["grad_norms"])
    assert out["losses"][-1] < out["losses"][0]


def _weight_norms(rank: int, world_size: int) -> list[list[float]]:
    import torch.distributed as dist

    from specialize.config import derive, load_config
    from specialize.distributed import init_distributed, seed_all
    from specialize.engine import Engine

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
