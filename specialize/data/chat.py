"""ChatML rendering: token ids and the loss mask, computed together.

A conversation renders as Qwen's chat format::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n

with the role, the newline and the content tokenized separately, as Qwen's own chat code does, so
training sees the token boundaries inference will produce. ``loss_mask[i] == 1`` means token ``i``
is learned (predicted from the tokens before it). Mask policies:

``assistant`` (default)
    learn every assistant turn's content and its ``<|im_end|>``; system and user turns, role
    headers and the newline after ``<|im_end|>`` are masked.
``qwen-repo``
    the Qwen repository's ``finetune.py``: additionally learn the ``<|im_start|>``, ``<|im_end|>``
    and trailing newline of every turn (system and user content and role headers stay masked).

The mask is built from the same pieces as the ids, never by searching the rendered text for
markers, so a template change cannot silently turn into "learn everything".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from base.tokenizer import QwenTokenizer

DEFAULT_SYSTEM = "You are a helpful assistant."
ROLES = ("system", "user", "assistant")
MASK_POLICIES = ("assistant", "qwen-repo")


class ChatError(ValueError):
    """A record that is not a usable conversation. ``reason`` is the manifest's count key."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def conversation(record: Any) -> list[dict[str, str]]:
    """The messages of a record in ``{"messages": [...]}`` or ``{"prompt", "response"}`` form.

    Raises ``ChatError`` naming what is wrong: unknown roles, empty or non-string content, a
    system message anywhere but first, no assistant turn.
    """
    if not isinstance(record, Mapping):
        raise ChatError("wrong_type", f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ChatError("wrong_type", "'messages' must be a non-empty list")
    elif "prompt" in record and "response" in record:
        messages = [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["response"]},
        ]
        if isinstance(record.get("system"), str):
            messages.insert(0, {"role": "system", "content": record["system"]})
    else:
        raise ChatError(
            "missing_field",
            f"expected 'messages' or 'prompt' and 'response'; fields: {', '.join(map(str, record))}",
        )
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatError("wrong_type", f"messages[{i}] is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ChatError("unknown_role", f"messages[{i}]: role {role!r} not one of {ROLES}")
        if not isinstance(content, str):
            raise ChatError("wrong_type", f"messages[{i}]: content is {type(content).__name__}")
        if not content.strip():
            raise ChatError("empty_content", f"messages[{i}] ({role}): empty content")
        if role == "system" and i != 0:
            raise ChatError("misplaced_system", f"messages[{i}]: a system message must be first")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise ChatError("no_assistant", "no assistant turn: nothing to learn")
    return out


def render(
    messages: Sequence[Mapping[str, str]],
    tokenizer: QwenTokenizer,
    policy: str = "assistant",
    system: str | None = DEFAULT_SYSTEM,
) -> tuple[list[int], list[int]]:
    """ChatML token ids and the loss mask (1 = learned) of a conversation.

    ``system`` is used when the conversation has no system message of its own; None: no system
    turn at all (a reference template without one).
    """
    if policy not in MASK_POLICIES:
        raise ValueError(f"mask policy {policy!r}: expected one of {', '.join(MASK_POLICIES)}")
    if system is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    newline = tokenizer.encode("\n")
    frame = 1 if policy == "qwen-repo" else 0  # <|im_start|>, <|im_end|>, newline learned?
    ids: list[int] = []
    mask: list[int] = []
    for message in messages:
        header = tokenizer.encode(message["role"]) + newline
        content = tokenizer.encode(message["content"])
        learned = 1 if message["role"] == "assistant" else 0
        ids += [tokenizer.im_start, *header, *content, tokenizer.im_end, *newline]
        mask += [frame, *[0] * len(header), *[learned] * len(content)]
        mask += [max(frame, learned), *[frame] * len(newline)]
    return ids, mask


def generation_prompt(
    messages: Sequence[Mapping[str, str]],
    tokenizer: QwenTokenizer,
    system: str | None = DEFAULT_SYSTEM,
) -> list[int]:
    """The ids of a conversation (ending in a user turn) followed by ``<|im_start|>assistant\\n``."""
    ids, _ = render([*messages, {"role": "assistant", "content": "-"}], tokenizer, system=system)
    tail = tokenizer.encode("-") + [tokenizer.im_end] + tokenizer.encode("\n")
    return ids[: len(ids) - len(tail)]
