"""GSM8K, MATH (MATH500) and Math401: data loading and decontamination texts."""

import re
from pathlib import Path

import datasets
import pytest

from specialize.eval.tasks import HubSource, TaskError, get_task
from tests.conftest import GSM8K_TRAIN, MATH401_SAMPLE

FIXTURES = Path(__file__).parents[1] / "fixtures" / "tasks"


@pytest.fixture
def offline(monkeypatch):
    """Any hub access fails, as on a machine without network."""

    def no_network(*args, **kwargs):
        raise ConnectionError("no network in tests")

    monkeypatch.setattr(datasets, "load_dataset", no_network)


def test_gsm8k_loads_a_local_file_in_the_published_schema(offline):
    task = get_task("gsm8k")
    records = task.load(GSM8K_TRAIN)
    assert len(records) == 7473
    assert all(set(r) == {"question", "answer"} for r in records)
    assert all("\n#### " in r["answer"] for r in records)
    assert records[0]["question"].startswith("Natalia sold clips to 48 of her friends")
    texts = task.reference_texts(records[:3])
    assert texts == [t for r in records[:3] for t in (r["question"], r["answer"])]


def test_gsm8k_offline_without_a_file_says_what_to_do(offline):
    with pytest.raises(TaskError) as raised:
        get_task("gsm8k").load()
    message = str(raised.value)
    assert "task 'gsm8k'" in message and "'openai/gsm8k'" in message and "'main'" in message
    assert "--data gsm8k=PATH" in message


def test_math_loads_math500_records(offline):
    task = get_task("math")
    assert task.hub == HubSource("HuggingFaceH4/MATH-500", split="test")
    records = task.load(FIXTURES / "math500.jsonl")
    assert [r["answer"] for r in records] == [
        "\\left( 3, \\frac{\\pi}{2} \\right)",
        "26000",
        "\\frac{7}{12}",
    ]
    assert records[0]["unique_id"] == "test/precalculus/807.json"  # extra fields are kept
    texts = task.reference_texts(records)
    assert texts == [t for r in records for t in (r["problem"], r["solution"])]


def test_math_record_without_solution_is_rejected(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"problem": "1+1?", "answer": "2"}\n')
    with pytest.raises(
        TaskError, match=rf"{re.escape(str(path))}:1: math record is missing field 'solution'"
    ):
        get_task("math").load(path)


def test_math401_loads_its_expressions(offline):
    task = get_task("math401")
    records = task.load(MATH401_SAMPLE)
    assert len(records) == 46
    assert records[1] == {"query": "2+5=", "response": "7"}
    for r in records:
        float(r["response"])  # every target is a number
    assert task.reference_texts(records) == [r["query"] for r in records]


def test_math401_without_a_file_asks_for_one(offline):
    with pytest.raises(
        TaskError, match=r"task 'math401' has no default data source.*--data math401"
    ):
        get_task("math401").load()


# ---- evaluation protocol ----


def test_math401_targets_as_completions_are_all_correct():
    task = get_task("math401")
    records = task.load(MATH401_SAMPLE)
    grades = task.grade(records, [r["response"] for r in records], "chat")
    assert all(g.correct for g in grades)
    assert grades[1].answer == "7" and grades[1].predicted == "7"
    assert task.prompt(records[1], "base") == task.prompt(records[1], "chat") == "2+5="
    assert task.protocol("base").stop == ("\n",) and task.protocol("base").shots == 0


def test_math23k_grades_the_release_schema():
    task = get_task("math23k")
    record = {"id": "1", "original_text": "甲数是乙数的一半，乙数是10，甲数是多少？", "ans": "5"}
    right, wrong = task.grade([record, record], ["甲数是10÷2=5", "答案是6"], "chat")
    assert right.correct and right.predicted == "5"
    assert not wrong.correct and wrong.status == "failed"
    assert task.prompt(record, "chat") == record["original_text"]


def test_a_record_the_grader_cannot_read_is_an_error_verdict():
    task = get_task("gsm8k")
    (grade,) = task.grade([{"question": "?", "answer": "no final answer"}], ["5"], "chat")
    assert grade.status == "error" and not grade.correct
    assert "GSM8K record without a final answer" in grade.reason and grade.predicted is None
