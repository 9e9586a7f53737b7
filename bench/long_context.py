"""Perplexity past the training length with Qwen's training-free context extension (paper §2.2).

Trains qwen-tiny at sequence length 256 with the project's training CLI (one process, the demo
recipe's data: the CPython standard library prepared by ``specialize data prepare``), then measures
perplexity at 256/512/1024 tokens over held-out long documents (Python files of installed packages
outside the standard library: code, like the training data, never seen in training) with each of
{none, ntk, logn, ntk+logn} and prints a table.

    .venv/bin/python bench/long_context.py [--steps 60] [--windows 8] [--retrain]

A few minutes on 2 CPU cores. The trained checkpoint is reused unless ``--retrain``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "bench" / "long-context"
DEMO_DATA = ROOT / "runs" / "demo" / "data" / "code"
TRAIN_LENGTH = 256
VARIANTS = {
    "none": {},
    "ntk": {"rope_scaling": "dynamic-ntk"},
    "logn": {"logn_attention": True},
    "ntk+logn": {"rope_scaling": "dynamic-ntk", "logn_attention": True},
}


def _run(args: list[str]) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, cwd=ROOT, check=True)


def prepare_data() -> Path:
    """The demo corpus if ``make demo`` prepared it, else the same prepared here (resumable)."""
    if (DEMO_DATA / "manifest.json").is_file():
        return DEMO_DATA
    data = OUT / "data"
    stdlib = sysconfig.get_paths()["stdlib"]
    _run(
        [sys.executable, "-m", "specialize", "data", "prepare", stdlib, "-o", str(data)]
        + ["--extensions", ".py"]
    )
    return data


def train(data: Path, steps: int, retrain: bool) -> Path:
    run_dir = OUT / "train"
    if (run_dir / "checkpoints" / "latest").is_file() and not retrain:
        print(f"reusing {run_dir} (--retrain to train again)")
        return run_dir
    _run(
        [
            sys.executable,
            "-m",
            "specialize",
            "train",
            "configs/demo/engine.yaml",
            "name=bench-long-context",
            "parallel.tensor=1",
            "model.spec=local",
            f"data.paths=[{data.relative_to(ROOT)}]",
            f"data.seq_length={TRAIN_LENGTH}",
            f"train.steps={steps}",
            "train.eval_interval=1000",
            f"checkpoint.dir={run_dir}",
            f"checkpoint.interval={steps}",
        ]
    )
    return run_dir


def held_out_stream(min_tokens: int, total: int) -> np.ndarray:
    """Tokens of long Python files outside the standard library (the training corpus), each file
    ending in ``<|endoftext|>``, concatenated until ``total`` tokens."""
    from base.tokenizer import QwenTokenizer

    tokenizer = QwenTokenizer.load()
    site = Path(sysconfig.get_paths()["purelib"])
    ids: list[int] = []
    for file in sorted((site / "megatron" / "core").rglob("*.py")):
        tokens = tokenizer.encode(file.read_text(errors="replace"))
        if len(tokens) >= min_tokens:
            ids.extend(tokens + [151643])
        if len(ids) >= total:
            break
    return np.asarray(ids[:total], dtype=np.int64)


def evaluate(run_dir: Path, lengths: list[int], max_windows: int) -> dict[str, dict[int, float]]:
    import torch

    from specialize.generate import load_model
    from specialize.perplexity import perplexity_by_length

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    stream = held_out_stream(max(lengths) + 1, max_windows * (max(lengths) + 1))
    table = {}
    for name, options in VARIANTS.items():
        start = time.time()
        model, _ = load_model(run_dir, long_context={"train_seq_length": TRAIN_LENGTH, **options})
        table[name] = perplexity_by_length(model, stream, lengths, max_windows)
        print(f"{name}: {table[name]} ({time.time() - start:.0f} s)", flush=True)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps at seq 256")
    parser.add_argument("--windows", type=int, default=8, help="windows per length")
    parser.add_argument("--retrain", action="store_true", help="train even if a checkpoint exists")
    args = parser.parse_args()
    lengths = [TRAIN_LENGTH, 2 * TRAIN_LENGTH, 4 * TRAIN_LENGTH]
    run_dir = train(prepare_data(), args.steps, args.retrain)
    table = evaluate(run_dir, lengths, args.windows)
    print(
        f"\nperplexity of qwen-tiny trained at {TRAIN_LENGTH} ({args.windows} windows per length)"
    )
    print("| variant | " + " | ".join(str(n) for n in lengths) + " |")
    print("|---|" + "---|" * len(lengths))
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{row[n]:.2f}" for n in lengths) + " |")


if __name__ == "__main__":
    main()
