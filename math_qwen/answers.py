"""Answer extraction and comparison for GSM8K-style outputs.

A GSM8K gold solution ends with ``#### N`` (N may carry thousands separators, e.g. ``#### 1,200``).
A model's reply is scored by the number after its last ``####`` or, for chat replies that do not
use the marker, by the last number in the reply, compared numerically with an absolute tolerance
of 1e-4 (the chat protocol of the Qwen report's GSM8K evaluation).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

__all__ = ["ANSWER_MARKER", "answers_match", "extract_answer", "normalize_number"]

ANSWER_MARKER = "####"

# A number as written in word-problem text: an optional sign and dollar sign, digits with optional
# thousands separators (only groups of three, so "1,2,3" stays three numbers) and a decimal part.
# The lookbehind keeps the "-" of "10-3" from being read as a sign, and digits glued to a word
# ("x2", "1.5" seen from its "5") from being read as a number of their own.
_NUMBER = re.compile(
    r"(?<![\w.])(?P<sign>-)?\$?(?P<digits>\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)",
)


def normalize_number(text: str | int | float) -> str | None:
    """The canonical spelling of a number: no separators or ``$``, no trailing zeros or ``.``.

    ``"1,200"`` → ``"1200"``, ``"$7.0"`` → ``"7"``, ``"0.50"`` → ``"0.5"``, ``"-0"`` → ``"0"``.
    Returns None when the text is not a single finite number.
    """
    value = _to_decimal(text)
    if value is None:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    # format(..., "f") keeps Decimal from switching to exponent notation ("1.2E+3").
    return format(value.normalize(), "f")


def extract_answer(text: str | None) -> str | None:
    """The final numeric answer of a GSM8K-style solution or model reply, normalized.

    The first number after the last ``####`` when that marker is followed by one; otherwise the last
    number anywhere in the text; None when the text has no number at all.
    """
    if not text:
        return None
    marker = text.rfind(ANSWER_MARKER)
    if marker >= 0:
        match = _NUMBER.search(text, marker + len(ANSWER_MARKER))
        if match is not None:
            return _normalize_match(match)
    last = None
    for match in _NUMBER.finditer(text):
        last = match
    return None if last is None else _normalize_match(last)


def answers_match(
    predicted: str | int | float | None, gold: str | int | float, tol: float = 1e-4
) -> bool:
    """Whether a predicted answer equals the gold one: numerically within ``tol`` (absolute).

    Both sides may carry ``$``, thousands separators or a trailing ``.``. A missing prediction never
    matches; when either side is not a number the stripped strings must be equal.
    """
    if predicted is None:
        return False
    p, g = _to_decimal(predicted), _to_decimal(gold)
    if p is None or g is None:
        return str(predicted).strip() == str(gold).strip()
    return abs(p - g) <= Decimal(str(tol))


def _normalize_match(match: re.Match[str]) -> str | None:
    return normalize_number((match["sign"] or "") + match["digits"])


def _to_decimal(text: str | int | float) -> Decimal | None:
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        text = repr(text)
    cleaned = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None
