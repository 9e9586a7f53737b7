"""The code corpus: languages by file extension, and the generated/minified-file heuristics.

Registered with the engine's prepare pipeline when the ``code_qwen`` plugin loads. The heuristics
follow the cleaning of The Stack / StarCoder: auto-generated markers near the top of a file, a mean
line length typical of minified code, and a low share of letters and digits (embedded data).
"""

from __future__ import annotations

import re

import numpy

from specialize.data.filters import Document, Filter, FilterSettings, register_filter
from specialize.data.sources import register_languages

LANGUAGES: dict[str, tuple[str, ...]] = {
    "python": (".py", ".pyi"),
    "c": (".c", ".h"),
    "c++": (".cc", ".cpp", ".cxx", ".hh", ".hpp", ".hxx"),
    "java": (".java",),
    "javascript": (".js", ".mjs", ".cjs"),
    "typescript": (".ts", ".tsx"),
    "go": (".go",),
    "rust": (".rs",),
    "c#": (".cs",),
    "ruby": (".rb",),
    "php": (".php",),
    "scala": (".scala",),
    "kotlin": (".kt", ".kts"),
    "swift": (".swift",),
    "shell": (".sh", ".bash"),
    "sql": (".sql",),
    "lua": (".lua",),
    "r": (".r", ".R"),
    "julia": (".jl",),
    "haskell": (".hs",),
    "markdown": (".md", ".rst"),
}

# Looked for in the first lines only (the keywords of codeparrot's/StarCoder's autogen filter, plus
# "do not edit"): a header saying the file was produced by a tool.
_GENERATED = re.compile(
    rb"auto-?generated|automatically generated|generated automatically|do not edit", re.IGNORECASE
)
_HEAD_LINES = 5
# Bytes counted as "alphanumeric": ASCII letters and digits, and every non-ASCII byte (letters of
# other scripts; counting them per byte avoids a per-character Python loop).
_NOT_ALPHANUMERIC = bytes(b for b in range(128) if not chr(b).isalnum())
# The same, as a byte -> bool table: one gather and count over the bytes, which (unlike
# bytes.translate) releases the GIL for the other workers and takes half the time.
_IS_ALPHANUMERIC = numpy.array([b not in _NOT_ALPHANUMERIC for b in range(256)], dtype=bool)


def _generated(settings: FilterSettings) -> Filter:
    def check(doc: Document) -> bool:
        end = -1
        for _ in range(_HEAD_LINES):
            end = doc.data.find(b"\n", end + 1)
            if end < 0:
                end = len(doc.data)
                break
        return _GENERATED.search(doc.data, 0, end) is not None

    return check


def _minified(settings: FilterSettings) -> Filter:
    return lambda doc: doc.mean_line_length > settings.max_mean_line_length


def _alphanumeric(settings: FilterSettings) -> Filter:
    def check(doc: Document) -> bool:
        data = numpy.frombuffer(doc.data, dtype=numpy.uint8)
        alphanumeric = numpy.count_nonzero(numpy.take(_IS_ALPHANUMERIC, data))
        return alphanumeric < settings.min_alphanumeric_fraction * len(doc.data)

    return check


register_languages({ext: name for name, exts in LANGUAGES.items() for ext in exts})
register_filter("generated", _generated)
register_filter("minified", _minified)
register_filter("alphanumeric", _alphanumeric)
