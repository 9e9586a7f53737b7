"""Scores reported by the Qwen technical report, the reference rows of ``specialize compare``.

Transcribed from Tables 2, 10 and 12 of the report, collected in docs/paper.md §11; the protocol
texts say how each benchmark is run, as docs/paper.md §10 describes (the report gives shots and
metrics; prompts, stops and grading come from Qwen's evaluation scripts and the benchmarks' own
papers). A model/task pair the tables leave blank is absent here: nothing is filled in or
estimated.

Model names follow the report's tables (family, then "-Chat" for the aligned model, then size);
the report's text writes the same models as e.g. ``CODE-QWEN-7B-CHAT``.
"""

from __future__ import annotations

from dataclasses import dataclass

SOURCE = (
    "Qwen technical report (arXiv 2309.16609), Tables 2, 10 and 12; protocols as "
    "docs/paper.md §10 describes them"
)
"""Where every number in this module comes from."""


@dataclass(frozen=True)
class PaperModel:
    """One model row of the paper's table."""

    name: str
    """The paper's name for the model, e.g. ``Code-Qwen-Chat-7B``."""
    mode: str
    """``base`` (few-shot completion) or ``chat`` (ChatML turns): which protocol applies."""
    scores: dict[str, float]
    """Task registry name -> reported score in percent (pass@1 for code, accuracy for math)."""


PAPER_MODELS: tuple[PaperModel, ...] = (
    PaperModel("Qwen-7B", "base", {"humaneval": 29.9, "mbpp": 31.6, "gsm8k": 51.7, "math": 11.6}),
    PaperModel("Qwen-14B", "base", {"humaneval": 32.3, "mbpp": 40.8, "gsm8k": 61.3, "math": 24.8}),
    PaperModel(
        "Qwen-Chat-7B",
        "chat",
        {
            "humaneval": 37.2,
            "mbpp": 35.8,
            "gsm8k": 50.3,
            "math": 6.8,
            "math401": 57.4,
            "math23k": 51.2,
        },
    ),
    PaperModel(
        "Qwen-Chat-14B",
        "chat",
        {
            "humaneval": 43.9,
            "mbpp": 46.4,
            "gsm8k": 60.1,
            "math": 18.4,
            "math401": 70.1,
            "math23k": 67.0,
        },
    ),
    PaperModel("Code-Qwen-7B", "base", {"humaneval": 40.2, "mbpp": 41.8}),
    PaperModel("Code-Qwen-14B", "base", {"humaneval": 45.1, "mbpp": 51.4}),
    PaperModel("Code-Qwen-Chat-7B", "chat", {"humaneval": 43.3, "mbpp": 44.2}),
    PaperModel("Code-Qwen-Chat-14B", "chat", {"humaneval": 66.4, "mbpp": 52.4}),
    PaperModel(
        "Math-Qwen-Chat-7B",
        "chat",
        {"gsm8k": 62.5, "math": 17.2, "math401": 80.8, "math23k": 75.4},
    ),
    PaperModel(
        "Math-Qwen-Chat-14B",
        "chat",
        {"gsm8k": 69.8, "math": 24.2, "math401": 85.0, "math23k": 78.4},
    ),
)

# (task, mode) -> protocol, as docs/paper.md §10 describes it; mode None: the same for both modes.
PAPER_PROTOCOLS: dict[tuple[str, str | None], str] = {
    ("humaneval", "base"): (
        "164 problems, pass@1 greedy; prompt verbatim, 0-shot; completion cut at "
        "`<|endoftext|>`, `\\n\\n\\n`, `\\n\\n`, `def `; 3 s timeout per problem"
    ),
    ("humaneval", "chat"): (
        '164 problems, pass@1 greedy; user turn "Write a Python function `{signature}` to '
        'solve the following problem: …"; the function from the first fenced block that defines '
        "the entry point; 3 s timeout per problem"
    ),
    ("mbpp", None): (
        "500 test problems; 3-shot Austin et al. prompt ending in `[BEGIN]`, stop at `[DONE]`"
    ),
    ("gsm8k", "base"): (
        "1,319 test problems; Qwen's evaluate_gsm8k.py: its own 8 GSM8K-train exemplars "
        '(gsm8k_prompt.txt), "Question: … Let\'s think step by step … The answer is N", cut at '
        "`<|endoftext|>`, `\\n\\n\\n`, `\\n\\n`, `Question:`; the last run of digits `==` "
        "the number after `####`"
    ),
    ("gsm8k", "chat"): (
        "1,319 test problems; Qwen's evaluate_chat_gsm8k.py: 0-shot, greedy, repetition penalty "
        "1.0; the last number of the reply against the gold's, abs tol 1e-4"
    ),
    ("math", None): (
        "MATH500 subset; lm-evaluation-harness minerva_math: 4-shot Minerva prompt ending "
        '`Solution:`, stop `Problem:`, 256 new tokens; the first "Final Answer: The final answer '
        'is X. I hope it is correct.", Minerva normalization, sympy equality of the parsed answers'
    ),
    ("math401", None): (
        "401 arithmetic expressions; correct when |pred − target| < 1e-3 (the Math401 README)"
    ),
    ("math23k", None): (
        "Chinese grade-school word problems (test split commonly 1,000); numeric answer"
    ),
}


def paper_protocol(task: str, mode: str) -> str | None:
    """The protocol for ``task`` in ``mode`` (``base``/``chat``), None if unstated."""
    return PAPER_PROTOCOLS.get((task, mode)) or PAPER_PROTOCOLS.get((task, None))
