"""Greedy generation from a megatron-core checkpoint, at any TP/PP.

Each new token recomputes the whole sequence (no KV cache; only the last position goes through the
output layer): exact, simple, and fast enough for the small models and short answers of CPU
evaluations. Prompts are batched by
length, so a batch needs neither padding nor attention masks.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from base.presets import QwenPreset
from base.tokenizer import QwenTokenizer
from specialize.logits import last_logits

STOP_IDS = (151643, 151645)  # <|endoftext|>, <|im_end|>


class WorldSizeError(ValueError):
    """The process count does not match the requested TP x PP layout."""


def load_model(ckpt: str | Path, tp: int = 1, pp: int = 1) -> tuple[torch.nn.Module, QwenPreset]:
    """The model of ``ckpt`` (a checkpoint or run directory) on this rank of a TP x PP world."""
    from specialize import checkpoint
    from specialize.convert import layout_config
    from specialize.distributed import init_distributed, seed_all
    from specialize.engine import build_model_chunks

    path = checkpoint.resolve_checkpoint(ckpt)
    record = json.loads((path / checkpoint.ARCH_FILE).read_text())
    record.pop("query_groups", None)
    arch = QwenPreset(**record)
    cfg = layout_config(arch, tp, pp)
    topo = init_distributed(cfg.parallel)
    if topo.world_size != tp * pp:
        raise WorldSizeError(
            f"run on tp x pp = {tp * pp} processes (torchrun), not {topo.world_size}"
        )
    seed_all(0)
    model = build_model_chunks(cfg, topo.device)[0]
    checkpoint.load_model_weights(model, path, cfg.model.architecture())
    return model.eval(), arch


@torch.no_grad()
def greedy(
    model: torch.nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids: Iterable[int] = STOP_IDS,
    vocab_size: int | None = None,
    batch_size: int = 16,
) -> list[list[int]]:
    """The greedy continuation of every prompt, up to and excluding the first stop id.

    ``vocab_size`` restricts the argmax to real tokens (the embedding is padded past them).
    """
    stop = set(stop_ids)
    out: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    groups: dict[int, list[int]] = {}
    for i in order:
        groups.setdefault(len(prompts[i]), []).append(i)
    for members in groups.values():
        for start in range(0, len(members), batch_size):
            batch = members[start : start + batch_size]
            tokens = torch.tensor([prompts[i] for i in batch], dtype=torch.long)
            done = [False] * len(batch)
            for _ in range(max_new_tokens):
                logits = last_logits(model, tokens)
                if vocab_size is not None:
                    logits = logits[:, :vocab_size]
                next_ids = logits.argmax(-1)
                for row, token in enumerate(next_ids.tolist()):
                    if not done[row]:
                        if token in stop:
                            done[row] = True
                        else:
                            out[batch[row]].append(token)
                if all(done):
                    break
                tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
    return out


def chat_answers(
    model: torch.nn.Module,
    tokenizer: QwenTokenizer,
    questions: list[str],
    max_new_tokens: int,
    system: str | None = None,
) -> list[str]:
    """Greedy assistant replies to single-turn questions in the ChatML format of SFT."""
    from specialize.data.chat import DEFAULT_SYSTEM, generation_prompt

    prompts = [
        generation_prompt([{"role": "user", "content": q}], tokenizer, system or DEFAULT_SYSTEM)
        for q in questions
    ]
    ids = greedy(model, prompts, max_new_tokens, vocab_size=tokenizer.vocab_size)
    return [tokenizer.decode(row) for row in ids]
