"""The math evaluation tasks: GSM8K, MATH (MATH500), Math401 and Math23K (data, decontamination
texts, and the evaluation protocol: prompts per mode, stop sequences, grading).

Every task implements two protocols. ``robust`` (the default, below) uses this project's
prompts and graders; ``paper`` reproduces the script behind the published number
(``math_qwen.paper``): Qwen's own ``evaluate_gsm8k.py`` / ``evaluate_chat_gsm8k.py`` for GSM8K,
lm-evaluation-harness's ``minerva_math500`` for MATH; Math401 and Math23K have no published
script, so their ``paper`` protocol is the robust one, whose tolerances are the benchmarks' own
(Math401's |pred - target| < 1e-3 of its README; Math23K's answer accuracy).

Robust protocols (docs/paper.md §10), per mode:

- GSM8K ``base``: 8-shot, the chain-of-thought exemplars of Wei et al. (2022), each written
  "Question: Q\\nLet's think step by step\\nREASONING\\nThe answer is N"; cut at ``\\n\\n`` or
  ``Question:``. ``chat``: the question alone, 0-shot. Graded by ``math_qwen.graders.gsm8k``.
- MATH ``base``: the 4-shot Minerva prompt ("Problem:\\nP\\n\\nSolution:\\nS ... Final Answer: The
  final answer is X. I hope it is correct."); cut at ``Problem:``. ``chat``: the problem alone.
  Graded by ``math_qwen.graders.math`` (Minerva normalization, sympy equivalence).
- Math401 and Math23K: the Qwen report gives chat numbers only; ``chat`` is the query (problem)
  alone, ``base`` the same text 0-shot as a plain prompt. Graded by ``math_qwen.graders``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from math_qwen import paper
from math_qwen.graders import GRADERS, PAPER_GRADERS
from specialize.eval.tasks import (
    ERROR,
    FAILED,
    PAPER,
    PASSED,
    ROBUST,
    Grade,
    HubSource,
    Protocol,
    Task,
    check_mode,
    register,
)

CHAT_STOP = ("<|im_end|>", "<|endoftext|>")
# Qwen's ``model.chat`` also stops at ``<|im_start|>`` (qwen_generation_utils' stop words).
QWEN_CHAT_STOP = ("<|im_end|>", "<|im_start|>", "<|endoftext|>")
# Qwen's scripts generate with the checkpoint's GenerationConfig (greedy; the chat script also
# sets repetition_penalty=1.0); its budget, 512 new tokens, is Qwen-7B's published default.
QWEN_MAX_NEW_TOKENS = 512
# lm-evaluation-harness's default max_gen_toks (lm_eval/defaults.py@4e7e0d47).
LM_EVAL_MAX_NEW_TOKENS = 256
MATH401_REFERENCE = "GanjinZero/math401-llm:README.md@0d47eafbcebc73a8c547ad285e9e8ee0a2b1aca9"
# Wei et al. 2022 (chain-of-thought prompting), the 8 GSM8K exemplars: (question, reasoning, answer).
GSM8K_EXEMPLARS = (
    (
        "There are 15 trees in the grove. Grove workers will plant trees in the grove today. "
        "After they are done, there will be 21 trees. How many trees did the grove workers plant "
        "today?",
        "There are 15 trees originally. Then there were 21 trees after some more were planted. "
        "So there must have been 21 - 15 = 6.",
        "6",
    ),
    (
        "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the "
        "parking lot?",
        "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5.",
        "5",
    ),
    (
        "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they "
        "have left in total?",
        "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. "
        "After eating 35, they had 74 - 35 = 39.",
        "39",
    ),
    (
        "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How "
        "many lollipops did Jason give to Denny?",
        "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave "
        "Denny 20 - 12 = 8.",
        "8",
    ),
    (
        "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many "
        "toys does he have now?",
        "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 "
        "more toys. 5 + 4 = 9.",
        "9",
    ),
    (
        "There were nine computers in the server room. Five more computers were installed each "
        "day, from monday to thursday. How many computers are now in the server room?",
        "There were originally 9 computers. For each of 4 days, 5 more computers were added. So "
        "5 * 4 = 20 computers were added. 9 + 20 is 29.",
        "29",
    ),
    (
        "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 "
        "more. How many golf balls did he have at the end of wednesday?",
        "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. "
        "After losing 2 more, he had 35 - 2 = 33 golf balls.",
        "33",
    ),
    (
        "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
        "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she "
        "has 23 - 15 dollars left. 23 - 15 is 8.",
        "8",
    ),
)
# Minerva's 4-shot MATH prompt (Lewkowycz et al. 2022): (problem, solution).
MINERVA_EXEMPLARS = (
    (
        r"Find the domain of the expression  $\frac{\sqrt{x-2}}{\sqrt{5-x}}$.}",
        r"The expressions inside each square root must be non-negative. Therefore, $x-2 \ge 0$, "
        r"so $x\ge2$, and $5 - x \ge 0$, so $x \le 5$. Also, the denominator cannot be equal to "
        r"zero, so $5-x>0$, which gives $x<5$. Therefore, the domain of the expression is "
        r"$\boxed{[2,5)}$."
        "\nFinal Answer: The final answer is $[2,5)$. I hope it is correct.",
    ),
    (
        r"If $\det \mathbf{A} = 2$ and $\det \mathbf{B} = 12,$ then find "
        r"$\det (\mathbf{A} \mathbf{B}).$",
        r"We have that $\det (\mathbf{A} \mathbf{B}) = (\det \mathbf{A})(\det \mathbf{B}) "
        r"= (2)(12) = \boxed{24}.$"
        "\nFinal Answer: The final answer is $24$. I hope it is correct.",
    ),
    (
        "Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights "
        "instead, how many times must Terrell lift them in order to lift the same total weight?",
        r"If Terrell lifts two 20-pound weights 12 times, he lifts a total of "
        r"$2\cdot 12\cdot20=480$ pounds of weight.  If he lifts two 15-pound weights instead "
        r"for $n$ times, he will lift a total of $2\cdot15\cdot n=30n$ pounds of weight.  "
        r"Equating this to 480 pounds, we can solve for $n$:"
        "\n\\begin{align*}\n30n&=480\\\\\n\\Rightarrow\\qquad n&=480/30=\\boxed{16}\n"
        "\\end{align*}\nFinal Answer: The final answer is $16$. I hope it is correct.",
    ),
    (
        "If the system of equations\n\n\\begin{align*}\n6x-4y&=a,\\\\\n6y-9x &=b.\n"
        "\\end{align*}has a solution $(x, y)$ where $x$ and $y$ are both nonzero,\n"
        r"find $\frac{a}{b},$ assuming $b$ is nonzero.",
        r"If we multiply the first equation by $-\frac{3}{2}$, we obtain"
        "\n\n"
        r"$$6y-9x=-\frac{3}{2}a.$$Since we also know that $6y-9x=b$, we have"
        "\n\n"
        r"$$-\frac{3}{2}a=b\Rightarrow\frac{a}{b}=\boxed{-\frac{2}{3}}.$$"
        "\nFinal Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct.",
    ),
)


@dataclass(frozen=True, kw_only=True)
class MathTask(Task):
    """A math task: prompts from one text field, graded by ``math_qwen.graders.GRADERS[name]``."""

    question_field: str
    """The field holding the problem text."""
    base_stop: tuple[str, ...] = ("\n\n",)
    """Stop sequences of the base (plain completion) prompt."""
    max_new_tokens: int = 512
    """Generation budget per completion."""
    protocols: tuple[str, ...] = (ROBUST, PAPER)
    paper_reference: str | None = None
    """The reference of the ``paper`` protocol when it is the robust one (Math401, Math23K)."""

    def exemplars(self) -> tuple[tuple[str, str], ...]:
        """Few-shot (question, worked answer) pairs of the base prompt; none by default."""
        return ()

    def shot(self, question: str, answer: str | None) -> str:
        """One problem of the base prompt, solved when ``answer`` is given."""
        return question if answer is None else f"{question}\n{answer}\n\n"

    def protocol(self, mode: str) -> Protocol:
        """Few-shot ``base``, 0-shot ``chat``; graded by the task's ``math_qwen`` grader. Under
        ``paper`` the same, naming ``paper_reference`` (override where the paper differs)."""
        grader = f"math_qwen.graders.{self.name}"
        named: dict[str, Any] = {"name": self.protocol_name}
        if self.protocol_name == PAPER:
            # The reference runs a transformers model: with the checkpoint's defaults.
            named |= {"reference": self.paper_reference, "repetition_penalty": None}
        if check_mode(mode) == "base":
            shots = len(self.exemplars())
            return Protocol(mode, shots, self.base_stop, self.max_new_tokens, grader, **named)
        return Protocol(mode, 0, CHAT_STOP, self.max_new_tokens, grader, **named)

    def grader(self, mode: str) -> Callable[..., dict[str, Any]]:
        """``grade(record, completion) -> {"answer", "predicted", "correct"}`` in ``mode``."""
        return GRADERS[self.name]

    def prompt(self, record: Mapping[str, Any], mode: str) -> str:
        """Base: the solved exemplars, then this problem. Chat: the problem text alone."""
        question = str(record[self.question_field])
        if check_mode(mode) == "chat":
            return question
        return "".join(self.shot(q, a) for q, a in self.exemplars()) + self.shot(question, None)

    def grade(
        self,
        records: Sequence[Mapping[str, Any]],
        completions: Sequence[str],
        mode: str,
        workers: int = 2,
    ) -> list[Grade]:
        """Each completion through the task's grader; a grader failure is an ``error``."""
        if len(records) != len(completions):
            raise ValueError(f"{len(records)} records but {len(completions)} completions")
        grader = self.grader(check_mode(mode))
        grades = []
        for record, completion in zip(records, completions):
            try:
                g = grader(record, completion)
            except (ValueError, KeyError, TypeError, ArithmeticError) as e:
                # A record the grader cannot read; reported in the sample, not fatal for the run.
                grades.append(Grade(ERROR, reason=f"{type(e).__name__}: {e}"))
                continue
            grades.append(Grade(PASSED if g["correct"] else FAILED, g["answer"], g["predicted"]))
        return grades


@dataclass(frozen=True, kw_only=True)
class GSM8KTask(MathTask):
    """GSM8K with Wei et al.'s 8 chain-of-thought exemplars in the base prompt (``robust``), or
    Qwen's own scripts (``paper``)."""

    def protocol(self, mode: str) -> Protocol:
        if self.protocol_name != PAPER:
            return super().protocol(mode)
        if check_mode(mode) == "base":
            return Protocol(
                mode,
                8,
                paper.QWEN_GSM8K_BASE_STOP,
                QWEN_MAX_NEW_TOKENS,
                "math_qwen.graders.gsm8k_qwen_base",
                name=PAPER,
                reference=paper.QWEN_GSM8K_BASE,
                repetition_penalty=None,  # evaluate_gsm8k.py: the checkpoint's GenerationConfig
            )
        return Protocol(
            mode,
            0,
            QWEN_CHAT_STOP,
            QWEN_MAX_NEW_TOKENS,
            "math_qwen.graders.gsm8k_qwen_chat",
            name=PAPER,
            reference=paper.QWEN_GSM8K_CHAT,
            repetition_penalty=1.0,  # evaluate_chat_gsm8k.py sets it
        )

    def prompt(self, record: Mapping[str, Any], mode: str) -> str:
        if self.protocol_name == PAPER and check_mode(mode) == "base":
            return paper.qwen_gsm8k_base_prompt(str(record[self.question_field]))
        return super().prompt(record, mode)

    def grader(self, mode: str) -> Callable[..., dict[str, Any]]:
        if self.protocol_name == PAPER:
            return PAPER_GRADERS[f"gsm8k_{mode}"]
        return super().grader(mode)

    def exemplars(self) -> tuple[tuple[str, str], ...]:
        """The 8 exemplars as (question, "REASONING\\nThe answer is N")."""
        return tuple((q, f"{r}\nThe answer is {n}") for q, r, n in GSM8K_EXEMPLARS)

    def shot(self, question: str, answer: str | None) -> str:
        """``Question: Q\\nLet's think step by step\\n`` and, when solved, the answer."""
        head = f"Question: {question}\nLet's think step by step\n"
        return head if answer is None else f"{head}{answer}\n\n"


@dataclass(frozen=True, kw_only=True)
class MinervaMathTask(MathTask):
    """MATH with Minerva's 4-shot prompt in base mode (``robust``), or lm-evaluation-harness's
    ``minerva_math500`` (``paper``): its prompt in both modes (in chat mode as the one user turn,
    as ``--apply_chat_template`` renders it), 256 new tokens, its extraction and comparison."""

    def protocol(self, mode: str) -> Protocol:
        if self.protocol_name != PAPER:
            return super().protocol(mode)
        # The harness's HF model stops at its `until` and the tokenizer's end of text.
        stop = ("Problem:", "<|endoftext|>")
        if check_mode(mode) == "chat":
            stop = ("Problem:", *QWEN_CHAT_STOP)
        return Protocol(
            mode,
            len(paper.MINERVA_EXEMPLARS),
            stop,
            LM_EVAL_MAX_NEW_TOKENS,
            "math_qwen.graders.math_minerva",
            name=PAPER,
            reference=paper.LM_EVAL_MINERVA,
            repetition_penalty=None,  # the harness's HF model: the checkpoint's defaults
        )

    def prompt(self, record: Mapping[str, Any], mode: str) -> str:
        if self.protocol_name == PAPER:
            check_mode(mode)
            return paper.minerva_prompt(str(record[self.question_field]))
        return super().prompt(record, mode)

    def grader(self, mode: str) -> Callable[..., dict[str, Any]]:
        if self.protocol_name == PAPER:
            return PAPER_GRADERS["math"]
        return super().grader(mode)

    def exemplars(self) -> tuple[tuple[str, str], ...]:
        """Minerva's 4 solved problems, each ending in its "Final Answer" sentence."""
        return MINERVA_EXEMPLARS

    def shot(self, question: str, answer: str | None) -> str:
        """``Problem:\\nP\\n\\nSolution:\\n`` and, when solved, the solution."""
        head = f"Problem:\n{question}\n\nSolution:\n"
        return head if answer is None else f"{head}{answer}\n\n"


GSM8K = register(
    GSM8KTask(
        name="gsm8k",
        domain="math",
        description="GSM8K: 1,319 grade-school word problems; the answer ends with '#### N'",
        hub=HubSource("openai/gsm8k", config="main", split="test"),
        required_fields=("question", "answer"),
        reference_fields=("question", "answer"),
        question_field="question",
        base_stop=("\n\n", "Question:"),
    )
)

MATH = register(
    MinervaMathTask(
        name="math",
        domain="math",
        description="MATH500: 500 competition problems (Lightman et al. subset of MATH)",
        hub=HubSource("HuggingFaceH4/MATH-500", split="test"),
        required_fields=("problem", "solution", "answer"),
        reference_fields=("problem", "solution"),
        id_field="unique_id",
        question_field="problem",
        base_stop=("Problem:",),
        max_new_tokens=1024,
    )
)

# Math401 has no canonical hub dataset: its 401 {"query", "response"} lines come as a local file.
MATH401 = register(
    MathTask(
        name="math401",
        domain="math",
        description="Math401: 401 arithmetic expressions, correct when |pred - target| < 1e-3",
        required_fields=("query", "response"),
        reference_fields=("query",),
        question_field="query",
        base_stop=("\n",),
        max_new_tokens=256,
        paper_reference=MATH401_REFERENCE,
    )
)

# Math23K neither: a local file of its release's {"original_text", "ans", ...} records.
MATH23K = register(
    MathTask(
        name="math23k",
        domain="math",
        description="Math23K: Chinese grade-school word problems (test split commonly 1,000)",
        required_fields=("original_text", "ans"),
        reference_fields=("original_text",),
        question_field="original_text",
    )
)
