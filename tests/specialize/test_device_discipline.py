"""The GPU path's device placement, checked on the CPU (``tests.device_discipline``): training
steps at TP=2 and PP=2 on packed SFT batches behind the parity gate, ``convert verify``, greedy and
sampled generation with the KV cache and by pipeline recomputation, and perplexity, all in one
2-process gloo world with a qwen-nano model. A tensor a GPU run would leave on the host fails the
test, naming the line that made it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from base.tokenizer import IM_START_ID, VOCAB_SIZE
from tests.distributed import run_distributed

PROMPTS = [[IM_START_ID, 872, 198, 13048], [9707, 11, 1879], [9707, 11, 1879, 0, 1, 2]]


def _chats(path) -> None:
    with path.open("w") as f:
        for a in range(24):
            record = {"prompt": f"What is {a} plus {2 * a + 1}?", "response": f"It is {3 * a + 1}."}
            f.write(json.dumps(record) + "\n")


def _init_matching(tmp: str, hf_dir: str) -> str:
    """A run checkpoint holding the HF reference's weights (so the parity gate passes)."""
    from base.hf_checkpoint import read_config
    from specialize.checkpoint.state import save
    from specialize.config import derive, load_config
    from specialize.convert.hf import _fill
    from specialize.mcore.distributed import init_distributed, seed_all
    from specialize.train.engine import Engine

    cfg = load_config(
        "configs/base/qwen-nano.yaml",
        ["train.steps=1", "schedule.warmup_steps=0", f"checkpoint.dir={tmp}/init"],
    )
    topo = init_distributed(cfg.parallel)
    seed_all(0)
    engine = Engine.build(cfg, topo, derive(cfg, topo.world_size))
    _fill(read_config(hf_dir), engine.preset, dict(engine.model[0].module.named_parameters()))
    return str(save(engine, iteration=0, consumed_samples=0))


def _sft_step(tmp: str, init: str, hf_dir: str, sft: str, layout: str) -> str:
    """One SFT step of ``init`` at ``layout``, after the parity gate; the final checkpoint."""
    from specialize.config import load_config
    from specialize.train.run import train

    overrides = [
        f"init={init}",
        f"init.verify_against={hf_dir}",
        "data.format=sft",
        f"data.paths=[{sft}]",
        "data.split=100,0,0",
        "train.steps=1",
        "train.micro_batch_size=1",
        "train.global_batch_size=2",
        "schedule.warmup_steps=0",
        f"checkpoint.dir={tmp}/{layout}",
        "logging.progress=false",
        "logging.tensorboard=false",
        {"tp2": "parallel.tensor=2", "pp2": "parallel.pipeline=2"}[layout],
    ]
    trainer = train(load_config("configs/base/qwen-nano.yaml", overrides))
    assert len(trainer.history) == 1 and math.isfinite(trainer.history[0])
    return str(trainer.last_checkpoint)


def _decode(ckpt: str, tp: int, pp: int, stream: np.ndarray) -> dict:
    from specialize.infer.generate import generate_ids
    from specialize.infer.likelihood import perplexity_by_length
    from specialize.infer.model import load_model

    model, _ = load_model(ckpt, tp, pp)
    return {
        "greedy": generate_ids(model, PROMPTS, 4, stop_ids=(), vocab_size=VOCAB_SIZE),
        "sampled": generate_ids(model, PROMPTS, 4, stop_ids=(), temperature=1.0, seed=3),
        "perplexity": perplexity_by_length(model, stream, [8, 16], max_windows=2),
    }


def _gpu_path(rank: int, world_size: int, tmp: str, hf_dir: str, sft: str) -> dict:
    from specialize.convert.parity import verify
    from specialize.mcore import cpu_bridge
    from tests.device_discipline import device_discipline

    cpu_bridge.install()  # before the check, which must see device arguments first
    stream = np.arange(1000, 1200, dtype=np.int64)
    with device_discipline():
        init = _init_matching(tmp, hf_dir)
        trained = {layout: _sft_step(tmp, init, hf_dir, sft, layout) for layout in ("pp2", "tp2")}
        verified = verify(hf_dir, init, tp=1, pp=2)
        # The PP=2 run's weights at both layouts: recomputation (PP) and the KV cache (TP).
        return {
            "verified": verified,
            "pp2": _decode(trained["pp2"], 1, 2, stream),
            "tp2": _decode(trained["pp2"], 2, 1, stream),
        }


@pytest.fixture(scope="module")
def gpu_path(tmp_path_factory) -> dict:
    from base.presets import get_preset
    from base.tokenizer import QwenTokenizer
    from specialize.data.sft_prepare import SFTOptions, prepare_sft
    from specialize.data.sources import Source
    from tests.base.test_hf_mapping import hf_model

    tmp = tmp_path_factory.mktemp("device")
    hf_model(get_preset("qwen-nano")).save_pretrained(tmp / "hf")
    _chats(tmp / "chats.jsonl")
    sft = tmp / "sft"
    prepare_sft(
        [Source("jsonl", str(tmp / "chats.jsonl"))],
        sft,
        QwenTokenizer.load(),
        SFTOptions(128, pack=True),
    )
    return run_distributed(_gpu_path, str(tmp), str(tmp / "hf"), str(sft))


def test_training_verification_generation_and_perplexity_keep_tensors_on_the_model_device(
    gpu_path,
):
    # Reaching here means no DeviceError; these show each part really ran.
    assert gpu_path["verified"][-1].startswith("logits")
    pp2, tp2 = gpu_path["pp2"], gpu_path["tp2"]
    assert pp2["greedy"] == tp2["greedy"] and all(len(row) == 4 for row in pp2["greedy"])
    assert pp2["sampled"] == tp2["sampled"] != pp2["greedy"]
    for length in (8, 16):
        assert pp2["perplexity"][length] == pytest.approx(tp2["perplexity"][length], rel=1e-4)
