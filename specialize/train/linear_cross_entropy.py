"""The output layer and the cross entropy in chunks of tokens, never holding all the logits.

megatron-core's unfused path computes a micro-batch's logits [s, b, V/tp] in one piece, makes four
passes over them (max, subtract and gather the target, exp and sum, normalize) and keeps the
softmax for backward. With Qwen's 151,936-token vocabulary that is 622 MB of fp32 per 1,024 tokens
(3.5 GiB per rank in the 7B CPT plan). Here each chunk of ``chunk_tokens`` rows computes its logits,
their max, their sum of exponentials and the target's logit, and only those three numbers per
token are kept. Backward recomputes each chunk's logits and accumulates the hidden-state and
output-weight gradients. It is the same role as Liger Kernel's ``FusedLinearCrossEntropy`` and
Apple's Cut Cross-Entropy. Those are Triton kernels, which do not run on the CPU path, and neither
splits the vocabulary the way megatron's tensor parallelism does. megatron-core 0.16.1's own
``cross_entropy_loss_fusion`` fuses the loss passes but still takes materialized logits (it is what
the GPU path uses).

Under tensor parallelism each rank holds the vocabulary slice megatron gives it
(``VocabUtility``), and the ranks combine their max, sum and target logit across the
tensor-parallel group as ``vocab_parallel_cross_entropy`` does. That takes one MAX and one SUM
all-reduce per micro-batch, not per chunk: each rank's sum is kept relative to its own max and
rescaled once the global max is known. The hidden states enter as they enter megatron's
``ColumnParallelLinear``: copied into the tensor-parallel region (gradients all-reduced), or
all-gathered from the sequence-parallel region (gradients reduce-scattered).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-token ``-log softmax(hidden @ weight.T)[label]`` over a vocabulary split across
    ``group``: ``hidden`` [n, h] (every rank's copy), ``weight`` [V/tp, h] (this rank's rows,
    vocabulary ids from ``vocab_start``), ``labels`` [n] global ids; returns [n] fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens, group, vocab_start):
        rows, vocab = hidden.shape[0], weight.shape[0]
        local = labels - vocab_start
        in_slice = (local >= 0) & (local < vocab)
        local = torch.where(in_slice, local, torch.zeros_like(local))
        local_max = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        sum_exp = torch.empty_like(local_max)
        target = torch.empty_like(local_max)
        for start in range(0, rows, chunk_tokens):
            end = min(start + chunk_tokens, rows)
            # Logits in the weights' dtype, then fp32, as megatron's output layer and loss do.
            logits = torch.matmul(hidden[start:end], weight.t()).float()
            chunk_max = torch.amax(logits, dim=1)
            local_max[start:end] = chunk_max
            target[start:end] = logits.gather(1, local[start:end, None]).squeeze(1)
            logits -= chunk_max[:, None]
            sum_exp[start:end] = logits.exp_().sum(dim=1)
        target = torch.where(in_slice, target, torch.zeros_like(target))
        if group is not None:
            global_max = local_max.clone()
            torch.distributed.all_reduce(global_max, op=torch.distributed.ReduceOp.MAX, group=group)
            sums = torch.stack([sum_exp * torch.exp(local_max - global_max), target])
            torch.distributed.all_reduce(sums, group=group)
            sum_exp, target = sums[0], sums[1]
        else:
            global_max = local_max
        log_normalizer = global_max + torch.log(sum_exp)
        ctx.save_for_backward(hidden, weight, log_normalizer, local, in_slice)
        ctx.chunk_tokens = chunk_tokens
        return log_normalizer - target

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, log_normalizer, local, in_slice = ctx.saved_tensors
        chunk_tokens = ctx.chunk_tokens
        grad_loss = grad_loss.float()
        grad_hidden = torch.empty_like(hidden)
        # Accumulated over chunks in fp32 (low-precision weights would round every chunk's sum).
        accumulate = torch.float32 if weight.dtype in (torch.bfloat16, torch.float16) else None
        grad_weight = torch.zeros_like(weight, dtype=accumulate)
        for start in range(0, hidden.shape[0], chunk_tokens):
            end = min(start + chunk_tokens, hidden.shape[0])
            part = hidden[start:end]
            logits = torch.matmul(part, weight.t()).float()
            softmax = logits.sub_(log_normalizer[start:end, None]).exp_()
            hit = in_slice[start:end].nonzero().squeeze(1)
            softmax[hit, local[start:end][hit]] -= 1.0
            grad_logits = softmax.mul_(grad_loss[start:end, None]).to(hidden.dtype)
            torch.matmul(grad_logits, weight, out=grad_hidden[start:end])
            if accumulate is None:
                grad_weight.addmm_(grad_logits.t(), part)
            else:
                grad_weight += torch.matmul(grad_logits.t(), part).float()
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int,
    sequence_parallel: bool = False,
) -> torch.Tensor:
    """megatron-core's output layer followed by ``compute_language_model_loss``, in chunks:
    ``hidden`` [s, b, h] (the output layer's input, [s/tp, b, h] under sequence parallelism),
    ``weight`` this rank's [V/tp, h] output weight, ``labels`` [b, s]; the per-token losses [b, s]."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group() if tp_size > 1 else None
    if sequence_parallel and tp_size > 1:
        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
    elif tp_size > 1:
        hidden = copy_to_tensor_model_parallel_region(hidden)
    seq, batch = hidden.shape[0], hidden.shape[1]
    vocab_start = parallel_state.get_tensor_model_parallel_rank() * weight.shape[0]
    losses = _LinearCrossEntropy.apply(
        hidden.reshape(seq * batch, -1),
        weight,
        labels.transpose(0, 1).reshape(-1),
        chunk_tokens,
        group,
        vocab_start,
    )
    return losses.view(seq, batch).transpose(0, 1).contiguous()
