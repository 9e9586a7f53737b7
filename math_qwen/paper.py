"""The scripts behind the published math numbers, reproduced: the ``paper`` protocol of the math
tasks (``math_qwen.tasks``). Each function says which reference it follows; they keep the
references' quirks on purpose, because those quirks produced the numbers the report shows.

- GSM8K ``base``: Qwen's ``eval/evaluate_gsm8k.py``. Its own 8 exemplars (``gsm8k_prompt.txt``,
  GSM8K train problems with multi-line reasoning), the completion cut at the first
  ``<|endoftext|>``, ``\\n\\n\\n``, ``\\n\\n`` or ``Question:``; the prediction is the last run of
  digits (``\\d+``: no sign, no decimals, no separators), the gold the number after ``#### ``,
  compared with ``==``.
- GSM8K ``chat``: Qwen's ``eval/evaluate_chat_gsm8k.py`` (0-shot): the question alone as the
  user turn; the last number of the reply (signs, decimals and thousands separators read) against
  the last number of the gold solution, within 1e-4 (absolute).
- MATH: lm-evaluation-harness's ``minerva_math500`` (Qwen published no MATH script): its 4-shot
  prompt ("Problem:\\nP\\n\\nSolution: S\\n\\n", its exemplars' bytes), a stop at ``Problem:``,
  256 new tokens, the *first* "Final Answer: The final answer is X. I hope it is correct." (no
  fallback), Minerva's normalization as the harness writes it, and equality only when sympy can
  subtract the two parsed answers to zero (``is_equiv``).
"""

from __future__ import annotations

import ast
import math as _math
import re
from functools import cache
from pathlib import Path
from typing import Any

from math_qwen.math_equivalence import minerva_is_equiv

__all__ = [
    "LM_EVAL_MINERVA",
    "MINERVA_EXEMPLARS",
    "QWEN_GSM8K_BASE",
    "QWEN_GSM8K_BASE_STOP",
    "QWEN_GSM8K_CHAT",
    "minerva_answer",
    "minerva_gold",
    "minerva_is_equiv",
    "minerva_normalize",
    "minerva_prompt",
    "qwen_gsm8k_base_correct",
    "qwen_gsm8k_base_prompt",
    "qwen_gsm8k_chat_correct",
    "qwen_last_number",
]

QWEN_COMMIT = "2df8e8ac450fa185c421a08b0090ef81826caa6e"
LM_EVAL_COMMIT = "4e7e0d47f33bc71070c1d38394bafbb52b117163"
QWEN_GSM8K_BASE = f"QwenLM/Qwen:eval/evaluate_gsm8k.py@{QWEN_COMMIT}"
QWEN_GSM8K_CHAT = f"QwenLM/Qwen:eval/evaluate_chat_gsm8k.py@{QWEN_COMMIT}"
LM_EVAL_MINERVA = (
    f"EleutherAI/lm-evaluation-harness:lm_eval/tasks/minerva_math/utils.py@{LM_EVAL_COMMIT}"
)

# ---------------------------------------------------------------------------- GSM8K (Qwen)

# QwenLM/Qwen eval/evaluate_gsm8k.py@2df8e8ac: decode() splits at these, in this order (the same
# text as cutting at the earliest of them).
QWEN_GSM8K_BASE_STOP = ("<|endoftext|>", "\n\n\n", "\n\n", "Question:")
_QWEN_GOLD = re.compile(r"#### (\-?[0-9\.\,]+)")
# QwenLM/Qwen eval/evaluate_chat_gsm8k.py@2df8e8ac: _PAT_LAST_DIGIT.
_QWEN_LAST_DIGIT = re.compile(
    r"([+-])?(?=([0-9]|\.[0-9]))(0|([1-9](\d{0,2}(,\d{3})*)|\d*))?(\.\d*)?(?=\D|$)"
)


@cache
def qwen_gsm8k_fewshot() -> str:
    """Qwen's ``eval/gsm8k_prompt.txt`` (QwenLM/Qwen@2df8e8ac), shipped byte for byte."""
    return (Path(__file__).parent / "prompts" / "qwen_gsm8k_prompt.txt").read_text("utf-8")


def qwen_gsm8k_base_prompt(question: str) -> str:
    """``doc_to_text`` of evaluate_gsm8k.py: the exemplars, then the question."""
    return qwen_gsm8k_fewshot() + "\nQuestion: " + question + "\nLet's think step by step\n"


def _literal(text: str) -> Any:
    """The script's ``eval`` of a numeral ("007" is a SyntaxError there too), without ``eval``."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def qwen_gsm8k_base_correct(gold_solution: str, completion: str) -> tuple[str, str | None, bool]:
    """``is_correct`` of evaluate_gsm8k.py: (gold, prediction, verdict). The gold must have a
    ``#### N`` line (the script asserts it)."""
    match = _QWEN_GOLD.search(gold_solution)
    gold = None if match is None else _literal(match.group(1).strip().replace(",", ""))
    if gold is None:
        raise ValueError(f"GSM8K record without a final answer: {gold_solution[-80:]!r}")
    digits = re.findall(r"\d+", completion)
    predicted = _literal(digits[-1]) if digits else None
    shown = None if predicted is None else str(predicted)
    return str(gold), shown, predicted is not None and predicted == gold


def qwen_last_number(text: str) -> str | None:
    """``extract_answer`` of evaluate_chat_gsm8k.py: the last number, without "," and "+"."""
    matches = list(_QWEN_LAST_DIGIT.finditer(text))
    if not matches:
        return None
    return matches[-1].group().replace(",", "").replace("+", "").strip()


def qwen_gsm8k_chat_correct(gold_solution: str, completion: str) -> tuple[str, str | None, bool]:
    """``is_correct`` of evaluate_chat_gsm8k.py: the last numbers within 1e-4 (absolute)."""
    gold = qwen_last_number(gold_solution)
    if gold is None:
        raise ValueError(f"GSM8K record without a number: {gold_solution[-80:]!r}")
    predicted = qwen_last_number(completion)
    if predicted is None:
        return gold, None, False
    g, p = _literal(gold), _literal(predicted)
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (g, p))
    return gold, predicted, numbers and _math.isclose(g, p, rel_tol=0, abs_tol=1e-4)


# ---------------------------------------------------------------------------- MATH (lm-eval)

# lm_eval/tasks/minerva_math/utils.py@4e7e0d47 list_fewshot_samples: (problem, solution). Its
# align rows end in one backslash ("480\\\n" in the Python source), not Minerva's "\\\\".
MINERVA_EXEMPLARS = (
    (
        "Find the domain of the expression  $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.}",
        "The expressions inside each square root must be non-negative. Therefore, $x-2 \\ge 0$, "
        "so $x\\ge2$, and $5 - x \\ge 0$, so $x \\le 5$. Also, the denominator cannot be equal to "
        "zero, so $5-x>0$, which gives $x<5$. Therefore, the domain of the expression is "
        "$\\boxed{[2,5)}$.\nFinal Answer: The final answer is $[2,5)$. I hope it is correct.",
    ),
    (
        "If $\\det \\mathbf{A} = 2$ and $\\det \\mathbf{B} = 12,$ then find "
        "$\\det (\\mathbf{A} \\mathbf{B}).$",
        "We have that $\\det (\\mathbf{A} \\mathbf{B}) = (\\det \\mathbf{A})(\\det \\mathbf{B}) "
        "= (2)(12) = \\boxed{24}.$\nFinal Answer: The final answer is $24$. I hope it is correct.",
    ),
    (
        "Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights "
        "instead, how many times must Terrell lift them in order to lift the same total weight?",
        "If Terrell lifts two 20-pound weights 12 times, he lifts a total of "
        "$2\\cdot 12\\cdot20=480$ pounds of weight.  If he lifts two 15-pound weights instead for "
        "$n$ times, he will lift a total of $2\\cdot15\\cdot n=30n$ pounds of weight.  Equating "
        "this to 480 pounds, we can solve for $n$:\n\\begin{align*}\n30n&=480\\\n"
        "\\Rightarrow\\qquad n&=480/30=\\boxed{16}\n\\end{align*}\nFinal Answer: The final answer "
        "is $16$. I hope it is correct.",
    ),
    (
        "If the system of equations\n\n\\begin{align*}\n6x-4y&=a,\\\n6y-9x &=b.\n\\end{align*}"
        "has a solution $(x, y)$ where $x$ and $y$ are both nonzero,\nfind $\\frac{a}{b},$ "
        "assuming $b$ is nonzero.",
        "If we multiply the first equation by $-\\frac{3}{2}$, we obtain\n\n"
        "$$6y-9x=-\\frac{3}{2}a.$$Since we also know that $6y-9x=b$, we have\n\n"
        "$$-\\frac{3}{2}a=b\\Rightarrow\\frac{a}{b}=\\boxed{-\\frac{2}{3}}.$$\nFinal Answer: The "
        "final answer is $-\\frac{2}{3}$. I hope it is correct.",
    ),
)


def minerva_prompt(problem: str) -> str:
    """The harness's plain-text context: each shot ``doc_to_text`` + " " (target_delimiter) +
    solution + "\\n\\n" (fewshot_delimiter), then ``doc_to_text`` of the problem."""
    shots = "".join(f"Problem:\n{p}\n\nSolution: {s}\n\n" for p, s in MINERVA_EXEMPLARS)
    return shots + "Problem:\n" + problem + "\n\n" + "Solution:"


def _last_boxed_only_string(string: str) -> str | None:
    # lm_eval/tasks/minerva_math/utils.py@4e7e0d47 last_boxed_only_string, as written.
    idx = string.rfind("\\boxed")
    if "\\boxed " in string:
        return "\\boxed " + string.split("\\boxed ")[-1].split("$")[0]
    if idx < 0:
        idx = string.rfind("\\fbox")
        if idx < 0:
            return None
    depth = 0
    for i in range(idx, len(string)):
        if string[i] == "{":
            depth += 1
        if string[i] == "}":
            depth -= 1
            if depth == 0:
                return string[idx : i + 1]
    return None


def _remove_boxed(s: str) -> str:
    # The harness asserts the shape; a solution it cannot read fails there too.
    if "\\boxed " in s:
        if not s.startswith("\\boxed "):
            raise ValueError(f"not a box: {s[:40]!r}")
        return s[len("\\boxed ") :]
    if not (s.startswith("\\boxed{") and s.endswith("}")):
        raise ValueError(f"not a box: {s[:40]!r}")
    return s[len("\\boxed{") : -1]


_SUBSTITUTIONS = (
    ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), (r"\ ", ""), (" ", ""), ("mbox", "text"),
    (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
)  # fmt: skip
_REMOVED_EXPRESSIONS = (
    "square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units",
    "\\ldots", "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm",
    "pounds", "meters", "meals", "edges", "students", "childrentickets", "multiples", "\\text{s}",
    "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}",
    r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;", r",\!", "{,}", '"', "\\dots",
)  # fmt: skip


def minerva_normalize(final_answer: str) -> str:
    """``normalize_final_answer`` of the harness (Lewkowycz et al. 2022, appendix D), as written:
    substring replacements, so "ft" eats ``\\left`` and "a " the variable of "2a + b"."""
    final_answer = final_answer.split("=")[-1]
    for before, after in _SUBSTITUTIONS:
        final_answer = final_answer.replace(before, after)
    for expr in _REMOVED_EXPRESSIONS:
        final_answer = final_answer.replace(expr, "")
    final_answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", final_answer)
    final_answer = re.sub(r"(\\text\{)(.*?)(\})", "\\2", final_answer)
    final_answer = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", final_answer)
    final_answer = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", final_answer)
    final_answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", final_answer)
    final_answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", final_answer)
    final_answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", final_answer)
    final_answer = final_answer.replace("$", "")
    if final_answer.replace(",", "").isdigit():
        final_answer = final_answer.replace(",", "")
    return final_answer


_FINAL = re.compile(r"Final Answer: The final answer is(.*?). I hope it is correct.")


def minerva_answer(completion: str) -> str | None:
    """``get_unnormalized_answer``: the *first* Minerva sentence, which need not be closed by
    "I hope it is correct." at the very end; None where the harness has ``[invalidanswer]``."""
    match = _FINAL.search(completion + "I hope it is correct.")
    return match.group(1).strip() if match else None


def minerva_gold(solution: str) -> str:
    """The harness's gold (``process_docs``): the normalized last box of the solution; the
    record's ``answer`` field is not used."""
    boxed = _last_boxed_only_string(solution)
    if boxed is None:
        raise ValueError("MATH solution without a \\boxed answer")
    return minerva_normalize(_remove_boxed(boxed))
