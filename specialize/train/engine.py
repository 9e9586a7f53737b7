"""Build the training objects from a config: model chunks in megatron-core DDP, optimizer, scheduler.

Everything here is megatron-core's own machinery; this module only decides its settings.
"""

from __future__ import annotations

import gc
import importlib.util
import inspect
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig

from base.model import ModelOptions, build_model, resolve_spec
from base.presets import QwenPreset
from specialize.config import ConfigError, Derived, RecipeConfig
from specialize.mcore import fixes as megatron_fixes
from specialize.mcore.distributed import Topology
from specialize.train.step import NonFiniteLossError, make_forward_step, reduce_loss

log = logging.getLogger(__name__)


def fused_wgrad_available() -> bool:
    """APEX's ``fused_weight_gradient_mlp_cuda``: megatron-core 0.16.1's output layer (a
    ``tensor_parallel.ColumnParallelLinear`` under every spec) refuses gradient-accumulation fusion
    without it, whatever Transformer Engine does for the other layers."""
    return importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


@dataclass(frozen=True)
class Performance:
    """The GPU path's throughput settings, resolved: a config field's value, else its default for
    the device. The defaults follow Megatron-Bridge's H100 recipes of 7-8B models (e.g.
    NVIDIA-NeMo/Megatron-Bridge src/megatron/bridge/recipes/qwen/h100/qwen3.py
    ``qwen3_8b_pretrain_4gpu_h100_bf16_config`` at 067f987df03b8355b03192d88d70f1709fedf51a:
    ``ddp.overlap_grad_reduce = ddp.overlap_param_gather = True``; ``gradient_accumulation_fusion``
    as ``utils/fusions.py``, which needs APEX here; ``CommOverlapConfig(tp_comm_overlap=False)`` in
    ``perf_recipes/llama/h100/llama3.py`` ``llama3_8b_pretrain_8gpu_h100_*``). On CPU all are off,
    and a run is exactly what it always was."""

    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    align_param_gather: bool = False
    """Every pipeline stage starts its parameter all-gathers together (interleaved schedule only)."""
    gradient_accumulation_fusion: bool = False
    tp_comm_overlap: bool = False


def performance(cfg: RecipeConfig, cuda: bool, spec: str) -> Performance:
    """``cfg``'s throughput settings on a CUDA (or CPU) rank with the resolved layer ``spec``."""
    par = cfg.parallel
    param_gather = par.overlap_param_gather
    if param_gather is None:
        param_gather = cuda and par.distributed_optimizer and par.overlap_grad_reduce is not False
    grad_reduce = par.overlap_grad_reduce
    if grad_reduce is None:
        grad_reduce = cuda or param_gather
    fusion = cfg.model.gradient_accumulation_fusion
    if fusion is None:
        fusion = spec == "te" and fused_wgrad_available()
    elif fusion and (spec != "te" or not fused_wgrad_available()):
        raise ConfigError(
            "model.gradient_accumulation_fusion=true: needs the te spec and APEX's "
            "fused_weight_gradient_mlp_cuda (megatron-core's output layer fuses with it); this "
            "machine has " + ("no APEX extension" if spec == "te" else "the local spec")
        )
    if par.tp_comm_overlap and spec != "te":
        raise ConfigError(
            "parallel.tp_comm_overlap: needs the te spec (Transformer Engine on CUDA)"
        )
    return Performance(
        overlap_grad_reduce=grad_reduce,
        overlap_param_gather=param_gather,
        # As Megatron-LM's --align-param-gather (on by default), which it turns off without the
        # interleaved schedule (NVIDIA/Megatron-LM megatron/training/arguments.py, core_v0.16.1).
        align_param_gather=param_gather and par.virtual_pipeline is not None,
        gradient_accumulation_fusion=fusion,
        tp_comm_overlap=par.tp_comm_overlap,
    )


def model_options(cfg: RecipeConfig, perf: Performance = Performance()) -> ModelOptions:
    return ModelOptions(
        spec=resolve_spec(cfg.model.spec),
        dtype=cfg.precision.dtype,
        fp8_format=cfg.precision.fp8_format,
        fp8_recipe=cfg.precision.fp8_recipe,
        fp8_amax_history_len=cfg.precision.fp8_amax_history_len,
        fp8_amax_compute_algo=cfg.precision.fp8_amax_compute_algo,
        fp8_bf16_layers=cfg.precision.fp8_bf16_layers(),
        hidden_dropout=cfg.model.hidden_dropout,
        attention_dropout=cfg.model.attention_dropout,
        recompute=cfg.model.recompute,
        tensor_parallel=cfg.parallel.tensor,
        pipeline_parallel=cfg.parallel.pipeline,
        virtual_pipeline=cfg.parallel.virtual_pipeline,
        sequence_parallel=cfg.parallel.sequence_parallel,
        gradient_accumulation_fusion=perf.gradient_accumulation_fusion,
        tp_comm_overlap=perf.tp_comm_overlap,
        long_context=cfg.model.long_context.resolved(cfg.data.seq_length),
    )


def build_model_chunks(
    cfg: RecipeConfig, device: torch.device, perf: Performance = Performance()
) -> list[torch.nn.Module]:
    """This rank's model chunks: one, or ``virtual_pipeline`` for the interleaved schedule."""
    preset = cfg.model.architecture()
    opts = model_options(cfg, perf)
    chunks = []
    vp = cfg.parallel.virtual_pipeline
    for stage in range(vp or 1):
        vp_stage = stage if vp else None
        chunk = build_model(
            preset,
            opts,
            pre_process=parallel_state.is_pipeline_first_stage(
                ignore_virtual=False, vp_stage=vp_stage
            ),
            post_process=parallel_state.is_pipeline_last_stage(
                ignore_virtual=False, vp_stage=vp_stage
            ),
            vp_stage=vp_stage,
        )
        chunks.append(chunk.to(device))
    return chunks


def ddp_config(
    cfg: RecipeConfig, perf: Performance = Performance()
) -> DistributedDataParallelConfig:
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        # Buckets of megatron-core's default size (40M parameters) when overlapping, else one.
        overlap_grad_reduce=perf.overlap_grad_reduce,
        overlap_param_gather=perf.overlap_param_gather,
        align_param_gather=perf.align_param_gather,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        # Gradients are summed and divided once by the global token count (see step.py).
        average_in_collective=False,
        check_for_nan_in_grad=False,
    )


def wrap_ddp(
    chunks: list[torch.nn.Module], cfg: RecipeConfig, perf: Performance = Performance()
) -> list[DistributedDataParallel]:
    config = ddp_config(cfg, perf)
    wrapped = []
    for i, chunk in enumerate(chunks):
        chunk.config.calculate_per_token_loss = True
        wrapped.append(
            DistributedDataParallel(
                config=chunk.config,
                ddp_config=config,
                module=chunk,
                # Only the first chunk gets bucketing, as in megatron-core's own training loop.
                disable_bucketing=i > 0,
            )
        )
    return wrapped


def optimizer_config(cfg: RecipeConfig, perf: Performance = Performance()) -> OptimizerConfig:
    o = cfg.optimizer
    low_precision = cfg.precision.dtype in ("bf16", "fp8")
    return OptimizerConfig(
        optimizer="adam",  # megatron-core's adam is AdamW: decoupled_weight_decay=True
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=low_precision,
        params_dtype=torch.bfloat16 if low_precision else torch.float32,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        overlap_param_gather=perf.overlap_param_gather,  # mirrors the DDP setting
    )


def build_optimizer(
    cfg: RecipeConfig, chunks: list[torch.nn.Module], perf: Performance = Performance()
) -> MegatronOptimizer:
    return get_megatron_optimizer(optimizer_config(cfg, perf), chunks)


def initialize_tp_comm_overlap(cfg: RecipeConfig) -> None:
    """Transformer Engine's userbuffers for ``parallel.tp_comm_overlap`` (``Engine.close`` frees
    them: a later stage may have another shape), as
    NVIDIA/Megatron-LM megatron/training/initialize.py ``_initialize_tp_communicators`` does
    (core_v0.16.1, 55ac7082517c3878ae653c07c09c534b8aed49f6): buffers of the layer input's global
    shape, [seq x micro-batch, hidden], FP8 ones under FP8 (plus BF16 ones for BF16 layers)."""
    from transformer_engine.pytorch.module import base as te_base

    shape = [cfg.data.seq_length * cfg.train.micro_batch_size, cfg.model.architecture().hidden_size]
    fp8 = cfg.precision.dtype == "fp8"
    kwargs = dict(shape=shape, tp_size=cfg.parallel.tensor, ub_cfgs={}, bootstrap_backend="nccl")
    if "quantization_modes" in inspect.signature(te_base.initialize_ub).parameters:
        mode = te_base.UserBufferQuantizationMode
        modes = [mode.FP8 if fp8 else mode.NONE]
        if fp8 and any(cfg.precision.fp8_bf16_layers()):
            modes.append(mode.NONE)
        kwargs["quantization_modes"] = modes
    else:
        kwargs["use_fp8"] = fp8
    te_base.initialize_ub(**kwargs)


class CosineWarmupScheduler(OptimizerParamScheduler):
    """megatron-core's scheduler with a half-cosine warmup (the paper's Code-Qwen-Chat SFT).

    megatron-core only warms up linearly; past the warmup everything is its own ``get_lr``.
    """

    def get_lr(self, param_group: dict) -> float:
        if self.lr_warmup_steps > 0 and self.num_steps <= self.lr_warmup_steps:
            max_lr = param_group.get("max_lr", self.max_lr)
            progress = float(self.num_steps) / float(self.lr_warmup_steps)
            return self.init_lr + (max_lr - self.init_lr) * 0.5 * (1 - math.cos(math.pi * progress))
        return super().get_lr(param_group)


def build_scheduler(
    cfg: RecipeConfig, optimizer: MegatronOptimizer, derived: Derived
) -> OptimizerParamScheduler:
    """Linear or cosine warmup, then constant/cosine/linear, counted in optimizer steps."""
    o = cfg.optimizer
    scheduler = (
        CosineWarmupScheduler if cfg.schedule.warmup_shape == "cosine" else OptimizerParamScheduler
    )
    return scheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=derived.warmup_steps,
        lr_decay_steps=derived.steps,
        lr_decay_style=cfg.schedule.decay,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=derived.steps,
        wd_incr_style="constant",
        # The config, not the checkpoint, decides the schedule: a resumed run follows its recipe.
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )


@dataclass
class StepResult:
    loss: float
    """Mean token loss over the global batch."""
    grad_norm: float
    lr: float
    num_tokens: int


# What megatron-core's schedules call through the model's config: bound methods of the optimizer
# and the DDP chunks, which make the model, its config and the optimizer a reference cycle.
_SCHEDULE_HOOKS = (
    "grad_scale_func",
    "no_sync_func",
    "grad_sync_func",
    "param_sync_func",
    "finalize_model_grads_func",
)


def _one_or_list(hooks: list):
    return hooks[0] if len(hooks) == 1 else hooks


@dataclass
class Engine:
    """The model, optimizer and schedule of one run, and how to take one step."""

    cfg: RecipeConfig
    topo: Topology
    derived: Derived
    preset: QwenPreset
    model: list[DistributedDataParallel]
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    perf: Performance

    @classmethod
    def build(cls, cfg: RecipeConfig, topo: Topology, derived: Derived) -> Engine:
        megatron_fixes.install()
        megatron_fixes.install_logits_max()
        perf = performance(cfg, topo.device.type == "cuda", resolve_spec(cfg.model.spec))
        if perf.tp_comm_overlap:
            initialize_tp_comm_overlap(cfg)
        chunks = wrap_ddp(build_model_chunks(cfg, topo.device, perf), cfg, perf)
        optimizer = build_optimizer(cfg, chunks, perf)
        scheduler = build_scheduler(cfg, optimizer, derived)
        # The step's hooks, as megatron-core's own training loop sets them (NVIDIA/Megatron-LM
        # megatron/training/training.py ``train``, core_v0.16.1, 55ac708).
        config = chunks[0].config
        config.grad_scale_func = optimizer.scale_loss
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = _one_or_list([c.no_sync for c in chunks])
        if perf.overlap_grad_reduce:
            config.grad_sync_func = _one_or_list([c.start_grad_sync for c in chunks])
        if perf.align_param_gather:
            config.param_sync_func = _one_or_list([c.start_param_sync for c in chunks])
        engine = cls(
            cfg, topo, derived, cfg.model.architecture(), chunks, optimizer, scheduler, perf
        )
        if topo.rank == 0:
            log.info("output layer + loss: %s", engine.output_loss_note)
        return engine

    @property
    def _supervised_only(self) -> bool:
        """The output layer at learned positions only (``train.supervised_logits_only``): SFT
        data, without sequence parallelism."""
        cfg = self.cfg
        return (
            cfg.train.supervised_logits_only
            and cfg.data.format == "sft"
            and not cfg.parallel.sequence_parallel
        )

    @property
    def _chunk_tokens(self) -> int | None:
        """Tokens per chunk of the chunked output layer and loss, or None for megatron's path
        (``train.chunked_cross_entropy``; auto: where its fused cross entropy is off)."""
        chunked = self.cfg.train.chunked_cross_entropy
        if chunked is None:
            chunked = not self.transformer_config.cross_entropy_loss_fusion
        return self.cfg.train.cross_entropy_chunk_tokens if chunked else None

    @property
    def output_loss_note(self) -> str:
        """Which output layer and loss the training steps run (README, "Running on GPUs")."""
        if self._chunk_tokens:
            return (
                f"chunked, {self._chunk_tokens} tokens per chunk (train.chunked_cross_entropy, "
                "specialize/train/linear_cross_entropy.py)"
            )
        if self.transformer_config.cross_entropy_loss_fusion:
            impl = self.transformer_config.cross_entropy_fusion_impl
            return f"megatron-core's fused vocab-parallel cross entropy ({impl})"
        return "megatron-core's unfused vocab-parallel cross entropy (train.chunked_cross_entropy=false)"

    @property
    def transformer_config(self) -> TransformerConfig:
        return self.model[0].config

    def close(self) -> None:
        """Free the model and optimizer now, for the next stage: the schedule hooks on the model's
        config are bound methods of the optimizer and the DDP chunks, a reference cycle that only
        a garbage-collector pass would free, perhaps after the next stage has allocated its own."""
        for config in {id(c.config): c.config for c in self.model}.values():
            for name in _SCHEDULE_HOOKS:
                setattr(config, name, None)
        self.model, self.optimizer, self.scheduler = [], None, None
        if self.perf.tp_comm_overlap:
            from transformer_engine.pytorch.module import base as te_base

            te_base.destroy_ub()
        gc.collect()
        if self.topo.device.type == "cuda":
            torch.cuda.empty_cache()

    def sync_params(self) -> None:
        """Finish the parameter all-gather that the last step left to the next forward pass
        (``overlap_param_gather``): the model's own parameters are then current, as a checkpoint
        needs them (megatron's training loop: ``force_param_sync`` before a save)."""
        if self.perf.overlap_param_gather:
            for chunk in self.model:
                chunk.start_param_sync(force_sync=True)

    @contextmanager
    def _params_in_sync(self):
        """Forward passes outside training (validation) with current parameters and without the
        all-gather hooks, as megatron's training loop evaluates."""
        if not self.perf.overlap_param_gather:
            yield
            return
        for chunk in self.model:
            chunk.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            for chunk in self.model:
                chunk.enable_forward_pre_hook()

    def _forward_backward(self, data_iterators: list, num_microbatches: int, forward_only: bool):
        data = data_iterators[0] if len(self.model) == 1 else data_iterators
        return get_forward_backward_func()(
            forward_step_func=make_forward_step(
                self.topo.device, self._supervised_only, self._chunk_tokens
            ),
            data_iterator=data,
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=num_microbatches,
            seq_length=self.cfg.data.seq_length,
            micro_batch_size=self.cfg.train.micro_batch_size,
            forward_only=forward_only,
        )

    def train_step(self, data_iterators: list, step: int) -> StepResult:
        for chunk in self.model:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = self._forward_backward(
            data_iterators, self.derived.micro_batches, forward_only=False
        )
        loss = reduce_loss(reports, self.topo.device)
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"step {step}: loss is {loss}; stopping (see the lr, data and precision)"
            )
        _, grad_norm, _ = self.optimizer.step()
        if grad_norm is not None and not math.isfinite(grad_norm):
            raise NonFiniteLossError(f"step {step}: gradient norm is {grad_norm}; stopping")
        self.scheduler.step(increment=1)
        return StepResult(
            loss=loss,
            grad_norm=float(grad_norm or 0.0),
            lr=self.optimizer.param_groups[0]["lr"],
            num_tokens=self.derived.tokens_per_step,
        )

    @torch.no_grad()
    def weight_norm(self) -> float:
        """L2 norm of the model's weights, the same number on every rank: each rank's parameters
        summed over the world. Copies held by several ranks (data-parallel replicas, norms
        replicated across tensor-parallel ranks) count once per holder, the same at every step,
        so ratios between steps are exact. With the parameter all-gather overlapped the model's
        parameters are stale until the next forward pass: the optimizer's fp32 main-parameter
        shards are summed instead (each data-parallel shard once), as megatron's
        ``calc_params_l2_norm`` does."""
        if self.perf.overlap_param_gather:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
        else:
            params = [p for chunk in self.model for p in chunk.parameters()]
        squares = [torch.linalg.vector_norm(p.detach(), dtype=torch.float32) ** 2 for p in params]
        total = torch.stack(squares).sum() if squares else torch.zeros((), device=self.topo.device)
        torch.distributed.all_reduce(total)
        return total.sqrt().item()

    @torch.no_grad()
    def evaluate(self, data_iterators: list, num_batches: int) -> float:
        for chunk in self.model:
            chunk.eval()
        reports = []
        with self._params_in_sync():
            for _ in range(num_batches):
                reports += self._forward_backward(
                    data_iterators, self.derived.micro_batches, forward_only=True
                )
        return reduce_loss(reports, self.topo.device)
