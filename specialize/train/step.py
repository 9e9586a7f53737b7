"""The forward step handed to megatron-core's pipeline schedules, and its loss.

The loss is a per-token mean over the whole global batch: each micro-batch returns the sum of its
masked token losses and its token count; megatron-core (``calculate_per_token_loss``) all-reduces the
counts over data-parallel ranks and scales the gradients once. So a micro-batch of padding or a
short packed sample weighs exactly its tokens, and the loss does not depend on how the global
batch is cut into micro-batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite."""


def _batch_to(batch: dict, device: torch.device) -> dict:
    return {
        k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()
    }


def next_batch(data_iterator: Iterator | None, device: torch.device) -> dict | None:
    """The next micro-batch for this pipeline stage; middle pipeline stages need no data."""
    if data_iterator is None:
        return None
    return _batch_to(next(data_iterator), device)


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Masked sum of token losses, number of learned tokens, and what to report."""
    losses = output_tensor.float()
    loss_mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(losses.view(-1) * loss_mask)
    num_tokens = loss_mask.sum().to(torch.int)
    # Reported as [sum, count] so that averaging across micro-batches and ranks stays exact.
    report = torch.stack([loss_sum.detach(), loss_mask.sum()])
    return loss_sum, num_tokens, {"lm loss": report}


def packed_seq_params(cu_seqlens: torch.Tensor) -> PackedSeqParams:
    """THD packing parameters from a micro-batch's ``cu_seqlens`` ([1, n], padded with -1)."""
    if cu_seqlens.dim() != 2 or cu_seqlens.shape[0] != 1:
        raise ValueError(
            f"cu_seqlens of shape {tuple(cu_seqlens.shape)}: packed THD micro-batches hold one "
            "sequence (train.micro_batch_size=1)"
        )
    cu_seqlens = cu_seqlens[0]
    cu_seqlens = cu_seqlens[cu_seqlens >= 0].to(torch.int32)
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )


def make_forward_step(device: torch.device):
    """A ``forward_step_func`` for ``get_forward_backward_func()``."""

    def forward_step(data_iterator: Iterator, model: torch.nn.Module):
        first = parallel_state.is_pipeline_first_stage()
        last = parallel_state.is_pipeline_last_stage()
        # Every pipeline stage reads the micro-batch: first needs tokens/positions, last needs labels and
        # the loss mask, and all need per-document boundaries when sequences are packed.
        batch = next_batch(data_iterator, device)
        packed = packed_seq_params(batch["cu_seqlens"]) if "cu_seqlens" in batch else None
        output = model(
            batch["tokens"] if first else None,
            batch["position_ids"] if first else None,
            batch.get("attention_mask"),
            labels=batch["labels"] if last else None,
            packed_seq_params=packed,
        )
        return output, partial(loss_func, batch["loss_mask"] if last else None)

    return forward_step


def reduce_loss(reports: list[dict], device: torch.device) -> float:
    """Mean token loss of one step, known on every rank (only the last pipeline stage computes it; the
    others add zeros, on ``device`` like the reports since NCCL reduces only device tensors)."""
    if reports:
        total = torch.stack([r["lm loss"] for r in reports]).sum(0)
    else:
        total = torch.zeros(2, device=device)
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    torch.distributed.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    return (total[0] / total[1].clamp(min=1)).item()
