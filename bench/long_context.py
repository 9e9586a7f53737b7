"""Perplexity past the training length with Qwen's training-free context extension (paper §2.5).

Trains qwen-tiny at sequence length 256 with the project's training CLI (one process, the demo's
data: the CPython standard library prepared by ``specialize data prepare``), then measures
perplexity at 256/512/1024 tokens over held-out code (megatron-core's installed Python files, never
seen in training) with ``specialize eval --tasks perplexity --long-context`` for each of
none, ntk, logn, ntk+logn and ntk+logn+window, which writes the table and chart next to
``runs/bench/long-context/results.json``.

    .venv/bin/python bench/long_context.py [--steps 300] [--windows 16] [--retrain]

About 10 minutes on 2 CPU cores. The trained checkpoint is reused unless ``--retrain``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "bench" / "long-context"
DEMO_DATA = ROOT / "runs" / "demo" / "factory" / "data" / "code"
TRAIN_LENGTH = 256
VARIANTS = ("none", "ntk", "logn", "ntk+logn", "ntk+logn+window")


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
    shutil.rmtree(run_dir, ignore_errors=True)  # from scratch, not resumed with other settings
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


def evaluate(run_dir: Path, windows: int) -> Path:
    """``specialize eval --tasks perplexity --long-context ...`` on held-out code: the Python files
    of megatron-core as installed (outside the standard library the model trained on)."""
    held_out = Path(sysconfig.get_paths()["purelib"]) / "megatron" / "core"
    lengths = ",".join(str(n) for n in (TRAIN_LENGTH, 2 * TRAIN_LENGTH, 4 * TRAIN_LENGTH))
    out = OUT / "results.json"
    _run(
        [sys.executable, "-m", "specialize", "eval", str(run_dir), "--tasks", "perplexity"]
        + ["--data", f"perplexity={held_out}", "--lengths", lengths, "--limit", str(windows)]
        + ["--long-context", ",".join(VARIANTS), "--label", "qwen-tiny@256", "-o", str(out)]
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps at seq 256")
    parser.add_argument("--windows", type=int, default=16, help="windows per length")
    parser.add_argument("--retrain", action="store_true", help="train even if a checkpoint exists")
    args = parser.parse_args()
    started = time.monotonic()
    run_dir = train(prepare_data(), args.steps, args.retrain)
    out = evaluate(run_dir, args.windows)
    print(f"table: {out.parent / 'results.perplexity.md'} ({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
