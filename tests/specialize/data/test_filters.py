import random

import pytest

from specialize.data.filters import (
    Document,
    FilterSettings,
    build_filters,
    register_filter,
    resolve_filter_names,
)
from specialize.plugins import load_plugins

load_plugins()


def _doc(text: str) -> Document:
    return Document(text.encode(), text, "python")


def _drops(name: str, text: str, **settings) -> bool:
    [(_, rejects)] = build_filters([name], FilterSettings(**settings))
    return rejects(_doc(text))


def test_line_metrics() -> None:
    doc = _doc("ab\n\nabcdef\n")
    assert doc.max_line_length == 6
    assert doc.mean_line_length == pytest.approx(8 / 4)
    assert _doc("no newline").max_line_length == 10


def test_the_block_test_for_long_lines_equals_the_longest_line() -> None:
    """Lines of every length around the limit and its half, at every alignment, with runs of
    newlines and none: the block shortcut answers as the exact longest line does."""
    rng = random.Random(0)
    for _ in range(3000):
        limit = rng.choice([0, 1, 2, 3, 7, 10, 11, 64])
        lengths = [
            rng.choice(
                [0, 1, limit // 2, limit // 2 + 1, limit, limit + 1, rng.randint(0, 3 * limit + 3)]
            )
            for _ in range(rng.randint(1, 6))
        ]
        text = "\n".join("x" * n for n in lengths)
        doc = _doc(text)
        assert doc.max_line_length == max(map(len, text.split("\n")))
        assert doc.has_line_longer_than(limit) == (doc.max_line_length > limit), (limit, lengths)


def test_size_and_long_lines() -> None:
    assert _drops("size", "x" * 11, max_bytes=10)
    assert not _drops("size", "x" * 10, max_bytes=10)
    assert _drops("long-lines", "a\n" + "b" * 11 + "\nc", max_line_length=10)
    assert not _drops("long-lines", "a\n" + "b" * 10 + "\nc", max_line_length=10)


def test_names_and_registration() -> None:
    assert resolve_filter_names("default")[:2] == ["size", "long-lines"]
    with pytest.raises(ValueError, match="already registered"):
        register_filter("size", lambda settings: lambda doc: False)
    with pytest.raises(ValueError, match="unknown filter"):
        resolve_filter_names("sizes")
