"""What ``specialize gpu-check`` prints and writes: one record per check, and the exit code."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
STATUSES = (PASS, FAIL, SKIP)
FORMAT = "specialize-gpu-check-1"
NO_CUDA = "no CUDA device"

EXIT_OK = 0
"""Every check that ran passed (checks lacking GPUs are skipped)."""
EXIT_FAIL = 1
"""At least one check failed."""
EXIT_NO_CUDA = 3
"""No CUDA device: nothing was checked (every line SKIP), which must not read as a pass."""


@dataclass(frozen=True)
class Record:
    name: str
    status: str
    figure: Optional[str]
    """The measured figure(s), as printed; None when the check did not run."""
    detail: str
    """Why it failed or was skipped, what it compared, where its logs are."""
    seconds: float

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r}: expected one of {STATUSES}")


def exit_code(records: Sequence[Record], cuda: bool) -> int:
    if any(r.status == FAIL for r in records):
        return EXIT_FAIL
    return EXIT_OK if cuda else EXIT_NO_CUDA


def format_record(index: int, total: int, record: Record) -> str:
    """``PASS [2/6] packed-sft  figure  (12.3 s)``; a failure's detail indented below its figure."""
    line = f"{record.status} [{index}/{total}] {record.name}  {record.figure or record.detail}"
    line += f"  ({record.seconds:.1f} s)"
    if record.figure and record.status != PASS and record.detail:
        line += f"\n       {record.detail}"
    return line


def summary_line(records: Sequence[Record], path: Path) -> str:
    counts = ", ".join(f"{sum(r.status == s for r in records)} {s}" for s in STATUSES)
    return f"gpu-check: {counts} -> {path}"


def write_report(path: Path, devices: dict[str, Any], records: Sequence[Record]) -> Path:
    """``gpu-check.json``, atomically: the machine and one record per check."""
    doc = {
        "format": FORMAT,
        "devices": devices,
        "checks": [dataclasses.asdict(r) for r in records],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
