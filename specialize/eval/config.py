"""The typed config of one ``specialize eval`` run.

``specialize eval`` builds an ``EvalConfig`` from its flags, from ``--config FILE`` (YAML on top of
these dataclasses, unknown keys and wrong types are errors naming the field) with ``key=value``
overrides, or both; a pipeline's eval step writes one per model. Each flag is the field of the
same name (``--max-new-tokens`` is ``max_new_tokens``; ``--samples``, ``--temperature``,
``--top-p``, ``--seed`` and ``--repetition-penalty`` are under ``sampling``), so errors name the
flag.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from specialize.config import ConfigError, _merge, _parse_override
from specialize.eval.tasks import PROTOCOLS, ROBUST, check_mode

# The precisions a model is evaluated in (``infer.model.INFERENCE_DTYPES``, which imports torch).
DTYPES = ("fp32", "bf16")
# The task ``lengths`` and ``long_context`` belong to (``specialize.eval.perplexity`` registers it).
PERPLEXITY = "perplexity"


class EvalError(ConfigError):
    """An evaluation request or completions file that cannot be evaluated; says what and where."""


@dataclass
class SamplingConfig:
    samples: int = 1
    """Completions per problem, for pass@k; more than one needs ``temperature`` > 0."""
    temperature: float = 0.0
    """Sampling temperature; 0 is greedy."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    seed: int = 0
    """Sampling seed; each sample and chunk of prompts derives its own from it."""
    repetition_penalty: Optional[float] = None
    """``transformers``' repetition penalty (1: none); None: the task protocol's (1 under
    ``robust``; under ``paper`` the reference script's, usually the checkpoint's own)."""


@dataclass
class EvalConfig:
    checkpoint: Optional[str] = None
    """Checkpoint (or run directory: its newest checkpoint) to generate completions from and to
    run likelihood tasks on; exclusive with ``score``."""
    score: Optional[str] = None
    """Completions to grade instead (JSONL lines ``{"task", "id", "completion"}``, several per id
    for pass@k), made by anything else."""
    tasks: list[str] = field(default_factory=list)
    """Task names, e.g. ``[humaneval, gsm8k]``; ``specialize eval --help`` lists them."""
    data: dict[str, str] = field(default_factory=dict)
    """Task -> local data file in its published schema (perplexity: comma-separated text files,
    directories or JSONL); a task without one uses its packaged data or hub dataset."""
    mode: str = "base"
    """``base``: few-shot completion prompts; ``chat``: a 0-shot ChatML user turn."""
    protocol: str = ROBUST
    """``robust``: this project's prompts and graders; ``paper``: the script behind the paper's
    number, byte for byte (each task's protocol names it; results record it)."""
    label: Optional[str] = None
    """Model name in the results; default: the checkpoint directory's name, else the results
    file's stem."""
    output: Optional[str] = None
    """Results JSON to write (required). Generated completions are kept beside it
    (``.completions.jsonl``), so are the long-context table and chart (``.perplexity.md``/``.png``)."""
    limit: Optional[int] = None
    """First N problems of each task (perplexity: windows per length); None: all of them."""
    max_new_tokens: Optional[int] = None
    """Generation budget instead of each task protocol's (recorded in the results)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """How completions are drawn (greedy by default)."""
    workers: int = 2
    """Parallel sandboxed program runs while grading."""
    tp: int = 1
    """Tensor-parallel size (run under torchrun with tp x pp processes)."""
    pp: int = 1
    """Pipeline-parallel size."""
    dtype: Optional[str] = None
    """``fp32`` or ``bf16``, the precision the checkpoint runs in; None: its training run's
    ``precision.dtype`` (fp8 as bf16), an import's stored dtype. Recorded in the results."""
    lengths: Optional[list[int]] = None
    """Task perplexity: context lengths; None: the model's ``max_position_embeddings``."""
    long_context: list[str] = field(default_factory=list)
    """Task perplexity: also measure with each of these option sets, e.g. ``[none, ntk,
    ntk+logn+window]`` (``ntk``: dynamic NTK RoPE, ``logn``: LogN attention, ``window``:
    training-length windows in the lower half of the layers); writes a table and a chart of
    perplexity against length."""

    @property
    def model_label(self) -> str:
        """The model's name in the results (and the long-context table's title)."""
        if self.label:
            return self.label
        if self.checkpoint:
            return Path(self.checkpoint).name
        return Path(str(self.output)).stem

    def validate(self) -> None:
        """What a single field's type cannot say; errors name the flag (and field) at fault."""
        if not self.tasks or self.output is None:
            raise EvalError("needs --tasks NAME[,NAME...] and -o RESULTS.json (tasks, output)")
        if (self.score is None) == (self.checkpoint is None):
            raise EvalError("give a checkpoint to generate from, or --score COMPLETIONS.jsonl")
        if self.limit is not None and self.limit < 1:
            raise EvalError(
                f"--limit {self.limit}: must be at least 1 (the first N problems of each task)"
            )
        check_mode(self.mode)
        if self.protocol not in PROTOCOLS:
            raise EvalError(f"--protocol {self.protocol!r}: must be one of {', '.join(PROTOCOLS)}")
        if self.dtype not in (None, *DTYPES):
            raise EvalError(f"--dtype {self.dtype!r}: must be {' or '.join(DTYPES)}")
        for name in ("tp", "pp", "workers"):
            if getattr(self, name) < 1:
                raise EvalError(f"--{name} {getattr(self, name)}: must be at least 1")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise EvalError(f"--max-new-tokens {self.max_new_tokens}: must be at least 1")
        penalty = self.sampling.repetition_penalty
        if penalty is not None and penalty <= 0.0:
            raise EvalError(f"--repetition-penalty {penalty}: must be > 0 (1 is no penalty)")
        if self.sampling.samples < 1:
            raise EvalError(f"--samples {self.sampling.samples}: must be at least 1")
        generating = self.score is None  # sampling settings are moot for a completions file
        if generating and self.sampling.samples > 1 and self.sampling.temperature <= 0.0:
            raise EvalError(
                "--samples > 1 needs --temperature > 0 (greedy samples are all the same)"
            )
        unused = sorted(set(self.data) - set(self.tasks))
        if unused:
            raise EvalError(f"--data given for {', '.join(unused)}, which is not among the tasks")
        if self.long_context and PERPLEXITY not in self.tasks:
            raise EvalError(f"--long-context applies to task {PERPLEXITY!r} only")


def load_eval_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    given: Mapping[str, Any] | None = None,
) -> EvalConfig:
    """A validated ``EvalConfig``: the defaults, then the YAML file ``path``, then ``key=value``
    ``overrides`` (``sampling.temperature=0.8``, ``data.mbpp=PATH``), then ``given`` (field ->
    value, e.g. the flags given on the command line) on top."""
    node = OmegaConf.structured(EvalConfig)
    if path is not None:
        node = _merge(node, _read(Path(path)), str(path))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise EvalError(f"override {item!r}: expected key=value")
        node = _merge(node, _parse_override(item, key, value), f"override {item!r}")
    if given:
        node = _merge(node, OmegaConf.create(dict(given)), "flags")
    try:
        cfg: EvalConfig = OmegaConf.to_object(node)
    except OmegaConfBaseException as e:  # e.g. an interpolation ${...} that names no field
        key = getattr(e, "full_key", None)
        raise EvalError(f"{key or path}: {str(e).splitlines()[0]}") from None
    cfg.validate()
    return cfg


def _read(path: Path) -> DictConfig:
    if not path.is_file():
        raise EvalError(f"eval config not found: {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError: its message spans lines
        raise EvalError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(node, DictConfig):
        raise EvalError(f"{path}: an eval config is a mapping, got {type(node).__name__}")
    return node


def to_yaml(cfg: EvalConfig) -> str:
    """``cfg`` as the YAML ``load_eval_config`` reads back to the same config."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
