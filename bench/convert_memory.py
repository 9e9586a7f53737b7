"""Peak memory of checkpoint conversion against the model's size.

Writes a random Hugging Face Qwen2-layout checkpoint of a preset's shape (safetensors shards), then
runs ``specialize convert import`` and ``specialize convert export`` in child processes and reads
their peak resident memory (``ru_maxrss``). A child that only imports the same modules and starts the
process group gives the baseline. The claim under test: conversion holds the model once, plus one
tensor (import) or one output shard (export) — never the whole model twice.

    .venv/bin/python bench/convert_memory.py [--preset qwen-1.8b] [--dtype bf16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from base.hf_mapping import qwen2_config  # noqa: E402
from base.presets import QwenPreset, get_preset  # noqa: E402
from specialize.convert.hf import qwen2_shapes  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
BASELINE = (
    "import warnings; warnings.filterwarnings('ignore');"
    "import specialize.convert.hf, specialize.checkpoint, safetensors.torch;"
    "from specialize.config import ParallelConfig; from specialize.mcore.distributed import init_distributed, shutdown;"
    "init_distributed(ParallelConfig()); shutdown()"
)


def write_random_checkpoint(
    arch: QwenPreset, path: Path, dtype: torch.dtype, shard_bytes: int = 2 << 30
) -> int:
    """A Qwen2-layout checkpoint with random tensors; returns its size in bytes."""
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    files: dict[str, str] = {}
    size = total = 0

    def flush() -> None:
        name = f"model-{len(set(files.values())) + 1:05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        files.update(dict.fromkeys(shard, name))
        shard.clear()

    for name, shape in qwen2_shapes(arch).items():
        tensor = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > shard_bytes:
            flush()
            size = 0
        shard[name] = tensor
        size += nbytes
        total += nbytes
    flush()
    index = {"metadata": {"total_size": total}, "weight_map": files}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **qwen2_config(arch)}
    config["torch_dtype"] = {torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
    (path / "config.json").write_text(json.dumps(config))
    return total


def peak_rss_mib(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS of ``cmd`` in MiB, wall seconds), measured by a fresh wrapper process.

    ``RUSAGE_CHILDREN`` keeps the maximum over every child ever waited for, so each command gets a
    wrapper of its own whose only child it is."""
    wrapper = (
        "import resource, subprocess, sys;"
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", wrapper, *cmd], check=True, cwd=ROOT, capture_output=True, text=True
    )
    return int(out.stdout.split()[-1]) / 1024, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="qwen-1.8b")
    parser.add_argument(
        "--hidden",
        type=int,
        help="override the preset's hidden size (with --layers, --ffn, --heads)",
    )
    parser.add_argument("--layers", type=int)
    parser.add_argument("--ffn", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    arch = get_preset(args.preset)
    if args.hidden:
        arch = QwenPreset(
            "custom", args.hidden, args.heads, args.layers, args.ffn, arch.padded_vocab_size
        )
    python = sys.executable
    with tempfile.TemporaryDirectory(
        dir=ROOT / "runs" if (ROOT / "runs").is_dir() else None
    ) as tmp:
        tmp = Path(tmp)
        size = write_random_checkpoint(arch, tmp / "hf", DTYPES[args.dtype])
        baseline, _ = peak_rss_mib([python, "-c", BASELINE])
        imported, import_s = peak_rss_mib(
            [
                python,
                "-m",
                "specialize",
                "convert",
                "import",
                "--hf",
                str(tmp / "hf"),
                "-o",
                str(tmp / "ckpt"),
            ]
        )
        exported, export_s = peak_rss_mib(
            [
                python,
                "-m",
                "specialize",
                "convert",
                "export",
                str(tmp / "ckpt"),
                "-o",
                str(tmp / "out"),
            ]
        )
    model_mib = size / 2**20
    result = {
        "architecture": arch.name,
        "parameters": arch.num_params(),
        "dtype": args.dtype,
        "model_mib": round(model_mib),
        "baseline_peak_rss_mib": round(baseline),
        "import_peak_rss_mib": round(imported),
        "export_peak_rss_mib": round(exported),
        "import_over_baseline_per_model": round((imported - baseline) / model_mib, 3),
        "export_over_baseline_per_model": round((exported - baseline) / model_mib, 3),
        "import_seconds": round(import_s, 1),
        "export_seconds": round(export_s, 1),
    }
    for key, value in result.items():
        print(f"{key:34s} {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
