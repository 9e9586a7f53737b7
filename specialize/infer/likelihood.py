"""Perplexity by context length: how well a model predicts long documents at 1x, 2x, 4x... its
training length, the measurement behind training-free context extension (paper §2.5: dynamic NTK,
LogN and window attention keep 2K-trained models good at 8K).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from specialize.infer.logits import full_logits


def windows(token_ids: np.ndarray, length: int, max_windows: int) -> np.ndarray:
    """The first ``max_windows`` non-overlapping windows of ``length + 1`` tokens of the stream,
    ``[n, length + 1]``: the model reads ``length`` tokens and predicts the ``length`` next ones."""
    span = length + 1
    count = min(max_windows, len(token_ids) // span)
    return np.asarray(token_ids[: count * span], dtype=np.int64).reshape(count, span)


@torch.no_grad()
def perplexity_by_length(
    model: torch.nn.Module,
    token_ids: np.ndarray,
    lengths: list[int],
    max_windows: int,
    batch_size: int = 1,
    vocab_size: int | None = None,
) -> dict[int, float]:
    """``{length: perplexity}`` over non-overlapping windows of each length from a document stream.

    Every window is a fresh sequence (positions from 0), its loss is averaged over all ``length``
    positions, so a long length measures the far positions as well as the near ones: a model that
    fails past its training length gets a higher perplexity there. ``vocab_size`` restricts the
    softmax to real tokens (default: the padded embedding, as the training loss). Works at any
    TP/PP (``full_logits`` returns the logits on every rank)."""
    if max_windows < 1:
        raise ValueError(f"max_windows={max_windows}: must be >= 1")
    result = {}
    for length in lengths:
        rows = windows(token_ids, length, max_windows)
        if len(rows) == 0:
            raise ValueError(
                f"length {length}: the stream has {len(token_ids)} tokens, fewer than one window "
                f"of {length + 1}"
            )
        nll, count = 0.0, 0
        for start in range(0, len(rows), batch_size):
            batch = torch.from_numpy(rows[start : start + batch_size])
            logits = full_logits(model, batch[:, :-1])
            if vocab_size is not None:
                logits = logits[..., :vocab_size]
            targets = batch[:, 1:].to(logits.device)
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"
            )
            nll += loss.item()
            count += targets.numel()
            del logits
        result[length] = math.exp(nll / count)
    return result
