"""Peak memory of training steps: the chunked output layer + loss against megatron-core's unfused path.

Each variant runs in a fresh child process (peak RSS is per process): ``Engine.build`` of the preset
(fp32, local spec, a world of one, as ``bench/train_throughput.py`` builds it), then ``--steps``
training steps on random tokens. Reported: the child's peak RSS (``ru_maxrss``) after building the
engine and after the steps, and the difference, which is what the steps added on top of the model,
its gradients and the optimizer state.

    .venv/bin/python bench/step_memory.py [--preset qwen-tiny] [--seq 512] [--micro-batch 4]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(args: argparse.Namespace) -> dict:
    import torch

    from bench.train_throughput import batches, build_engine

    torch.set_num_threads(args.threads)
    engine = build_engine(args.preset, args)
    built = _peak_mb()
    iterators = [batches(args.seq, args.micro_batch)]
    for step in range(1, args.steps + 1):
        loss = engine.train_step(iterators, step).loss
    return {"built_mb": built, "peak_mb": _peak_mb(), "loss": loss}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="qwen-tiny")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chunk-tokens", type=int, default=0)
    p.add_argument("--json", type=Path)
    p.add_argument("--child", choices=("null", "true", "false"), help=argparse.SUPPRESS)
    args = p.parse_args()
    # What build_engine reads from the throughput bench's arguments.
    args.micro_batches, args.warmup, args.seed = 1, 0, 1234
    if args.child:
        args.chunked_cross_entropy = args.child
        print(json.dumps(child(args)))
        return
    results = {}
    for variant in ("false", "true"):
        command = [sys.executable, __file__, "--child", variant, *sys.argv[1:]]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    print(
        f"{args.preset}, seq {args.seq} x micro-batch {args.micro_batch}, fp32, {args.steps} steps"
    )
    print(f"{'output layer + loss':36} {'after build MB':>15} {'peak MB':>9} {'steps add MB':>13}")
    for variant, label in (("false", "megatron-core unfused"), ("true", "chunked (default)")):
        r = results[variant]
        print(
            f"{label:36} {r['built_mb']:>15,.0f} {r['peak_mb']:>9,.0f} "
            f"{r['peak_mb'] - r['built_mb']:>13,.0f}"
        )
    unfused, chunked = results["false"]["peak_mb"], results["true"]["peak_mb"]
    print(
        f"peak RSS: {chunked:,.0f} MB against {unfused:,.0f} MB ({1 - chunked / unfused:.0%} lower)"
    )
    print(f"losses after the steps: {results['false']['loss']:.6f} / {results['true']['loss']:.6f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
