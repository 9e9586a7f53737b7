"""The general-text corpus: prose of docstrings and comments, never code."""

from __future__ import annotations

import json

from specialize.data.general_text import iter_documents, main, module_text

SOURCE = '''"""Module summary: what this module is for.

>>> f(1)
2

Text after the example stays.
"""
import os  # noqa

# The helper below exists because the standard
# library needs one more example.
def f(x):
    """Return x plus one, for demonstration."""
    # x = x + 2
    return x + 1  # this trailing comment explains the arithmetic
'''


def test_docstrings_and_comments_without_code():
    text = module_text(SOURCE)
    assert text.startswith("Module summary: what this module is for.")
    assert ">>>" not in text and "\n2\n" not in text
    assert "Text after the example stays." in text
    assert "Return x plus one, for demonstration." in text
    # Consecutive comment lines become one paragraph; commented-out code and pragmas are dropped.
    assert "The helper below exists because the standard library needs one more example." in text
    assert "this trailing comment explains the arithmetic" in text
    assert "x = x + 2" not in text and "noqa" not in text and "import os" not in text


def test_walk_excludes_directories_and_counts(tmp_path):
    for package in ("kept", "heldout"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "mod.py").write_text(SOURCE * 3)
    (tmp_path / "kept" / "tiny.py").write_text("x = 1\n")
    (tmp_path / "kept" / "bad.py").write_bytes(b"\xff\xfe def")
    counts: dict[str, int] = {}
    docs = list(iter_documents(tmp_path, exclude=("heldout",), counts=counts))
    assert [d["path"] for d in docs] == ["kept/mod.py"]
    assert counts == {"modules": 3, "documents": 1, "unreadable": 1, "too_little_prose": 1}

    out = tmp_path / "out.jsonl"
    assert main([str(tmp_path), "-o", str(out), "--exclude", "heldout"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in rows] == ["kept/mod.py"] and rows[0]["text"] == docs[0]["text"]
