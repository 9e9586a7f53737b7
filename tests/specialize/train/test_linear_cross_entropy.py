"""The chunked output layer + cross entropy: per-token losses and every gradient equal megatron-
core's unfused path (its output layer's matmul, then ``vocab_parallel_cross_entropy``) at TP=1 and
TP=2, whatever the chunk size, with the gradients computed in the forward pass (an upstream
gradient proportional to the loss mask, as megatron's loss sends) or recomputed (any other); and
sequence parallelism gathers and scatters as megatron does."""

from __future__ import annotations

import pytest
import torch

from specialize.train.linear_cross_entropy import _LinearCrossEntropy
from tests.distributed import run_distributed

VOCAB, HIDDEN, SEQ, BATCH = 96, 16, 10, 3


def _inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=generator)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator) * 0.5  # logits of a few units
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    loss_mask = (torch.rand(BATCH, SEQ, generator=generator) > 0.3).float()
    return hidden, weight, labels, loss_mask


# (mask handed to the loss, upstream gradient): computed in the forward pass, or recomputed
UPSTREAM = {
    "eager": lambda mask: (mask, mask * 0.37),  # what megatron's loss_func sends: c x mask
    "recomputed": lambda mask: (None, mask * 0.37),
    "not-proportional": lambda mask: (
        mask,
        mask * torch.linspace(0.5, 1.5, mask.numel()).view(mask.shape),
    ),
}


def _close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6 * reference.abs().max().item())


@pytest.mark.parametrize("upstream", UPSTREAM)
@pytest.mark.parametrize("chunk", [1, 7, SEQ * BATCH, 1000])
def test_one_rank_equals_the_full_logits_cross_entropy(chunk: int, upstream: str) -> None:
    hidden, weight, labels, loss_mask = _inputs()
    given_mask, grad = UPSTREAM[upstream](loss_mask)
    flat_labels = labels.t().reshape(-1)
    flat_mask = None if given_mask is None else given_mask.t().reshape(-1)

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = torch.matmul(h1, w1.t()).float()  # [s, b, V]
    reference = torch.nn.functional.cross_entropy(
        logits.view(-1, VOCAB), flat_labels, reduction="none"
    )
    reference.backward(grad.t().reshape(-1))

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ours = _LinearCrossEntropy.apply(
        h2.view(-1, HIDDEN), w2, flat_labels, flat_mask, chunk, None, 0
    )
    ours.backward(grad.t().reshape(-1))

    _close(ours, reference.detach())
    _close(h2.grad, h1.grad)
    _close(w2.grad, w1.grad)


def _tensor_parallel(rank: int, world_size: int, sequence_parallel: bool, upstream: str) -> dict:
    from megatron.core import parallel_state, tensor_parallel

    from specialize.config import ParallelConfig
    from specialize.mcore.distributed import init_distributed
    from specialize.train.linear_cross_entropy import linear_cross_entropy

    init_distributed(ParallelConfig(tensor=2))
    hidden, weight, labels, loss_mask = _inputs()
    given_mask, grad = UPSTREAM[upstream](loss_mask)
    shard = weight.chunk(world_size)[rank]
    rows = SEQ // world_size
    results = {}

    def inputs():
        h = hidden[rank * rows : (rank + 1) * rows] if sequence_parallel else hidden
        return h.clone().requires_grad_(), shard.clone().requires_grad_()

    # megatron-core's path: ColumnParallelLinear's input mapping and matmul, then its loss.
    h1, w1 = inputs()
    if sequence_parallel:
        full = tensor_parallel.gather_from_sequence_parallel_region(h1, True)
    else:
        full = tensor_parallel.copy_to_tensor_model_parallel_region(h1)
    logits = torch.matmul(full, w1.t())
    reference = tensor_parallel.vocab_parallel_cross_entropy(logits, labels.t().contiguous())
    reference = reference.transpose(0, 1)  # [b, s], as compute_language_model_loss returns
    reference.backward(grad)

    for chunk in (1, 7, 64):
        h2, w2 = inputs()
        ours = linear_cross_entropy(h2, w2, labels, chunk, sequence_parallel, given_mask)
        ours.backward(grad)
        results[chunk] = (ours.detach(), h2.grad, w2.grad)
    parallel_state.destroy_model_parallel()
    return {"reference": (reference.detach(), h1.grad, w1.grad), "ours": results}


@pytest.mark.parametrize(
    "sequence_parallel,upstream",
    [(False, "eager"), (False, "recomputed"), (True, "eager"), (True, "not-proportional")],
)
def test_two_tensor_parallel_ranks_equal_megatrons_vocab_parallel_loss(
    sequence_parallel, upstream
) -> None:
    out = run_distributed(_tensor_parallel, sequence_parallel, upstream)
    loss, grad_hidden, grad_weight = out["reference"]
    assert loss.shape == (BATCH, SEQ) and 1.0 < loss.mean().item() < 20.0
    for ours_loss, ours_hidden, ours_weight in out["ours"].values():
        _close(ours_loss, loss)
        _close(ours_hidden, grad_hidden)  # after the all-reduce (or reduce-scatter) of TP
        _close(ours_weight, grad_weight)  # rank 0's vocabulary slice


def test_low_precision_weights_accumulate_their_gradient_in_fp32() -> None:
    hidden, weight, labels, grad = _inputs()
    flat_labels = labels.t().reshape(-1)
    h, w = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    loss = _LinearCrossEntropy.apply(h.view(-1, HIDDEN), w, flat_labels, None, 1, None, 0)
    assert loss.dtype == torch.float32
    loss.backward(grad.t().reshape(-1))
    assert w.grad.dtype == h.grad.dtype == torch.bfloat16
    # One chunk per token: bf16 accumulation would round 30 times; fp32 accumulation once.
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    _LinearCrossEntropy.apply(h32.view(-1, HIDDEN), w32, flat_labels, None, 1, None, 0).backward(
        grad.t().reshape(-1)
    )
    torch.testing.assert_close(w.grad.float(), w32.grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "upstream,passes", [("eager", 1), ("recomputed", 2), ("not-proportional", 2)]
)
def test_logits_are_computed_once_when_the_upstream_gradient_is_the_mask(
    monkeypatch: pytest.MonkeyPatch, upstream: str, passes: int
) -> None:
    from specialize.train import linear_cross_entropy as module

    calls = []
    logits = module._Chunks.logits
    monkeypatch.setattr(
        module._Chunks, "logits", lambda self, *a: calls.append(a) or logits(self, *a)
    )
    hidden, weight, labels, loss_mask = _inputs()
    given_mask, grad = UPSTREAM[upstream](loss_mask)
    h, w = hidden.view(-1, HIDDEN).requires_grad_(), weight.requires_grad_()
    flat_mask = None if given_mask is None else given_mask.t().reshape(-1)
    loss = _LinearCrossEntropy.apply(h, w, labels.t().reshape(-1), flat_mask, 8, None, 0)
    assert len(calls) == 4  # 30 rows in chunks of 8
    loss.backward(grad.t().reshape(-1))
    assert len(calls) == 4 * passes


def test_no_gradients_are_computed_without_a_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    # Validation's forward runs under no_grad, where autograd still says the inputs need them.
    from megatron.core import parallel_state

    from specialize.train import linear_cross_entropy as module

    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_world_size", lambda: 1)
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_rank", lambda: 0)
    added = []
    monkeypatch.setattr(module, "_add_gradients", lambda *args: added.append(args))
    hidden, weight, labels, loss_mask = _inputs()
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    with torch.no_grad():
        module.linear_cross_entropy(h, w, labels, 8, loss_mask=loss_mask)
    assert added == []
    module.linear_cross_entropy(h, w, labels, 8, loss_mask=loss_mask)
    assert len(added) == 4  # 30 rows in chunks of 8, in the forward pass
