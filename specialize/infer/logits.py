"""Full-vocabulary logits of a (tensor- and pipeline-) parallel model, on every rank.

Used by parity checks (same weights at another layout, or against transformers). It runs the
pipeline stages one after another with point-to-point sends, not megatron's training schedules,
because it needs the logits themselves rather than a loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where this rank's part of ``model`` lives (every pipeline stage holds parameters)."""
    return next(_unwrap(model).parameters()).device


def _forward_inputs(
    model: torch.nn.Module, tokens: torch.Tensor
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The bare ``GPTModel`` in eval mode, and ``tokens`` with their positions on its device."""
    model = _unwrap(model)
    model.eval()
    tokens = tokens.to(model_device(model))
    batch, seq = tokens.shape
    positions = torch.arange(seq, device=tokens.device).unsqueeze(0).expand(batch, seq)
    return model, tokens, positions


@torch.no_grad()
def full_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Logits ``[batch, seq, padded_vocab]`` (fp32) for ``tokens`` ``[batch, seq]``, on every rank,
    on the model's device (``tokens`` may come from anywhere)."""
    model, tokens, positions = _forward_inputs(model, tokens)
    device = tokens.device
    batch, seq = tokens.shape
    # Between stages megatron sends [s, b, h], or [s/TP, b, h] when the sequence is sharded.
    sharded = model.config.sequence_parallel
    tp = parallel_state.get_tensor_model_parallel_world_size()
    hidden_shape = (seq // tp if sharded else seq, batch, model.config.hidden_size)
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    if not first:
        received = torch.empty(hidden_shape, dtype=model.config.params_dtype, device=device)
        dist.recv(
            received, src=parallel_state.get_pipeline_model_parallel_prev_rank(), group=pp_group
        )
        model.set_input_tensor(received)
    output = model(tokens if first else None, positions if first else None, None)
    if not last:
        dist.send(
            output.contiguous(),
            dst=parallel_state.get_pipeline_model_parallel_next_rank(),
            group=pp_group,
        )
        logits = torch.empty(batch, seq, model.vocab_size, dtype=torch.float32, device=device)
    else:
        logits = (
            tensor_parallel.gather_from_tensor_model_parallel_region(output).float().contiguous()
        )
    last_rank = parallel_state.get_pipeline_model_parallel_last_rank()
    dist.broadcast(logits, src=last_rank, group=pp_group)
    return logits


@torch.no_grad()
def last_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits ``[batch, padded_vocab]`` (fp32) of the last position only.

    Generation needs nothing else, and the output layer over every position is most of a small
    model's cost. Without pipeline parallelism the decoder's hidden states are taken by running
    megatron's ``GPTModel`` as a non-final stage (``post_process`` off: it returns the normalized
    hidden states) and only the last position goes through the output layer.
    """
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        return full_logits(model, tokens)[:, -1]
    model, tokens, positions = _forward_inputs(model, tokens)
    model.post_process = False
    try:
        hidden = model(tokens, positions, None)  # [seq, batch, hidden]
    finally:
        model.post_process = True
    weight = (
        model.shared_embedding_or_output_weight()
        if model.share_embeddings_and_output_weights
        else None
    )
    logits, _ = model.output_layer(hidden[-1:], weight=weight)
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    return logits[0].float()
