"""Graders of the math tasks: ``grade(record, completion) -> {"answer", "predicted", "correct"}``.

One pure function per task (no model code), taking an evaluation record in its dataset's published
schema and the generated text, returning the gold answer, the answer read from the completion (None
when it has none) and whether they match:

- ``gsm8k``: the number after ``####`` in the gold solution; the completion's number after its last
  ``####``, else its last number ("The answer is N" of the 8-shot prompt, a chat reply's final
  number); equal within 1e-4 (``math_qwen.answers``).
- ``math``: the record's ``answer`` (else the last ``\\boxed`` of its ``solution``); the
  completion's Minerva "Final Answer: The final answer is X. I hope it is correct." slot, else its
  last box, "answer is", ``$X$``; Minerva-normalized and sympy-equivalent
  (``math_qwen.math_equivalence``).
- ``math401``: the record's ``response``; the completion's last number; correct when
  ``|pred - target| < 1e-3``, absolute, the rule of the Math401 paper (Yuan et al. 2023); the Qwen
  report states none (docs/paper.md §10). Targets are printed to 4 decimals, so a prediction at
  full precision is within 5e-5 of them, while one rounded to 2 decimals usually is not.
- ``math23k``: the record's ``ans`` (the Math23K release) or ``answer``; the completion's last
  quantity; equal within 1e-4, absolute, the usual Math23K answer-accuracy tolerance.

The last quantity of a completion may be written ``-12``, ``1,234.5``, ``2/3``, ``\\frac{2}{3}``,
``50%``, ``1.5e3``, ``1.5 \\times 10^{3}``, the mixed number ``2(1/3)`` of Math23K answers, or the
Chinese ``3分之1`` / ``百分之50``; all are read exactly (as fractions), so 12-digit Math401 targets
lose nothing to floating point. For Math23K a percentage also matches its bare number ("50%" and
"50"), because the dataset writes the answers of "what percent ..." problems both ways.

``PAPER_GRADERS`` are the graders of the ``paper`` protocol, the reference scripts' own
(``math_qwen.paper``): ``gsm8k_base``, ``gsm8k_chat`` (Qwen's) and ``math`` (lm-evaluation-
harness's ``minerva_math``); Math401 and Math23K use the graders above under both protocols.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from types import MappingProxyType
from typing import Any

from math_qwen import paper
from math_qwen.answers import answers_match, extract_answer
from math_qwen.math_equivalence import (
    DEFAULT_TIMEOUT_SECONDS,
    SympyWorker,
    extract_math_answer,
    is_equiv,
    last_boxed_only_string,
    minerva_equal,
    remove_boxed,
)

__all__ = [
    "GRADERS",
    "MATH23K_TOLERANCE",
    "MATH401_TOLERANCE",
    "PAPER_GRADERS",
    "Quantity",
    "gsm8k",
    "last_quantity",
    "math",
    "math23k",
    "math401",
    "parse_quantity",
]

MATH401_TOLERANCE = Fraction(1, 1000)
MATH23K_TOLERANCE = Fraction(1, 10000)

Grade = dict[str, Any]


def gsm8k(record: Mapping[str, Any], completion: str) -> Grade:
    """GSM8K: the gold number after ``####`` against the completion's final number."""
    answer = extract_answer(record["answer"])
    if answer is None:
        raise ValueError(f"GSM8K record without a final answer: {record['answer'][-80:]!r}")
    predicted = extract_answer(completion)
    return _grade(answer, predicted, answers_match(predicted, answer))


def math(
    record: Mapping[str, Any],
    completion: str,
    *,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    worker: SympyWorker | None = None,
) -> Grade:
    """MATH (MATH500): Minerva extraction, normalization and sympy equivalence.

    ``timeout_seconds`` bounds the symbolic comparison (a timeout grades the answer wrong);
    ``worker`` is the sympy process to use (default: the shared one).
    """
    answer = record.get("answer") or remove_boxed(last_boxed_only_string(record["solution"]))
    if not answer:
        raise ValueError("MATH record without an 'answer' or a boxed answer in its 'solution'")
    predicted = extract_math_answer(completion)
    correct = is_equiv(answer, predicted, timeout_seconds, worker=worker)
    return _grade(answer, predicted, correct)


def math401(record: Mapping[str, Any], completion: str) -> Grade:
    """Math401: the completion's last number within 1e-3 (absolute) of the target."""
    answer = str(record["response"]).strip()
    target = parse_quantity(answer)
    if target is None:
        raise ValueError(f"Math401 target is not a number: {answer!r}")
    found = last_quantity(completion)
    correct = found is not None and abs(found.value - target.value) < MATH401_TOLERANCE
    return _grade(answer, None if found is None else found.text, correct)


def math23k(record: Mapping[str, Any], completion: str) -> Grade:
    """Math23K: the completion's last quantity equal to the answer within 1e-4 (absolute)."""
    answer = str(record["ans"] if "ans" in record else record["answer"]).strip()
    gold = parse_quantity(answer)
    if gold is None:
        raise ValueError(f"Math23K answer is not a number: {answer!r}")
    boxed = remove_boxed(last_boxed_only_string(completion or ""))
    found = (parse_quantity(boxed) if boxed else None) or last_quantity(completion)
    correct = found is not None and _math23k_match(found, gold)
    return _grade(answer, None if found is None else found.text, correct)


GRADERS: Mapping[str, Callable[..., Grade]] = MappingProxyType(
    {"gsm8k": gsm8k, "math": math, "math401": math401, "math23k": math23k}
)
"""The grader of each math task, by task name."""


def gsm8k_qwen_base(record: Mapping[str, Any], completion: str) -> Grade:
    """GSM8K as Qwen's ``evaluate_gsm8k.py`` grades it: the completion's last run of digits
    ``==`` the number after ``#### ``."""
    return _grade(*paper.qwen_gsm8k_base_correct(record["answer"], completion))


def gsm8k_qwen_chat(record: Mapping[str, Any], completion: str) -> Grade:
    """GSM8K as Qwen's ``evaluate_chat_gsm8k.py`` grades it: the last numbers of reply and gold
    solution within 1e-4."""
    return _grade(*paper.qwen_gsm8k_chat_correct(record["answer"], completion))


def math_minerva(
    record: Mapping[str, Any],
    completion: str,
    *,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    worker: SympyWorker | None = None,
) -> Grade:
    """MATH as lm-evaluation-harness's ``minerva_math`` grades it: the gold from the solution's
    last box, the completion's first "Final Answer: The final answer is X. I hope it is
    correct.", both normalized by the harness, equal when sympy subtracts them to zero."""
    answer = paper.minerva_gold(record["solution"])
    raw = paper.minerva_answer(completion)
    if raw is None:
        return _grade(answer, None, False)
    predicted = paper.minerva_normalize(raw)
    return _grade(
        answer, predicted, minerva_equal(predicted, answer, timeout_seconds, worker=worker)
    )


PAPER_GRADERS: Mapping[str, Callable[..., Grade]] = MappingProxyType(
    {"gsm8k_base": gsm8k_qwen_base, "gsm8k_chat": gsm8k_qwen_chat, "math": math_minerva}
)
"""The ``paper`` protocol's graders that differ from ``GRADERS``: GSM8K per mode, and MATH."""


def _grade(answer: str, predicted: str | None, correct: bool) -> Grade:
    return {"answer": answer, "predicted": predicted, "correct": bool(correct)}


def _math23k_match(found: Quantity, gold: Quantity) -> bool:
    candidates = [(found.value, gold.value)]
    if found.percent is not None:
        candidates.append((found.percent, gold.value))
    if gold.percent is not None:
        candidates.append((found.value, gold.percent))
    return any(abs(p - g) < MATH23K_TOLERANCE for p, g in candidates)


# --------------------------------------------------------------------------- quantities


@dataclass(frozen=True)
class Quantity:
    """A number read from text, exactly."""

    text: str
    """As written, e.g. ``"50%"``."""
    value: Fraction
    """Its value: ``Fraction(1, 2)`` for ``"50%"``."""
    percent: Fraction | None = None
    """For a percentage, the number before ``%`` (``50``), else None."""


_NUM = r"\d+(?:,\d{3})*(?:\.\d+)?|\.\d+"
# A "-" is a sign only where it cannot be a minus ("10-3" has no negative number); ASCII classes,
# because Chinese characters are word characters and "有20个" must still yield 20.
_QUANTITY = re.compile(
    rf"""
    (?:(?<![A-Za-z0-9_.)\]}}])(?P<sign>-))?
    (?<![A-Za-z0-9_.])
    (?:
      \\[dt]?frac\{{\s*(?P<fn>-?(?:{_NUM}))\s*\}}\{{\s*(?P<fd>-?(?:{_NUM}))\s*\}}
    | (?P<mw>{_NUM})\s*(?:又\s*|\(\s*)(?P<mn>{_NUM})\s*/\s*(?P<md>{_NUM})\s*\)?
    | (?P<cd>{_NUM})\s*分之\s*(?P<cn>{_NUM})
    | 百分之\s*(?P<cp>{_NUM})
    | (?P<sm>{_NUM})\s*(?:\\times|×|\*)\s*10\s*\^\s*\{{?\s*(?P<se>[-+]?\d+)\s*\}}?
    | (?P<an>{_NUM})\s*/\s*(?P<ad>{_NUM})
    | (?P<n>{_NUM})(?:[eE](?P<ne>[-+]?\d+))?(?:\s*(?P<pct>\\?%|％))?
    )
    """,
    re.VERBOSE,
)


def last_quantity(text: str | None) -> Quantity | None:
    """The last number, fraction or percentage written in ``text``; None when it has none."""
    if not text:
        return None
    found = None
    for match in _QUANTITY.finditer(text.replace("\u2212", "-")):
        found = _quantity(match) or found
    return found


def parse_quantity(text: str | None) -> Quantity | None:
    """``text`` read as exactly one quantity (``"-3.5"``, ``"(1/3)"``, ``"50%"``), else None."""
    if text is None:
        return None
    stripped = text.strip().replace("\u2212", "-").replace("$", "")
    while stripped.startswith("(") and stripped.endswith(")"):  # Math23K writes "(1/3)"
        stripped = stripped[1:-1].strip()
    match = _QUANTITY.fullmatch(stripped.rstrip("."))
    return None if match is None else _quantity(match)


def _quantity(match: re.Match[str]) -> Quantity | None:
    def number(name: str) -> Fraction:
        return Fraction(match[name].replace(",", ""))

    percent = None
    try:
        if match["fn"] is not None:
            value = number("fn") / number("fd")
        elif match["mw"] is not None:
            value = number("mw") + number("mn") / number("md")
        elif match["cd"] is not None:
            value = number("cn") / number("cd")
        elif match["cp"] is not None:
            percent = number("cp")
            value = percent / 100
        elif match["sm"] is not None:
            value = number("sm") * _power_of_ten(match["se"])
        elif match["an"] is not None:
            value = number("an") / number("ad")
        else:
            value = number("n") * _power_of_ten(match["ne"] or "0")
            if match["pct"]:
                percent, value = value, value / 100
    except (ZeroDivisionError, ValueError, OverflowError):
        return None
    if match["sign"]:
        value = -value
        percent = None if percent is None else -percent
    return Quantity(match[0].strip(), value, percent)


def _power_of_ten(exponent: str) -> Fraction:
    # "1e999999999" must not build a billion-digit integer.
    if abs(int(exponent)) > 400:
        raise OverflowError(f"exponent {exponent} out of range")
    return Fraction(10) ** int(exponent)
