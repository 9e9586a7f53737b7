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

    # Line metrics are in bytes (a close bound on characters for code) and vectorized: a list of
    # line strings per document would cost as much as the other filters together.
    @property
    def mean_line_length(self) -> float:
        newlines = self.data.count(b"\n")
        return (len(self.data) - newlines) / (newlines + 1)

    @property
    def max_line_length(self) -> int:
        ends = numpy.flatnonzero(numpy.frombuffer(self.data, dtype=numpy.uint8) == 10)
        bounds = numpy.concatenate(([-1], ends, [len(self.data)]))
        return int(numpy.diff(bounds).max()) - 1


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
    return lambda doc: doc.max_line_length > settings.max_line_length


register_filter("size", _size)
register_filter("long-lines", _long_lines)
