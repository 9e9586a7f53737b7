"""GSM8K answer extraction and comparison."""

import json

import pytest

from math_qwen.answers import answers_match, extract_answer, normalize_number
from tests.conftest import gsm8k_train_lines


def test_extracts_the_gold_answer_of_every_gsm8k_training_solution():
    records = [json.loads(line) for line in gsm8k_train_lines()]
    assert len(records) == 7473
    wrong = []
    for record in records:
        gold = record["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        if extract_answer(record["answer"]) != gold:
            wrong.append((gold, record["answer"][-80:]))
    assert not wrong, wrong[:5]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She earned 2 * 5 = 10 dollars.\n#### 10", "10"),
        ("#### 1,200", "1200"),
        ("#### 2,520,000", "2520000"),
        ("The total is $1,234.50.", "1234.5"),
        ("It costs $12.", "12"),
        ("The temperature dropped to -7 degrees.", "-7"),
        ("#### -47", "-47"),
        ("He paid -$5 in fees", "-5"),
        ("10-3=7", "7"),  # the minus of an expression is not a sign
        ("The answer is 7.0", "7"),
        ("0.50 of the cake", "0.5"),
        ("About .5 left", "0.5"),
        ("#### 72\n", "72"),
        ("12 apples #### 5 then 9 more", "5"),  # the number right after the marker wins
        ("#### 3\n...\n#### 8", "8"),  # the last marker wins
        ("Total: 6 ####", "6"),  # a marker without a number falls back to the last one
        ("lists 1,2,3", "3"),  # "1,2,3" is not one number
        ("item x2 costs 30", "30"),
        ("There is no number here.", None),
        ("", None),
        (None, None),
        ("abc123", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1,200", "1200"), ("$7.0", "7"), ("-0", "0"), ("1200.", "1200"), ("3.140", "3.14"),
     ("1e3", "1000"), ("abc", None), ("nan", None), ("", None), (5, "5"), (2.5, "2.5")],
)  # fmt: skip
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


@pytest.mark.parametrize(
    ("predicted", "gold", "expected"),
    [
        ("7", "7", True),
        ("7.0", "7", True),
        ("7.00001", "7", True),  # within the 1e-4 absolute tolerance
        ("7.001", "7", False),
        ("$1,200", "1200", True),
        ("-12", "-12", True),
        ("12", "-12", False),
        (None, "7", False),
        (7, "7", True),
        ("seven", "7", False),
        ("123456789012345678", "123456789012345679", False),  # exact for big integers
    ],
)
def test_answers_match(predicted, gold, expected):
    assert answers_match(predicted, gold) is expected


def test_answers_match_tolerance_is_configurable():
    assert answers_match("0.33", "1/3") is False  # not a number: compared as text
    assert answers_match("0.333", "0.3333333", tol=1e-3)
    assert not answers_match("0.333", "0.3333333")
