"""Same weights, different layouts: TP=1, TP=2 and PP=2 give the same logits (fp32)."""

from __future__ import annotations

import pytest
import torch

from base.tokenizer import NUM_RANKS
from tests.distributed import run_distributed

LAYOUTS = {"tp1": [], "tp2": ["parallel.tensor=2"], "pp2": ["parallel.pipeline=2"]}


def _build(run_dir: str, overrides: list[str]):
    from specialize.config import derive, load_config
    from specialize.mcore.distributed import init_distributed, seed_all
    from specialize.train.engine import Engine

    cfg = load_config(
        "configs/base/qwen-nano.yaml",
        [
            "train.steps=1",
            "schedule.warmup_steps=0",
            "train.global_batch_size=8",
            f"checkpoint.dir={run_dir}",
            *overrides,
        ],
    )
    topo = init_distributed(cfg.parallel)
    seed_all(cfg.train.seed)
    return Engine.build(cfg, topo, derive(cfg, topo.world_size))


def _logits_per_layout(rank: int, world_size: int, run_dir: str) -> dict[str, torch.Tensor]:
    from specialize.checkpoint.state import load_weights, save
    from specialize.infer.logits import full_logits

    tokens = torch.randint(0, NUM_RANKS, (2, 24), generator=torch.Generator().manual_seed(0))
    engine = _build(run_dir, LAYOUTS["tp1"])
    saved = save(engine, iteration=0, consumed_samples=0)
    results = {"tp1": full_logits(engine.model[0], tokens)}
    for name in ("tp2", "pp2"):
        # Another seed: only loading the checkpoint can make these weights equal.
        engine = _build(run_dir + "-" + name, [*LAYOUTS[name], "train.seed=999"])
        results[f"{name}-before-load"] = full_logits(engine.model[0], tokens)
        load_weights(engine, saved)
        results[name] = full_logits(engine.model[0], tokens)
    # The other direction: weights saved at TP=2 load at TP=1.
    engine = _build(run_dir + "-tp2-own", [*LAYOUTS["tp2"], "train.seed=777"])
    results["tp2-own"] = full_logits(engine.model[0], tokens)
    saved_tp2 = save(engine, iteration=0, consumed_samples=0)
    engine = _build(run_dir + "-tp1-from-tp2", [*LAYOUTS["tp1"], "train.seed=555"])
    load_weights(engine, saved_tp2)
    results["tp1-from-tp2"] = full_logits(engine.model[0], tokens)
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, torch.Tensor]:
    return run_distributed(_logits_per_layout, str(tmp_path_factory.mktemp("parity") / "run"))


def test_same_logits_at_tp1_tp2_pp2(results):
    reference = results["tp1"]
    assert reference.shape == (2, 24, 151936)
    assert reference.abs().max() > 0
    for name in ("tp2", "pp2"):
        assert (results[f"{name}-before-load"] - reference).abs().max() > 1e-2
        diff = (results[name] - reference).abs().max().item()
        print(f"{name} vs tp1: max |Δlogit| {diff:.2e}")
        assert diff <= 1e-5, f"{name}: max |Δlogit| {diff}"


def test_checkpoint_saved_at_tp2_loads_at_tp1(results):
    assert (results["tp2-own"] - results["tp1"]).abs().max() > 1e-2  # really other weights
    diff = (results["tp1-from-tp2"] - results["tp2-own"]).abs().max().item()
    assert diff <= 1e-5, f"max |Δlogit| {diff}"
