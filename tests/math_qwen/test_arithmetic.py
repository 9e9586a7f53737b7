"""Generated arithmetic in Math401's schema: correct answers, disjoint splits, graded by math401."""

from __future__ import annotations

import re

import pytest

from math_qwen.arithmetic import generate, to_chat
from specialize.eval.tasks import get_task


def _operands(query: str) -> frozenset[int]:
    for op in "+-*":
        if op in query:
            a, b = query.rstrip("=").split(op)
            return frozenset((int(a), int(b)))
    raise AssertionError(query)


def test_answers_are_right_and_splits_share_no_operand_pair():
    train, test = generate(600, 0, "train"), generate(150, 0, "test")
    for record in train + test:
        a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)=", record["query"]).groups()
        expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert str(expected) == record["response"]
        assert int(record["response"]) >= 0
    assert not {_operands(r["query"]) for r in train} & {_operands(r["query"]) for r in test}
    assert generate(600, 0, "train") == train and generate(600, 1, "train") != train


def test_gold_responses_pass_the_math401_grader_and_wrong_ones_fail():
    task = get_task("math401")
    records = generate(50, 0, "test")
    grades = task.grade(records, [r["response"] for r in records], "chat")
    assert all(g.correct for g in grades)
    grades = task.grade(records, [str(int(r["response"]) + 1) for r in records], "chat")
    assert not any(g.correct for g in grades)


def test_chat_form_and_errors():
    record = {"query": "3+4=", "response": "7"}
    assert to_chat(record)["messages"][0] == {"role": "user", "content": "3+4="}
    with pytest.raises(ValueError, match="distinct train expressions"):
        generate(10**6, 0, "train")
    with pytest.raises(ValueError, match="split"):
        generate(1, 0, "dev")
