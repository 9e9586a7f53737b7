"""Build the training objects from a config: model chunks in megatron-core DDP, optimizer, scheduler.

Everything here is megatron-core's own machinery; this module only decides its settings.
"""

from __future__ import annotations

import logging
import math
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
from specialize import megatron_fixes
from specialize.config import Derived, RecipeConfig
from specialize.distributed import Topology
from specialize.step import NonFiniteLossError, make_forward_step, reduce_loss

log = logging.getLogger(__name__)


def model_options(cfg: RecipeConfig) -> ModelOptions:
    return ModelOptions(
        spec=resolve_spec(cfg.model.spec),
        dtype=cfg.precision.dtype,
        fp8_format=cfg.precision.fp8_format,
        fp8_recipe=cfg.precision.fp8_recipe,
        fp8_amax_history_len=cfg.precision.fp8_amax_history_len,
        fp8_amax_compute_algo=cfg.precision.fp8_amax_compute_algo,
        hidden_dropout=cfg.model.hidden_dropout,
        attention_dropout=cfg.model.attention_dropout,
        recompute=cfg.model.recompute,
        tensor_parallel=cfg.parallel.tensor,
        pipeline_parallel=cfg.parallel.pipeline,
        virtual_pipeline=cfg.parallel.virtual_pipeline,
        sequence_parallel=cfg.parallel.sequence_parallel,
        rope_scaling=cfg.model.rope_scaling,
        rope_alpha=cfg.model.rope_alpha,
        logn_attention=cfg.model.logn_attention,
        layer_windows=None if cfg.model.layer_windows is None else tuple(cfg.model.layer_windows),
        train_seq_length=cfg.model.train_seq_length or cfg.data.seq_length,
    )


def build_model_chunks(cfg: RecipeConfig, device: torch.device) -> list[torch.nn.Module]:
    """This rank's model chunks: one, or ``virtual_pipeline`` for the interleaved schedule."""
    preset = cfg.model.architecture()
    opts = model_options(cfg)
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


def wrap_ddp(chunks: list[torch.nn.Module], cfg: RecipeConfig) -> list[DistributedDataParallel]:
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        # Gradients are summed and divided once by the global token count (see step.py).
        average_in_collective=False,
        check_for_nan_in_grad=False,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        chunk.config.calculate_per_token_loss = True
        wrapped.append(
            DistributedDataParallel(
                config=chunk.config,
                ddp_config=ddp_config,
                module=chunk,
                # Only the first chunk gets bucketing, as in megatron-core's own training loop.
                disable_bucketing=i > 0,
            )
        )
    return wrapped


def build_optimizer(cfg: RecipeConfig, chunks: list[torch.nn.Module]) -> MegatronOptimizer:
    o = cfg.optimizer
    low_precision = cfg.precision.dtype in ("bf16", "fp8")
    config = OptimizerConfig(
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
    )
    return get_megatron_optimizer(config, chunks)


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

    @classmethod
    def build(cls, cfg: RecipeConfig, topo: Topology, derived: Derived) -> Engine:
        megatron_fixes.install()
        chunks = wrap_ddp(build_model_chunks(cfg, topo.device), cfg)
        optimizer = build_optimizer(cfg, chunks)
        scheduler = build_scheduler(cfg, optimizer, derived)
        config = chunks[0].config
        config.grad_scale_func = optimizer.scale_loss
        config.finalize_model_grads_func = finalize_model_grads
        no_sync = [c.no_sync for c in chunks]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        return cls(cfg, topo, derived, cfg.model.architecture(), chunks, optimizer, scheduler)

    @property
    def transformer_config(self) -> TransformerConfig:
        return self.model[0].config

    def _forward_backward(self, data_iterators: list, num_microbatches: int, forward_only: bool):
        data = data_iterators[0] if len(self.model) == 1 else data_iterators
        return get_forward_backward_func()(
            forward_step_func=make_forward_step(self.topo.device),
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
        so ratios between steps are exact."""
        squares = [
            torch.linalg.vector_norm(p.detach(), dtype=torch.float32) ** 2
            for chunk in self.model
            for p in chunk.parameters()
        ]
        total = torch.stack(squares).sum() if squares else torch.zeros((), device=self.topo.device)
        torch.distributed.all_reduce(total)
        return total.sqrt().item()

    @torch.no_grad()
    def evaluate(self, data_iterators: list, num_batches: int) -> float:
        for chunk in self.model:
            chunk.eval()
        reports = []
        for _ in range(num_batches):
            reports += self._forward_backward(
                data_iterators, self.derived.micro_batches, forward_only=True
            )
        return reduce_loss(reports, self.topo.device)
