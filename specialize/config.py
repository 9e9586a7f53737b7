"""The typed config tree of a training run.

A recipe is YAML on top of these dataclasses: unknown keys are errors, every field carries a
docstring (shown by ``specialize config``), and ``validate`` checks what spans fields. A recipe may
name a parent with ``base: other.yaml`` (relative to itself) and override fields of it.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from base.presets import QwenPreset, get_preset

ARCHITECTURE_FIELDS = (
    "hidden_size",
    "num_layers",
    "num_attention_heads",
    "num_query_groups",
    "ffn_hidden_size",
    "padded_vocab_size",
    "max_position_embeddings",
    "rotary_base",
    "norm_epsilon",
)


def architecture_overrides(arch: QwenPreset) -> dict[str, object]:
    """``model.*`` values that make a recipe build exactly ``arch``."""
    return {
        k: arch.query_groups if k == "num_query_groups" else getattr(arch, k)
        for k in ARCHITECTURE_FIELDS
    }


class ConfigError(ValueError):
    """A recipe or override that cannot describe a valid run. The message names the field."""


@dataclass
class ModelConfig:
    preset: str = "qwen-tiny"
    """Architecture preset from ``base.presets`` (qwen-1.8b, qwen-7b, qwen-14b from the paper; tiny CPU presets)."""
    spec: str = "auto"
    """Layer implementation: ``te`` (Transformer Engine fused kernels), ``local`` (plain PyTorch), ``auto`` (te when CUDA and TE import, else local)."""
    tokenizer: Optional[str] = None
    """Path to ``qwen.tiktoken`` or a directory holding it; default: the copy shipped in the ``dashscope`` package."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP blocks (the paper's general SFT uses 0.1)."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    recompute: str = "none"
    """Activation recomputation: ``none``, ``selective`` (core attention) or ``full`` (every layer)."""
    hidden_size: Optional[int] = None
    """Override of the preset's hidden size (imported checkpoints of other shapes set these)."""
    num_layers: Optional[int] = None
    """Override of the preset's number of transformer layers."""
    num_attention_heads: Optional[int] = None
    """Override of the preset's number of attention heads."""
    num_query_groups: Optional[int] = None
    """Override of the number of key/value heads (GQA, Qwen1.5+); Qwen v1 uses one per query head."""
    ffn_hidden_size: Optional[int] = None
    """Override of the preset's SwiGLU FFN width."""
    padded_vocab_size: Optional[int] = None
    """Override of the preset's embedding rows (the vocabulary padded for efficient GEMMs)."""
    max_position_embeddings: Optional[int] = None
    """Override of the longest sequence the RoPE tables are built for."""
    rotary_base: Optional[float] = None
    """Override of the RoPE base (paper: 10000; Qwen2 uses 1e6)."""
    norm_epsilon: Optional[float] = None
    """Override of the RMSNorm epsilon (paper: 1e-6)."""

    def architecture(self) -> QwenPreset:
        """The preset with this config's overrides applied."""
        preset = get_preset(self.preset)
        overrides = {
            k: getattr(self, k) for k in ARCHITECTURE_FIELDS if getattr(self, k) is not None
        }
        changed = {k: v for k, v in overrides.items() if getattr(preset, k) != v}
        if not changed:
            return preset
        return dataclasses.replace(preset, name=f"{preset.name}+custom", **changed)


@dataclass
class PrecisionConfig:
    dtype: str = "fp32"
    """Training precision: ``fp32``, ``bf16`` (BF16 weights with FP32 main params in the optimizer) or ``fp8`` (bf16 plus TE FP8 GEMMs)."""
    fp8_format: str = "hybrid"
    """FP8 format: ``hybrid`` (E4M3 forward, E5M2 backward) or ``e4m3``."""
    fp8_recipe: str = "delayed"
    """FP8 scaling recipe: ``delayed`` (amax history) or ``tensorwise`` (current per-tensor scaling)."""
    fp8_amax_history_len: int = 1024
    """Length of the amax history window for delayed scaling."""
    fp8_amax_compute_algo: str = "max"
    """How the scale is derived from the amax history: ``max`` or ``most_recent``."""


@dataclass
class ParallelConfig:
    tensor: int = 1
    """Tensor-parallel size (attention heads and FFN split across ranks)."""
    pipeline: int = 1
    """Pipeline-parallel size (layers split into stages)."""
    virtual_pipeline: Optional[int] = None
    """Model chunks per pipeline rank (interleaved schedule); GPU runs only."""
    sequence_parallel: bool = False
    """Shard norms/dropout activations along the sequence across TP ranks (needs the ``te`` spec)."""
    distributed_optimizer: bool = False
    """Shard optimizer states across data-parallel ranks (ZeRO-1, megatron-core DistributedOptimizer)."""
    backend: str = "auto"
    """Process-group backend: ``nccl``, ``gloo`` or ``auto`` (nccl with CUDA, else gloo)."""


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)
    """Directories written by ``specialize data prepare`` (``manifest.json`` + shards), or bare Megatron prefixes (``.bin``/``.idx`` without the suffix)."""
    weights: Optional[list[float]] = None
    """Blend weights, one per path, each split over a directory's shards by tokens (default: proportional to tokens)."""
    split: str = "98,2,0"
    """Train/validation/test split of the documents, as ratios."""
    seq_length: int = 2048
    """Tokens per training sequence (the paper: 2048 base pretraining, 8192 Code-Qwen)."""
    cache_dir: Optional[str] = None
    """Where GPTDataset writes its sample indices (default: ``<checkpoint.dir>/data_cache``)."""
    reset_position_ids: bool = False
    """Restart position ids after each end-of-document token."""
    reset_attention_mask: bool = False
    """Stop attention across end-of-document tokens (block-diagonal causal mask)."""
    eod_mask_loss: bool = False
    """Exclude end-of-document tokens from the loss."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""


@dataclass
class OptimizerConfig:
    lr: float = 3.0e-4
    """Peak learning rate (the paper: 3e-4 pretraining, 3e-5/6e-5 Code-Qwen, 2e-5 math SFT)."""
    min_lr: float = 3.0e-5
    """Learning rate at the end of decay (the paper decays to 10% of peak)."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not applied to biases and norms)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1.0e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""


@dataclass
class ScheduleConfig:
    warmup_steps: Optional[int] = None
    """Linear warmup length in steps; exclusive with ``warmup_fraction``."""
    warmup_fraction: Optional[float] = None
    """Warmup as a fraction of the run's steps (the paper: 3% for Code-Qwen)."""
    decay: str = "cosine"
    """Shape after warmup: ``constant``, ``cosine`` or ``linear`` (down to ``optimizer.min_lr``)."""


@dataclass
class TrainConfig:
    micro_batch_size: int = 1
    """Sequences per rank per forward/backward pass."""
    global_batch_size: int = 8
    """Sequences per optimizer step across all data-parallel ranks (micro-batches are accumulated)."""
    steps: Optional[int] = None
    """Optimizer steps; exclusive with ``tokens``."""
    tokens: Optional[float] = None
    """Token budget from which the step count is derived (e.g. 90e9 for Code-Qwen)."""
    seed: int = 1234
    """Seed for initialization, dropout and data order."""
    eval_interval: int = 0
    """Run validation every N steps (0: never)."""
    eval_steps: int = 2
    """Global batches per validation."""
    exit_after_steps: Optional[int] = None
    """Stop (after checkpointing) once this step is reached, without changing the schedule; for staged runs and tests."""


@dataclass
class InitConfig:
    checkpoint: Optional[str] = None
    """Checkpoint whose weights start this run (``init=PATH`` is shorthand). Must exist; never a silent random init."""
    verify_against: Optional[str] = None
    """Hugging Face directory the loaded weights must reproduce (per-layer parity gate before step 1)."""
    verify_tolerance: Optional[float] = None
    """Max |Δ| per layer and on the logits for the gate (default by precision: fp32 1e-4, bf16 0.5)."""


@dataclass
class CheckpointConfig:
    dir: str = "runs/default"
    """Run directory: checkpoints ``iter_NNNNNNN/``, the resolved config and lineage, TensorBoard logs."""
    interval: int = 0
    """Save every N steps (0: only at the end)."""
    keep_last: int = 2
    """How many recent checkpoints to keep (0 keeps all)."""
    resume: bool = True
    """Continue from the newest checkpoint in ``dir`` when there is one."""


@dataclass
class LoggingConfig:
    interval: int = 1
    """Log every N steps."""
    tensorboard: bool = True
    """Write scalars to ``<checkpoint.dir>/tensorboard``."""
    progress: bool = True
    """Show a progress bar with ETA on rank 0."""
    device_peak_tflops: Optional[float] = None
    """Peak dense TFLOP/s of one device for MFU (default: looked up for known GPUs; none on CPU)."""


@dataclass
class RecipeConfig:
    name: str = "run"
    """Run name, shown in logs and lineage."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Base-model architecture and implementation."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Numeric precision (fp32, bf16, fp8)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor/pipeline/data parallel layout."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW settings."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batch sizes, length and seed."""
    init: InitConfig = field(default_factory=InitConfig)
    """Starting weights."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving and resuming."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Console and TensorBoard logging."""


CHOICES = {
    "model.spec": ("auto", "te", "local"),
    "model.recompute": ("none", "selective", "full"),
    "precision.dtype": ("fp32", "bf16", "fp8"),
    "precision.fp8_format": ("hybrid", "e4m3"),
    "precision.fp8_recipe": ("delayed", "tensorwise"),
    "precision.fp8_amax_compute_algo": ("max", "most_recent"),
    "parallel.backend": ("auto", "nccl", "gloo"),
    "schedule.decay": ("constant", "cosine", "linear"),
}


# ----------------------------------------------------------------------------- loading


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """Read a recipe file and, recursively, the ``base:`` recipes it derives from."""
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    if path in seen:
        raise ConfigError(f"{path}: circular 'base:' chain {' -> '.join(map(str, seen))}")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError carries the line
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: a recipe must be a mapping, got {type(node).__name__}")
    parent = node.pop("base", None)
    _normalize_shorthands(node)
    if parent is None:
        return node
    base_node = _read_yaml(path.parent / str(parent), (*seen, path))
    return OmegaConf.merge(base_node, node)


def _normalize_shorthands(node: DictConfig) -> None:
    """``init: PATH`` is shorthand for ``init: {checkpoint: PATH}`` (also for ``init: ???``)."""
    if OmegaConf.is_missing(node, "init"):  # `"init" in node` is False for a ??? value
        node.init = {"checkpoint": "???"}
    elif "init" in node and (node.init is None or isinstance(node.init, str)):
        node.init = {"checkpoint": node.init}


def _merge(schema: DictConfig, node: Any, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(schema, node)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        reason = str(e).splitlines()[0]
        raise ConfigError(f"{where}: {key + ': ' if key else ''}{reason}") from None


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> RecipeConfig:
    """Build a validated ``RecipeConfig`` from a recipe file plus ``key=value`` overrides.

    A recipe value ``???`` marks a field the user must give (e.g. ``init: {checkpoint: ???}``);
    leaving it unset is an error naming the field.
    """
    cfg = OmegaConf.structured(RecipeConfig)
    if path is not None:
        node = _read_yaml(Path(path))
        required = OmegaConf.missing_keys(node)
        cfg = _merge(cfg, node, str(path))
        for key in required:  # merging ??? keeps the schema default; mark the field missing again
            OmegaConf.update(cfg, key, "???")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, value = item.split("=", 1)
        if key == "init":
            key = "init.checkpoint"
        dotted = OmegaConf.from_dotlist([f"{key}={value}"])
        cfg = _merge(cfg, dotted, f"override {item!r}")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        given = " ".join("init=PATH" if k == "init.checkpoint" else f"{k}=VALUE" for k in missing)
        raise ConfigError(
            f"{', '.join(missing)}: required by {path} (left as ???); give {given} on the "
            "command line"
        )
    recipe: RecipeConfig = OmegaConf.to_object(cfg)
    validate(recipe)
    return recipe


def to_yaml(cfg: RecipeConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# ----------------------------------------------------------------------------- validation


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: RecipeConfig, world_size: Optional[int] = None) -> None:
    """Checks that span fields. ``world_size`` adds the checks that need the process count."""
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}: must be one of {', '.join(allowed)}")
    try:
        preset = cfg.model.architecture()
    except KeyError as e:
        raise ConfigError(f"model.preset: {e.args[0]}") from None
    if preset.num_attention_heads % preset.query_groups:
        raise ConfigError(
            f"model.num_query_groups={preset.query_groups}: must divide the {preset.num_attention_heads} attention heads"
        )
    par = cfg.parallel
    for key in ("tensor", "pipeline"):
        if getattr(par, key) < 1:
            raise ConfigError(f"parallel.{key}={getattr(par, key)}: must be >= 1")
    if preset.num_attention_heads % par.tensor:
        raise ConfigError(
            f"parallel.tensor={par.tensor}: must divide the {preset.num_attention_heads} attention "
            f"heads of {preset.name}"
        )
    if preset.query_groups % par.tensor:
        raise ConfigError(
            f"parallel.tensor={par.tensor}: must divide the {preset.query_groups} key/value heads of {preset.name}"
        )
    if preset.ffn_hidden_size % par.tensor:
        raise ConfigError(
            f"parallel.tensor={par.tensor}: must divide ffn_hidden_size={preset.ffn_hidden_size} of {preset.name}"
        )
    stages = par.pipeline * (par.virtual_pipeline or 1)
    if preset.num_layers % stages:
        raise ConfigError(
            f"parallel.pipeline={par.pipeline}"
            + (f" x virtual_pipeline={par.virtual_pipeline}" if par.virtual_pipeline else "")
            + f": must divide the {preset.num_layers} layers of {preset.name}"
        )
    if par.virtual_pipeline is not None and par.pipeline < 2:
        raise ConfigError("parallel.virtual_pipeline: needs parallel.pipeline >= 2")
    if par.sequence_parallel and par.tensor < 2:
        raise ConfigError("parallel.sequence_parallel: needs parallel.tensor >= 2")
    train = cfg.train
    if train.micro_batch_size < 1 or train.global_batch_size < 1:
        raise ConfigError("train.micro_batch_size and train.global_batch_size must be >= 1")
    if (train.steps is None) == (train.tokens is None):
        raise ConfigError("train: set exactly one of train.steps and train.tokens")
    if train.steps is not None and train.steps < 1:
        raise ConfigError(f"train.steps={train.steps}: must be >= 1")
    sched = cfg.schedule
    if sched.warmup_steps is not None and sched.warmup_fraction is not None:
        raise ConfigError("schedule: set at most one of warmup_steps and warmup_fraction")
    if sched.warmup_fraction is not None and not 0 <= sched.warmup_fraction < 1:
        raise ConfigError(f"schedule.warmup_fraction={sched.warmup_fraction}: must be in [0, 1)")
    opt = cfg.optimizer
    if not 0 <= opt.min_lr <= opt.lr:
        raise ConfigError(f"optimizer.min_lr={opt.min_lr}: must be in [0, optimizer.lr={opt.lr}]")
    if cfg.data.weights is not None and len(cfg.data.weights) != len(cfg.data.paths):
        raise ConfigError(
            f"data.weights has {len(cfg.data.weights)} entries for {len(cfg.data.paths)} data.paths"
        )
    if cfg.data.seq_length < 1:
        raise ConfigError(f"data.seq_length={cfg.data.seq_length}: must be >= 1")
    if cfg.init.checkpoint is not None and not Path(cfg.init.checkpoint).exists():
        raise ConfigError(
            f"init.checkpoint={cfg.init.checkpoint!r}: no such checkpoint. Refusing to start from "
            "random weights; fix the path or remove init to train from scratch on purpose."
        )
    if cfg.init.verify_against is not None:
        if cfg.init.checkpoint is None:
            raise ConfigError("init.verify_against: needs init.checkpoint (the weights to verify)")
        if not (Path(cfg.init.verify_against) / "config.json").is_file():
            raise ConfigError(
                f"init.verify_against={cfg.init.verify_against!r}: no config.json there"
            )
        if par.virtual_pipeline is not None:
            raise ConfigError("init.verify_against: not available with parallel.virtual_pipeline")
    if world_size is not None:
        model_parallel = par.tensor * par.pipeline
        if world_size % model_parallel:
            raise ConfigError(
                f"parallel: tensor x pipeline = {model_parallel} does not divide the {world_size} processes"
            )
        data_parallel = world_size // model_parallel
        if train.global_batch_size % (train.micro_batch_size * data_parallel):
            raise ConfigError(
                f"train.global_batch_size={train.global_batch_size}: must be a multiple of "
                f"micro_batch_size x data-parallel size = {train.micro_batch_size} x {data_parallel}"
            )


# ----------------------------------------------------------------------------- derived numbers


@dataclass(frozen=True)
class Derived:
    """Numbers that follow from a config and the process count."""

    data_parallel: int
    micro_batches: int
    tokens_per_step: int
    steps: int
    warmup_steps: int


def derive(cfg: RecipeConfig, world_size: int) -> Derived:
    validate(cfg, world_size)
    par, train = cfg.parallel, cfg.train
    data_parallel = world_size // (par.tensor * par.pipeline)
    tokens_per_step = train.global_batch_size * cfg.data.seq_length
    steps = train.steps if train.steps is not None else math.ceil(train.tokens / tokens_per_step)
    if cfg.schedule.warmup_steps is not None:
        warmup = cfg.schedule.warmup_steps
    elif cfg.schedule.warmup_fraction is not None:
        warmup = round(cfg.schedule.warmup_fraction * steps)
    else:
        warmup = 0
    if warmup > steps:
        raise ConfigError(f"schedule.warmup_steps={warmup}: longer than the run ({steps} steps)")
    return Derived(
        data_parallel=data_parallel,
        micro_batches=train.global_batch_size // (train.micro_batch_size * data_parallel),
        tokens_per_step=tokens_per_step,
        steps=steps,
        warmup_steps=warmup,
    )


def summary(cfg: RecipeConfig, derived: Derived, world_size: int) -> str:
    """The resolved config and its derived numbers, as ``--dry-run`` prints them."""
    total_tokens = derived.steps * derived.tokens_per_step
    return (
        f"{to_yaml(cfg)}\n"
        f"# derived for {world_size} process(es)\n"
        f"data_parallel: {derived.data_parallel}\n"
        f"micro_batches_per_step: {derived.micro_batches}\n"
        f"tokens_per_step: {derived.tokens_per_step}\n"
        f"steps: {derived.steps}\n"
        f"warmup_steps: {derived.warmup_steps}\n"
        f"total_tokens: {total_tokens:.4g}\n"
    )


# ----------------------------------------------------------------------------- docs


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal after each field) of a dataclass."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = nxt.value.value
    return docs


def describe(cls: type = RecipeConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every leaf field, for ``specialize config``."""
    rows = []
    docs = field_docs(cls)
    defaults = cls()
    for f in fields(cls):
        value = getattr(defaults, f.name)
        if is_dataclass(value):
            rows += describe(type(value), f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", repr(value), docs.get(f.name, "")))
    return rows
