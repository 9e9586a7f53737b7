"""The typed config tree of a training run.

A recipe is YAML on top of these dataclasses: unknown keys are errors, every field carries a
docstring (shown by ``specialize config``), and ``validate`` checks what spans fields. A recipe may
name a parent with ``base: other.yaml`` (relative to itself) and override fields of it.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import json
import math
import os
import re
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, is_dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from base import spec as layer_specs
from base.long_context_config import LongContextConfig, LongContextError
from base.presets import PRESETS, QwenPreset, get_preset
from specialize.checkpoint.layout import iteration_dir  # stages name their final checkpoint

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
    """Layer implementation: ``te`` (Transformer Engine fused kernels), ``local`` (plain PyTorch), ``auto`` (te where there is CUDA and a Transformer Engine in megatron-core's version range that imports, else local). ``--dry-run`` and the run log show the choice and why; each checkpoint's ``lineage.json`` records it, and resuming where ``auto`` chooses otherwise is refused."""
    tokenizer: Optional[str] = None
    """Path to ``qwen.tiktoken`` or a directory holding it; default: the copy shipped in the ``dashscope`` package."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP blocks (the paper's general SFT uses 0.1)."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    recompute: str = "none"
    """Activation recomputation: ``none``, ``selective`` (core attention) or ``full`` (every layer). Under Flash Attention (the ``te`` spec) core attention keeps no ``s x s`` activations, so ``selective`` saves nothing there and only recomputes the attention forward."""
    gradient_accumulation_fusion: Optional[bool] = None
    """Accumulate weight gradients straight into DDP's fp32 ``main_grad`` inside the wgrad GEMM (Transformer Engine's fused wgrad for the layers, APEX's ``fused_weight_gradient_mlp_cuda`` for megatron-core's output layer, which 0.16.1 requires). Unset: on with the ``te`` spec when that APEX extension imports (as Megatron-Bridge's ``gradient_accumulation_fusion`` default), off otherwise; CPU runs never fuse."""
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
    long_context: LongContextConfig = field(default_factory=LongContextConfig)
    """Training-free long-context options (dynamic NTK RoPE, LogN attention, layer-wise windows), off by default; a checkpoint's inference uses its run's."""

    def resolved_spec(self, te_available: Optional[bool] = None) -> str:
        """``te`` or ``local``: ``spec`` on this machine (``te_available`` None) or on one with
        (True) or without (False) a usable Transformer Engine. Layers, data and plans follow
        this; ``spec`` itself is what was asked for."""
        return layer_specs.resolve_spec(self.spec, te_available)

    def check_long_context(self, num_layers: int) -> None:
        """Raise a ``ConfigError`` naming every invalid ``model.long_context`` field."""
        try:
            self.long_context.check(num_layers, where="model.long_context.")
        except LongContextError as e:
            raise ConfigError(str(e)) from None

    def architecture(self) -> QwenPreset:
        """The preset with this config's overrides applied (long-context options checked against it)."""
        preset = get_preset(self.preset)
        self.check_long_context(self.num_layers or preset.num_layers)
        overrides = {
            k: getattr(self, k) for k in ARCHITECTURE_FIELDS if getattr(self, k) is not None
        }
        changed = {k: v for k, v in overrides.items() if getattr(preset, k) != v}
        if not changed:
            return preset
        custom = dataclasses.replace(preset, name=f"{preset.name}+custom", **changed)
        # Overrides that rebuild another preset's shape (an imported qwen-nano under the default
        # qwen-tiny recipe) name that preset, not a custom model.
        shape = architecture_overrides(custom)
        return next(
            (p for p in PRESETS.values() if architecture_overrides(p) == shape),
            custom,
        )


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
    fp8_bf16_layers_at_start: Optional[int] = None
    """Transformer layers at the start of the model kept in BF16 under FP8 (megatron-core's ``num_layers_at_start_in_bf16``; at most the layers of one pipeline stage). Unset: 1 with ``tensorwise``, as Megatron-Bridge's ``bf16_with_fp8_current_scaling_mixed`` recipe; 0 with ``delayed``, which megatron-core cannot mix with BF16 layers."""
    fp8_bf16_layers_at_end: Optional[int] = None
    """Transformer layers at the end of the model kept in BF16 under FP8 (``num_layers_at_end_in_bf16``); unset: 1 with ``tensorwise``, 0 with ``delayed``, as ``fp8_bf16_layers_at_start``."""

    def fp8_bf16_layers(self) -> tuple[int, int]:
        """(first, last) transformer layers kept in BF16 under FP8; (0, 0) without FP8."""
        if self.dtype != "fp8":
            return 0, 0
        # NVIDIA-NeMo/Megatron-Bridge src/megatron/bridge/training/mixed_precision.py
        # bf16_with_fp8_current_scaling_mixed at 067f987df03b8355b03192d88d70f1709fedf51a:
        # first_last_layers_bf16 with 1 and 1 (only its throughput benchmarks turn it off).
        default = 1 if self.fp8_recipe == "tensorwise" else 0
        start, end = self.fp8_bf16_layers_at_start, self.fp8_bf16_layers_at_end
        return (default if start is None else start, default if end is None else end)


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
    overlap_grad_reduce: Optional[bool] = None
    """Overlap the data-parallel gradient reduce(-scatter) with the backward pass (megatron-core DDP, in 40M-parameter buckets); unset: on with CUDA (or when ``overlap_param_gather`` is set), off on CPU."""
    overlap_param_gather: Optional[bool] = None
    """Overlap the distributed optimizer's parameter all-gather with the next forward pass (needs ``distributed_optimizer`` and ``overlap_grad_reduce``); unset: on with CUDA and ``distributed_optimizer``, off otherwise."""
    tp_comm_overlap: bool = False
    """Overlap tensor-parallel communication with the GEMMs through Transformer Engine's userbuffers (``initialize_ub``; needs ``sequence_parallel`` and the ``te`` spec). Off by default: Megatron-Bridge's H100 recipes of 7-8B models run without it, and it has not been run on this project's layouts."""
    cuda_device_max_connections: Optional[int] = None
    """``CUDA_DEVICE_MAX_CONNECTIONS`` of the training processes, set before CUDA starts. Unset: 1 with CUDA and ``tensor`` > 1 (megatron-core relies on one hardware queue to start its tensor-parallel communication before the GEMM it overlaps; Blackwell no longer needs it), else left as the environment has it; a value in the environment wins over the unset default."""
    expandable_segments: Optional[bool] = None
    """Add ``expandable_segments:True`` to ``PYTORCH_CUDA_ALLOC_CONF`` before CUDA starts (less fragmentation with changing activation sizes); unset: on with CUDA unless the environment's ``PYTORCH_CUDA_ALLOC_CONF`` already sets it."""
    reshardable_optimizer_state: Optional[bool] = None
    """Save the distributed optimizer's state in megatron-core's ``fully_reshardable`` format (any TP/PP/DP resumes it; the save gathers it on each data-parallel rank 0, and every rank's load holds its TP/PP shard's whole fp32 state in host memory, 12 bytes per parameter / (TP x PP)) instead of ``dp_reshardable`` (each rank saves and loads only its own shard; only the data-parallel size may change). Unset: fully reshardable for a run's final checkpoint, which other runs and stages load, dp_reshardable for the checkpoints before it, which this run resumes."""


@dataclass
class DataConfig:
    format: str = "pretrain"
    """pretrain: documents cut into seq_length windows (GPTDataset); sft: prepared chat samples with loss masks (specialize data prepare-sft)."""
    paths: list[str] = field(default_factory=list)
    """Directories written by ``specialize data prepare`` (``manifest.json`` + shards), or bare Megatron prefixes (``.bin``/``.idx`` without the suffix)."""
    weights: Optional[list[float]] = None
    """Blend weights, one per path, each split over a directory's shards by tokens (default: proportional to tokens)."""
    split: str = "98,2,0"
    """Train/validation/test split of the documents, as ratios."""
    seq_length: int = 2048
    """Tokens per training sequence (the paper: 2048 base pretraining, 8192 Code-Qwen)."""
    cache_dir: Optional[str] = None
    """Where GPTDataset writes its sample indices, in a subdirectory named after the data's manifests (default: ``<checkpoint.dir>/data_cache``)."""
    reset_position_ids: bool = False
    """Restart position ids after each end-of-document token."""
    reset_attention_mask: bool = False
    """Stop attention across end-of-document tokens (block-diagonal causal mask)."""
    eod_mask_loss: bool = False
    """Exclude end-of-document tokens from the loss."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    allow_changed: bool = False
    """Resume although a ``data.paths`` directory changed since the checkpoint was written (its ``manifest.json`` hash, as the checkpoint's ``lineage.json`` records it): warn and train on the new data. Default: refuse, saying which path changed."""


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
    """Warmup length in steps; exclusive with ``warmup_fraction``."""
    warmup_fraction: Optional[float] = None
    """Warmup as a fraction of the run's steps (the paper: 3% for Code-Qwen)."""
    warmup_shape: str = "linear"
    """Warmup from 0 to ``optimizer.lr``: ``linear`` (megatron-core's) or ``cosine`` (half cosine,
    the paper's Code-Qwen-Chat SFT)."""
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
    supervised_logits_only: bool = True
    """SFT data: the output layer and the loss run only at the positions the loss mask keeps, so
    masked system and user turns cost no vocabulary-wide logits; the loss and the gradients are
    those of every position (a masked one adds exact zeros). Not under
    ``parallel.sequence_parallel``, where each rank holds other positions: then every position."""
    chunked_cross_entropy: Optional[bool] = None
    """Compute the output layer and the cross entropy together, ``cross_entropy_chunk_tokens``
    tokens at a time, never holding a micro-batch's full-vocabulary logits
    (``specialize/train/linear_cross_entropy.py``); the per-token losses and gradients are the
    unfused path's. None: on where megatron-core's fused cross entropy is not used (the CPU path;
    on GPUs ``cross_entropy_loss_fusion`` is on and takes this role)."""
    cross_entropy_chunk_tokens: int = 64
    """Tokens per chunk of ``chunked_cross_entropy``: the fp32 logits held at once are this times
    the vocabulary slice of the rank (64 x 151,936 x 4 bytes = 39 MB at TP=1). Smaller chunks
    stay in cache between the passes over them; larger ones make fewer, larger matmuls
    (BENCHMARKS.md: 32 to 64 fastest on a 2-core CPU, 512 and over slower than unfused)."""
    exit_after_steps: Optional[int] = None
    """Stop (after checkpointing) once this step is reached, without changing the schedule; for staged runs and tests."""
    spike_factor: float = 10.0
    """Stop the run, without saving, when a step's loss or gradient norm exceeds this many times its mean over the previous ``spike_window`` steps, or when a step multiplies (or divides) the norm of the weights by more than this; 0 disables. Loss and gradient norm are checked once the window holds min(5, spike_window) steps of this launch, so the volatile first steps of a run (and of a resume) are not compared against a mean of one or two; non-finite values always stop the run."""
    spike_window: int = 20
    """Steps in the running mean that ``spike_factor`` compares the loss and gradient norm with."""


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
class StageResetConfig:
    optimizer: bool = True
    """Start with a fresh AdamW (false: also load the init checkpoint's moments and step counts; the stage's own betas, eps, LR and weight decay still apply)."""
    scheduler: bool = True
    """Start this stage's LR schedule at step 0, with its own warmup (false: continue at the init checkpoint's schedule position; needs optimizer and iteration false too)."""
    iteration: bool = True
    """Count this stage's steps from 0 (false: continue the init checkpoint's iteration and consumed samples, and its schedule position: the stage ends at that iteration plus its own length)."""


@dataclass
class StageConfig:
    name: str = ""
    """Stage name (required, unique; letters, digits, ``.``, ``_``, ``-``); its run directory is ``<checkpoint.dir>/stages/<position>-<name>``."""
    data: dict[str, Any] = field(default_factory=dict)
    """Overrides of ``data.*`` for this stage, field by field (e.g. ``{paths: [data/sft-2]}``); the rest keeps the recipe's values."""
    optimizer: dict[str, Any] = field(default_factory=dict)
    """Overrides of ``optimizer.*`` for this stage (e.g. ``{lr: 1.0e-5, min_lr: 1.0e-5}``)."""
    schedule: dict[str, Any] = field(default_factory=dict)
    """Overrides of ``schedule.*`` for this stage; setting one of warmup_steps/warmup_fraction replaces the other."""
    train: dict[str, Any] = field(default_factory=dict)
    """Overrides of ``train.*`` for this stage; setting one of steps/tokens replaces the other."""
    epochs: Optional[float] = None
    """Stage length in passes over its SFT data: ceil(epochs x sequences / train.global_batch_size), sequences summed over the ``manifest.json`` of each ``data.paths`` directory; exclusive with ``train.steps``/``train.tokens``."""
    reset: StageResetConfig = field(default_factory=StageResetConfig)
    """What starts fresh. Default: everything; only the weights come from the previous stage's final checkpoint (stage 1: from ``init``)."""


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
    stages: list[StageConfig] = field(default_factory=list)
    """Stages run in order by one ``specialize train`` (empty: the recipe is one stage). Each starts from its predecessor's final checkpoint and may override data, optimizer, schedule and train."""


CHOICES = {
    "model.spec": ("auto", "te", "local"),
    "model.recompute": ("none", "selective", "full"),
    "precision.dtype": ("fp32", "bf16", "fp8"),
    "precision.fp8_format": ("hybrid", "e4m3"),
    "precision.fp8_recipe": ("delayed", "tensorwise"),
    "precision.fp8_amax_compute_algo": ("max", "most_recent"),
    "parallel.backend": ("auto", "nccl", "gloo"),
    "data.format": ("pretrain", "sft"),
    "schedule.decay": ("constant", "cosine", "linear"),
    "schedule.warmup_shape": ("linear", "cosine"),
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


# Runs saved before ``model.long_context`` existed keep these options flat in ``model`` in their
# ``config.yaml`` (which the checkpoint's inference reads and a recipe may name as its base), and
# older recipes and command lines name them so: they are read at their new place.
MOVED_KEYS = {f"model.{f.name}": f"model.long_context.{f.name}" for f in fields(LongContextConfig)}


def _normalize_shorthands(node: DictConfig) -> None:
    """``init: PATH`` is shorthand for ``init: {checkpoint: PATH}`` (also for ``init: ???``);
    ``model.rope_scaling`` and the other keys of ``MOVED_KEYS`` are ``model.long_context.*``."""
    if OmegaConf.is_missing(node, "init"):  # `"init" in node` is False for a ??? value
        node.init = {"checkpoint": "???"}
    elif "init" in node and (node.init is None or isinstance(node.init, str)):
        node.init = {"checkpoint": node.init}
    if "model" in node and isinstance(node.model, DictConfig):
        _move_long_context_keys(node)


def _move_long_context_keys(node: DictConfig) -> None:
    raw = OmegaConf.to_container(node.model, resolve=False)  # keeps ??? and ${...} as written
    flat = [key for key in raw if f"model.{key}" in MOVED_KEYS]
    if not flat:
        return
    section = raw.get("long_context") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"model.long_context: must be a mapping, not {section!r}")
    for key in flat:
        if key in section:
            raise ConfigError(f"model.{key}: also set as model.long_context.{key}; keep only that")
        section[key] = raw.pop(key)
    node.model = {**raw, "long_context": section}


def _merge(schema: DictConfig, node: Any, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(schema, node)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        reason = str(e).splitlines()[0]
        raise ConfigError(f"{where}: {key + ': ' if key else ''}{reason}") from None


def _parse_override(item: str, key: str, value: str) -> DictConfig:
    """``key=value`` as a config node; a value YAML cannot read is an error naming the override."""
    try:
        return OmegaConf.from_dotlist([f"{key}={value}"])
    except yaml.YAMLError as e:
        where = getattr(e, "context", None)
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        reason = f"{where}: {what}" if where else what
    except OmegaConfBaseException as e:
        reason = str(e).splitlines()[0]
    raise ConfigError(
        f"override {item!r}: cannot read the value {value!r} ({reason}); a list is written "
        "[a,b], a string starting with [ or { needs quotes"
    )


def load_config(
    path: str | os.PathLike | None, overrides: list[str] = (), require_paths: bool = True
) -> RecipeConfig:
    """Build a validated ``RecipeConfig`` from a recipe file plus ``key=value`` overrides.

    A recipe value ``???`` marks a field the user must give (e.g. ``init: {checkpoint: ???}``);
    leaving it unset is an error naming the field. ``require_paths=False`` accepts an init
    checkpoint that does not exist yet (``missing_paths`` lists it), for planning a run.
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
        key = MOVED_KEYS.get(key, key)
        if _STAGE_ITEM.match(key):
            _update_stage(cfg, key, value, item)
            continue
        cfg = _merge(cfg, _parse_override(item, key, value), f"override {item!r}")
    try:
        OmegaConf.resolve(cfg)  # e.g. an interpolation ${...} that names no field
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"{key or path}: {str(e).splitlines()[0]}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        given = " ".join("init=PATH" if k == "init.checkpoint" else f"{k}=VALUE" for k in missing)
        raise ConfigError(
            f"{', '.join(missing)}: required by {path} (left as ???); give {given} on the "
            "command line"
        )
    recipe: RecipeConfig = OmegaConf.to_object(cfg)
    try:
        validate(recipe)
    except ConfigError as e:
        if path is not None and str(e).startswith("stages["):  # say which file declares the stage
            raise ConfigError(f"{path}: {e}") from None
        raise
    if require_paths:
        check_paths(recipe)
    return recipe


# ``stages[1].train.steps=3`` or ``stages.1.train.steps=3``: a field of one list element, which a
# dotlist merge cannot address (it would build a mapping with key "1").
_STAGE_ITEM = re.compile(r"^stages(\[\d+\]|\.\d+)")


def _update_stage(cfg: DictConfig, key: str, value: str, item: str) -> None:
    index = int(re.findall(r"\d+", key)[0])
    if index >= len(cfg.stages):
        raise ConfigError(
            f"override {item!r}: no stages[{index}]; the recipe declares {len(cfg.stages)} stage(s)"
        )
    parsed = _parse_override(item, "value", value)["value"]
    try:
        OmegaConf.update(cfg, key, parsed, merge=True)
    except (OmegaConfBaseException, IndexError) as e:
        reason = str(e).splitlines()[0]
        raise ConfigError(f"override {item!r}: {reason}") from None


def to_yaml(cfg: RecipeConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def saved_long_context(config_file: str | os.PathLike) -> LongContextConfig:
    """``model.long_context`` of a run's saved ``config.yaml`` (an older run's flat ``model.*``
    keys included), its ``train_seq_length`` defaulting to the run's ``data.seq_length``. Only
    this section is read, so a run saved by an older version still tells its options."""
    try:
        node = OmegaConf.load(config_file)
    except Exception as e:  # yaml.YAMLError carries the line
        raise ConfigError(f"{config_file}: not valid YAML: {e}") from e
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{config_file}: a run config must be a mapping")
    _normalize_shorthands(node)
    section = {"model": {"long_context": OmegaConf.select(node, "model.long_context") or {}}}
    schema = OmegaConf.create({"model": {"long_context": OmegaConf.structured(LongContextConfig)}})
    merged = _merge(schema, section, str(config_file))  # errors name model.long_context.<field>
    options: LongContextConfig = OmegaConf.to_object(merged.model.long_context)
    seq_length = OmegaConf.select(node, "data.seq_length", default=None)
    return options if seq_length is None else options.resolved(seq_length)


# ----------------------------------------------------------------------------- validation


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def missing_paths(cfg: RecipeConfig) -> dict[str, str]:
    """The files a recipe names that are not there: dotted field -> error message."""
    problems = {}
    if cfg.init.checkpoint is not None and not Path(cfg.init.checkpoint).exists():
        problems["init.checkpoint"] = (
            f"init.checkpoint={cfg.init.checkpoint!r}: no such checkpoint. Refusing to start from "
            "random weights; fix the path or remove init to train from scratch on purpose."
        )
    if cfg.init.verify_against is not None:
        if not (Path(cfg.init.verify_against) / "config.json").is_file():
            problems["init.verify_against"] = (
                f"init.verify_against={cfg.init.verify_against!r}: no config.json there"
            )
    return problems


def check_paths(cfg: RecipeConfig) -> None:
    """The files a recipe names must exist: above all the init checkpoint (never a silent random
    init). Separate from ``validate`` because a later stage's init is written by the stage before,
    and a dry run plans a run whose init is yet to be imported."""
    problems = missing_paths(cfg)
    if problems:
        raise ConfigError(next(iter(problems.values())))


def missing_lines(cfg: RecipeConfig, indent: str = "") -> list[str]:
    """``--dry-run`` lines marking the paths the run will need but that do not exist yet."""
    return [
        f"{indent}# MISSING {key}={_get(cfg, key)}: does not exist yet; the run refuses to start "
        "until it does"
        for key in missing_paths(cfg)
    ]


def check_machine(cfg: RecipeConfig, planning: bool = False) -> None:
    """What this machine must offer the run.

    ``model.spec=auto`` means this machine's layers, so FP8 with an ``auto`` spec that resolves to
    ``local`` here is refused also when only planning (``--dry-run``). An explicit
    ``model.spec=te`` may be planned anywhere (a GPU recipe on a laptop) and is checked when the
    run starts."""
    if cfg.model.spec == "local" or (planning and cfg.model.spec == "te"):
        return  # local runs anywhere; FP8 with local is refused by validate
    problem = layer_specs.why_not_te()
    if problem is None:
        return
    if cfg.model.spec == "te":
        raise ConfigError(
            f"model.spec=te: Transformer Engine is not usable on this machine ({problem}); use "
            "model.spec=local or auto"
        )
    if cfg.precision.dtype == "fp8":
        raise ConfigError(
            "precision.dtype=fp8: needs Transformer Engine on CUDA; model.spec=auto resolves to "
            f"local on this machine ({problem}); use bf16 or fp32 here"
        )


def spec_note(cfg: RecipeConfig) -> str:
    """The layer spec a run of ``cfg`` uses here, and why, for ``--dry-run`` and the run log."""
    spec = cfg.model.resolved_spec()
    if cfg.model.spec != "auto":
        return spec
    why = layer_specs.why_not_te()
    return f"{spec} (model.spec=auto{'; Transformer Engine not used: ' + why if why else ''})"


def _packed_sft_paths(data: DataConfig) -> list[str]:
    """The ``data.paths`` whose SFT manifest says they were prepared with ``--pack`` (paths not
    written yet, or not SFT data, are left to the data loader to report)."""
    packed = []
    for path in data.paths:
        try:
            manifest = json.loads((Path(path) / "manifest.json").read_text())
        except (OSError, ValueError):
            continue
        options = manifest.get("options") if isinstance(manifest, dict) else None
        if isinstance(options, dict) and options.get("pack"):
            packed.append(path)
    return packed


def _check_thd_batches(cfg: RecipeConfig) -> None:
    """With the te spec, packed SFT sequences and documents under ``data.reset_attention_mask``
    are kept apart by THD ``PackedSeqParams`` (TE's causal attention ignores a dense mask), and a
    THD micro-batch holds one sequence."""
    if cfg.model.resolved_spec() != "te" or cfg.train.micro_batch_size == 1:
        return
    spec = "model.spec=te" if cfg.model.spec == "te" else "model.spec=auto (te on this machine)"
    mbs = f"train.micro_batch_size={cfg.train.micro_batch_size}"
    if cfg.data.format == "pretrain" and cfg.data.reset_attention_mask:
        raise ConfigError(
            f"{mbs}: data.reset_attention_mask with {spec} keeps documents apart in the THD "
            "layout, one sequence per micro-batch; set it to 1 (raise global_batch_size instead)"
        )
    packed = _packed_sft_paths(cfg.data) if cfg.data.format == "sft" else []
    if packed:
        raise ConfigError(
            f"{mbs}: packed SFT data ({packed[0]}) with {spec} keeps samples apart in the THD "
            "layout, one packed sequence per micro-batch; set it to 1"
        )


def check_sft_micro_batch(spec: str, data_format: str, micro_batch_size: int) -> None:
    """Packed SFT with the te spec feeds TE's THD attention one packed sequence per micro-batch."""
    if data_format == "sft" and spec == "te" and micro_batch_size != 1:
        raise ConfigError(
            f"train.micro_batch_size={micro_batch_size}: packed SFT with the te spec uses the THD "
            "layout, one packed sequence per micro-batch; set it to 1"
        )


def check_layout(
    preset: QwenPreset,
    *,
    tensor: int,
    pipeline: int,
    virtual_pipeline: Optional[int],
    sequence_parallel: bool,
    micro_batch_size: int,
    global_batch_size: int,
    seq_length: int,
    spec: str,
    dtype: str,
    data_format: str,
    world_size: Optional[int] = None,
) -> None:
    """The rules a parallel layout must follow, for ``validate`` and ``specialize plan`` alike.

    Both call this one function, so the planner only recommends layouts the trainer accepts.
    ``spec`` is the layer spec the run builds: ``te`` or ``local``, or ``auto`` when the machine is
    not known yet (then only the rules that hold for both apply). ``world_size`` adds the checks
    that need the process count."""
    if dtype == "fp8" and spec == "local":
        raise ConfigError(
            "precision.dtype=fp8: needs the Transformer Engine layer spec on CUDA (model.spec=te "
            "or auto); model.spec=local has no FP8 GEMMs"
        )
    for key, size in (("tensor", tensor), ("pipeline", pipeline)):
        if size < 1:
            raise ConfigError(f"parallel.{key}={size}: must be >= 1")
    if preset.num_attention_heads % tensor:
        raise ConfigError(
            f"parallel.tensor={tensor}: must divide the {preset.num_attention_heads} attention "
            f"heads of {preset.name}"
        )
    if preset.query_groups % tensor:
        raise ConfigError(
            f"parallel.tensor={tensor}: must divide the {preset.query_groups} key/value heads of "
            f"{preset.name}"
        )
    if preset.ffn_hidden_size % tensor:
        raise ConfigError(
            f"parallel.tensor={tensor}: must divide ffn_hidden_size={preset.ffn_hidden_size} of "
            f"{preset.name}"
        )
    if preset.num_layers % (pipeline * (virtual_pipeline or 1)):
        raise ConfigError(
            f"parallel.pipeline={pipeline}"
            + (f" x virtual_pipeline={virtual_pipeline}" if virtual_pipeline else "")
            + f": must divide the {preset.num_layers} layers of {preset.name}"
        )
    if virtual_pipeline is not None and pipeline < 2:
        raise ConfigError("parallel.virtual_pipeline: needs parallel.pipeline >= 2")
    if sequence_parallel:
        if tensor < 2:
            raise ConfigError("parallel.sequence_parallel: needs parallel.tensor >= 2")
        if spec == "local":  # megatron-core's torch RMSNorm asserts it is not sequence-parallel
            raise ConfigError("parallel.sequence_parallel: needs the te spec, not model.spec=local")
        if seq_length % tensor:  # the embedding output is split along the sequence
            raise ConfigError(
                f"parallel.sequence_parallel: data.seq_length={seq_length} must be a multiple of "
                f"parallel.tensor={tensor}"
            )
    if micro_batch_size < 1 or global_batch_size < 1:
        raise ConfigError("train.micro_batch_size and train.global_batch_size must be >= 1")
    check_sft_micro_batch(spec, data_format, micro_batch_size)
    if world_size is None:
        return
    model_parallel = tensor * pipeline
    if world_size % model_parallel:
        raise ConfigError(
            f"parallel: tensor x pipeline = {model_parallel} does not divide the {world_size} "
            "processes"
        )
    data_parallel = world_size // model_parallel
    if global_batch_size % (micro_batch_size * data_parallel):
        raise ConfigError(
            f"train.global_batch_size={global_batch_size}: must be a multiple of "
            f"micro_batch_size x data-parallel size = {micro_batch_size} x {data_parallel}"
        )
    micro_batches = global_batch_size // (micro_batch_size * data_parallel)
    # megatron-core's interleaved schedule runs micro-batches in groups of PP (its default
    # microbatch_group_size_per_vp_stage) and raises unless the groups come out whole.
    if virtual_pipeline is not None and micro_batches % pipeline:
        raise ConfigError(
            f"parallel.virtual_pipeline: needs micro-batches per step ({micro_batches} = "
            f"global_batch_size / (micro_batch_size x data-parallel size)) to be a multiple of "
            f"parallel.pipeline={pipeline}"
        )


def validate(cfg: RecipeConfig, world_size: Optional[int] = None) -> None:
    """Checks that span fields. ``world_size`` adds the checks that need the process count.

    A staged recipe is checked stage by stage (each stage's sections merged over the recipe's);
    errors in a stage's sections name it, e.g. ``stages[1].optimizer.min_lr``."""
    if cfg.stages:
        _validate_stages(cfg, world_size)
        return
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
    windows = cfg.model.long_context.layer_windows
    if windows and (cfg.data.format == "sft" or cfg.data.reset_attention_mask):
        # A window layer builds its own sliding-window causal mask and would drop the per-document
        # mask, letting packed samples attend to each other.
        raise ConfigError(
            "model.long_context.layer_windows: window attention cannot be combined with per-document attention "
            f"masks (data.format={cfg.data.format}, data.reset_attention_mask="
            f"{cfg.data.reset_attention_mask}); windows are an inference option for long prompts"
        )
    _check_thd_batches(cfg)
    par, train = cfg.parallel, cfg.train
    check_layout(
        preset,
        tensor=par.tensor,
        pipeline=par.pipeline,
        virtual_pipeline=par.virtual_pipeline,
        sequence_parallel=par.sequence_parallel,
        micro_batch_size=train.micro_batch_size,
        global_batch_size=train.global_batch_size,
        seq_length=cfg.data.seq_length,
        spec=cfg.model.spec,
        dtype=cfg.precision.dtype,
        data_format=cfg.data.format,
        world_size=world_size,
    )
    _validate_throughput(cfg, preset.num_layers)
    if (train.steps is None) == (train.tokens is None):
        raise ConfigError("train: set exactly one of train.steps and train.tokens")
    if train.steps is not None and train.steps < 1:
        raise ConfigError(f"train.steps={train.steps}: must be >= 1")
    if not train.spike_factor >= 0:
        raise ConfigError(f"train.spike_factor={train.spike_factor}: must be >= 0 (0 disables)")
    if train.spike_factor and train.spike_factor <= 1:
        raise ConfigError(
            f"train.spike_factor={train.spike_factor}: must be > 1 (a multiple of the running "
            "mean), or 0 to disable the check"
        )
    if train.spike_window < 1:
        raise ConfigError(f"train.spike_window={train.spike_window}: must be >= 1")
    if train.cross_entropy_chunk_tokens < 1:
        raise ConfigError(
            f"train.cross_entropy_chunk_tokens={train.cross_entropy_chunk_tokens}: must be >= 1"
        )
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
    if cfg.init.verify_against is not None:
        if cfg.init.checkpoint is None:
            raise ConfigError("init.verify_against: needs init.checkpoint (the weights to verify)")
        if par.virtual_pipeline is not None:
            raise ConfigError("init.verify_against: not available with parallel.virtual_pipeline")


def _validate_throughput(cfg: RecipeConfig, num_layers: int) -> None:
    """The GPU-path settings (overlaps, fusions, FP8 BF16 layers) that contradict the recipe."""
    par = cfg.parallel
    if par.overlap_param_gather and not par.distributed_optimizer:
        raise ConfigError(
            "parallel.overlap_param_gather: needs parallel.distributed_optimizer (the gather it "
            "overlaps is the distributed optimizer's)"
        )
    if par.overlap_param_gather and par.overlap_grad_reduce is False:
        raise ConfigError(
            "parallel.overlap_param_gather: needs parallel.overlap_grad_reduce (megatron-core "
            "overlaps the parameter gather only together with the gradient reduce)"
        )
    if par.tp_comm_overlap and cfg.model.spec == "local":
        raise ConfigError(
            "parallel.tp_comm_overlap: needs Transformer Engine's userbuffers (model.spec=te)"
        )
    if par.tp_comm_overlap and not par.sequence_parallel:
        raise ConfigError(
            "parallel.tp_comm_overlap: needs parallel.sequence_parallel (it overlaps the "
            "sequence-parallel all-gathers and reduce-scatters)"
        )
    if par.cuda_device_max_connections is not None and par.cuda_device_max_connections < 1:
        raise ConfigError(
            f"parallel.cuda_device_max_connections={par.cuda_device_max_connections}: must be >= 1"
        )
    if cfg.model.gradient_accumulation_fusion and cfg.model.spec == "local":
        raise ConfigError(
            "model.gradient_accumulation_fusion: needs the Transformer Engine layers on CUDA "
            "(model.spec=te or auto)"
        )
    prec = cfg.precision
    per_stage = num_layers // par.pipeline
    for name, value in zip(
        ("fp8_bf16_layers_at_start", "fp8_bf16_layers_at_end"), prec.fp8_bf16_layers()
    ):
        if value and prec.fp8_recipe == "delayed":
            raise ConfigError(
                f"precision.{name}={value}: delayed scaling cannot keep layers in BF16 "
                "(megatron-core refuses it); use precision.fp8_recipe=tensorwise or 0"
            )
        if not 0 <= value <= per_stage:
            raise ConfigError(
                f"precision.{name}={value}: must be between 0 and the {per_stage} layers of a "
                "pipeline stage"
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


def _steps_of(cfg: RecipeConfig) -> int:
    """The run's last step: ``train.steps``, or the token budget in whole steps."""
    train = cfg.train
    if train.steps is not None:
        return train.steps
    return math.ceil(train.tokens / (train.global_batch_size * cfg.data.seq_length))


def derive(cfg: RecipeConfig, world_size: int) -> Derived:
    if cfg.stages:
        raise ConfigError(
            "stages: a staged recipe has no single step count; derive each of resolve_stages(cfg)"
        )
    validate(cfg, world_size)
    par, train = cfg.parallel, cfg.train
    data_parallel = world_size // (par.tensor * par.pipeline)
    tokens_per_step = train.global_batch_size * cfg.data.seq_length
    steps = _steps_of(cfg)
    if cfg.schedule.warmup_steps is not None:
        warmup = cfg.schedule.warmup_steps
    elif cfg.schedule.warmup_fraction is not None:
        warmup = round(cfg.schedule.warmup_fraction * steps)
    else:
        warmup = 0
    if warmup >= steps:  # megatron's scheduler needs fewer warmup than decay steps
        raise ConfigError(
            f"schedule.warmup_steps={warmup}: must be shorter than the run ({steps} steps)"
        )
    return Derived(
        data_parallel=data_parallel,
        micro_batches=train.global_batch_size // (train.micro_batch_size * data_parallel),
        tokens_per_step=tokens_per_step,
        steps=steps,
        warmup_steps=warmup,
    )


# ----------------------------------------------------------------------------- stages

STAGE_SECTIONS = ("data", "optimizer", "schedule", "train")
# Fields that say one thing together: a stage that sets one of them replaces the others.
_ALTERNATIVES = {"train": ("steps", "tokens"), "schedule": ("warmup_steps", "warmup_fraction")}
_STAGE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass
class Stage:
    """One stage of a recipe, resolved: the recipe it runs and how it starts."""

    index: int
    """Position in the recipe, from 1."""
    count: int
    """Number of stages in the recipe."""
    name: str
    """The stage's declared name."""
    cfg: RecipeConfig
    """The resolved recipe (no stages): its own checkpoint.dir and init, and train.steps set when
    the length came from epochs or the stage continues its predecessor's step count."""
    reset: StageResetConfig
    """What the stage does not take from its init checkpoint."""
    start_step: int
    """Iteration the stage starts at: 0, or its predecessor's last when it continues it."""
    steps: int
    """Its last iteration (the final checkpoint is ``iter_<steps>``)."""
    length: str
    """Where its length comes from, for ``--dry-run``."""

    @property
    def label(self) -> str:
        return f"stage {self.index}/{self.count} '{self.name}'"

    @property
    def final_checkpoint(self) -> Path:
        return iteration_dir(self.cfg.checkpoint.dir, self.steps)

    def derive(self, world_size: int) -> Derived:
        with self.errors():
            return derive(self.cfg, world_size)

    def errors(self) -> typing.ContextManager[None]:
        """Report errors in this stage's sections as ``stages[i].<field>: ...``."""
        return _stage_errors(self.index - 1)


@contextmanager
def _stage_errors(index: int) -> Iterator[None]:
    """Report an error in a stage's merged sections as ``stages[i].<field>: ...``; errors about
    the shared sections (model, parallel, ...) stay as they are."""
    try:
        yield
    except ConfigError as e:
        message = str(e)
        if re.split(r"[.:=\s]", message, maxsplit=1)[0] in STAGE_SECTIONS:
            raise ConfigError(f"stages[{index}].{message}") from None
        raise


def _merge_stage(cfg: RecipeConfig, index: int) -> RecipeConfig:
    """The recipe with stage ``index``'s sections merged over its own, field by field."""
    stage = cfg.stages[index]
    merged = copy.deepcopy(cfg)
    merged.stages = []
    for section in STAGE_SECTIONS:
        override = dict(getattr(stage, section))
        if not override:
            continue
        alternatives = _ALTERNATIVES.get(section, ())
        if any(override.get(key) is not None for key in alternatives):
            for key in alternatives:
                override.setdefault(key, None)
        try:
            node = OmegaConf.merge(OmegaConf.structured(getattr(cfg, section)), override)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None)
            reason = str(e).splitlines()[0]
            raise ConfigError(
                f"stages[{index}].{section}{'.' + key if key else ''}: {reason}"
            ) from None
        setattr(merged, section, OmegaConf.to_object(node))
    if stage.epochs is not None:
        merged.train.steps = merged.train.tokens = None  # the length comes from the data
    return merged


def _check_stage_declarations(cfg: RecipeConfig) -> None:
    """Names, resets and lengths of the declared stages (what needs no merging)."""
    seen: dict[str, int] = {}
    for i, stage in enumerate(cfg.stages):
        where = f"stages[{i}]"
        if not stage.name:
            raise ConfigError(f"{where}.name: required (it names the stage's run directory)")
        if not _STAGE_NAME.match(stage.name):
            raise ConfigError(
                f"{where}.name={stage.name!r}: use letters, digits, '.', '_' and '-' only"
            )
        if stage.name in seen:
            raise ConfigError(
                f"{where}.name={stage.name!r}: already the name of stages[{seen[stage.name]}]"
            )
        seen[stage.name] = i
        reset = stage.reset
        if reset.scheduler != reset.iteration:
            raise ConfigError(
                f"{where}.reset: scheduler={str(reset.scheduler).lower()} with "
                f"iteration={str(reset.iteration).lower()}; the schedule position and the step "
                "count are kept or reset together (the schedule is counted in the stage's steps)"
            )
        if not reset.scheduler and reset.optimizer:
            raise ConfigError(
                f"{where}.reset: scheduler=false needs optimizer=false; continuing the schedule "
                "skips warmup, which fresh AdamW moments need"
            )
        if i == 0 and not reset.iteration:
            raise ConfigError(
                f"{where}.reset: only a later stage can continue its predecessor's schedule and "
                "step count; the first stage starts from init (reset.optimizer=false keeps "
                "init's optimizer state)"
            )
        if i == 0 and not reset.optimizer and cfg.init.checkpoint is None:
            raise ConfigError(
                f"{where}.reset.optimizer=false: there is no optimizer state to keep; the first "
                "stage starts from init.checkpoint, which is not set"
            )
        if stage.epochs is not None:
            if stage.epochs <= 0:
                raise ConfigError(f"{where}.epochs={stage.epochs}: must be > 0")
            given = [k for k in ("steps", "tokens") if stage.train.get(k) is not None]
            if given:
                raise ConfigError(
                    f"{where}.epochs: exclusive with {where}.train.{given[0]}; set one length"
                )


def _validate_stages(cfg: RecipeConfig, world_size: Optional[int]) -> None:
    _check_stage_declarations(cfg)
    for i, stage in enumerate(cfg.stages):
        merged = _merge_stage(cfg, i)
        if stage.epochs is not None:
            merged.train.steps = 1  # stands in until the data is counted (resolve_stages)
        elif merged.train.steps is None and merged.train.tokens is None:
            raise ConfigError(
                f"stages[{i}]: no length; set stages[{i}].train.steps, train.tokens or epochs "
                "(or train.steps/train.tokens for every stage at the top level)"
            )
        with _stage_errors(i):
            validate(merged, world_size)
        if stage.epochs is not None and merged.data.format != "sft":
            raise ConfigError(
                f"stages[{i}].epochs: needs data.format=sft; pretraining data is measured in "
                f"tokens, so set stages[{i}].train.steps or train.tokens"
            )


def _sft_sequences(data: DataConfig, where: str) -> int:
    """Training sequences in the prepared SFT directories of ``data.paths``."""
    if not data.paths:
        raise ConfigError(f"{where}: needs data.paths to count sequences in")
    total = 0
    for path in data.paths:
        manifest_file = Path(path) / "manifest.json"
        if not manifest_file.is_file():
            raise ConfigError(
                f"{where}: {path} has no manifest.json to count sequences in; prepare it with "
                "`specialize data prepare-sft`"
            )
        manifest = json.loads(manifest_file.read_text())
        if "sequences" not in manifest:
            raise ConfigError(
                f"{where}: {path} is pretraining data (its manifest counts documents and tokens, "
                "not sequences); give the stage's length as train.steps or train.tokens"
            )
        total += int(manifest["sequences"])
    return total


def resolve_stages(cfg: RecipeConfig) -> list[Stage]:
    """The stages of a recipe, each a full recipe of its own, in order.

    Stage i runs in ``<checkpoint.dir>/stages/<i>-<name>``; stage 1 starts from the recipe's
    ``init``, stage k > 1 from stage k-1's final checkpoint (which need not exist yet). Lengths
    given as epochs are counted from the data's manifests here.
    """
    validate(cfg)
    stages: list[Stage] = []
    for i, declared in enumerate(cfg.stages):
        where = f"stages[{i}]"
        merged = _merge_stage(cfg, i)
        train = merged.train
        previous = stages[-1] if stages else None
        if declared.epochs is not None:
            sequences = _sft_sequences(merged.data, f"{where}.epochs")
            # Exact decimal arithmetic: 0.3 epochs of 10 sequences is 3 steps, not 4.
            exact = Fraction(repr(declared.epochs)) * sequences / train.global_batch_size
            own = math.ceil(exact)
            if own < 1:
                raise ConfigError(
                    f"{where}.epochs={declared.epochs}: no steps ({sequences} sequences)"
                )
            length = (
                f"epochs: {declared.epochs:g} x {sequences} sequences / "
                f"{train.global_batch_size} per step"
            )
        elif train.steps is not None:
            own, length = train.steps, "train.steps"
        else:
            own = _steps_of(merged)
            length = (
                f"train.tokens: {train.tokens:.4g} / "
                f"{train.global_batch_size * merged.data.seq_length} per step"
            )
        start = previous.steps if previous is not None and not declared.reset.iteration else 0
        if start or declared.epochs is not None:
            train.steps, train.tokens = start + own, None
        merged.name = f"{cfg.name}/{declared.name}"
        merged.checkpoint.dir = str(
            Path(cfg.checkpoint.dir) / "stages" / f"{i + 1}-{declared.name}"
        )
        if previous is not None:  # the parity gate belongs to the recipe's init only
            merged.init = InitConfig(checkpoint=str(previous.final_checkpoint))
        with _stage_errors(i):
            validate(merged)
        stages.append(
            Stage(
                index=i + 1,
                count=len(cfg.stages),
                name=declared.name,
                cfg=merged,
                reset=copy.deepcopy(declared.reset),
                start_step=start,
                steps=start + own,
                length=length,
            )
        )
    return stages


def stage_configs(cfg: RecipeConfig) -> list[RecipeConfig]:
    """The fully resolved recipe of every stage (see ``resolve_stages``)."""
    return [stage.cfg for stage in resolve_stages(cfg)]


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
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        value = getattr(defaults, f.name)
        item = _list_item_type(hints[f.name])
        if is_dataclass(value):
            rows += describe(type(value), f"{prefix}{f.name}.")
        elif item is not None:
            rows.append((f"{prefix}{f.name}", repr(value), docs.get(f.name, "")))
            rows += describe(item, f"{prefix}{f.name}[].")
        else:
            rows.append((f"{prefix}{f.name}", repr(value), docs.get(f.name, "")))
    return rows


def _list_item_type(hint: Any) -> Optional[type]:
    """The dataclass ``T`` of a ``list[T]`` field, else None."""
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if is_dataclass(item):
            return item
    return None
