"""The training-free long-context options of a model, as one value (``base.long_context`` implements
them in megatron-core).

The same ``LongContextConfig`` is a recipe's ``model.long_context``, what ``ModelOptions`` carries
to the builder, a checkpoint's record (its run's ``config.yaml``; ``long_context.json`` for an
import) and each variant of the perplexity evaluation. It imports no torch, so the config tree
nests it and validates recipes cheaply.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Optional

ROPE_SCALINGS = ("none", "dynamic-ntk")
QWEN_SEQ_LENGTH = 2048
"""Qwen v1's ``seq_length`` (``QWenConfig`` default): the training length when none is known."""
LONG_CONTEXT_FILE = "long_context.json"
"""Per-checkpoint inference options (written next to ``arch.json``; read by ``load_model``)."""


class LongContextError(ValueError):
    """Invalid long-context options; the message names each invalid field."""


# Optional[...] as in the rest of the recipe schema, whose annotations omegaconf reads.
@dataclass
class LongContextConfig:
    rope_scaling: str = "none"
    """Training-free context extension of RoPE at inference: ``none`` or ``dynamic-ntk`` (Qwen v1: the base grows by ``alpha ** (d/(d-2))``, ``alpha = max(2**ceil(log2(L/train_seq_length)+1) - 1, 1)``)."""
    rope_alpha: Optional[float] = None
    """A fixed NTK alpha for ``rope_scaling=dynamic-ntk`` instead of Qwen's length rule (>= 1)."""
    logn_attention: bool = False
    """LogN attention at inference: queries at positions n > ``train_seq_length`` are scaled by log(n)/log(train_seq_length), keeping attention entropy (paper §2.5, docs/paper.md §5)."""
    layer_windows: Optional[list[Optional[int]]] = None
    """Sliding attention window per layer, one entry per layer (null or 0: full attention); a token attends to itself and the window-1 tokens before it. The paper uses short windows in lower layers, long in higher."""
    train_seq_length: Optional[int] = None
    """The length the model was trained at (Qwen's ``seq_length``), past which dynamic-ntk and LogN act; default: ``data.seq_length``."""

    @property
    def enabled(self) -> bool:
        return self.rope_scaling != "none" or self.logn_attention or bool(self.layer_windows)

    def resolved(self, seq_length: int) -> LongContextConfig:
        """A copy whose unset ``train_seq_length`` is ``seq_length`` (the length trained at)."""
        return replace(self, train_seq_length=self.train_seq_length or seq_length)

    def check(self, num_layers: int, where: str = "") -> None:
        """Raise a ``LongContextError`` naming every invalid field (``where`` prefixes the names,
        e.g. ``model.long_context.``) for a model of ``num_layers`` layers."""
        problems = []
        if self.rope_scaling not in ROPE_SCALINGS:
            problems.append(
                (
                    "rope_scaling",
                    f"{self.rope_scaling!r}: must be one of {', '.join(ROPE_SCALINGS)}",
                )
            )
        if self.rope_alpha is not None:
            if self.rope_scaling != "dynamic-ntk":
                problems.append(
                    ("rope_alpha", f"{self.rope_alpha}: needs rope_scaling=dynamic-ntk")
                )
            elif self.rope_alpha < 1:
                problems.append(
                    ("rope_alpha", f"{self.rope_alpha}: must be >= 1 (1 is plain RoPE)")
                )
        uses_length = self.rope_scaling != "none" or self.logn_attention
        length = self.train_seq_length
        if uses_length and length is not None and length < 2:
            problems.append(("train_seq_length", f"{length}: must be >= 2 (log of it divides)"))
        windows = self.layer_windows
        if windows is not None:
            if len(windows) != num_layers:
                problems.append(
                    (
                        "layer_windows",
                        f"has {len(windows)} entries for {num_layers} layers (one per layer; null "
                        "or 0 for full attention)",
                    )
                )
            bad = [w for w in windows if w is not None and w < 0]
            if bad:
                problems.append(("layer_windows", f"{bad}: windows must be >= 1 (or null/0: full)"))
        if problems:
            raise LongContextError("; ".join(f"{where}{name}: {why}" for name, why in problems))

    def as_dict(self) -> dict[str, Any]:
        record = asdict(self)
        if self.layer_windows is not None:
            record["layer_windows"] = list(self.layer_windows)
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> LongContextConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(record) - names)
        if unknown:
            raise LongContextError(
                f"unknown long-context option(s) {unknown}; known: {sorted(names)}"
            )
        windows = record.get("layer_windows")
        return cls(**{**record, "layer_windows": None if windows is None else list(windows)})


def write_long_context(path: str | Path, options: LongContextConfig) -> None:
    """Record a checkpoint's inference options (``load_model`` applies them)."""
    Path(path, LONG_CONTEXT_FILE).write_text(json.dumps(options.as_dict(), indent=2) + "\n")


def read_long_context(path: str | Path) -> LongContextConfig | None:
    file = Path(path, LONG_CONTEXT_FILE)
    if not file.is_file():
        return None
    return LongContextConfig.from_dict(json.loads(file.read_text()))
