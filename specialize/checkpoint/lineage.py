"""Where a checkpoint comes from, ``lineage.json``: its parent, init, stage, data manifests, git
commit, parallel layout and layer spec (a conversion: its source and report)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from megatron.core import parallel_state

from specialize.checkpoint.layout import LINEAGE_FILE, STAGE_FILE
from specialize.data.pretrain import data_manifest_records
from specialize.train.engine import Engine


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def parallel_layout() -> dict:
    """This world's tensor, pipeline and data-parallel sizes."""
    return {
        "tensor": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline": parallel_state.get_pipeline_model_parallel_world_size(),
        "data": parallel_state.get_data_parallel_world_size(),
    }


def lineage_record(
    engine: Engine, iteration: int, consumed_samples: int, parent: str | None
) -> dict:
    manifests = data_manifest_records(engine.cfg.data.paths)
    stage_file = Path(engine.cfg.checkpoint.dir) / STAGE_FILE
    return {
        "name": engine.cfg.name,
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "parent": parent,
        "init": engine.cfg.init.checkpoint,
        "stage": json.loads(stage_file.read_text()) if stage_file.is_file() else None,
        "data_manifests": manifests,
        "git_commit": git_commit(),
        "layout": parallel_layout(),
        "preset": engine.preset.name,  # the shape's preset, or NAME+custom
        # What `auto` chose depends on the machine; a resume on another one is checked against it.
        "model_spec": {
            "requested": engine.cfg.model.spec,
            "resolved": engine.cfg.model.resolved_spec(),
        },
    }


def conversion_record(report: dict) -> dict:
    """The lineage of a converted checkpoint: its source and the conversion's report."""
    return {"parent": report.get("source"), "git_commit": git_commit(), "conversion": report}


def write_lineage(path: Path, record: dict) -> None:
    """Write ``record`` as the lineage of the checkpoint directory ``path``."""
    (path / LINEAGE_FILE).write_text(json.dumps(record, indent=2) + "\n")
