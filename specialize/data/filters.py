"""Per-document quality filters for ``specialize data prepare``, registered by name.

A filter looks at one decoded document and says whether to drop it; the manifest counts removals
under the filter's name. The generic ones live here; domain packages register their own with
``register_filter`` (``code_qwen`` adds the generated/minified-file heuristics). Corpus-level
filters (deduplication, decontamination) need state across documents and live in ``dedup.py`` and
``decontam.py``; their names share the same ``--filters`` namespace.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy


@dataclass(frozen=True)
class FilterSettings:
    """Thresholds of the per-document filters (defaults follow The Stack / StarCoder cleaning)."""

    max_bytes: int = 1_000_000
    """``size``: documents larger than this many bytes are dropped."""
    max_line_length: int = 1000
    """``long-lines``: documents with a line longer than this many bytes are dropped."""
    max_mean_line_length: float = 100.0
    """``minified``: documents whose mean line length (bytes) exceeds this are dropped."""
    min_alphanumeric_fraction: float = 0.25
    """``alphanumeric``: documents with a smaller share of letters/digits are dropped (data blobs)."""


class Document:
    """One decoded document as filters see it."""

    __slots__ = ("data", "text", "language")

    def __init__(self, data: bytes, text: str, language: str) -> None:
        self.data, self.text, self.language = data, text, language

    # Line metrics are in bytes (a close bound on characters for code) and computed in C: a list of
    # line strings per document would cost as much as the other filters together.
    @property
    def mean_line_length(self) -> float:
        newlines = self.data.count(b"\n")
        return (len(self.data) - newlines) / (newlines + 1)

    @property
    def max_line_length(self) -> int:
        ends = numpy.flatnonzero(numpy.frombuffer(self.data, dtype=numpy.uint8) == 10)
        if not len(ends):
            return len(self.data)
        first, last = int(ends[0]), len(self.data) - 1 - int(ends[-1])
        between = int((ends[1:] - ends[:-1]).max()) - 1 if len(ends) > 1 else 0
        return max(first, between, last)

    def has_line_longer_than(self, limit: int) -> bool:
        """``max_line_length > limit``, mostly without looking at every byte.

        A line of more than ``limit`` bytes holds a whole aligned block of ``(limit + 1) // 2``
        bytes. If every block has a newline, no line is that long; in code, ``bytes.find`` meets a
        newline within a few dozen bytes of each block's start (a third of the time of finding
        every newline). Only documents with a block of no newline are measured.
        """
        data = self.data
        if len(data) <= limit:
            return False
        size = max(1, (limit + 1) // 2)
        find = data.find
        if all(find(b"\n", i, i + size) >= 0 for i in range(0, len(data) - size + 1, size)):
            return False
        return self.max_line_length > limit


Filter = Callable[[Document], bool]
"""Returns True when the document must be dropped."""

_REGISTRY: dict[str, Callable[[FilterSettings], Filter]] = {}


def register_filter(name: str, factory: Callable[[FilterSettings], Filter]) -> None:
    """Make ``name`` available to ``--filters``; filters run in registration order."""
    if name in _REGISTRY or name in CORPUS_FILTERS:
        raise ValueError(f"a document filter named {name!r} is already registered")
    _REGISTRY[name] = factory


def document_filter_names() -> list[str]:
    return list(_REGISTRY)


def build_filters(names: list[str], settings: FilterSettings) -> list[tuple[str, Filter]]:
    """The per-document filters among ``names``, in registration order."""
    return [(name, factory(settings)) for name, factory in _REGISTRY.items() if name in names]


# Corpus-level filters, applied by the prepare pipeline itself.
EXACT_DEDUP = "exact-dedup"
NEAR_DEDUP = "near-dedup"
DECONTAMINATE = "decontaminate"
CORPUS_FILTERS = (DECONTAMINATE, EXACT_DEDUP, NEAR_DEDUP)


def resolve_filter_names(spec: str) -> list[str]:
    """``--filters``: ``default`` (everything but near-dedup), ``all``, ``none``, or a list.

    Unknown names are an error that lists the known ones.
    """
    known = document_filter_names() + list(CORPUS_FILTERS)
    default = [name for name in known if name != NEAR_DEDUP]
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if part == "none":
            continue
        if part == "default":
            names += default
        elif part == "all":
            names += known
        elif part in known:
            names.append(part)
        else:
            raise ValueError(
                f"--filters: unknown filter {part!r}; known: {', '.join(known)} "
                "(or default, all, none)"
            )
    if "none" in spec.split(",") and len(names) > 0:
        raise ValueError(f"--filters={spec!r}: 'none' cannot be combined with other filters")
    return [name for name in known if name in names]  # canonical order, no repeats


def _size(settings: FilterSettings) -> Filter:
    return lambda doc: len(doc.data) > settings.max_bytes


def _long_lines(settings: FilterSettings) -> Filter:
    return lambda doc: doc.has_line_longer_than(settings.max_line_length)


register_filter("size", _size)
register_filter("long-lines", _long_lines)
