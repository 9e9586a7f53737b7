"""Checkpoints: atomic, verified, resumable, reshardable.

By concern: ``layout`` (the run directory: iteration directories, ``latest``, which checkpoints
are complete and intact, checksums, set-aside, pruning), ``architecture`` (``arch.json``, the model
a checkpoint holds), ``lineage`` (``lineage.json``: where it comes from) and ``state`` (the tensors
and training state, saved and loaded with megatron-core's ``dist_checkpointing``).

The names of the first two are re-exported here. ``lineage`` and ``state`` are imported by their
module names: they load megatron-core and the config, and the config imports this package.
"""

from specialize.checkpoint.architecture import (
    ARCH_FILE,
    check_architecture,
    read_architecture,
    write_architecture,
)
from specialize.checkpoint.layout import (
    CHECKSUMS,
    GENERATION_CONFIG_FILE,
    LATEST,
    LINEAGE_FILE,
    STAGE_FILE,
    CheckpointError,
    checkpoint_root,
    complete_checkpoints,
    find_latest,
    iteration_dir,
    read_generation_config,
    read_lineage,
    resolve_checkpoint,
    verify_checkpoint,
    write_checksums,
)

__all__ = [
    "ARCH_FILE",
    "CHECKSUMS",
    "GENERATION_CONFIG_FILE",
    "LATEST",
    "LINEAGE_FILE",
    "STAGE_FILE",
    "CheckpointError",
    "check_architecture",
    "checkpoint_root",
    "complete_checkpoints",
    "find_latest",
    "iteration_dir",
    "read_architecture",
    "read_generation_config",
    "read_lineage",
    "resolve_checkpoint",
    "verify_checkpoint",
    "write_architecture",
    "write_checksums",
]
