"""The MATH answer pipeline: final-answer extraction, Minerva normalization, sympy equivalence.

Follows the Minerva evaluation (Lewkowycz et al. 2022, appendix D) that the Qwen report uses for
MATH, with the ``hendrycks/math`` helpers for boxes:

1. The answer is taken from the completion (``extract_math_answer``): the 4-shot Minerva slot
   "Final Answer: The final answer is X. I hope it is correct.", else the last ``\\boxed{X}``,
   else "The answer is X", else the last ``$X$``.
2. Both answers are normalized (``normalize_final_answer``): the part after the last ``=``,
   without boxes, ``$``, units, ``\\text``, degrees, percent signs, spacing commands and spaces,
   with ``\\frac12``/``\\sqrt2`` shorthands braced and thousands separators dropped.
3. They are equivalent (``is_equiv``) when the normalized strings are equal, else when sympy proves
   ``simplify(a - b) == 0``; that runs in a worker process killed after ``timeout_seconds``.

Deviations from Minerva's reference code, each fixing a false verdict it gives:

- Unit words are removed as whole words only ("ft" no longer eats ``\\left``, "a " no longer
  deletes the variable of "2a + b"); ``\\overline`` is kept (``0.\\overline{3}`` is not 0.3).
- Thousands separators are dropped only from a single number ("1,000"), so the solution list
  "1,2" does not become 12.
- Lists are compared element by element: tuples and intervals in order with the same brackets
  ("(1,2]" is not "(1,2)"), sets ``\\{..\\}`` and bare comma-separated solution lists ("Enter all
  solutions, separated by commas") in any order, matrices cell by cell. Minerva compares them as
  whole strings, which fails a correct list given in another order.
- LaTeX is read by a small translator (``latex_to_sympy``) rather than sympy's ``parse_latex``
  (tried only for what the translator cannot read), which reads a mixed number ``3\\frac{1}{2}``
  as a product and a word as a product of letters. Decimals become exact rationals, so "0.333" is never equal to 1/3, and a run of three or more
  letters is a word, not a product, so "Monday" and "Mondya" differ.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from math_qwen.answers import normalize_number

__all__ = [
    "SympyWorker",
    "extract_math_answer",
    "is_equiv",
    "last_boxed_only_string",
    "latex_to_sympy",
    "minerva_equal",
    "normalize_final_answer",
    "remove_boxed",
    "symbolic_equal",
]

DEFAULT_TIMEOUT_SECONDS = 5.0

# --------------------------------------------------------------------------- boxes and extraction

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed_only_string(text: str) -> str | None:
    """The last ``\\boxed{...}`` (or ``\\boxed X``, ``\\fbox{...}``) of ``text``, braces included.

    Nested braces are matched; escaped ``\\{``/``\\}`` do not count. None when there is no box or
    its braces never close.
    """
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    command = "\\boxed" if text.startswith("\\boxed", start) else "\\fbox"
    after = start + len(command)
    if text.startswith(" ", after):
        # "\boxed 5$": the argument is the next word (the form hendrycks/math also accepts).
        word = text[after:].lstrip().split("$")[0].split()
        return f"{command} {word[0]}" if word else None
    if not text.startswith("{", after):
        return None
    close = _matching_brace(text, after)
    return None if close is None else text[start : close + 1]


def remove_boxed(boxed: str | None) -> str | None:
    """The content of a box returned by ``last_boxed_only_string``; None when it is not one."""
    if boxed is None:
        return None
    for command in _BOX_COMMANDS:
        if boxed.startswith(command + " "):
            return boxed[len(command) + 1 :].strip()
        if boxed.startswith(command + "{") and boxed.endswith("}"):
            return boxed[len(command) + 1 : -1]
    return None


# "Final Answer: The final answer is $X$. I hope it is correct." -- the Minerva few-shot slot; the
# answer ends with its line or at "I hope it is correct" (it may itself contain ".", as in 3.5).
_FINAL_ANSWER = re.compile(
    r"The final answer is\s*:?\s*(?P<answer>[^\n]*?)(?=\s*I hope it is correct|\n|$)",
    re.IGNORECASE,
)
_I_HOPE = re.compile(r"\s*I hope it is correct.*", re.IGNORECASE)
_ANSWER_IS = re.compile(r"answer is\s*:?\s*(?P<answer>[^\n]*)", re.IGNORECASE)
_DOLLAR_MATH = re.compile(r"(?<!\\)\$+(?P<answer>[^$]+?)(?<!\\)\$+")


def extract_math_answer(completion: str | None) -> str | None:
    """The final answer written in a MATH completion, un-normalized; None when there is none.

    In order: the last Minerva slot "The final answer is X. I hope it is correct." ("I hope ..."
    may be missing; the last, because a reply that corrects itself ends with the answer it
    means), the last ``\\boxed{X}``, the last "answer is X" line, the last ``$X$``. A few-shot
    completion is cut at its stop sequence (``Problem:``) before it gets here, so problems the
    model goes on to invent are not read.
    """
    if not completion:
        return None
    for match in reversed(list(_FINAL_ANSWER.finditer(completion))):
        answer = _strip_sentence_end(_I_HOPE.sub("", match["answer"]))
        if answer:
            return answer
    boxed = remove_boxed(last_boxed_only_string(completion))
    if boxed is not None and boxed.strip():
        return boxed.strip()
    answers = [m["answer"] for m in _ANSWER_IS.finditer(completion) if m["answer"].strip()]
    if answers:
        return _strip_sentence_end(answers[-1])
    maths = [m["answer"] for m in _DOLLAR_MATH.finditer(completion) if m["answer"].strip()]
    return maths[-1].strip() if maths else None


def _strip_sentence_end(text: str) -> str:
    return text.strip().rstrip(".").strip()


# --------------------------------------------------------------------------- normalization

# Units and filler words Minerva removes (its REMOVED_EXPRESSIONS), plus singulars, matched as
# whole words so that they never cut into commands or variable names.
_UNIT_WORDS = (
    "square", "sq", "cubic", "ways", "integers", "dollars", "dollar", "cents", "cent", "mph",
    "inches", "inch", "ft", "feet", "foot", "hours", "hour", "minutes", "minute", "seconds",
    "km", "cm", "gm", "meters", "meter", "units", "unit", "points", "point", "digits",
    "degrees", "degree", "pounds", "meals", "edges", "students", "multiples", "days", "years",
)  # fmt: skip
_UNITS = re.compile(
    r"(?<![A-Za-z\\])(?:" + "|".join(sorted(_UNIT_WORDS, key=len, reverse=True)) + r")(?![A-Za-z])"
    # The unit's exponent goes with it: "6 cm^2" is 6, not 6^2.
    r"(?:\s*\^\s*\{?\s*[23]\s*\}?)?"
)
_UNICODE = {
    "\u2212": "-", "\u00d7": "\\times ", "\u00f7": "\\div ", "\u00b7": "\\cdot ",
    "\u03c0": "\\pi ", "\u221e": "\\infty ", "\u00b0": "^\\circ", "\u2264": "\\le ",
    "\u2265": "\\ge ",
}  # fmt: skip
# Text-like commands: their content is kept, except that a ``\text`` after a value is a unit.
_TEXT_COMMAND = re.compile(r"\\(text|textrm|textnormal|textit|textbf|mbox|mathrm|mathbf)\s*\{")
_UNIT_COMMANDS = ("text", "textrm", "textnormal", "mbox", "mathrm")
_UNIT_TAIL = re.compile(r"(?:\^\{?[23]\}?)?\.?")
_ORDINAL = re.compile(r"\^?\{?\\(?:text|mathrm)\{(?:st|nd|rd|th)\}\}?")
_TEXT_AND = re.compile(r",?\s*\\(?:text|mbox)\{\s*(?:and|or)\s*\}\s*")
_ARTICLE = re.compile(r"\b(?:an?|the)\s+(?=[A-Za-z]{2,})")
# Sizing and spacing commands ("\\ " but not the "\\\\ " row break of a matrix).
_SPACING = re.compile(r"\\(?:left|right|displaystyle)(?![A-Za-z])|(?<!\\)\\ ")
_DROPPED = (
    ",\\!", "{,}", "\\!", "\\,", "\\;", "\\:", "\\qquad", "\\quad", "~", "^{\\circ}", "^\\circ",
    "\\circ", "\\%", "%", "\\$", "\\ldots", "\\dots", "\\cdots", '"',
)  # fmt: skip
_RENAMED = (
    ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\cfrac", "\\frac"), ("\\dbinom", "\\binom"),
    ("\\tbinom", "\\binom"), ("\\leq", "\\le"), ("\\geq", "\\ge"), ("\\neq", "\\ne"),
)  # fmt: skip
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_PLAIN_NUMBER = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)")
_SHORTHAND = re.compile(r"\\(frac|binom|sqrt)(?![A-Za-z])")


def normalize_final_answer(answer: str) -> str:
    """Minerva's normalization of a final answer, for string comparison and parsing.

    ``"x = \\dfrac12"`` → ``"\\frac{1}{2}"``, ``"5\\text{ cm}^2"`` → ``"5"``, ``"\\$1,000."`` →
    ``"1000"``, ``"30^\\circ"`` → ``"30"``, ``"\\left( 3, \\frac{\\pi}{2} \\right)"`` →
    ``"(3,\\frac{\\pi}{2})"``, ``"\\text{(C)}"`` → ``"(C)"``, ``"5.0"`` → ``"5"``.
    """
    text = answer.strip()
    for char, replacement in _UNICODE.items():
        text = text.replace(char, replacement)
    text = text.replace("\\$", "")
    # Math delimiters: keep the first $...$ segment (Minerva), drop \( \) \[ \].
    math = _DOLLAR_MATH.search(text)
    if math:
        text = math["answer"]
    text = re.sub(r"\\[()\[\]]", "", text).replace("$", "")
    boxed = remove_boxed(last_boxed_only_string(text))
    if boxed is not None:
        text = boxed
    text = _TEXT_AND.sub(",", text)
    text = _ORDINAL.sub("", text)
    # "x = 5", "f(x) = 2x + 1": the value is what follows the last "=".
    text = text.split("=")[-1]
    text = _SPACING.sub("", text)
    for dropped in _DROPPED:
        text = text.replace(dropped, "")
    for before, after in _RENAMED:
        text = text.replace(before, after)
    text = _strip_text_commands(text)
    without_units = _ARTICLE.sub("", _UNITS.sub("", text))
    if without_units.strip():  # "\text{degrees}" alone stays what it was
        text = without_units
    text = re.sub(r"\s+", "", text)
    text = _brace_shorthand(text)
    text = re.sub(r"^[A-Za-z]\\in", "", text)  # "x \in [2, 5)"
    text = text.rstrip(".")
    text = re.sub(r"(?<![\d}])\.(\d)", r"0.\1", text)  # ".5" → "0.5"
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    if _PLAIN_NUMBER.fullmatch(text):
        text = normalize_number(text) or text
    return text


def _strip_text_commands(text: str) -> str:
    """Unwrap ``\\text{X}`` to X, except a unit after a value: ``5\\text{ cm}^2`` → ``5``."""
    out = []
    pos = 0
    while True:
        match = _TEXT_COMMAND.search(text, pos)
        if match is None:
            break
        close = _matching_brace(text, match.end() - 1)
        if close is None:
            break
        before = text[pos : match.start()]
        value_before = ("".join(out) + before).strip()
        is_unit = match[1] in _UNIT_COMMANDS and re.search("[A-Za-z]", text[match.end() : close])
        if value_before and is_unit and _UNIT_TAIL.fullmatch(text[close + 1 :].strip()):
            out.append(before)
            pos = len(text)
            break
        out.append(before + text[match.end() : close])
        pos = close + 1
    out.append(text[pos:])
    return "".join(out)


def _brace_shorthand(text: str) -> str:
    """Brace shorthand arguments: ``\\frac12`` → ``\\frac{1}{2}``, ``\\sqrt2`` → ``\\sqrt{2}``.

    As in LaTeX, an unbraced argument is one character or one command (``\\frac\\pi2``).
    """
    out = []
    pos = 0
    while True:
        match = _SHORTHAND.search(text, pos)
        if match is None:
            break
        out.append(text[pos : match.end()])
        pos = match.end()
        if match[1] == "sqrt" and text.startswith("[", pos):
            close = text.find("]", pos)
            if close < 0:
                break
            out.append(text[pos : close + 1])
            pos = close + 1
        for _ in range(1 if match[1] == "sqrt" else 2):
            if pos >= len(text):
                break
            if text[pos] == "{":
                close = _matching_brace(text, pos)
                if close is None:
                    break
                out.append("{" + _brace_shorthand(text[pos + 1 : close]) + "}")
                pos = close + 1
            else:
                command = re.match(r"\\[A-Za-z]+", text[pos:])
                arg = command[0] if command else text[pos]
                out.append("{" + arg + "}")
                pos += len(arg)
    out.append(text[pos:])
    return "".join(out)


def _matching_brace(text: str, open_index: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_index``; escaped braces are skipped."""
    depth = 0
    i = open_index
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


# --------------------------------------------------------------------------- structure


def _split_top(text: str, separator: str = ",") -> list[str]:
    """``text`` split at ``separator`` outside any brackets (``\\{`` and ``\\}`` count)."""
    parts = []
    depth = 0
    start = 0
    i = 0
    while i < len(text):
        if text.startswith(separator, i) and depth == 0:
            parts.append(text[start:i])
            i += len(separator)
            start = i
            continue
        char = text[i]
        if char == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
            depth += 1 if text[i + 1] == "{" else -1
            i += 2
            continue
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        i += 1
    parts.append(text[start:])
    return parts


def _enclosed_list(text: str) -> tuple[str, list[str], str] | None:
    """``(1,2]`` → ``("(", ["1", "2"], "]")``: a bracketed list of two or more items, else None."""
    if len(text) < 2:
        return None
    if text.startswith("\\{") and text.endswith("\\}"):
        opener, closer, inner = "\\{", "\\}", text[2:-2]
    elif text[:1] in "([" and text[-1:] in ")]":
        opener, closer, inner = text[0], text[-1], text[1:-1]
    else:
        return None
    # "(1)+(2)" is not a list: the opening bracket must close at the very end.
    if _split_top(inner, ",") == [inner] or _unbalanced(inner):
        return None
    return opener, _split_top(inner, ","), closer


def _unbalanced(text: str) -> bool:
    depth = 0
    for char in text:
        depth += 1 if char in "([{" else -1 if char in ")]}" else 0
        if depth < 0:
            return True
    return depth != 0


_MATRIX = re.compile(r"\\begin\{([pbvB]?matrix)\}(?P<body>.*)\\end\{\1\}", re.DOTALL)


def _matrix_cells(text: str) -> list[list[str]] | None:
    match = _MATRIX.fullmatch(text)
    if match is None:
        return None
    return [row.split("&") for row in match["body"].split("\\\\") if row.strip()]


Scalar = Callable[[str, str], bool]


def _structured_equal(a: str, b: str, scalar: Scalar) -> bool:
    """Whether normalized answers are equal item by item; ``scalar`` compares single values."""
    if a == b:
        return True
    cells_a, cells_b = _matrix_cells(a), _matrix_cells(b)
    if cells_a is not None or cells_b is not None:
        return (
            cells_a is not None
            and cells_b is not None
            and [len(r) for r in cells_a] == [len(r) for r in cells_b]
            and all(
                _structured_equal(x, y, scalar)
                for row_a, row_b in zip(cells_a, cells_b)
                for x, y in zip(row_a, row_b)
            )
        )
    union_a, union_b = _split_top(a, "\\cup"), _split_top(b, "\\cup")
    if len(union_a) > 1 or len(union_b) > 1:
        return _ordered_equal(union_a, union_b, scalar)
    list_a, list_b = _enclosed_list(a), _enclosed_list(b)
    if list_a is not None or list_b is not None:
        if list_a is None or list_b is None or (list_a[0], list_a[2]) != (list_b[0], list_b[2]):
            return False
        if list_a[0] == "\\{":  # a set
            return _unordered_equal(list_a[1], list_b[1], scalar)
        return _ordered_equal(list_a[1], list_b[1], scalar)
    items_a, items_b = _split_top(a, ","), _split_top(b, ",")
    if len(items_a) > 1 or len(items_b) > 1:  # "Enter all the solutions, separated by commas."
        return _unordered_equal(items_a, items_b, scalar)
    return scalar(a, b)


def _ordered_equal(a: Sequence[str], b: Sequence[str], scalar: Scalar) -> bool:
    return len(a) == len(b) and all(_structured_equal(x, y, scalar) for x, y in zip(a, b))


def _unordered_equal(a: Sequence[str], b: Sequence[str], scalar: Scalar) -> bool:
    # Equivalence is transitive, so matching greedily finds a pairing whenever one exists.
    if len(a) != len(b):
        return False
    remaining = list(b)
    for x in a:
        for j, y in enumerate(remaining):
            if _structured_equal(x, y, scalar):
                del remaining[j]
                break
        else:
            return False
    return True


_NUM = r"-?(?:\d+(?:\.\d+)?|\.\d+)"
_EXACT_FRACTION = re.compile(
    rf"\\frac\{{(?P<a>{_NUM})\}}\{{(?P<b>{_NUM})\}}|(?P<c>{_NUM})/(?P<d>{_NUM})"
)


def _exact_number(text: str) -> Fraction | None:
    """A normalized answer that is a plain rational (``-\\frac{1}{2}``, ``0.5``, ``3/4``)."""
    sign = 1
    if text.startswith("-") and not _PLAIN_NUMBER.fullmatch(text):
        sign, text = -1, text[1:]
    try:
        if _PLAIN_NUMBER.fullmatch(text):
            return sign * Fraction(text)
        match = _EXACT_FRACTION.fullmatch(text)
        if match is None:
            return None
        numerator, denominator = (
            (match["a"], match["b"]) if match["a"] else (match["c"], match["d"])
        )
        return sign * Fraction(numerator) / Fraction(denominator)
    except (ValueError, ZeroDivisionError):
        return None


def _fast_scalar(a: str, b: str) -> bool | None:
    """Equal strings or equal plain rationals; None when only sympy can tell."""
    if a == b:
        return True
    x, y = _exact_number(a), _exact_number(b)
    return None if x is None or y is None else x == y


# --------------------------------------------------------------------------- LaTeX → sympy


class LatexParseError(ValueError):
    """Text the translator does not read as one mathematical expression."""


class _WordError(LatexParseError):
    """Text with a word in it: not an expression for any parser (letters would become a product)."""


_TOKEN = re.compile(r"\\[A-Za-z]+|\\.|\d+(?:\.\d+)?|\.\d+|[A-Za-z]|\S")
_FUNCTIONS = (
    "sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh",
    "tanh", "exp", "ln", "log",
)  # fmt: skip


class _Parser:
    """Recursive descent over the LaTeX of one answer; builds a sympy expression.

    expr := term (('+'|'-') term)*;  term := unary ((op | implicit) unary)*;
    unary := ('+'|'-') unary | power;  power := postfix ('^' exponent)*;  postfix := primary '!'*
    """

    def __init__(self, text: str) -> None:
        import sympy

        self.sp = sympy
        self.tokens = _TOKEN.findall(text)
        self.pos = 0
        letters = 0
        for token in self.tokens:
            letters = letters + 1 if len(token) == 1 and token.isalpha() else 0
            if letters >= 3:
                raise _WordError(f"{text!r} contains a word")

    def parse(self) -> Any:
        if not self.tokens:
            raise LatexParseError("empty expression")
        node = self.expr()
        if self.pos != len(self.tokens):
            raise LatexParseError(f"unexpected {self.peek()!r}")
        return node

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token != expected):
            raise LatexParseError(f"expected {expected or 'more'}, got {token!r}")
        self.pos += 1
        return token

    def expr(self) -> Any:
        node = self.term()
        while self.peek() in ("+", "-"):
            node = node + self.term() if self.take() == "+" else node - self.term()
        return node

    def term(self) -> Any:
        node = self.unary()
        while True:
            token = self.peek()
            if token in ("*", "\\cdot", "\\times"):
                self.take()
                node = node * self.unary()
            elif token in ("/", "\\div"):
                self.take()
                node = node / self.unary()
            elif self.starts_primary(token):
                node = node * self.power()
            else:
                return node

    def starts_primary(self, token: str | None) -> bool:
        if token is None:
            return False
        if token in ("(", "{", "[", "\\pi", "\\infty", "\\frac", "\\sqrt", "\\binom", "\\lfloor",
                     "\\lceil"):  # fmt: skip
            return True
        return token[0].isdigit() or token[0] == "." or token.isalpha() or token[1:] in _FUNCTIONS

    def unary(self) -> Any:
        if self.peek() == "-":
            self.take()
            return -self.unary()
        if self.peek() == "+":
            self.take()
            return self.unary()
        return self.power()

    def power(self) -> Any:
        node = self.postfix()
        while self.peek() == "^":
            self.take()
            node = node ** self.exponent()
        return node

    def exponent(self) -> Any:
        if self.peek() == "-":
            self.take()
            return -self.exponent()
        return self.postfix()

    def postfix(self) -> Any:
        node = self.primary()
        while self.peek() == "!":
            self.take()
            node = self.sp.factorial(node)
        return node

    def group(self, one_character: bool = False) -> Any:
        """A braced argument, or a single primary (``\\frac\\pi2`` after normalization).

        ``one_character``: as in LaTeX, an unbraced number argument is one digit (``\\log_28`` is
        the base-2 logarithm of 8, spaces being gone after normalization).
        """
        if self.peek() == "{":
            self.take()
            node = self.expr()
            self.take("}")
            return node
        token = self.peek()
        if one_character and token is not None and token[0].isdigit() and len(token) > 1:
            self.tokens[self.pos : self.pos + 1] = [token[0], token[1:]]
        return self.postfix()

    def primary(self) -> Any:
        sp = self.sp
        token = self.take()
        if token[0].isdigit() or token[0] == ".":
            return sp.Rational(token)  # exact: 0.333 stays 333/1000
        if len(token) == 1 and token.isalpha():
            name = token
            if self.peek() == "_":
                self.take()
                start = self.pos
                self.group(one_character=True)
                name += "_" + "".join(self.tokens[start : self.pos])
            return sp.Symbol(name)
        closers = {"(": ")", "[": "]", "{": "}", "|": "|", "\\lfloor": "\\rfloor",
                   "\\lceil": "\\rceil"}  # fmt: skip
        if token in closers:
            node = self.expr()
            self.take(closers[token])
            wrap = {"|": sp.Abs, "\\lfloor": sp.floor, "\\lceil": sp.ceiling}.get(token)
            return wrap(node) if wrap else node
        if token == "\\frac":
            numerator = self.group()
            return numerator / self.group()
        if token == "\\binom":
            n = self.group()
            return sp.binomial(n, self.group())
        if token == "\\sqrt":
            if self.peek() == "[":
                self.take()
                index = self.expr()
                self.take("]")
                return sp.root(self.group(), index)
            return sp.sqrt(self.group())
        if token == "\\pi":
            return sp.pi
        if token == "\\infty":
            return sp.oo
        if token[1:] in _FUNCTIONS:
            return self.function(token[1:])
        raise LatexParseError(f"unsupported {token!r}")

    def function(self, name: str) -> Any:
        sp = self.sp
        power = None
        if self.peek() == "^":  # \sin^2 x
            self.take()
            power = self.exponent()
        base = None
        if name == "log" and self.peek() == "_":
            self.take()
            base = self.group(one_character=True)
        argument = self.postfix() if self.peek() in ("(", "{") else self.power()
        functions = {"ln": sp.log, "arcsin": sp.asin, "arccos": sp.acos, "arctan": sp.atan}
        function = functions.get(name) or getattr(sp, name)
        value = sp.log(argument, base) if base is not None else function(argument)
        return value**power if power is not None else value


def latex_to_sympy(text: str) -> Any:
    """A sympy expression for one normalized LaTeX answer (``\\frac``, ``\\sqrt``, ``^``,
    ``\\cdot``, ``\\pi``, brackets, numbers, letters, common functions).

    Raises ``LatexParseError`` for what it does not read. Building the expression evaluates it,
    which can take unbounded time (``2^{2^{100}}``): call it only where a timeout applies.
    """
    return _Parser(text).parse()


def _antlr_parse(text: str) -> Any | None:
    """sympy's own LaTeX parser, when its antlr4 runtime is installed."""
    if importlib.util.find_spec("antlr4") is None:
        return None
    from sympy.parsing.latex import parse_latex

    try:
        return parse_latex(text)
    except Exception:  # its errors are of several kinds, all meaning "not readable"
        return None


def _to_sympy(text: str) -> Any | None:
    try:
        return latex_to_sympy(text)
    except _WordError:
        return None
    except (LatexParseError, TypeError, ValueError, ZeroDivisionError):
        return _antlr_parse(text)


def _sympy_scalar(a: str, b: str) -> bool:
    """sympy equivalence of two single normalized answers (runs in the worker process)."""
    fast = _fast_scalar(a, b)
    if fast is not None:
        return fast
    x, y = _to_sympy(a), _to_sympy(b)
    if x is None or y is None:
        return False
    import sympy

    difference = x - y
    if difference == 0 or sympy.simplify(difference) == 0:
        return True
    if difference.free_symbols:
        return False
    # simplify misses some identities (nested radicals); 50 digits settle those without ever
    # accepting a rounded decimal, which differs from the exact value far above 1e-30.
    scale = max(1, abs(complex(sympy.N(x, 50))))
    return bool(abs(complex(sympy.N(difference, 50))) < 1e-30 * scale)


def symbolic_equal(a: str, b: str) -> bool:
    """Equivalence of two normalized answers, structure and sympy; no timeout (worker side)."""
    try:
        return _structured_equal(a, b, _sympy_scalar)
    except Exception:  # sympy fails in many ways (MemoryError, RecursionError, its own errors...)
        return False


# --------------------------------------------------------------------------- worker process

ROBUST_COMPARISON = "robust"


def minerva_is_equiv(x1: str, x2: str) -> bool:
    """lm-evaluation-harness's ``minerva_math`` ``is_equiv`` (``math_qwen.paper`` cites it) of two
    answers it normalized, run in the sympy worker: true only when sympy's ``parse_latex`` (the
    harness's parser, on the antlr4 runtime this project pins) reads both and
    ``simplify(x1 - x2) == 0``; no string comparison comes first, so identical intervals or
    tuples, which do not parse, are unequal."""
    import sympy  # the worker's, loaded there only
    from sympy.parsing.latex import parse_latex

    try:
        x, y = parse_latex(x1), parse_latex(x2)
    except Exception:  # LaTeXParsingError, SympifyError, TypeError: "not equal" in the harness
        return False
    try:
        return bool(sympy.simplify(x - y) == 0)
    except Exception:
        return False


_COMPARISONS: dict[str, Callable[[str, str], bool]] = {
    ROBUST_COMPARISON: symbolic_equal,
    "minerva": minerva_is_equiv,
}


def serve(memory_mb: int = 2048) -> None:
    """The worker loop (``python -c "...; serve()"``): one JSON ``[a, b]`` per stdin line, one
    JSON verdict per line on the real stdout, until stdin closes."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed goes to stderr, never into the protocol
    import sympy  # noqa: F401  (imported before "ready": start-up is not billed to a request)

    _limit_memory(memory_mb)
    protocol.write('"ready"\n')
    for line in sys.stdin:
        try:
            a, b, *kind = json.loads(line)
            verdict = _COMPARISONS[kind[0] if kind else ROBUST_COMPARISON](a, b)
        except (ValueError, KeyError, IndexError):
            verdict = False
        protocol.write(json.dumps(verdict) + "\n")


def _limit_memory(memory_mb: int) -> None:
    """Cap the worker's address space at its current size + ``memory_mb`` (Linux only), so that
    a runaway computation ends in MemoryError instead of swapping the machine."""
    try:
        import resource

        with open("/proc/self/statm") as f:
            current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limit = current + memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, OSError, ValueError):
        pass


class SympyWorker:
    """A sympy process that answers equivalence questions and is killed when one overruns.

    sympy can run forever (or inside C code that no signal interrupts), so it never runs in the
    caller's process: a request without a reply after its timeout kills the worker and counts as
    "not equivalent"; the next request starts a new one. The worker is a fresh interpreter
    (``subprocess``, not ``multiprocessing``: nothing of the caller's ``__main__`` is re-run and
    no threads are forked). Thread-safe (requests queue up); a forked process gets its own worker.
    POSIX only (the reply is awaited with ``select``).
    """

    def __init__(self, memory_mb: int = 2048, startup_timeout: float = 120.0) -> None:
        self.memory_mb = memory_mb
        self.startup_timeout = startup_timeout
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._buffer = b""
        self._pid = os.getpid()

    def equal(
        self, a: str, b: str, timeout_seconds: float, comparison: str = "robust"
    ) -> bool | None:
        """Whether normalized answers ``a`` and ``b`` are equivalent by ``comparison``
        (``robust``: ``symbolic_equal``; ``minerva``: the harness's ``is_equiv``, in
        ``math_qwen.paper``); None on timeout."""
        with self._lock:
            process = self._start()
            assert process.stdin is not None
            try:
                process.stdin.write((json.dumps([a, b, comparison]) + "\n").encode())
                process.stdin.flush()
                reply = self._read_line(timeout_seconds)
            except OSError:  # the worker died (e.g. killed by the OOM killer)
                reply = None
            if reply is None:
                self._stop(kill=True)
                return None
            return json.loads(reply) is True

    def close(self) -> None:
        """Stop the worker process (a later request starts a new one)."""
        with self._lock:
            self._stop(kill=False)

    def __enter__(self) -> SympyWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> subprocess.Popen[bytes]:
        if self._pid != os.getpid():  # forked: the pipes belong to the parent's worker
            self._process, self._buffer, self._pid = None, b"", os.getpid()
        if self._process is not None and self._process.poll() is None:
            return self._process
        if importlib.util.find_spec("sympy") is None:
            raise ModuleNotFoundError("MATH answer equivalence needs sympy: pip install sympy")
        # The child must import this package even when it is not installed (a source checkout).
        root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        code = f"from math_qwen.math_equivalence import serve; serve({int(self.memory_mb)})"
        self._process = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        self._buffer = b""
        if self._read_line(self.startup_timeout) != '"ready"':
            self._stop(kill=True)
            raise RuntimeError(f"the sympy worker did not start within {self.startup_timeout} s")
        return self._process

    def _read_line(self, timeout_seconds: float) -> str | None:
        """The worker's next output line, or None when none is complete in time or it exited."""
        assert self._process is not None and self._process.stdout is not None
        fd = self._process.stdout.fileno()
        deadline = time.monotonic() + timeout_seconds
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:  # EOF: the worker exited
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def _stop(self, kill: bool) -> None:
        process, self._process, self._buffer = self._process, None, b""
        if process is None:
            return
        if not kill:
            try:
                assert process.stdin is not None
                process.stdin.close()  # the worker's loop ends at EOF
                process.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass


_default_worker: SympyWorker | None = None
_default_lock = threading.Lock()


def _shared_worker() -> SympyWorker:
    """The worker ``is_equiv`` uses unless given one: started on first need, stopped at exit."""
    global _default_worker
    with _default_lock:
        if _default_worker is None:
            _default_worker = SympyWorker()
            atexit.register(_default_worker.close)
        return _default_worker


# --------------------------------------------------------------------------- equivalence


def is_equiv(
    a: str | None,
    b: str | None,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    *,
    worker: SympyWorker | None = None,
) -> bool:
    """Whether two MATH answers (raw, un-normalized) are equivalent; symmetric.

    Equal normalized strings or equal plain rationals decide in this process; anything else goes
    to ``worker`` (default: one shared worker process) and counts as not equivalent when sympy
    has no verdict within ``timeout_seconds``. A missing or empty answer is never equivalent.
    """
    if timeout_seconds <= 0:
        raise ValueError(f"timeout_seconds must be positive, got {timeout_seconds}")
    if a is None or b is None:
        return False
    x, y = normalize_final_answer(a), normalize_final_answer(b)
    if not x or not y:
        return False
    percent_x, percent_y = _is_percent(a, x), _is_percent(b, y)
    if percent_x != percent_y:
        # "25\\%" answers "25" (MATH writes percent answers both ways) and "50\\%" is 1/2, but
        # "0.5\\%" is not 1/2: the percentage counts as written or as its value, nothing else.
        number, other = (x, y) if percent_x else (y, x)
        if other == number:
            return True
        return _normalized_equiv(other, f"\\frac{{{number}}}{{100}}", timeout_seconds, worker)
    return _normalized_equiv(x, y, timeout_seconds, worker)


def _is_percent(raw: str, normalized: str) -> bool:
    """A single value written with a percent sign (normalization drops the sign)."""
    return "%" in raw and len(_split_top(normalized, ",")) == 1


def _normalized_equiv(x: str, y: str, timeout_seconds: float, worker: SympyWorker | None) -> bool:
    undecided = False

    def fast(p: str, q: str) -> bool:
        nonlocal undecided
        verdict = _fast_scalar(p, q)
        undecided = undecided or verdict is None
        return bool(verdict)

    if _structured_equal(x, y, fast):
        return True
    if not undecided:  # every item was a plain number (or the shapes differ): that is final
        return False
    return (worker or _shared_worker()).equal(x, y, timeout_seconds) is True


def minerva_equal(
    x: str,
    y: str,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    *,
    worker: SympyWorker | None = None,
) -> bool:
    """The harness's ``is_equiv`` of two answers it normalized (``math_qwen.paper``), in the
    worker process; a timeout is "not equal", as the harness's 5 s alarm makes it."""
    return (worker or _shared_worker()).equal(x, y, timeout_seconds, "minerva") is True
