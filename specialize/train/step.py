"""The forward step handed to megatron-core's pipeline schedules, and its loss.

The loss is a per-token mean over the whole global batch: each micro-batch returns the sum of its
masked token losses and its token count; megatron-core (``calculate_per_token_loss``) all-reduces the
counts over data-parallel ranks and scales the gradients once. So a micro-batch of padding or a
short packed sample weighs exactly its tokens, and the loss does not depend on how the global
batch is cut into micro-batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.utils import get_attr_wrapped_model

from specialize.train.linear_cross_entropy import linear_cross_entropy


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


def supervised_rows(loss_mask: torch.Tensor) -> torch.Tensor:
    """Indices of the positions ``loss_mask`` ([b, s]) keeps, in the sequence-first order of the
    hidden states the output layer reads ([s, b, h] flattened to [s * b, h]); at least one (a
    micro-batch that learns nothing then computes one position, weighted 0)."""
    rows = loss_mask.t().reshape(-1).nonzero().view(-1)
    if rows.numel() == 0:
        rows = torch.zeros(1, dtype=torch.long, device=loss_mask.device)
    return rows


def _gathered(tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``tensor`` [b, s] at ``rows`` of its sequence-first flattening, as [1, len(rows)]."""
    return tensor.t().reshape(-1).index_select(0, rows).unsqueeze(0)


@contextmanager
def output_layer_rows(model: torch.nn.Module, rows: torch.Tensor):
    """While active, the output layer of ``model`` (a last pipeline stage, wrapped or not) reads
    only the hidden states at ``rows`` (``supervised_rows``), as a sequence of that length and
    batch 1. megatron-core's ``GPTModel`` applies its output layer to every position; a forward
    pre-hook is the one place to select positions without changing the model or its state dict.
    """
    output_layer = get_attr_wrapped_model(model, "output_layer")  # under DDP, Float16Module

    def select(module, args, kwargs):
        hidden = args[0]
        flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
        return (flat.unsqueeze(1), *args[1:]), kwargs

    handle = output_layer.register_forward_pre_hook(select, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def chunked_output_loss(
    model: torch.nn.Module, chunk_tokens: int, loss_mask: torch.Tensor | None = None
):
    """While active, the output layer of ``model`` (a last pipeline stage, wrapped or not) and its
    loss run as one chunked computation (``linear_cross_entropy``): the output layer hands its
    input and weight to ``compute_language_model_loss`` instead of computing logits. Both are
    replaced on the instance, so megatron-core's ``GPTModel`` forward, its hooks (the supervised
    rows above) and its state dict stay as they are. ``loss_mask``: what ``loss_func`` weighs the
    losses with, so the gradients are computed in the same pass as the loss."""
    gpt = get_attr_wrapped_model(model, "output_layer", return_model_obj=True)
    output_layer = gpt.output_layer
    weights: list[torch.Tensor] = []

    def forward(input_, weight=None, runtime_gather_output=None):
        weights.append(output_layer.weight if weight is None else weight)
        return input_, None

    def compute_language_model_loss(labels, hidden):
        return linear_cross_entropy(
            hidden, weights.pop(), labels, chunk_tokens, output_layer.sequence_parallel, loss_mask
        )

    output_layer.forward = forward
    gpt.compute_language_model_loss = compute_language_model_loss
    try:
        yield
    finally:
        del output_layer.forward
        del gpt.compute_language_model_loss


def make_forward_step(
    device: torch.device, supervised_only: bool = False, chunk_tokens: int | None = None
):
    """A ``forward_step_func`` for ``get_forward_backward_func()``. ``supervised_only``: the
    output layer and the loss only where the loss mask is nonzero (``TrainConfig.
    supervised_logits_only``); the same sums of token losses and token counts. ``chunk_tokens``:
    the output layer and the loss in chunks of that many tokens (``chunked_output_loss``)."""

    def forward_step(data_iterator: Iterator, model: torch.nn.Module):
        first = parallel_state.is_pipeline_first_stage()
        last = parallel_state.is_pipeline_last_stage()
        # Every pipeline stage reads the micro-batch: first needs tokens/positions, last needs labels and
        # the loss mask, and all need per-document boundaries when sequences are packed.
        batch = next_batch(data_iterator, device)
        packed = packed_seq_params(batch["cu_seqlens"]) if "cu_seqlens" in batch else None
        labels = loss_mask = None
        selecting, chunking = nullcontext(), nullcontext()
        if last:
            labels, loss_mask = batch["labels"], batch["loss_mask"]
            if supervised_only:
                rows = supervised_rows(loss_mask)
                labels, loss_mask = _gathered(labels, rows), _gathered(loss_mask, rows)
                selecting = output_layer_rows(model, rows)
            if chunk_tokens:
                chunking = chunked_output_loss(model, chunk_tokens, loss_mask)
        with selecting, chunking:
            output = model(
                batch["tokens"] if first else None,
                batch["position_ids"] if first else None,
                batch.get("attention_mask"),
                labels=labels,
                packed_seq_params=packed,
            )
        return output, partial(loss_func, loss_mask)

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
