"""General (non-code) English text made offline from what every machine has: the prose of the
CPython standard library's docstrings and comments.

The factory demo pretrains its small base model on this rather than on code, so that continued
pretraining on code (Code-Qwen) has something to add, as it has for the real Qwen base. One
document per module: its docstrings in source order (module, classes, functions), then its comment
lines, stripped of the ``#`` and joined into paragraphs. Code itself never appears: doctest lines
(``>>>`` and their output) are removed from docstrings, and a comment that is commented-out code
(it parses as a Python statement with an operator, call or keyword) is dropped.

Directories named in ``exclude`` are skipped, so held-out code (the demo's perplexity set) does not
reach the base through its docstrings either. Files that cannot be decoded or parsed are counted.

    python -m specialize.data.general_text [ROOT] -o general.jsonl [--exclude email,json]
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import sys
import sysconfig
import tokenize
from collections.abc import Iterator, Sequence
from pathlib import Path

DEFAULT_EXCLUDE = ("site-packages", "dist-packages", "__pycache__", "test", "tests", "idlelib")
MIN_CHARS = 200  # a module with less prose than this is mostly code: no document


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _docstrings(tree: ast.Module) -> list[str]:
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef))]
    found = []
    for node in nodes:
        text = ast.get_docstring(node, clean=True)
        if text:
            found.append(_without_doctests(text))
    return [t for t in found if t]


def _without_doctests(text: str) -> str:
    """Drop ``>>>``/``...`` lines and the output lines that follow them (up to a blank line)."""
    kept, in_example = [], False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith((">>>", "... ")) or stripped == "...":
            in_example = True
            continue
        if in_example and stripped:
            continue
        in_example = False
        kept.append(line)
    return "\n".join(kept).strip()


def _is_code(text: str) -> bool:
    """Commented-out code: parses, and is more than a bare name or phrase."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return False
    return any(not isinstance(s, ast.Expr) or not isinstance(s.value, ast.Name) for s in tree.body)


def _comments(source: str) -> list[str]:
    """Comment text, consecutive lines joined into one paragraph; shebangs and pragmas dropped."""
    paragraphs: list[list[str]] = []
    last_row = -2
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.COMMENT:
            continue
        text = token.string.lstrip("#").strip()
        if not text or text.startswith(("!", "-*-", "type:", "noqa", "pragma", "fmt:")):
            continue
        if _is_code(text):
            continue
        if token.start[0] == last_row + 1 and paragraphs:
            paragraphs[-1].append(text)
        else:
            paragraphs.append([text])
        last_row = token.start[0]
    return [" ".join(p) for p in paragraphs if sum(len(t) for t in p) >= 20]


def module_text(source: str) -> str:
    """The prose of one module (raises SyntaxError / tokenize.TokenError on bad source)."""
    tree = ast.parse(source)
    parts = _docstrings(tree) + _comments(source)
    return "\n\n".join(parts)


def iter_documents(
    root: Path, exclude: Sequence[str] = DEFAULT_EXCLUDE, counts: dict[str, int] | None = None
) -> Iterator[dict[str, str]]:
    """``{"path", "text"}`` per module under ``root`` with enough prose; ``counts`` gets
    ``modules``, ``documents``, ``unreadable`` and ``too_little_prose``."""
    counts = counts if counts is not None else {}
    for key in ("modules", "documents", "unreadable", "too_little_prose"):
        counts.setdefault(key, 0)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in exclude)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            counts["modules"] += 1
            try:
                text = module_text(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, SyntaxError, ValueError, tokenize.TokenError):
                counts["unreadable"] += 1
                continue
            if len(text) < MIN_CHARS:
                counts["too_little_prose"] += 1
                continue
            counts["documents"] += 1
            yield {"path": str(path.relative_to(root)), "text": text}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m specialize.data.general_text", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("root", nargs="?", default=None, help="default: this Python's stdlib")
    parser.add_argument("-o", "--output", required=True, help="JSONL file of {path, text}")
    parser.add_argument(
        "--exclude",
        default="",
        help="comma-separated directory names to skip, added to " + ",".join(DEFAULT_EXCLUDE),
    )
    args = parser.parse_args(argv)
    root = Path(args.root) if args.root else stdlib_root()
    if not root.is_dir():
        parser.error(f"{root}: not a directory")
    exclude = DEFAULT_EXCLUDE + tuple(x.strip() for x in args.exclude.split(",") if x.strip())
    counts: dict[str, int] = {}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    chars = 0
    with partial.open("w", encoding="utf-8") as f:
        for document in iter_documents(root, exclude, counts):
            chars += len(document["text"])
            f.write(json.dumps(document, ensure_ascii=False) + "\n")
    partial.replace(out)  # a killed run leaves no half file that looks finished
    print(
        f"{out}: {counts['documents']:,} documents ({chars:,} characters) from "
        f"{counts['modules']:,} modules; skipped {counts['unreadable']:,} unreadable, "
        f"{counts['too_little_prose']:,} with too little prose",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
