"""megatron-core patches: the unfused cross entropy's row maximum by ``torch.amax``."""

import torch


def test_logits_max_by_amax_is_megatrons_maximum_bit_for_bit() -> None:
    from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy

    from specialize.mcore import fixes

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 1000, generator=generator).bfloat16()
    logits[0, 0, :] = 2.0  # ties
    logits[1, 1, 7] = float("inf")
    logits[2, 2, :] = float("-inf")
    # megatron-core 0.16.1's own body (the class may already be patched by an earlier test)
    original = (logits.float(), torch.max(logits.float(), dim=-1)[0])
    fixes.install_logits_max()
    fixes.install_logits_max()  # idempotent
    patched = VocabParallelCrossEntropy.calculate_logits_max(logits.clone())
    assert VocabParallelCrossEntropy.calculate_logits_max.__module__ == fixes.__name__
    assert patched[0].dtype == original[0].dtype == torch.float32
    assert torch.equal(patched[0], original[0])
    assert torch.equal(patched[1], original[1])  # including inf and -inf rows
