"""The generated function problems: determinism, the held-out split, correct HumanEval records,
and the SFT form."""

import ast
import doctest
import json

import pytest

from base.tokenizer import QwenTokenizer
from code_qwen.execution import check_humaneval
from code_qwen.synthetic_functions import (
    TEMPLATES,
    generate,
    key_split,
    main,
    split_keys,
    to_chat,
)
from specialize.data.chat import conversation
from specialize.data.sft_prepare import SFTOptions, prepare_sft
from specialize.data.sources import Source
from specialize.eval.tasks import get_task

FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


def one_per_template(split: str) -> list[dict]:
    """The first problem of every template the split has."""
    first: dict[str, dict] = {}
    for record in generate(400, seed=0, split=split):
        first.setdefault(record["template"], record)
    return list(first.values())


def test_same_seed_same_file_other_seed_other_problems(tmp_path):
    paths = [tmp_path / f"{i}.jsonl" for i in range(3)]
    for path, seed in zip(paths, ("0", "0", "1")):
        assert main(["--n", "50", "--seed", seed, "--split", "test", "-o", str(path)]) == 0
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[0].read_bytes() != paths[2].read_bytes()
    rows = [json.loads(line) for line in paths[0].read_text().splitlines()]
    assert rows == generate(50, seed=0, split="test")
    assert generate(20, seed=3) == generate(100, seed=3)[:20]  # a smaller n is a prefix


def test_train_and_test_share_no_prompt_and_no_template_with_constants():
    train = generate(3000, seed=0)
    test = generate(600, seed=1, split="test")  # the split does not depend on the seed
    for records in (train, test):
        assert len({r["prompt"] for r in records}) == len(records)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    train_keys = {(r["template"], r["constants"]) for r in train}
    test_keys = {(r["template"], r["constants"]) for r in test}
    assert not train_keys & test_keys
    held_out = {t.name for t in TEMPLATES if t.held_out}
    assert held_out and not held_out & {r["template"] for r in train}
    assert held_out < {r["template"] for r in test}
    # Both splits also meet the shared templates, with other constants.
    shared = {r["template"] for r in test} - held_out
    assert len(shared) >= 15 and shared <= {r["template"] for r in train}


def test_the_key_split_is_a_partition_by_a_stable_hash():
    train, test = split_keys("train"), split_keys("test")
    for template in TEMPLATES:
        every = template.keys()
        parts = train.get(template, []) + test.get(template, [])
        assert sorted(map(repr, parts)) == sorted(map(repr, every)), template.name
        assert all(key_split(template, k) == "test" for k in test.get(template, []))
    assert key_split(TEMPLATES[0], {"k": 7}) == key_split(TEMPLATES[0], {"k": 7})
    more = split_keys("test", test_percent=50)
    assert sum(map(len, more.values())) > sum(map(len, test.values()))
    with pytest.raises(ValueError, match="split"):
        split_keys("validation")


def _skills(body: str) -> set[str]:
    """The syntax node kinds, functions and methods a body uses."""
    tree = ast.parse("def f():\n" + "".join(f"    {line}\n" for line in body.split("\n")))
    skills = {type(node).__name__ for node in ast.walk(tree)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            skills.add(ast.unparse(node.func).split(".")[-1])
    return skills


def test_held_out_templates_use_only_skills_taught_in_training():
    taught = set().union(*(_skills(t.body) for t in TEMPLATES if not t.held_out))
    for template in (t for t in TEMPLATES if t.held_out):
        assert _skills(template.body) <= taught, template.name


@pytest.mark.parametrize("split", ["train", "test"])
def test_canonical_solutions_pass_in_the_sandbox_and_a_wrong_one_fails(split):
    records = one_per_template(split)
    assert {r["template"] for r in records} == {t.name for t in split_keys(split)}
    for record in records:
        assert set(FIELDS) <= set(record)
        ast.parse(record["prompt"] + record["canonical_solution"])
        assert 3 <= record["test"].count("assert candidate(") <= 5
        assert f"def {record['entry_point']}(" in record["prompt"]
    right = check_humaneval(records, [r["canonical_solution"] for r in records])
    assert [r.result for r in right] == ["passed"] * len(records)
    wrong = check_humaneval(records, ["    return None\n"] * len(records))
    assert {r.result for r in wrong} == {"failed: AssertionError"}


# What each docstring says, written independently of the templates' bodies: c holds the constants.
ORACLES = {
    "add": lambda c, x: x + c["k"],
    "sub": lambda c, x: x - c["k"],
    "mul": lambda c, x: x * c["k"],
    "mod": lambda c, x: x - (x // c["k"]) * c["k"],
    "add_mul": lambda c, a, b: a * c["k"] + b * c["k"],
    "mul_add": lambda c, a, b: b + a * c["k"],
    "cap": lambda c, x: x if x <= c["k"] else c["k"],
    "floor": lambda c, x: x if x >= c["k"] else c["k"],
    "label": lambda c, x: c["hi"] if x > c["k"] else c["lo"],
    "repeat": lambda c, s: "".join([s] * c["k"]),
    "suffix": lambda c, s: f"{s}{c['w']}",
    "prefix": lambda c, s: f"{c['w']}{s}",
    "upper_suffix": lambda c, s: f"{s.upper()}{c['w']}",
    "reverse_prefix": lambda c, s: c["w"] + "".join(reversed(s)),
    "head": lambda c, s: s[0 : c["k"]],
    "tail": lambda c, s: s[max(len(s) - c["k"], 0) :],
    "count_char": lambda c, s: sum(ch == c["c"] for ch in s),
    "join": lambda c, words: c["sep"].join(words),
    "sum_plus": lambda c, xs: c["k"] + sum(xs),
    "max_times": lambda c, xs: sorted(xs)[-1] * c["k"],
    "keep_above": lambda c, xs: list(filter(lambda x: x > c["k"], xs)),
    "map_add": lambda c, xs: list(map(lambda x: x + c["k"], xs)),
    "map_mul": lambda c, xs: list(map(lambda x: x * c["k"], xs)),
    "count_above": lambda c, xs: sum(x > c["k"] for x in xs),
    "range_sum": lambda c, n: c["k"] * n * (n - 1) // 2,
    "range_count": lambda c, n: (n + c["k"] - 1) // c["k"],
    "range_list": lambda c, n: list(range(0, c["k"] * n, c["k"])),
    "mul_add_const": lambda c, x: c["m"] + c["k"] * x,
    "clip": lambda c, x: sorted([c["lo"], x, c["hi"]])[1],
    "upper_repeat": lambda c, s: "".join([s.upper()] * c["k"]),
    "sum_above": lambda c, xs: sum(filter(lambda x: x > c["k"], xs)),
    "map_filter": lambda c, xs: [c["k"] * x for x in filter(lambda x: x > c["m"], xs)],
    "range_sum_divisible": lambda c, n: sum(range(0, n, c["k"])),
    "add_reworded": lambda c, x: c["k"] + x,
}


def test_every_template_does_what_its_docstring_says():
    assert set(ORACLES) == {t.name for t in TEMPLATES}
    for record in generate(600, seed=0) + generate(300, seed=0, split="test"):
        constants, oracle = json.loads(record["constants"]), ORACLES[record["template"]]
        for line in record["test"].splitlines()[1:]:
            call = ast.parse(line.strip()).body[0].test
            args = [ast.literal_eval(arg) for arg in call.left.args]
            assert oracle(constants, *args) == ast.literal_eval(call.comparators[0]), line


def test_docstring_examples_are_what_the_canonical_solution_returns():
    for record in one_per_template("train") + one_per_template("test"):
        namespace: dict = {}
        exec(record["prompt"] + record["canonical_solution"], namespace)  # the project's own code
        function = namespace[record["entry_point"]]
        runner = doctest.DocTestRunner()
        for test in doctest.DocTestFinder().find(function, globs=namespace):
            runner.run(test)
        assert 1 <= runner.tries <= 2 and runner.failures == 0, record["prompt"]


def test_chat_form_asks_as_chat_humaneval_and_answers_with_the_fenced_function(tmp_path):
    record = generate(1, seed=0)[0]
    user, assistant = to_chat(record)["messages"]
    assert user == {"role": "user", "content": get_task("humaneval").prompt(record, "chat")}
    signature = record["prompt"].split("\n")[0]
    assert assistant["content"] == f"```python\n{signature}\n{record['canonical_solution']}```"
    roles = [m["role"] for m in to_chat(record, system="Be brief.")["messages"]]
    assert roles == ["system", "user", "assistant"]
    body = to_chat(record, reply="body")["messages"][-1]["content"]
    assert body == f"```python\n{record['canonical_solution']}```"
    # Either reply passes the chat grading: the body continues the prompt's stub.
    task = get_task("synthetic-functions")
    replies = [to_chat(record, reply=r)["messages"][-1]["content"] for r in ("function", "body")]
    codes = [task.postprocess(record, reply, "chat") for reply in replies]
    assert [g.status for g in task.grade([record, record], codes, "chat")] == ["passed"] * 2
    with pytest.raises(ValueError, match="reply 'prose'"):
        to_chat(record, reply="prose")

    path = tmp_path / "train.jsonl"
    main(["--n", "40", "--seed", "0", "--format", "chat", "-o", str(path)])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [to_chat(r) for r in generate(40, seed=0)]
    assert all(conversation(row) == row["messages"] for row in rows)
    options = SFTOptions(512, pack=True, on_error="fail")
    manifest = prepare_sft(
        [Source("jsonl", str(path))], tmp_path / "sft", QwenTokenizer.load(), options
    )
    assert manifest["samples"] == 40 and manifest["skipped"] == {}


def test_command_line_errors_are_one_line_usage_errors(capsys):
    for argv in (["--n", "-1"], ["--test-percent", "0"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
    assert "test_percent must be in 1..99" in capsys.readouterr().err
