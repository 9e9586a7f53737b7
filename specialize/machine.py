"""The machine a run is on: what decides its CPU numbers, and how fast it is.

On CPU, the kernels torch and MKL pick depend on the processor's instruction set (AVX2, AVX-512,
AMX) and on the thread count; each choice sums in its own order, so weights trained on two
machines differ in the last bits and a long run can end at different scores. ``describe`` records
what decides that; ``measure_speed`` gives a number a run's duration scales with.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

# Environment variables that pin the kernels (see the README's "Reproducing the demo numbers").
KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> dict:
    """The processor, torch's kernel set and the variables that pin it."""
    import torch

    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "kernel_variables": {k: os.environ[k] for k in KERNEL_VARIABLES if k in os.environ},
    }


# The demo's qwen-tiny spends most of a step in its output layer (hidden 128 -> 151,936 logits),
# a matmul bound by memory more than by arithmetic; its speed follows the demo's, where a square
# matmul's does not (AVX2 kernels: 40% fewer square-matmul FLOP/s here, 5% slower demo steps).
_TOKENS, _HIDDEN, _VOCAB = 256, 128, 151936


def measure_speed(seconds: float = 1.0) -> dict:
    """One-thread fp32 GFLOP/s of qwen-tiny's output layer (what CPU training time follows) and
    the Qwen tokenizer's tokens/s (what data preparation follows), each for about ``seconds``."""
    import torch

    from base.tokenizer import QwenTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator().manual_seed(0)
        hidden = torch.randn(_TOKENS, _HIDDEN, generator=generator)
        weight = torch.randn(_HIDDEN, _VOCAB, generator=generator)
        hidden @ weight  # warm-up: the first call loads and dispatches the kernel
        count, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            hidden @ weight
            count += 1
        gflops = 2 * _TOKENS * _HIDDEN * _VOCAB * count / elapsed / 1e9
    finally:
        torch.set_num_threads(threads)

    tokenizer = QwenTokenizer.load()
    text = Path(__file__).read_text() * 4
    tokens, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        tokens += len(tokenizer.encode(text))
    return {
        "matmul_gflops_1thread": round(gflops, 1),
        "tokenizer_tokens_per_s": round(tokens / elapsed),
    }


def summary(record: dict) -> str:
    """One line for logs and reports."""
    line = (
        f"{record['cpu']} ({record['logical_cpus']} CPUs, torch {record['torch_cpu_capability']}"
        f", {record['torch_threads']} threads)"
    )
    if "matmul_gflops_1thread" in record:
        line += (
            f"; output-layer matmul {record['matmul_gflops_1thread']:.1f} GFLOP/s on one thread, "
            f"tokenizer {record['tokenizer_tokens_per_s']:,} tokens/s"
        )
    if record["kernel_variables"]:
        pinned = ", ".join(f"{k}={v}" for k, v in record["kernel_variables"].items())
        line += f"; {pinned}"
    return line


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(
        prog="python -m specialize.machine", description="This machine and its CPU speed."
    )
    parser.add_argument("-o", "--output", help="also write the record as JSON here")
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    args = parser.parse_args(argv)
    record = {**describe(), **measure_speed(args.seconds)}
    print(summary(record))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
