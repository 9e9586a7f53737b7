"""The Qwen v1 tokenizer: tiktoken BPE over the real ``qwen.tiktoken`` vocabulary.

The vocabulary file holds 151,643 ranks (``base64token rank`` per line); the special tokens follow
them. Text is encoded as bytes without normalization, so ``decode(encode(text)) == text`` for any
string. The default vocabulary is the copy shipped in the ``dashscope`` package; a missing file is
an error, never a fallback to another vocabulary.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy
import tiktoken

# Qwen's pre-tokenizer: cl100k-like, except that every digit is its own piece.
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_RANKS = 151643
"""Ordinary BPE tokens in ``qwen.tiktoken`` (ids ``0..NUM_RANKS-1``); the special tokens follow."""
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
NUM_EXTRA = 205


def _special_tokens() -> dict[str, int]:
    names = [ENDOFTEXT, IM_START, IM_END] + [f"<|extra_{i}|>" for i in range(NUM_EXTRA)]
    return {name: NUM_RANKS + i for i, name in enumerate(names)}


# The ids every module names (docs/paper.md §3: 151643, 151644, 151645), read from the table.
EOD_ID, IM_START_ID, IM_END_ID = (_special_tokens()[name] for name in (ENDOFTEXT, IM_START, IM_END))
VOCAB_SIZE = NUM_RANKS + len(_special_tokens())
"""Ids the tokenizer can produce; embedding tables are padded past them (``padded_vocab_size``)."""


def _default_vocab_file() -> Path:
    # find_spec locates the package without importing it (importing dashscope loads its client).
    spec = importlib.util.find_spec("dashscope")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "no Qwen vocabulary given and the 'dashscope' package (which ships qwen.tiktoken) is "
            "not installed; pass the path of qwen.tiktoken or of a Qwen checkpoint directory"
        )
    return (
        Path(next(iter(spec.submodule_search_locations))) / "resources" / QwenTokenizer.VOCAB_FILE
    )


def resolve_vocab_file(path: str | os.PathLike | None = None) -> Path:
    """The ``qwen.tiktoken`` file named by ``path``: the file itself or a directory holding it."""
    candidate = _default_vocab_file() if path is None else Path(path).expanduser()
    if candidate.is_dir():
        candidate = candidate / QwenTokenizer.VOCAB_FILE
    if not candidate.is_file():
        raise FileNotFoundError(f"Qwen vocabulary file not found: {candidate}")
    return candidate.resolve()


def _read_ranks(data: bytes, where: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:  # binascii.Error is a ValueError
            raise ValueError(f"{where}:{lineno}: not a 'base64token rank' line") from e
    if len(ranks) != NUM_RANKS or sorted(ranks.values()) != list(range(NUM_RANKS)):
        raise ValueError(f"{where}: expected ranks 0..{NUM_RANKS - 1}, got {len(ranks)} tokens")
    return ranks


@functools.lru_cache(maxsize=8)
def _load(vocab_file: str) -> QwenTokenizer:
    # Parsing 151k ranks takes about a second; every caller in a process shares one instance.
    return QwenTokenizer(Path(vocab_file))


class QwenTokenizer:
    VOCAB_FILE = "qwen.tiktoken"

    def __init__(self, vocab_file: Path) -> None:
        data = vocab_file.read_bytes()
        self.vocab_file = vocab_file
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.special_tokens = _special_tokens()
        self._enc = self._new_encoding(_read_ranks(data, vocab_file))
        # The constructing thread tokenizes with ``_enc`` and becomes the owner of its regex
        # caches; every other thread gets an encoding of its own (``_encoding``).
        self._thread = threading.local()
        self._thread.encoding = self._enc
        self._enc.encode_ordinary("warm-up")
        self.vocab_size = VOCAB_SIZE
        self.eod = self.special_tokens[ENDOFTEXT]
        self.im_start = self.special_tokens[IM_START]
        self.im_end = self.special_tokens[IM_END]
        self.pad = self.eod  # Qwen v1 has no pad token
        # Identifies the vocabulary, not where it lives: dataset caches stay valid across machines.
        self.unique_identifiers = {"class": type(self).__name__, "vocab_sha256": self.sha256}

    def _new_encoding(self, ranks: dict[bytes, int]) -> tiktoken.Encoding:
        return tiktoken.Encoding(
            name="qwen", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )

    def _encoding(self) -> tiktoken.Encoding:
        """The calling thread's own tiktoken encoding (built on its first use: 0.08 s, 36 MB).

        Why not one for all threads: tiktoken keeps a clone of its compiled pattern per thread,
        but fancy-regex shares the sub-regexes the clones delegate to, and regex-automata's cache
        pool has a lock-free path only for the first thread that ever used it. Every other
        thread takes a mutex on each delegated search: tokenizing the standard library took 27%
        longer in any thread but the first (BENCHMARKS.md, corpus preparation).
        """
        encoding = getattr(self._thread, "encoding", None)
        if encoding is None:
            encoding = self._thread.encoding = self._new_encoding(self._enc._mergeable_ranks)
        return encoding

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> QwenTokenizer:
        """Load from ``qwen.tiktoken``, a directory holding it, or the default; once per file."""
        return _load(str(resolve_vocab_file(path)))

    def __reduce__(self):  # DataLoader workers and spawned processes reload through the cache
        return (_load, (str(self.vocab_file),))

    def __repr__(self) -> str:
        return f"QwenTokenizer({str(self.vocab_file)!r}, sha256={self.sha256[:12]}…)"

    def encode(self, text: str) -> list[int]:
        """Token ids of ordinary text; special-token strings in it are encoded as plain text."""
        return self._encoding().encode(text, allowed_special=set(), disallowed_special=())

    def encode_document(self, text: str) -> numpy.ndarray:
        """``encode(text) + [eod]`` as int32, filled from tiktoken's buffer without a list."""
        ids = self._encoding().encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        out = numpy.empty(len(ids) + 1, dtype=numpy.int32)
        out[:-1] = ids
        out[-1] = self.eod
        return out

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """``encode`` over many texts; tiktoken releases the GIL, so threads run in parallel."""
        return self._enc.encode_batch(
            texts, num_threads=num_threads, allowed_special=set(), disallowed_special=()
        )

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode(list(ids))

    def encode_special(self, name: str) -> int:
        """The id of a special token such as ``<|im_end|>``."""
        try:
            return self.special_tokens[name]
        except KeyError:
            raise KeyError(
                f"{name!r} is not a Qwen special token; known: {ENDOFTEXT}, {IM_START}, {IM_END}, "
                f"<|extra_0|>..<|extra_{NUM_EXTRA - 1}|>"
            ) from None
