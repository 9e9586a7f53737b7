"""Greedy generation throughput: ``specialize.infer.generate`` vs transformers ``generate``, same model.

A random ``--preset`` model is built by the engine, saved, and exported with ``convert export``;
transformers loads the export (``Qwen2ForCausalLM``, eager attention, KV cache on) and ours loads
the checkpoint (megatron-core's static KV cache). Both decode the same prompts greedily for exactly ``--new-tokens`` tokens (no stop
ids), batch size 1, with the same ``torch.set_num_threads``; the continuations are checked to be
identical, then new tokens per second (prefill included) are compared. Each side runs in its own
child process: the engine's CPU bridge, once installed, would tax transformers' ops too.

    .venv/bin/python bench/generate.py [--preset qwen-nano] [--new-tokens 32] [--prompts 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*not installed")

PROMPT = "def fibonacci(n):\n    "


def _prompts(count: int) -> list[list[int]]:
    from base.tokenizer import QwenTokenizer

    tokenizer = QwenTokenizer.load()
    return [tokenizer.encode(PROMPT + "#" * i) for i in range(count)]


def make_model(work: Path, preset: str) -> None:
    from specialize.checkpoint.state import save
    from specialize.config import derive, load_config
    from specialize.convert.hf import export_hf
    from specialize.mcore.distributed import init_distributed, seed_all
    from specialize.train.engine import Engine

    cfg = load_config(
        f"configs/base/{preset}.yaml",
        ["train.steps=1", "schedule.warmup_steps=0", f"checkpoint.dir={work / 'run'}"],
    )
    topo = init_distributed(cfg.parallel)
    seed_all(0)
    engine = Engine.build(cfg, topo, derive(cfg, topo.world_size))
    saved = save(engine, iteration=1, consumed_samples=0)
    export_hf(saved, work / "hf")
    (work / "ckpt").write_text(str(saved))


def run_ours(work: Path, count: int, new_tokens: int) -> dict:
    from base.tokenizer import VOCAB_SIZE
    from specialize.infer.generate import greedy
    from specialize.infer.model import load_model

    model, _ = load_model((work / "ckpt").read_text())
    prompts = _prompts(count)
    greedy(model, prompts[:1], 2, stop_ids=(), vocab_size=VOCAB_SIZE)  # warm up
    start = time.perf_counter()
    out = [greedy(model, [p], new_tokens, stop_ids=(), vocab_size=VOCAB_SIZE)[0] for p in prompts]
    return {"seconds": time.perf_counter() - start, "ids": out}


def run_transformers(work: Path, count: int, new_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from base.tokenizer import EOD_ID, VOCAB_SIZE

    model = AutoModelForCausalLM.from_pretrained(
        work / "hf", attn_implementation="eager", torch_dtype=torch.float32
    ).eval()
    prompts = _prompts(count)

    def run(prompt: list[int], n: int) -> list[int]:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(
                ids,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                use_cache=True,
                pad_token_id=EOD_ID,
                # Same choice set as ours: only the real tokens (the embedding is padded).
                suppress_tokens=list(range(VOCAB_SIZE, model.config.vocab_size)),
            )
        return out[0, len(prompt) :].tolist()

    run(prompts[0], 2)  # warm up
    start = time.perf_counter()
    out = [run(p, new_tokens) for p in prompts]
    return {"seconds": time.perf_counter() - start, "ids": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="qwen-nano")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--role", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.role:
        work = Path(args.work)
        if args.role == "make":
            make_model(work, args.preset)
            return
        run = run_ours if args.role == "ours" else run_transformers
        print(json.dumps(run(work, args.prompts, args.new_tokens)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        base = [sys.executable, __file__, "--work", tmp, "--preset", args.preset]
        base += ["--prompts", str(args.prompts), "--new-tokens", str(args.new_tokens)]
        base += ["--threads", str(args.threads)]
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        subprocess.run(
            [*base, "--role", "make"], check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL
        )
        results = {}
        for role in ("transformers", "ours"):
            done = subprocess.run(
                [*base, "--role", role],
                check=True,
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
            )
            results[role] = json.loads(done.stdout.strip().splitlines()[-1])
    tokens = args.prompts * args.new_tokens
    same = results["ours"]["ids"] == results["transformers"]["ids"]
    theirs = tokens / results["transformers"]["seconds"]
    ours = tokens / results["ours"]["seconds"]
    print(
        f"{args.preset}, {args.prompts} prompts x {args.new_tokens} new tokens, batch 1, "
        f"{args.threads} threads; identical continuations: {same}"
    )
    print(f"transformers generate (eager, KV cache): {theirs:8.1f} tokens/s")
    print(
        f"specialize.infer.generate (megatron KV cache): {ours:7.1f} tokens/s  ({ours / theirs:.2f}x)"
    )


if __name__ == "__main__":
    main()
