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
from megatron.core.tensor_parallel.utils import VocabUtility


class _Chunks:
    """The row chunks of one pass and a logits buffer they share: a fresh block of this size per
    chunk would be mapped from the kernel and page-faulted every time (glibc maps blocks over
    32 MB straight from the kernel)."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, chunk_tokens: int) -> None:
        self.hidden, self.weight, self.chunk_tokens = hidden, weight, chunk_tokens
        rows = min(chunk_tokens, hidden.shape[0])
        self.buffer = torch.empty(rows, weight.shape[0], dtype=weight.dtype, device=weight.device)
        self.buffer32 = (
            self.buffer
            if weight.dtype == torch.float32
            else torch.empty(self.buffer.shape, dtype=torch.float32, device=weight.device)
        )

    def __iter__(self):
        rows = self.hidden.shape[0]
        for start in range(0, rows, self.chunk_tokens):
            end = min(start + self.chunk_tokens, rows)
            yield start, end

    def logits(self, start: int, end: int) -> torch.Tensor:
        """fp32 logits of rows ``start:end``: computed in the weights' dtype, then fp32, as
        megatron-core's output layer and loss do."""
        out = self.buffer[: end - start]
        torch.matmul(self.hidden[start:end], self.weight.t(), out=out)
        if self.buffer32 is self.buffer:
            return out
        return self.buffer32[: end - start].copy_(out)


def _accumulator(weight: torch.Tensor) -> torch.Tensor:
    # The weight gradient is summed over chunks in fp32: low-precision weights would round every
    # chunk's partial sum.
    dtype = torch.float32 if weight.dtype in (torch.bfloat16, torch.float16) else weight.dtype
    return torch.zeros(weight.shape, dtype=dtype, device=weight.device)


def _minus_one_hot(softmax, local, in_slice, weights) -> torch.Tensor:
    """``(softmax - one_hot(target)) * weights[:, None]`` in place: the logits' gradient (rows of
    one chunk; ``local``/``in_slice`` its targets in this rank's vocabulary slice)."""
    hit = in_slice.nonzero().squeeze(1)
    softmax[hit, local[hit]] -= 1.0
    return softmax.mul_(weights[:, None])


def _add_gradients(chunks, start, end, grad_logits, grad_hidden, grad_weight) -> None:
    part = chunks.hidden[start:end]
    grad_logits = grad_logits.to(part.dtype)
    torch.matmul(grad_logits, chunks.weight, out=grad_hidden[start:end])
    if grad_weight.dtype == part.dtype:
        grad_weight.addmm_(grad_logits.t(), part)
    else:
        grad_weight += torch.matmul(grad_logits.t(), part).float()


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-token ``-log softmax(hidden @ weight.T)[label]`` over a vocabulary split across
    ``group``: ``hidden`` [n, h] (every rank's copy), ``weight`` [V/tp, h] (this rank's rows,
    vocabulary ids from ``vocab_start``), ``labels`` [n] global ids; returns [n] fp32.

    With ``loss_mask`` ([n], the weights the caller will sum the losses with) the gradients are
    computed in the forward pass, for an upstream gradient of ``loss_mask``, while each chunk's
    logits are at hand; backward then only scales them, so the logits are computed once instead
    of twice. megatron-core's loss (``loss_func``: sum of losses x mask, times the schedule's
    scale) sends exactly ``c * loss_mask``; any other upstream gradient is detected and handled by
    recomputing the logits chunk by chunk. Without ``loss_mask`` (or without gradients) the
    forward keeps only the log normalizer and backward recomputes.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, loss_mask, chunk_tokens, group, vocab_start):
        rows, vocab = hidden.shape[0], weight.shape[0]
        local = labels - vocab_start
        in_slice = (local >= 0) & (local < vocab)
        local = torch.where(in_slice, local, torch.zeros_like(local))
        losses = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        log_normalizer = torch.empty_like(losses)
        chunks = _Chunks(hidden, weight, chunk_tokens)
        eager = loss_mask is not None and any(ctx.needs_input_grad[:2])
        if eager:
            mask = loss_mask.float()
            grad_hidden, grad_weight = torch.empty_like(hidden), _accumulator(weight)
        for start, end in chunks:
            logits = chunks.logits(start, end)
            # megatron-core's vocab_parallel_cross_entropy, on one chunk: the global max, the
            # target's shifted logit and the sum of exponentials (each all-reduced across TP).
            row_max = torch.amax(logits, dim=1)
            if group is not None:
                torch.distributed.all_reduce(
                    row_max, op=torch.distributed.ReduceOp.MAX, group=group
                )
            logits -= row_max[:, None]
            target = logits.gather(1, local[start:end, None]).squeeze(1)
            target = torch.where(in_slice[start:end], target, torch.zeros_like(target))
            sums = torch.stack([logits.exp_().sum(dim=1), target])
            if group is not None:
                torch.distributed.all_reduce(sums, group=group)
            losses[start:end] = torch.log(sums[0]) - sums[1]
            log_normalizer[start:end] = row_max + torch.log(sums[0])
            if eager:  # (softmax - one-hot) x mask, while the exponentials are here
                softmax = logits.div_(sums[0][:, None])
                grad_logits = _minus_one_hot(
                    softmax, local[start:end], in_slice[start:end], mask[start:end]
                )
                _add_gradients(chunks, start, end, grad_logits, grad_hidden, grad_weight)
        if eager:
            ctx.eager = (mask, grad_hidden, grad_weight.to(weight.dtype))
        else:
            ctx.eager = None
        ctx.save_for_backward(hidden, weight, log_normalizer, local, in_slice)
        ctx.chunk_tokens = chunk_tokens
        return losses

    @staticmethod
    def backward(ctx, grad_loss):
        grad_loss = grad_loss.float()
        if ctx.eager is not None:
            mask, grad_hidden, grad_weight = ctx.eager
            ctx.eager = None
            scale = _scale_of(grad_loss, mask)
            if scale is not None:
                return grad_hidden.mul_(scale), grad_weight.mul_(scale), *[None] * 5
        hidden, weight, log_normalizer, local, in_slice = ctx.saved_tensors
        chunks = _Chunks(hidden, weight, ctx.chunk_tokens)
        grad_hidden, grad_weight = torch.empty_like(hidden), _accumulator(weight)
        for start, end in chunks:
            softmax = chunks.logits(start, end).sub_(log_normalizer[start:end, None]).exp_()
            grad_logits = _minus_one_hot(
                softmax, local[start:end], in_slice[start:end], grad_loss[start:end]
            )
            _add_gradients(chunks, start, end, grad_logits, grad_hidden, grad_weight)
        return grad_hidden, grad_weight.to(weight.dtype), *[None] * 5


def _scale_of(grad_loss: torch.Tensor, mask: torch.Tensor) -> float | None:
    """``c`` if ``grad_loss`` is exactly ``c * mask``, else None.

    Computed on the tensors' device and read back in one transfer (on CUDA, one sync per
    micro-batch: choosing between the kept and the recomputed gradients needs the host)."""
    grad_loss, mask = grad_loss.reshape(-1), mask.reshape(-1)
    masked = mask != 0
    first = masked.to(torch.uint8).argmax()  # the first nonzero; 0 when there is none
    zero = torch.zeros((), dtype=grad_loss.dtype, device=grad_loss.device)
    scale = torch.where(masked[first], grad_loss[first] / mask[first], zero)
    uniform = torch.eq(grad_loss, mask * scale).all()
    uniform_value, scale_value = torch.stack([uniform.to(scale.dtype), scale]).tolist()
    return scale_value if uniform_value else None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int,
    sequence_parallel: bool = False,
    loss_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """megatron-core's output layer followed by ``compute_language_model_loss``, in chunks:
    ``hidden`` [s, b, h] (the output layer's input, [s/tp, b, h] under sequence parallelism),
    ``weight`` this rank's [V/tp, h] output weight, ``labels`` and ``loss_mask`` [b, s] (the mask
    the losses will be summed with: the gradients are then computed in the same pass, see
    ``_LinearCrossEntropy``); the per-token losses [b, s]."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group() if tp_size > 1 else None
    if sequence_parallel and tp_size > 1:
        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
    elif tp_size > 1:
        hidden = copy_to_tensor_model_parallel_region(hidden)
    seq, batch = hidden.shape[0], hidden.shape[1]
    backward = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    vocab_start, _ = VocabUtility.vocab_range_from_per_partition_vocab_size(
        weight.shape[0], parallel_state.get_tensor_model_parallel_rank(), tp_size
    )
    losses = _LinearCrossEntropy.apply(
        hidden.reshape(seq * batch, -1),
        weight,
        labels.transpose(0, 1).reshape(-1),
        # Gradients in the forward pass only when a backward follows (not in validation's
        # no-grad forward, where autograd still reports the inputs as needing gradients).
        None if loss_mask is None or not backward else loss_mask.transpose(0, 1).reshape(-1),
        chunk_tokens,
        group,
        vocab_start,
    )
    return losses.view(seq, batch).transpose(0, 1).contiguous()
