"""``specialize gpu-check`` (``make gpu-check``): the first command to run on a machine with GPUs.

On whatever GPUs it finds, with tiny presets and the demo's data (prepared under ``<work>/data``
by the demo factory's own steps when absent), it checks the GPU path end to end and prints one
line per check with the measured figure:

1. Transformer Engine imports, its version is inside megatron-core's declared range (read from
   megatron-core's metadata), and ``pytest -m gpu`` passes;
2. one packed-SFT step with ``model.spec`` te, local and auto from the same weights: te and local
   losses agree, auto equals te, and a sample's logits do not change with its neighbours (THD);
3. TP=2 + SP, PP=2 with virtual stages on 4 GPUs: finite, falling losses, a checkpoint, and a
   resume at TP=4 PP=1 that continues the loss;
4. ``specialize eval --tp 2`` of that checkpoint: HumanEval (2 problems), perplexity at two
   lengths with every long-context variant, sampled generation;
5. BF16 against FP8 (delayed and tensorwise scaling) on the same batches: within 1% after 20 steps;
6. tokens/s/GPU, MFU and peak memory of qwen-1.8b (or the largest preset that fits) at seq 8192,
   next to ``specialize plan``'s prediction for the same layout.

A check skips only when the machine has too few GPUs for it (saying how many it needs). Results go
to ``<work>/gpu-check.json``, every run's logs beside them. Exit code: 0 when every check that ran
passed, 1 when any failed, 3 without a CUDA device (nothing checked; every line SKIP).
"""

from __future__ import annotations

import sys
from pathlib import Path

DEFAULT_WORK_DIR = "runs/gpu-check"


def select(only: str | None, names: list[str]) -> list[int] | None:
    """Check numbers (from 1) named by ``--only``; None selects all."""
    if not only:
        return None
    chosen = []
    for item in (part.strip() for part in only.split(",") if part.strip()):
        if item.isdigit() and 1 <= int(item) <= len(names):
            chosen.append(int(item))
        elif item in names:
            chosen.append(names.index(item) + 1)
        else:
            known = ", ".join(f"{i} {n}" for i, n in enumerate(names, 1))
            raise ValueError(f"--only {item!r}: no such check (known: {known})")
    return sorted(set(chosen))


def gpu_check(work: Path, selected: list[int] | None = None, timeout: float = 3600.0) -> int:
    """Run the checks, print their lines, write ``gpu-check.json``; returns the exit code."""
    import torch

    from specialize.gpu_check.checks import (
        CheckFailed,
        Context,
        Devices,
        devices_record,
        probe,
        run_checks,
    )
    from specialize.gpu_check.report import exit_code, summary_line, write_report

    work = work.resolve()  # the commands run from the checkout, wherever this was started
    devices = Devices()
    if torch.cuda.is_available():  # no device: report it without starting anything
        try:
            devices = probe(work)
        except CheckFailed as e:
            print(f"gpu-check: {e}", file=sys.stderr)
            return 1
    print(f"gpu-check: {devices.describe()}; work dir {work}", flush=True)
    records = run_checks(
        Context(work, devices, timeout), selected=selected, echo=lambda s: print(s, flush=True)
    )
    path = write_report(work / "gpu-check.json", devices_record(devices), records)
    print(summary_line(records, path))
    return exit_code(records, devices.count > 0)
