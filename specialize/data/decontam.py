"""Decontamination: drop training documents that share a long n-gram with an evaluation set.

The n-grams are over *canonical* token ids, in the spirit of the word-level 13-grams of GPT-3's
study: every Qwen token with a letter in it is mapped to its lower-cased text without surrounding
whitespace, and tokens without letters (spaces, digits, punctuation) are dropped, so re-indenting or
re-wrapping a benchmark solution does not hide it, and a run of numbers like ``1, 2, 3, 4, ...``
that half the test files of any code base contain does not count as a match. A document is contaminated when any window of ``n`` canonical
tokens also occurs in a prompt or reference solution of one of the evaluation tasks (from the task
registry). Lookups are a bitmap test and, for its rare hits, a binary search in a sorted array: a few
vectorized numpy passes per document, cheap next to tokenization.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable

import numpy

from base.tokenizer import QwenTokenizer
from specialize.data.dedup import ngram_hashes

DEFAULT_NGRAM = 13  # the window of GPT-3's and most later decontamination studies


_LETTER = re.compile(r"[^\W\d_]")


@functools.lru_cache(maxsize=4)
def canonical_table(tokenizer: QwenTokenizer) -> numpy.ndarray:
    """token id -> canonical id (-1 for tokens without a letter, and special tokens)."""
    ranks = tokenizer._enc._mergeable_ranks
    table = numpy.full(tokenizer._enc.n_vocab, -1, dtype=numpy.int32)
    canonical: dict[str, int] = {}
    for token, token_id in ranks.items():
        text = token.decode("utf-8", "ignore").strip().lower()
        if _LETTER.search(text):
            table[token_id] = canonical.setdefault(text, len(canonical))
    return table


class NgramIndex:
    """The canonical n-gram hashes of evaluation texts, and a membership test for documents."""

    def __init__(self, table: numpy.ndarray, n: int, hashes: numpy.ndarray) -> None:
        self.table, self.n, self.hashes = table, n, hashes
        # A bitmap over the low hash bits answers "no" for almost every window in one gather;
        # only its hits are binary-searched. Sized for a fill of at most 1/16.
        bits = max(16, int(16 * len(hashes)).bit_length())
        self._mask = numpy.uint64((1 << bits) - 1)
        self._bitmap = numpy.zeros(1 << bits, dtype=bool)
        self._bitmap[(hashes & self._mask).astype(numpy.intp)] = True

    @classmethod
    def build(cls, tokenizer: QwenTokenizer, texts: Iterable[str], n: int = DEFAULT_NGRAM):
        if n < 1:
            raise ValueError(f"decontamination n-gram length {n} must be >= 1")
        table = canonical_table(tokenizer)
        parts = [
            ngram_hashes(cls._canonical(table, numpy.asarray(ids)), n)
            for ids in tokenizer.encode_batch(list(texts))
        ]
        hashes = numpy.unique(numpy.concatenate(parts)) if parts else numpy.empty(0, numpy.uint64)
        return cls(table, n, hashes)

    @staticmethod
    def _canonical(table: numpy.ndarray, ids: numpy.ndarray) -> numpy.ndarray:
        canonical = table[ids]
        return canonical[canonical >= 0]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.hashes.tobytes()).hexdigest()

    def __len__(self) -> int:
        return len(self.hashes)

    def contaminated(self, ids: numpy.ndarray) -> bool:
        return self.contaminated_many([ids])[0]

    def contaminated_many(self, documents: list[numpy.ndarray]) -> list[bool]:
        """``contaminated`` of each document (token ids), in one set of numpy passes over their
        concatenation: per document, a dozen small array operations would cost more than the
        arithmetic. Only windows within one document count, so the answers are the same."""
        if not len(self.hashes) or not documents:
            return [False] * len(documents)
        lengths = numpy.fromiter(map(len, documents), dtype=numpy.intp, count=len(documents))
        canonical = self.table[numpy.concatenate(documents)]
        keep = canonical >= 0
        # Where each document's canonical tokens end in their concatenation.
        token_ends = numpy.cumsum(lengths)
        kept_before = numpy.concatenate(([0], numpy.cumsum(keep)))
        ends = kept_before[token_ends]
        windows = ngram_hashes(canonical[keep], self.n)
        hits = numpy.flatnonzero(self._bitmap[(windows & self._mask).astype(numpy.intp)])
        contaminated = [False] * len(documents)
        if not len(hits):
            return contaminated
        # Only the rare bitmap hits are checked: in the index, and within one document (a window
        # across two documents' tokens is no window of either).
        where = numpy.searchsorted(self.hashes, windows[hits])
        where[where == len(self.hashes)] = 0
        hits = hits[self.hashes[where] == windows[hits]]
        first = numpy.searchsorted(ends, hits, side="right")
        last = numpy.searchsorted(ends, hits + self.n - 1, side="right")
        for document in numpy.unique(first[first == last]):
            contaminated[int(document)] = True
        return contaminated
