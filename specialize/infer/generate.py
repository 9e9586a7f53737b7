"""Generation from a megatron-core checkpoint at any TP/PP: greedy or sampled, stop ids and strings.

Without pipeline parallelism, decoding uses megatron-core's KV cache (``StaticInferenceContext``):
the prompt runs once, then one token per step. With it, each new token recomputes the sequence
(only the last position goes through the output layer). Both give the same tokens (tested).
Prompts of different lengths share a batch without padding being attended (see ``generate_ids``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from base.tokenizer import EOD_ID, IM_END_ID, QwenTokenizer
from specialize.data.chat import DEFAULT_SYSTEM, generation_prompt
from specialize.infer.logits import last_logits, model_device

STOP_IDS = (EOD_ID, IM_END_ID)  # a document ends with <|endoftext|>, a chat turn with <|im_end|>


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """``transformers``' repetition penalty (``RepetitionPenaltyLogitsProcessor``, Keskar et al.
    2019): the logit of every token already in the row (prompt included) is divided by
    ``penalty`` when positive and multiplied by it when negative. ``seen``: bool, like ``logits``."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def _next_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    if temperature <= 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:  # nucleus: the smallest set of tokens whose probability reaches top_p
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class _CachedDecoder:
    """Last-position logits with megatron-core's KV cache (``StaticInferenceContext``): the prompt
    runs once, then each new token alone. Without pipeline parallelism."""

    def __init__(self, model: torch.nn.Module, batch: int, max_length: int) -> None:
        from megatron.core.inference.contexts import StaticInferenceContext

        self.model = getattr(model, "module", model)
        self.context = StaticInferenceContext(max_batch_size=batch, max_sequence_length=max_length)

    def __call__(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        batch, length = tokens.shape
        positions = torch.arange(start, start + length, device=tokens.device).expand(batch, length)
        logits = self.model(
            tokens, positions, None, inference_context=self.context, runtime_gather_output=True
        )
        self.context.sequence_len_offset += length
        return logits[:, -1].float()


class _RecomputingDecoder:
    """Last-position logits by running the whole sequence again (any pipeline layout)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.tokens = model, None

    def __call__(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        self.tokens = tokens if self.tokens is None else torch.cat([self.tokens, tokens], dim=1)
        return last_logits(self.model, self.tokens)


@torch.no_grad()
def generate_ids(
    model: torch.nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids: Iterable[int] = STOP_IDS,
    vocab_size: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_when: Callable[[list[int]], bool] | None = None,
    batch_size: int = 16,
    kv_cache: bool = True,
    repetition_penalty: float = 1.0,
    max_length: int | None = None,
) -> list[list[int]]:
    """The continuation of every prompt, up to and excluding the first stop id.

    Greedy at ``temperature`` 0, else sampled (``top_p`` nucleus) from a generator on the model's
    device seeded with ``seed``, so every tensor-parallel rank draws the same tokens.
    ``vocab_size`` restricts the choice to real tokens (the embedding is padded past them).
    ``stop_when(ids)`` ends a row early (stop strings). With pipeline parallelism (or
    ``kv_cache=False``) each step recomputes the sequence. ``repetition_penalty`` other than 1
    applies ``transformers``' penalty to every token of the row so far, prompt included.
    ``max_length`` bounds prompt and completion together, as ``transformers``' ``max_length``
    does (a prompt that long gets no completion), on top of ``max_new_tokens``.

    Prompts of different lengths share a batch the way megatron-core's static inference engine
    does it: the batch runs the shortest prompt at once, then advances one position per step, and
    a row still inside its own prompt takes its next prompt token instead of the sampled one. So
    no row ever attends to padding, on the local and the Transformer Engine attention alike, and
    no attention mask is needed. Prompts are sorted by length first so a batch's lengths are close.
    """
    from megatron.core import parallel_state

    cached = kv_cache and parallel_state.get_pipeline_model_parallel_world_size() == 1
    stop = set(stop_ids)
    device = model_device(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    out: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens <= 0:
        return out
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate_ids: every prompt needs at least one token")
    if repetition_penalty <= 0.0:
        raise ValueError(f"generate_ids: repetition_penalty {repetition_penalty} must be > 0")
    penalize = repetition_penalty != 1.0
    budgets = [
        max_new_tokens if max_length is None else min(max_new_tokens, max_length - len(p))
        for p in prompts
    ]
    order = [
        i for i in sorted(range(len(prompts)), key=lambda i: len(prompts[i])) if budgets[i] > 0
    ]
    for first in range(0, len(order), batch_size):
        batch = order[first : first + batch_size]
        lengths = [len(prompts[i]) for i in batch]
        shortest, longest = min(lengths), max(lengths)
        total = longest + max(budgets[i] for i in batch)
        # Right padding, never attended; one copy to the device.
        rows = [prompts[i] + [0] * (total - len(prompts[i])) for i in batch]
        tokens = torch.tensor(rows, dtype=torch.long, device=device)
        prompt_lengths = torch.tensor(lengths, device=device)
        decode = _CachedDecoder(model, len(batch), total) if cached else _RecomputingDecoder(model)
        logits = decode(tokens[:, :shortest], 0)
        if penalize:  # the tokens of each row so far; a row inside its prompt adds prompt tokens
            seen = torch.zeros(logits.shape, dtype=torch.bool, device=device)
            seen.scatter_(1, tokens[:, :shortest], True)
        done = [False] * len(batch)
        for position in range(shortest, total):
            if penalize:
                logits = penalize_repeats(logits, seen, repetition_penalty)
            if vocab_size is not None:
                logits = logits[:, :vocab_size]
            sampled = _next_tokens(logits, temperature, top_p, generator)
            next_ids = torch.where(position < prompt_lengths, tokens[:, position], sampled)
            for row, token in enumerate(next_ids.tolist()):
                if done[row] or position < lengths[row]:
                    continue
                produced = out[batch[row]]
                if token in stop:
                    done[row] = True
                    continue
                produced.append(token)
                if len(produced) == budgets[batch[row]] or (
                    stop_when is not None and stop_when(produced)
                ):
                    done[row] = True
            if all(done):
                break
            if penalize:
                seen.scatter_(1, next_ids[:, None], True)
            logits = decode(next_ids[:, None], position)
    return out


def greedy(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, **kwargs):
    """``generate_ids`` at temperature 0."""
    return generate_ids(model, prompts, max_new_tokens, temperature=0.0, **kwargs)


def generate_text(
    model: torch.nn.Module,
    tokenizer: QwenTokenizer,
    prompts: list[str] | list[list[int]],
    max_new_tokens: int,
    stop: Iterable[str] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    repetition_penalty: float = 1.0,
    max_length: int | None = None,
) -> list[str]:
    """Completions of text (or token-id) prompts, cut before the first of the ``stop`` strings."""
    stop = tuple(stop)
    ids = [p if isinstance(p, list) else tokenizer.encode(p) for p in prompts]

    def stopped(row: list[int]) -> bool:
        text = tokenizer.decode(row)
        return any(s in text for s in stop)

    rows = generate_ids(
        model,
        ids,
        max_new_tokens,
        vocab_size=tokenizer.vocab_size,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop_when=stopped if stop else None,
        repetition_penalty=repetition_penalty,
        max_length=max_length,
    )
    texts = []
    for row in rows:
        text = tokenizer.decode(row)
        cut = min((text.index(s) for s in stop if s in text), default=len(text))
        texts.append(text[:cut])
    return texts


def chat_answers(
    model: torch.nn.Module,
    tokenizer: QwenTokenizer,
    questions: list[str],
    max_new_tokens: int,
    system: str | None = None,
) -> list[str]:
    """Greedy assistant replies to single-turn questions in the ChatML format of SFT."""
    prompts = [
        generation_prompt([{"role": "user", "content": q}], tokenizer, system or DEFAULT_SYSTEM)
        for q in questions
    ]
    return generate_text(model, tokenizer, prompts, max_new_tokens)
