"""The arithmetic word-problem generator: determinism, split disjointness, correct solutions."""

import json
import operator
import re

import pytest

from math_qwen.answers import extract_answer
from math_qwen.word_problems import (
    NAMES,
    OBJECTS,
    ProblemConfig,
    generate,
    main,
    split_pairs,
    to_chat,
)

ALL_OPS = ProblemConfig(ops=("add", "sub", "mul", "add_sub"))
EQUATION = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")
OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def test_same_seed_same_problems_other_seed_other_problems():
    assert generate(300, seed=0) == generate(300, seed=0)
    assert generate(300, seed=0, split="test") == generate(300, seed=0, split="test")
    first, other = generate(300, seed=0), generate(300, seed=1)
    assert [r["question"] for r in first] != [r["question"] for r in other]
    assert generate(50, seed=0) == first[:50]  # a smaller n is a prefix


def test_train_and_test_never_share_a_question():
    train = {r["question"] for r in generate(4000, seed=0, config=ALL_OPS)}
    test = {r["question"] for r in generate(1000, seed=0, split="test", config=ALL_OPS)}
    assert len(train) == 4000 and len(test) == 1000  # distinct within a split
    assert not train & test


def test_held_out_pairs_are_new_combinations_of_known_words():
    train, test = split_pairs("train"), split_pairs("test")
    assert not set(train) & set(test)
    assert len(train) + len(test) == len(NAMES) * len(OBJECTS)
    for split in (train, test):  # every name and object is seen in both splits
        assert {name for name, _ in split} == set(NAMES)
        assert {obj for _, obj in split} == set(OBJECTS)
    with pytest.raises(ValueError, match="split"):
        split_pairs("validation")


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_solution_is_correct_arithmetic_ending_in_its_answer(split):
    records = generate(1500, seed=3, split=split, config=ALL_OPS)
    for record in records:
        steps, final = record["solution"].rsplit("\n", 1)
        assert final == f"#### {record['answer']}"
        assert extract_answer(record["solution"]) == record["answer"]
        equations = EQUATION.findall(steps)
        assert equations and len(equations) == len(steps.split("\n")), record
        for a, op, b, result in equations:
            assert OPERATORS[op](int(a), int(b)) == int(result), record
        assert equations[-1][3] == record["answer"]
        assert int(record["answer"]) >= 0
        # The question states the operands the solution computes with.
        first_numbers = re.findall(r"\d+", record["question"])
        assert {equations[0][0], equations[0][2]} <= set(first_numbers), record
    kinds = {op for r in records for _, op, _, _ in EQUATION.findall(r["solution"])}
    assert kinds == {"+", "-", "*"}


def test_operands_stay_in_the_configured_ranges():
    config = ProblemConfig(add_range=(3, 6), mul_range=(2, 3), ops=("add", "sub", "mul"))
    for record in generate(300, seed=0, config=config):
        ((a, op, b, _),) = EQUATION.findall(record["solution"])
        low, high = config.mul_range if op == "*" else config.add_range
        assert low <= int(a) <= high and low <= int(b) <= high, record


def test_a_too_small_problem_space_is_an_error_not_a_hang():
    with pytest.raises(ValueError, match="distinct problems"):
        generate(10_000, seed=0, config=ProblemConfig(add_range=(1, 1), ops=("add",)))
    with pytest.raises(ValueError, match="ops"):
        ProblemConfig(ops=("div",))
    with pytest.raises(ValueError, match="add_range"):
        ProblemConfig(add_range=(5, 2))


def test_chat_form_has_user_question_and_assistant_solution():
    record = generate(1, seed=0)[0]
    assert to_chat(record) == {
        "messages": [
            {"role": "user", "content": record["question"]},
            {"role": "assistant", "content": record["solution"]},
        ]
    }
    roles = [m["role"] for m in to_chat(record, system="Be brief.")["messages"]]
    assert roles == ["system", "user", "assistant"]


def test_command_line_writes_jsonl(tmp_path, capsys):
    out = tmp_path / "train.jsonl"
    assert main(["--n", "20", "--seed", "0", "--split", "test", "-o", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [to_chat(r) for r in generate(20, seed=0, split="test")]
    main(["--n", "3", "--seed", "1", "--format", "records", "--system", "ignored"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows == generate(3, seed=1)
