"""Code-instruction SFT data made offline from Python sources (by default the standard library).

Stage 1 (one turn): the user asks for a function by its signature and docstring, in the wording of
the chat HumanEval prompt (``Write a Python function `sig` to solve the following problem:``), and
the assistant answers with the function's source. Stage 2 (two turns, stricter selection) continues
the conversation with a follow-up whose answer is derived from the source alone:

- the docstring has self-contained doctest examples → "write a test": a pytest function asserting
  those examples;
- otherwise, chosen by a stable hash of the function's name → "explain what it does": the
  docstring's summary paragraph; or "show it without the docstring": the source minus that string.

Selection: top-level functions (methods too with ``include_methods``) that are public (no leading
``_``), undecorated (a decorator such as ``@contextmanager`` changes what the body means), have a
docstring and a body beyond it, and span at most ``max_lines`` lines. The split is by module: a
stable hash of the dotted module name puts ``test_percent`` percent of the modules in ``"test"``.
Exact duplicate sources are kept once, at their first occurrence in sorted path order over both
splits, so the held-out split never repeats a training answer (for calls with the same selection
options: a method and a function with the same source only meet when methods are included).
Files that cannot be decoded or parsed are skipped and counted.

    python -m code_qwen.instructions --stage 1 --split train -o code-sft-1.jsonl [--limit N]
"""

from __future__ import annotations

import argparse
import ast
import builtins
import doctest
import hashlib
import importlib.util
import json
import sys
import sysconfig
import textwrap
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "EXCLUDED_DIRS",
    "SPLITS",
    "FunctionSample",
    "collect_functions",
    "default_root",
    "function_instructions",
    "main",
    "module_split",
    "multi_turn_instructions",
    "single_turn_chat",
    "multi_turn_chat",
]

SPLITS = ("train", "test")

# Directories never read: installed third-party packages, bytecode, and test suites (test helpers
# are rarely documented and lib2to3's test data is deliberately broken Python 2).
EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)

_BUILTINS = frozenset(dir(builtins))


@dataclass(frozen=True)
class FunctionSample:
    """One selected function and everything the conversations are made from."""

    module: str
    """Dotted module name, e.g. ``"email.utils"``."""
    qualname: str
    """``name`` for a function, ``Class.name`` for a method."""
    signature: str
    """``name(args)`` with annotations and defaults as written."""
    docstring: str
    """The cleaned docstring (``inspect.cleandoc`` form)."""
    source: str
    """The dedented source of the ``def`` statement, docstring included."""
    bare_source: str | None
    """The source without its docstring, when removing it leaves valid code."""
    is_async: bool = False

    @property
    def name(self) -> str:
        """The function's own name."""
        return self.qualname.rpartition(".")[2]

    @property
    def is_method(self) -> bool:
        """Whether the function is defined in a class body."""
        return "." in self.qualname

    @property
    def summary(self) -> str:
        """The docstring's first paragraph on one line."""
        return " ".join(self.docstring.split("\n\n")[0].split())

    def doctest_asserts(self) -> list[str]:
        """``assert`` lines for the docstring's examples that need nothing but this function.

        An example qualifies when its source and expected output are single expressions that use no
        names besides the function and builtins, and it does not expect an exception.
        """
        if self.is_method:
            return []
        try:
            examples = doctest.DocTestParser().get_examples(self.docstring)
        except ValueError:  # malformed doctest markup
            return []
        asserts = []
        for example in examples:
            got, want = example.source.strip(), example.want.strip()
            # Option directives (ELLIPSIS, NORMALIZE_WHITESPACE...) mean the output is not a literal.
            if example.exc_msg is not None or example.options or not want or "..." in want:
                continue
            if "\n" in got or "\n" in want:
                continue
            if not (self._self_contained(got, calls=True) and self._self_contained(want)):
                continue
            op = "is" if want in ("None", "True", "False") else "=="
            asserts.append(f"assert {got} {op} {want}")
        return asserts

    def _self_contained(self, expression: str, calls: bool = False) -> bool:
        try:
            tree = ast.parse(expression, mode="eval")
        except SyntaxError:
            return False
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        if calls and self.name not in names:
            return False
        return names <= _BUILTINS | {self.name}


def module_split(module: str, test_percent: int = 10) -> str:
    """The split a module belongs to: a stable hash of its dotted name (not Python's salted hash)."""
    digest = hashlib.blake2b(module.encode(), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "big") % 100 < test_percent else "train"


def default_root() -> Path:
    """The running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def collect_functions(
    root: str | Path | None = None,
    max_lines: int = 30,
    limit: int | None = None,
    *,
    split: str | None = "train",
    test_percent: int = 10,
    include_methods: bool = False,
    min_doc_words: int = 1,
    exclude: Iterable[str] = (),
) -> tuple[list[FunctionSample], dict[str, int]]:
    """The selected functions under ``root`` (a directory or one ``.py`` file), in a fixed order.

    ``split=None`` keeps both splits. ``limit`` stops after that many samples; the result is then a
    prefix of the unlimited one. The counts say how many files were read, could not be decoded
    (``unreadable``) or parsed (``unparsable``), how many functions were seen and why they were
    dropped, and how many were kept. Directories named in ``exclude`` are skipped besides
    ``EXCLUDED_DIRS`` (held-out code).
    """
    if split not in (*SPLITS, None):
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    if max_lines < 1:
        raise ValueError(f"max_lines must be >= 1, got {max_lines}")
    root = Path(root) if root is not None else default_root()
    if not root.exists():
        raise FileNotFoundError(f"no such file or directory: {root}")
    counts: Counter[str] = Counter()
    samples: list[FunctionSample] = []
    seen_sources: set[str] = set()
    for path in _python_files(root, EXCLUDED_DIRS.union(exclude)):
        if limit is not None and len(samples) >= limit:
            break
        counts["files"] += 1
        try:
            text = importlib.util.decode_source(path.read_bytes())
        except (OSError, UnicodeDecodeError, SyntaxError):  # a bad coding cookie is a SyntaxError
            counts["unreadable"] += 1
            continue
        try:
            tree = ast.parse(text, filename=str(path))
        except (SyntaxError, ValueError):  # ValueError: NUL bytes in the source
            counts["unparsable"] += 1
            continue
        module = _module_name(path)
        # ast's column offsets count UTF-8 bytes; decode_source has normalized newlines to "\n".
        lines = [line.encode() for line in text.split("\n")]
        wanted = split is None or module_split(module, test_percent) == split
        for qualname, node in _candidates(tree, include_methods):
            counts["functions"] += 1
            sample = _select(node, qualname, module, lines, max_lines, min_doc_words, counts)
            if sample is None:
                continue
            # Deduplicate across both splits, so a copy in a test module of a training function
            # (or the reverse) is dropped rather than leaking the answer.
            if sample.source in seen_sources:
                counts["duplicate"] += 1
                continue
            seen_sources.add(sample.source)
            if not wanted:
                counts["other_split"] += 1
                continue
            samples.append(sample)
            counts["kept"] += 1
            if limit is not None and len(samples) >= limit:
                break
    return samples, dict(counts)


def single_turn_chat(sample: FunctionSample, system: str | None = None) -> dict[str, list]:
    """The stage-1 conversation: the request for the function, and its source."""
    return {"messages": [*_system(system), *_first_exchange(sample)]}


def multi_turn_chat(sample: FunctionSample, system: str | None = None) -> dict[str, list]:
    """The stage-2 conversation: the stage-1 exchange and one follow-up (see the module doc)."""
    follow_up, answer = _follow_up(sample)
    return {
        "messages": [
            *_system(system),
            *_first_exchange(sample),
            {"role": "user", "content": follow_up},
            {"role": "assistant", "content": answer},
        ]
    }


def function_instructions(
    root: str | Path | None = None,
    max_lines: int = 30,
    limit: int | None = None,
    *,
    system: str | None = None,
    **selection: Any,
) -> tuple[list[dict[str, list]], dict[str, int]]:
    """Stage-1 SFT conversations ``{"messages": [...]}`` and the selection counts; ``selection``:
    the keyword options of ``collect_functions`` (split, test_percent, include_methods, exclude)."""
    samples, counts = collect_functions(root, max_lines, limit, **selection)
    return [single_turn_chat(s, system) for s in samples], counts


def multi_turn_instructions(
    root: str | Path | None = None,
    max_lines: int = 30,
    limit: int | None = None,
    *,
    min_doc_words: int = 5,
    system: str | None = None,
    **selection: Any,
) -> tuple[list[dict[str, list]], dict[str, int]]:
    """Stage-2 SFT conversations (two turns; docstrings of at least ``min_doc_words`` words)."""
    samples, counts = collect_functions(
        root, max_lines, limit, min_doc_words=min_doc_words, **selection
    )
    return [multi_turn_chat(s, system) for s in samples], counts


# --- selection -------------------------------------------------------------------------------


def _python_files(root: Path, excluded: frozenset[str] = EXCLUDED_DIRS) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        if not excluded.intersection(path.relative_to(root).parts[:-1]) and path.is_file():
            yield path


def _module_name(path: Path) -> str:
    """The dotted name Python imports the file as: climb while the directory is a package."""
    parts = [] if path.stem == "__init__" else [path.stem]
    directory = path.parent
    while (directory / "__init__.py").is_file():
        parts.append(directory.name)
        directory = directory.parent
    return ".".join(reversed(parts)) or path.parent.name


_FunctionNode = ast.FunctionDef | ast.AsyncFunctionDef


def _candidates(tree: ast.Module, include_methods: bool) -> Iterator[tuple[str, _FunctionNode]]:
    for node in tree.body:
        if isinstance(node, _FunctionNode):
            yield node.name, node
        elif include_methods and isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, _FunctionNode):
                    yield f"{node.name}.{item.name}", item


def _select(
    node: _FunctionNode,
    qualname: str,
    module: str,
    lines: list[bytes],
    max_lines: int,
    min_doc_words: int,
    counts: Counter[str],
) -> FunctionSample | None:
    """The sample for one function, or None (counting the reason) when it does not qualify."""
    docstring = ast.get_docstring(node, clean=True)
    reason = None
    if node.name.startswith("_"):
        reason = "private"
    elif node.decorator_list:
        reason = "decorated"
    elif not docstring or len(docstring.split()) < min_doc_words:
        reason = "no_docstring"
    elif _trivial_body(node.body[1:]):
        reason = "trivial"
    elif node.end_lineno - node.lineno + 1 > max_lines:
        reason = "too_long"
    if reason is not None:
        counts[reason] += 1
        return None
    segment = _segment(lines, node)
    source = textwrap.dedent(segment).strip("\n")
    try:
        ast.parse(source)
    except SyntaxError:  # e.g. a def sharing its line with other statements
        counts["unparsable_function"] += 1
        return None
    return FunctionSample(
        module=module,
        qualname=qualname,
        signature=f"{node.name}({ast.unparse(node.args)})",
        docstring=docstring,
        source=source,
        bare_source=_without_docstring(node, segment),
        is_async=isinstance(node, ast.AsyncFunctionDef),
    )


def _segment(lines: list[bytes], node: ast.stmt) -> str:
    """The node's source with its first line's indentation kept, so a method dedents as a whole.

    What ``ast.get_source_segment(text, node, padded=True)`` returns, without re-splitting the
    whole file on every call (that made a pass over the standard library take a minute).
    A ``def`` starts its line, so everything before its column is indentation.
    """
    first, last = node.lineno - 1, node.end_lineno - 1
    if first == last:
        chunk = [lines[first][: node.end_col_offset]]
    else:
        chunk = [*lines[first:last], lines[last][: node.end_col_offset]]
    return b"\n".join(chunk).decode()


def _trivial_body(body: list[ast.stmt]) -> bool:
    """No body, or only ``pass`` / ``...`` / ``raise NotImplementedError``: nothing to learn."""
    for stmt in body:
        if isinstance(stmt, ast.Pass):
            continue
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue
        if isinstance(stmt, ast.Raise) and "NotImplementedError" in ast.unparse(stmt):
            continue
        return False
    return True


def _without_docstring(node: _FunctionNode, segment: str) -> str | None:
    """The function's source with the docstring's lines removed, if that leaves valid code.

    ``segment`` is the function's padded source; it starts on the ``def`` line, so source line
    numbers map onto its lines by subtracting ``node.lineno``.
    """
    doc = node.body[0]
    if doc.lineno == node.lineno or doc.end_lineno == node.body[1].lineno:
        return None  # the docstring shares a line with other code
    lines = segment.split("\n")  # decode_source normalized newlines; ast counts only these
    del lines[doc.lineno - node.lineno : doc.end_lineno - node.lineno + 1]
    source = textwrap.dedent("\n".join(lines)).strip("\n")
    try:
        tree = ast.parse(source)
    except SyntaxError:  # e.g. the header ends on the docstring's first line
        return None
    return source if ast.get_docstring(tree.body[0]) is None else None


# --- conversations ---------------------------------------------------------------------------


def _system(system: str | None) -> list[dict[str, str]]:
    return [] if system is None else [{"role": "system", "content": system}]


def _first_exchange(sample: FunctionSample) -> list[dict[str, str]]:
    kind = "an async Python" if sample.is_async else "a Python"
    if sample.is_method:
        owner = sample.qualname.rpartition(".")[0]
        what = f"{kind} method `{sample.signature}` of the class `{owner}`"
    else:
        what = f"{kind} function `{sample.signature}`"
    request = f"Write {what} to solve the following problem:\n{sample.docstring}"
    return [
        {"role": "user", "content": request},
        {"role": "assistant", "content": sample.source},
    ]


def _follow_up(sample: FunctionSample) -> tuple[str, str]:
    asserts = sample.doctest_asserts()
    if asserts:
        body = "\n".join(f"    {line}" for line in asserts)
        test = f"from {sample.module} import {sample.name}\n\n\ndef test_{sample.name}():\n{body}"
        return f"Now write a pytest test for `{sample.name}` based on its examples.", test
    # Stable hash (not Python's salted hash) so the choice is the same on every run.
    digest = hashlib.blake2b(f"{sample.module}:{sample.qualname}".encode(), digest_size=1)
    if sample.bare_source is not None and digest.digest()[0] % 2:
        return "Show the same function without its docstring.", sample.bare_source
    return f"In short, what does `{sample.name}` do?", sample.summary


def main(argv: Sequence[str] | None = None) -> int:
    """Write stage-1 or stage-2 code SFT conversations as JSONL; report the counts on stderr."""
    parser = argparse.ArgumentParser(
        prog="python -m code_qwen.instructions", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--stage", type=int, choices=(1, 2), default=1)
    parser.add_argument("--split", choices=SPLITS, default="train")
    parser.add_argument("-o", "--output", default="-", help="JSONL file ('-' = stdout)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many conversations")
    parser.add_argument("--root", default=None, help="source tree (default: the stdlib)")
    parser.add_argument("--max-lines", type=int, default=30)
    parser.add_argument("--test-percent", type=int, default=10)
    parser.add_argument("--methods", action="store_true", help="also take public methods")
    parser.add_argument("--system", default=None, help="system message")
    parser.add_argument(
        "--exclude", default="", help="comma-separated directory names to skip (held-out code)"
    )
    args = parser.parse_args(argv)
    make = function_instructions if args.stage == 1 else multi_turn_instructions
    try:
        records, counts = make(
            args.root,
            args.max_lines,
            args.limit,
            split=args.split,
            test_percent=args.test_percent,
            include_methods=args.methods,
            system=args.system,
            exclude=[x.strip() for x in args.exclude.split(",") if x.strip()],
        )
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if args.output == "-":
        sys.stdout.write(lines)
    else:
        with open(args.output, "w", encoding="utf-8") as out:
            out.write(lines)
    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(
        f"stage {args.stage} {args.split}: {len(records)} conversations ({summary})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
