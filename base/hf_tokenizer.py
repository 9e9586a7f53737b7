"""Qwen's tiktoken vocabulary as transformers tokenizer files (``vocab.json``, ``merges.txt``).

transformers and vLLM read a byte-level BPE as a vocabulary of GPT-2-style unicode strings plus a
list of merges; tiktoken stores only ranks. Every multi-byte token is the merge of exactly two lower
ranked tokens, found by running BPE on its bytes with the merges ranked below it — the same
derivation tiktoken's own tooling uses. Qwen2's tokenizer class has Qwen's pre-tokenizer pattern.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from base.tokenizer import ENDOFTEXT, QwenTokenizer, _read_ranks


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _split(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[1]):
                best = (i, rank)
        if best is None:
            return parts
        i = best[0]
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2 :]


def write_hf_tokenizer(tokenizer: QwenTokenizer, out: Path, model_max_length: int) -> None:
    ranks = _read_ranks(tokenizer.vocab_file.read_bytes(), tokenizer.vocab_file)
    to_unicode = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(to_unicode[b] for b in token)

    ordered = sorted(ranks.items(), key=lambda kv: kv[1])
    merges = []
    for token, rank in ordered:
        if len(token) > 1:
            parts = _split(token, ranks, rank)
            if len(parts) != 2:
                raise ValueError(
                    f"{tokenizer.vocab_file}: token {token!r} (rank {rank}) is not one merge of lower ranks"
                )
            merges.append(f"{text(parts[0])} {text(parts[1])}")
    (out / "vocab.json").write_text(
        json.dumps({text(t): r for t, r in ordered}, ensure_ascii=False)
    )
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    added = {
        str(i): {
            "content": name,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for name, i in tokenizer.special_tokens.items()
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": ENDOFTEXT,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": model_max_length,
    }
    (out / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    )
