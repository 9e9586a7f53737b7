"""Conversion holds the model once: peak memory stays under twice the model's size (bench/convert_memory.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_conversion_never_holds_the_model_twice(tmp_path):
    out = tmp_path / "memory.json"
    # ~181M parameters in fp32 (690 MiB): large against the ~370 MiB interpreter baseline.
    subprocess.run(
        [
            sys.executable,
            "bench/convert_memory.py",
            "--hidden",
            "512",
            "--layers",
            "8",
            "--ffn",
            "1376",
            "--heads",
            "8",
            "--dtype",
            "fp32",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    result = json.loads(out.read_text())
    print(result)
    # Model once, plus one tensor (import: the 297 MiB embedding, its finiteness mask, the save's
    # buffers) or one output shard (export); 2.0 would be a second copy. Measured 1.46-1.74.
    assert result["import_over_baseline_per_model"] < 1.85, result
    assert result["export_over_baseline_per_model"] < 1.85, result
