"""The ``paper`` protocol of the math tasks against the reference scripts' own outputs.

The fixtures in tests/fixtures/paper_math were produced by running the references' functions
(Qwen's evaluate_gsm8k.py / evaluate_chat_gsm8k.py, lm-evaluation-harness's minerva_math) on the
same inputs; see their README.
"""

import gzip
import json
from pathlib import Path

import pytest

from math_qwen import paper
from math_qwen.math_equivalence import SympyWorker
from specialize.eval.tasks import PAPER, ROBUST, get_task
from tests.conftest import GSM8K_TRAIN

FIXTURES = Path(__file__).parents[1] / "fixtures"
PAPER_MATH = FIXTURES / "paper_math"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def worker():
    with SympyWorker() as w:
        yield w


# ---- GSM8K: Qwen's scripts ----


def test_gsm8k_paper_prompts_are_qwens_bytes():
    task = get_task("gsm8k").under(PAPER)
    rows = _jsonl(PAPER_MATH / "gsm8k-prompts.jsonl")
    for row in rows:
        record = {"question": row["question"], "answer": "#### 0"}
        assert task.prompt(record, "base") == row["base"]
        assert task.prompt(record, "chat") == row["chat"]
    # Qwen's 8 exemplars are not Wei et al.'s, which the robust protocol keeps.
    robust = get_task("gsm8k").prompt({"question": rows[0]["question"]}, "base")
    assert "There are 15 trees in the grove" in robust
    assert "There are 15 trees" not in rows[0]["base"]
    assert rows[0]["base"].startswith("Question: In 2004, there were 60 kids at a cookout.")


@pytest.mark.parametrize("mode", ["base", "chat"])
def test_gsm8k_paper_verdicts_are_qwens(mode):
    task = get_task("gsm8k").under(PAPER)
    rows = _jsonl(PAPER_MATH / "gsm8k-verdicts.jsonl")
    records = [{"question": "?", "answer": row["answer"]} for row in rows]
    graded = [task.postprocess(r, row["completion"], mode) for r, row in zip(records, rows)]
    assert graded == [row[f"{mode}_graded"] for row in rows]
    verdicts = [g.correct for g in task.grade(records, graded, mode)]
    assert verdicts == [row[mode] for row in rows]
    # The table holds both verdicts on both sides, so each comparison could fail.
    assert {True, False} == set(verdicts)


def test_gsm8k_paper_base_reads_the_last_digits_only():
    grade = get_task("gsm8k").under(PAPER).grade
    record = {"question": "?", "answer": "1,000 + 234 = 1,234\n#### 1,234"}
    separated, plain = grade(
        [record, record], ["The answer is 1,234", "The answer is 1234"], "base"
    )
    assert not separated.correct and separated.predicted == "234"
    assert plain.correct and plain.answer == "1234"
    robust = get_task("gsm8k").grade([record], ["The answer is 1,234"], "base")[0]
    assert robust.correct


def test_gsm8k_train_gold_answers_under_both_protocols():
    records = [json.loads(line) for line in gzip.open(GSM8K_TRAIN, "rt", encoding="utf-8")]
    assert len(records) == 7473
    answers = [r["answer"] for r in records]
    for protocol, mode in ((ROBUST, "base"), (ROBUST, "chat"), (PAPER, "chat")):
        grades = get_task("gsm8k").under(protocol).grade(records, answers, mode)
        assert all(g.correct for g in grades), (protocol, mode)
    # Qwen's base script reads the last run of digits: a gold written "1,080" reads as "080" and
    # "-7" as 7, so exactly those golds fail against themselves (the paper's protocol).
    grades = get_task("gsm8k").under(PAPER).grade(records, answers, "base")
    failing = {i for i, g in enumerate(grades) if not g.correct}
    final = [a.rsplit("####", 1)[1] for a in answers]
    assert failing == {i for i, f in enumerate(final) if "," in f or "-" in f}
    assert len(failing) == 82


def test_gsm8k_paper_protocols_name_their_scripts():
    task = get_task("gsm8k").under(PAPER)
    base, chat = task.protocol("base"), task.protocol("chat")
    assert base.name == chat.name == PAPER
    assert base.reference == paper.QWEN_GSM8K_BASE
    assert base.reference.startswith("QwenLM/Qwen:eval/evaluate_gsm8k.py@2df8e8ac")
    assert chat.reference.startswith("QwenLM/Qwen:eval/evaluate_chat_gsm8k.py@")
    assert base.stop == ("<|endoftext|>", "\n\n\n", "\n\n", "Question:") and base.shots == 8
    assert "<|im_start|>" in chat.stop and chat.shots == 0
    robust = get_task("gsm8k").protocol("chat")
    assert robust.name == ROBUST and robust.reference is None


# ---- MATH: lm-evaluation-harness minerva_math500 ----


@pytest.mark.parametrize("mode", ["base", "chat"])
def test_math_paper_prompts_are_the_harness_bytes(mode):
    task = get_task("math").under(PAPER)
    records = task.load(FIXTURES / "tasks" / "math500.jsonl")
    rows = _jsonl(PAPER_MATH / "math-prompts.jsonl")
    assert [r["unique_id"] for r in records] == [row["unique_id"] for row in rows]
    for record, row in zip(records, rows):
        assert task.prompt(record, mode) == row["prompt"]
        assert row["prompt"].endswith("\n\nSolution:")
    robust = get_task("math").prompt(records[0], "base")
    assert robust.endswith("Solution:\n") and robust != rows[0]["prompt"]


def test_math_paper_extraction_and_normalization_are_the_harness():
    for row in _jsonl(PAPER_MATH / "math-extraction.jsonl"):
        raw = paper.minerva_answer(row["completion"])
        expected = None if row["unnormalized"] == "[invalidanswer]" else row["unnormalized"]
        assert raw == expected, row["completion"]
        if raw is not None:
            assert paper.minerva_normalize(raw) == row["normalized"], raw


def test_math_paper_gold_is_the_harness_gold():
    task = get_task("math")
    records = task.load(FIXTURES / "tasks" / "math500.jsonl")
    rows = _jsonl(PAPER_MATH / "math-prompts.jsonl")
    assert [paper.minerva_gold(r["solution"]) for r in records] == [row["gold"] for row in rows]


FINAL = "Final Answer: The final answer is ${}$. I hope it is correct."


@pytest.mark.parametrize(
    ("gold", "completion", "paper_verdict", "robust_verdict"),
    [
        ("26000", FINAL.format("26000"), True, True),
        # No fallback to a box or "the answer is" under the harness.
        ("26000", "So the answer is $\\boxed{26000}$.", False, True),
        ("26000", "The answer is 26000.", False, True),
        # The harness takes the first final-answer sentence; robust the last.
        ("25", FINAL.format("24") + "\n" + FINAL.format("25"), False, True),
        # Identical intervals do not parse, so the harness never matches them.
        ("[2,5)", FINAL.format("[2,5)"), False, True),
        # "cm" is removed and leaves 6^2 = 36: the harness's false positive.
        ("36", "Final Answer: The final answer is 6 cm^2. I hope it is correct.", True, False),
        ("\\frac{1}{2}", FINAL.format("0.5\\%"), False, False),
        ("\\frac{7}{12}", FINAL.format("\\frac{14}{24}"), True, True),
        ("\\frac{7}{12}", FINAL.format("\\dfrac{7}{12}"), True, True),  # parse_latex reads \dfrac
        # The harness's normalization drops commas from integers only, but parse_latex's numbers
        # take thousands separators.
        ("1000.5", FINAL.format("1,000.5"), True, True),
        ("2a+b", FINAL.format("x = 2a + b"), False, True),  # "a " is removed: 2+b
    ],
)
def test_math_paper_verdicts(worker, gold, completion, paper_verdict, robust_verdict):
    record = {"problem": "?", "solution": f"So it is $\\boxed{{{gold}}}$.", "answer": gold}
    from math_qwen import graders

    assert graders.math_minerva(record, completion, worker=worker)["correct"] is paper_verdict
    assert graders.math(record, completion, worker=worker)["correct"] is robust_verdict


def test_math_paper_protocol_is_the_harness():
    task = get_task("math").under(PAPER)
    base, chat = task.protocol("base"), task.protocol("chat")
    assert base.max_new_tokens == chat.max_new_tokens == 256
    assert base.stop == ("Problem:", "<|endoftext|>") and base.shots == 4
    assert chat.stop[0] == "Problem:" and "<|im_end|>" in chat.stop
    assert base.reference == paper.LM_EVAL_MINERVA
    assert "minerva_math/utils.py@4e7e0d47" in base.reference
    assert get_task("math").protocol("base").max_new_tokens == 1024


# ---- Math401, Math23K: the benchmarks' tolerances under both protocols ----


@pytest.mark.parametrize("name", ["math401", "math23k"])
def test_math401_and_math23k_paper_grade_as_robust(name):
    task, robust = get_task(name).under(PAPER), get_task(name)
    record = (
        {"query": "1/3=", "response": "0.3333"}
        if name == "math401"
        else {"original_text": "?", "ans": "0.3333"}
    )
    completions = ["0.33333", "0.333", "1/3"]
    assert [g.correct for g in task.grade([record] * 3, completions, "chat")] == [
        g.correct for g in robust.grade([record] * 3, completions, "chat")
    ]
    protocol = task.protocol("chat")
    assert protocol.name == PAPER and protocol.grader == robust.protocol("chat").grader
    if name == "math401":
        assert protocol.reference.startswith("GanjinZero/math401-llm:README.md@")


def test_scoring_under_paper_records_the_script_and_grades_by_it(tmp_path):
    from specialize.eval.config import EvalConfig
    from specialize.eval.harness import score_completions

    data = tmp_path / "gsm8k.jsonl"
    record = {"question": "How many?", "answer": "1,000 + 200 = 1,200\n#### 1,200"}
    data.write_text(json.dumps(record) + "\n", encoding="utf-8")
    completions = tmp_path / "c.jsonl"
    completions.write_text(
        json.dumps({"task": "gsm8k", "id": 0, "completion": "The answer is 1,200"}) + "\n"
    )
    results = {}
    for protocol in (ROBUST, PAPER):
        cfg = EvalConfig(
            tasks=["gsm8k"],
            score=str(completions),
            data={"gsm8k": str(data)},
            output="unused.json",
            protocol=protocol,
        )
        cfg.validate()
        results[protocol] = score_completions(cfg)["tasks"]["gsm8k"]
    assert results[PAPER]["protocol"]["name"] == PAPER
    assert results[PAPER]["protocol"]["reference"] == paper.QWEN_GSM8K_BASE
    assert results[PAPER]["samples"][0]["prompt"] == paper.qwen_gsm8k_base_prompt("How many?")
    # Qwen's base script reads "200" from "1,200"; this project reads 1200.
    assert results[PAPER]["metrics"]["accuracy"] == 0.0
    assert results[ROBUST]["metrics"]["accuracy"] == 1.0
