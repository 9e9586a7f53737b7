"""Decontamination: drop training documents that share a long n-gram with an evaluation set.

The n-grams are over *canonical* token ids, in the spirit of the word-level 13-grams of GPT-3's
study: every Qwen token with a letter in it is mapped to its lower-cased text without surrounding
whitespace, and tokens without letters (spaces, digits, punctuation) are dropped, so re-indenting or
re-wrapping a benchmark solution does not hide it, and a run of numbers like ``1, 2, 3, 4, ...``
that half the test files of any code base contain does not count as a match. A document is
contaminated when any window of ``n`` canonical tokens also occurs in a prompt or reference solution
of one of the evaluation tasks (from the task registry).

Lookups: a window can match only if all its ``n`` canonical tokens occur in the evaluation texts
(HumanEval uses 1.5% of the canonical vocabulary; 2% of the standard library's canonical tokens lie
in runs of 13 such tokens). Only those runs are hashed; their windows get a bitmap test and, for its
rare hits, a binary search in a sorted array. A few vectorized numpy passes per batch of documents.
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
OTHER = -2  # a canonical token that no evaluation text has


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

    def __init__(
        self, table: numpy.ndarray, n: int, hashes: numpy.ndarray, vocabulary: numpy.ndarray
    ) -> None:
        """``table``: token id -> canonical id (``canonical_table``); ``hashes``: sorted n-gram
        hashes (``ngram_hashes``) of the evaluation texts; ``vocabulary``: their canonical ids."""
        self.table, self.n, self.hashes = table, n, hashes
        # token id -> canonical id if it occurs in the evaluation texts, OTHER if it does not
        # (no window through it can match), -1 without a letter (not part of any window).
        self._lookup = numpy.where(table >= 0, OTHER, -1).astype(numpy.int32)
        in_texts = numpy.isin(table, vocabulary)
        self._lookup[in_texts] = table[in_texts]
        # A bitmap over the low hash bits answers "no" for almost every window in one gather;
        # only its hits are binary-searched. Sized for a fill of at most 1/64 (HumanEval: 1 MB,
        # in a core's cache; at 1/16 the binary search of false hits cost as much as the rest).
        bits = max(16, int(64 * len(hashes)).bit_length())
        self._mask = numpy.uint64((1 << bits) - 1)
        self._bitmap = numpy.zeros(1 << bits, dtype=bool)
        self._bitmap[(hashes & self._mask).astype(numpy.intp)] = True

    @classmethod
    def build(cls, tokenizer: QwenTokenizer, texts: Iterable[str], n: int = DEFAULT_NGRAM):
        if n < 1:
            raise ValueError(f"decontamination n-gram length {n} must be >= 1")
        table = canonical_table(tokenizer)
        canonical = [cls._canonical(table, tokenizer.encode_document(text)[:-1]) for text in texts]
        hashes = numpy.unique(
            numpy.concatenate(
                [numpy.empty(0, numpy.uint64), *(ngram_hashes(c, n) for c in canonical)]
            )
        )
        vocabulary = numpy.unique(numpy.concatenate([numpy.empty(0, numpy.int32), *canonical]))
        return cls(table, n, hashes, vocabulary)

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
        looked_up = self._lookup.take(numpy.concatenate(documents))
        keep = looked_up != -1
        canonical = looked_up[keep]
        # Where each document's canonical tokens end in their concatenation (per-document sums:
        # a running count over every token would be the largest array of the batch).
        lengths = numpy.fromiter(map(len, documents), dtype=numpy.intp, count=len(documents))
        nonempty = lengths > 0
        kept = numpy.zeros(len(documents), dtype=numpy.intp)
        if nonempty.any():
            document_starts = (numpy.cumsum(lengths) - lengths)[nonempty]
            kept[nonempty] = numpy.add.reduceat(keep, document_starts, dtype=numpy.intp)
        ends = numpy.cumsum(kept)
        contaminated = [False] * len(documents)
        # The runs of at least n tokens of the evaluation texts' vocabulary, packed together.
        bounds = numpy.flatnonzero(canonical == OTHER)
        bounds = numpy.concatenate(([-1], bounds, [len(canonical)]))
        run_lengths = numpy.diff(bounds) - 1
        long_runs = numpy.flatnonzero(run_lengths >= self.n)
        if not len(long_runs):
            return contaminated
        run_starts, run_lengths = bounds[long_runs] + 1, run_lengths[long_runs]
        packed_starts = numpy.cumsum(run_lengths) - run_lengths
        positions = numpy.arange(run_lengths.sum()) + numpy.repeat(
            run_starts - packed_starts, run_lengths
        )
        windows = ngram_hashes(canonical[positions], self.n)
        # A window of the packed runs is one of the document's if it lies within one run.
        window_at = numpy.arange(len(windows))
        run = numpy.searchsorted(packed_starts, window_at, side="right") - 1
        within = numpy.flatnonzero(window_at + self.n <= packed_starts[run] + run_lengths[run])
        windows, window_starts = windows[within], positions[within]  # positions in `canonical`
        slots = numpy.bitwise_and(windows, self._mask).view(numpy.intp)
        hits = numpy.flatnonzero(self._bitmap.take(slots))
        if not len(hits):
            return contaminated
        # Only the rare bitmap hits are checked: in the index, and within one document (a window
        # across two documents' tokens is no window of either).
        where = numpy.searchsorted(self.hashes, windows[hits])
        where[where == len(self.hashes)] = 0
        hits = window_starts[hits[self.hashes[where] == windows[hits]]]
        first = numpy.searchsorted(ends, hits, side="right")
        last = numpy.searchsorted(ends, hits + self.n - 1, side="right")
        for document in numpy.unique(first[first == last]):
            contaminated[int(document)] = True
        return contaminated
