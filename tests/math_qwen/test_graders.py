"""Graders of GSM8K, MATH, Math401 and Math23K completions."""

import json
from decimal import Decimal
from pathlib import Path

import pytest

from math_qwen import graders
from math_qwen.graders import GRADERS, last_quantity, parse_quantity
from tests.conftest import MATH401_SAMPLE, gsm8k_train_lines

FIXTURES = Path(__file__).parents[1] / "fixtures" / "tasks"


def _jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_every_task_has_a_grader():
    assert set(GRADERS) == {"gsm8k", "math", "math401", "math23k"}


# --------------------------------------------------------------------------- GSM8K


def test_every_gsm8k_training_solution_grades_correct_against_itself():
    records = [json.loads(line) for line in gsm8k_train_lines()]
    assert len(records) == 7473
    wrong = [r["answer"][-60:] for r in records if not graders.gsm8k(r, r["answer"])["correct"]]
    assert not wrong, wrong[:5]


def test_gsm8k_grades_the_final_number():
    record = {"question": "?", "answer": "3 * 400 = 1200\n#### 1,200"}
    grade = graders.gsm8k(record, "Question: ... Let's think step by step. The answer is 1200.")
    assert grade == {"answer": "1200", "predicted": "1200", "correct": True}
    assert graders.gsm8k(record, "The total is $1,200.00")["correct"]
    wrong = graders.gsm8k(record, "3 * 400 = 1200, plus 1 is 1201")
    assert wrong == {"answer": "1200", "predicted": "1201", "correct": False}
    assert graders.gsm8k(record, "I cannot tell.") == {
        "answer": "1200",
        "predicted": None,
        "correct": False,
    }


def test_gsm8k_rejects_a_record_without_an_answer():
    with pytest.raises(ValueError, match="GSM8K record"):
        graders.gsm8k({"answer": "no number"}, "5")


# --------------------------------------------------------------------------- MATH


def test_every_math500_fixture_solution_grades_correct_against_its_answer():
    records = _jsonl(FIXTURES / "math500.jsonl")
    assert records
    for record in records:
        assert graders.math(record, record["solution"])["correct"], record["answer"]
        # Without the "answer" field the gold answer is the solution's box.
        bare = {"problem": record["problem"], "solution": record["solution"]}
        assert graders.math(bare, record["solution"])["answer"] == record["answer"]


@pytest.mark.parametrize(
    ("answer", "completion", "correct"),
    [
        ("26000", "Final Answer: The final answer is $26{,}000$. I hope it is correct.", True),
        ("26000", "Final Answer: The final answer is $26,001$. I hope it is correct.", False),
        (r"\frac{7}{12}", r"So the fraction is $\boxed{\dfrac{7}{12}}$.", True),
        (r"\frac{7}{12}", "The answer is 7/12.", True),
        (r"\frac{7}{12}", "The answer is 0.58.", False),
        (r"\left( 3, \frac{\pi}{2} \right)", r"... $\boxed{(3,\tfrac{\pi}{2})}$", True),
        (r"2\sqrt{2}", r"Final Answer: The final answer is $\sqrt8$. I hope it is correct.", True),
        ("5", "No idea.", False),
    ],
)
def test_math_grades_minerva_and_boxed_answers(answer, completion, correct):
    grade = graders.math({"problem": "?", "solution": "", "answer": answer}, completion)
    assert grade["correct"] is correct
    assert grade["answer"] == answer


def test_math_reports_the_extracted_answer():
    grade = graders.math(
        {"answer": "5"}, "Final Answer: The final answer is $5$. I hope it is correct."
    )
    assert grade == {"answer": "5", "predicted": "$5$", "correct": True}
    assert graders.math({"answer": "5"}, "nothing")["predicted"] is None


def test_math_rejects_a_record_without_an_answer():
    with pytest.raises(ValueError, match="MATH record"):
        graders.math({"solution": "no box"}, "5")


# --------------------------------------------------------------------------- Math401


def _math401_records():
    records = _jsonl(MATH401_SAMPLE)
    assert len(records) == 46
    return records


def test_every_math401_target_grades_correct_against_itself():
    for record in _math401_records():
        for completion in (record["response"], f"{record['query']}{record['response']}"):
            grade = graders.math401(record, completion)
            assert grade["correct"], (record, completion, grade)


def test_a_math401_answer_off_by_more_than_1e_3_is_wrong():
    for record in _math401_records():
        target = Decimal(record["response"])
        off = graders.math401(record, str(target + Decimal("0.002")))
        assert not off["correct"], record
        near = graders.math401(record, str(target - Decimal("0.0009")))
        assert near["correct"], record


@pytest.mark.parametrize(
    ("response", "completion", "correct"),
    [
        ("1933406196413", "946195468138+987210728275=1,933,406,196,413", True),
        ("1933406196413", "= 1933406196414", False),  # 12 digits compared exactly
        ("0.6667", "2÷3 = 2/3", True),
        ("0.6667", r"The result is $\frac{2}{3}$.", True),
        ("-0.8632", "( 8 - 90) / 95 = \u22120.863157...", True),
        ("-0.8632", "( 8 - 90) / 95 = 0.8632", False),
        ("160.5713", "approximately 160.57", False),  # rounded beyond the 1e-3 tolerance
        ("1834413472", "1.834413472 \\times 10^{9}", True),
        ("14", "5+9=", False),  # only the echoed query: its last number is 9
    ],
)
def test_math401_reads_the_last_number(response, completion, correct):
    assert graders.math401({"query": "?", "response": response}, completion)["correct"] is correct


# --------------------------------------------------------------------------- Math23K


@pytest.mark.parametrize(
    ("ans", "completion", "correct"),
    [
        ("20", "答：小明有20个苹果。", True),
        ("20", "答：小明有21个苹果。", False),
        ("1/3", "所以是三分之一，即 1/3", True),
        ("(1/3)", "答案是 0.3333", True),  # within 1e-4
        ("(1/3)", "答案是 0.33", False),
        ("50%", "占全部的50%。", True),
        ("50%", "占全部的0.5。", True),
        ("50%", "占全部的 50 。", True),  # the percent sign dropped
        ("0.5", "百分之50", True),
        ("50", "占50%", True),  # a "what percent" answer stored as its number
        ("50%", "占全部的 5%", False),
        ("2(1/3)", "答：需要 7/3 小时", True),
        ("7/3", r"$\boxed{\frac{7}{3}}$ 小时, 共 3 次", True),  # the box wins over later numbers
        ("12.5", r"所以 x = \frac{25}{2} 千米", True),
        ("-4", "温度下降了，是 -4 度", True),
        ("12", r"\boxed{12} 是答案，因为 3 + 9 = 13 ... ", True),  # the box wins
    ],
)
def test_math23k(ans, completion, correct):
    grade = graders.math23k({"original_text": "?", "ans": ans}, completion)
    assert grade["correct"] is correct, grade
    assert grade["answer"] == ans


def test_math23k_accepts_an_answer_field_and_rejects_a_non_number():
    assert graders.math23k({"answer": "3"}, "3")["correct"]
    with pytest.raises(ValueError, match="Math23K answer"):
        graders.math23k({"ans": "x+1"}, "3")


# --------------------------------------------------------------------------- quantities


@pytest.mark.parametrize(
    ("text", "written", "value"),
    [
        ("有20个", "20", 20),
        ("10-3=7", "7", 7),
        ("x=-0.5", "-0.5", -0.5),
        ("total 1,234.5 dollars", "1,234.5", 1234.5),
        ("50%", "50%", 0.5),
        ("3分之1", "3分之1", 1 / 3),
        ("1.5e3", "1.5e3", 1500),
        ("1e999999999 or 4", "4", 4),  # an absurd exponent is skipped, not computed
        ("nothing", None, None),
    ],
)
def test_last_quantity(text, written, value):
    found = last_quantity(text)
    if written is None:
        assert found is None
    else:
        assert found.text == written
        assert float(found.value) == pytest.approx(value)


@pytest.mark.parametrize("text", ["abc", "1 2", "", "1/0", None])
def test_parse_quantity_rejects_what_is_not_one_number(text):
    assert parse_quantity(text) is None
