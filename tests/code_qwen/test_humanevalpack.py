"""HumanEvalPack synthesize: per-language program assembly, sandboxed grading, protocol."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from code_qwen.humanevalpack import (
    HUMANEVALPACK,
    LANGUAGES,
    ToolchainMissing,
    assemble,
    available_languages,
    find_toolchain,
)
from specialize.eval.tasks import get_task

FIXTURES = Path(__file__).parents[1] / "fixtures" / "tasks"
AVAILABLE = available_languages()
# A body that compiles in every language but returns the wrong answer for the first test.
WRONG = {
    "python": "    return False\n",
    "js": "  return false;\n}\n",
    "java": "        return false;\n    }\n}",
    "go": "    return false\n}\n",
    "cpp": "    return false;\n}\n",
    "rust": "    return false;\n}\n",
}


def records(language: str) -> list[dict]:
    return HUMANEVALPACK[language].load(FIXTURES / f"humanevalpack-{language}.jsonl")


def test_every_language_is_registered() -> None:
    for language in LANGUAGES:
        task = get_task(f"humanevalpack-{language}")
        assert task.language == language
        assert task.protocol("base").timeout == task.timeout


@pytest.mark.parametrize("language", LANGUAGES)
def test_canonical_solutions_pass_and_a_wrong_one_fails(language: str) -> None:
    if language not in AVAILABLE:
        pytest.skip(f"no {language} toolchain here")
    task = HUMANEVALPACK[language]
    recs = records(language)
    completions = [r["canonical_solution"] for r in recs] + [WRONG[language]]
    grades = task.grade([*recs, recs[0]], completions, "base")
    assert [g.status for g in grades] == ["passed"] * len(recs) + ["failed"]


@pytest.mark.parametrize("language", ["python", "cpp"])
def test_chat_mode_grades_the_whole_function(language: str) -> None:
    if language not in AVAILABLE:
        pytest.skip(f"no {language} toolchain here")
    task = HUMANEVALPACK[language]
    rec = records(language)[0]
    reply = f"Here it is:\n```\n{rec['prompt']}{rec['canonical_solution']}\n```\nDone."
    code = task.postprocess(rec, reply, "chat")
    assert code.startswith(rec["prompt"])
    assert [g.status for g in task.grade([rec], [code], "chat")] == ["passed"]


@pytest.mark.parametrize("language", LANGUAGES)
def test_missing_toolchain_is_an_error_for_every_sample(language: str) -> None:
    task = dataclasses.replace(HUMANEVALPACK[language], search_path="")
    recs = records(language)
    if language == "python":  # runs in the sandbox's own interpreter: nothing to miss
        assert "python" in available_languages(search_path="")
        return
    assert language not in available_languages(search_path="")
    with pytest.raises(ToolchainMissing, match="not found"):
        find_toolchain(language, search_path="")
    runs = task.grade_runs(recs, [r["canonical_solution"] for r in recs], "base")
    assert [r.status for r in runs] == ["error"] * len(recs)
    assert all("not found" in r.error and "install it or drop the task" in r.error for r in runs)
    assert [g.status for g in task.grade(recs, ["x"] * len(recs), "base")] == ["error"] * 2


def test_prompts_per_mode() -> None:
    task = HUMANEVALPACK["java"]
    rec = records("java")[0]
    assert task.prompt(rec, "base") == rec["prompt"]
    assert task.prompt(rec, "chat") == rec["instruction"]
    assert task.messages(rec) == [{"role": "user", "content": rec["instruction"]}]
    assert task.protocol("chat").stop == ("<|im_end|>", "<|endoftext|>")
    py = HUMANEVALPACK["python"]
    assert "\ndef" in py.protocol("base").stop
    assert py.postprocess(rec, "    return 1\ndef other():\n", "base") == "    return 1"


def test_program_assembly_follows_the_harness() -> None:
    rust = records("rust")[0]
    program = assemble(rust, "body", "rust", "base")
    assert program.startswith("\nfn main(){ \n } \n" + rust["declaration"] + "body")
    go = records("go")[0]
    program = assemble(go, go["canonical_solution"], "go", "base")
    assert program.startswith(go["test_setup"] + '\nimport (\n    "math"\n)\n')
    assert go["import"] not in program.split(")\n", 2)[2]
    cpp = assemble(records("cpp")[0], "x", "cpp", "base")
    assert cpp.index("#include<algorithm>") < cpp.index("using namespace std;")


def test_failed_and_errored_samples_keep_their_reason() -> None:
    task = HUMANEVALPACK["python"]
    rec = records("python")[0]
    (failed,) = task.grade([rec], [WRONG["python"]], "base")
    assert failed.status == "failed"
    assert failed.reason.startswith("failed: AssertionError")
    assert "AssertionError" in failed.stderr
    missing = dataclasses.replace(HUMANEVALPACK["cpp"], search_path="")
    (errored,) = missing.grade(records("cpp")[:1], ["x"], "base")
    assert errored.status == "error"
    assert "not found" in errored.reason
