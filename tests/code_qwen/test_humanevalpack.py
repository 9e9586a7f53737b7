"""HumanEvalPack synthesize: per-language program assembly, sandboxed grading, protocol."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from base.tokenizer import QwenTokenizer
from code_qwen.humanevalpack import (
    HUMANEVALPACK,
    JS_PRELUDE,
    LANGUAGES,
    TOOLS,
    ToolchainMissing,
    assemble,
    available_languages,
    bigcode_program,
    find_toolchain,
    toolchain_report,
)
from specialize.data.chat import generation_prompt
from specialize.eval.tasks import get_task

FIXTURES = Path(__file__).parents[1] / "fixtures" / "tasks"
# bigcode-evaluation-harness's own functions applied to the fixture records (code_paper/README.md).
BIGCODE = json.loads(
    (Path(__file__).parents[1] / "fixtures" / "code_paper" / "humanevalpack_paper.json").read_text()
)
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
    skip_without(language)
    task = HUMANEVALPACK[language]
    recs = records(language)
    completions = [r["canonical_solution"] for r in recs] + [WRONG[language]]
    grades = task.grade([*recs, recs[0]], completions, "base")
    assert [g.status for g in grades] == ["passed"] * len(recs) + ["failed"]


@pytest.mark.parametrize("language", ["python", "cpp"])
def test_chat_mode_grades_the_whole_function(language: str) -> None:
    skip_without(language)
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
    assert task.protocol("chat").stop == ("<|im_end|>", "<|im_start|>", "<|endoftext|>")
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


# ---- ``paper``: bigcode-evaluation-harness's humanevalsynthesize-LANG


def skip_without(language: str) -> None:
    if language not in AVAILABLE:
        tools = ", ".join(TOOLS[language])
        pytest.skip(f"toolchain for {language} not installed ({tools})")


@pytest.mark.parametrize("language", LANGUAGES)
def test_paper_prompts_are_bigcodes_bytes(language: str) -> None:
    """Base: the prompt stripped (``continue``); chat: ``codeqwen``'s ChatML without a system
    turn, the assistant turn pre-filled with the right-stripped prompt."""
    task, rec = HUMANEVALPACK[language].under("paper"), records(language)[0]
    expected = BIGCODE[language]
    assert task.prompt(rec, "base") == expected["base_prompt"] != rec["prompt"]
    tok = QwenTokenizer.load()
    ids = generation_prompt(task.messages(rec), tok, task.chat_system()) + tok.encode(
        task.prefill(rec)
    )
    assert tok.decode(ids) == expected["chat_prompt"]
    robust = HUMANEVALPACK[language]
    assert robust.prefill(rec) == "" and robust.chat_system() is not None
    assert task.protocol("base").reference.startswith(
        "bigcode-project/bigcode-evaluation-harness:bigcode_eval/tasks/humanevalpack.py@8fc5bae"
    )
    # --max_length_generation's default: the prompt's tokens count against the 512.
    assert task.protocol("base").max_length == task.protocol("chat").max_length == 512
    assert robust.protocol("base").max_length is None


@pytest.mark.parametrize("language", LANGUAGES)
def test_paper_cut_and_program_are_bigcodes(language: str) -> None:
    """``remove_last_block`` after the stop words, and the per-language glue of
    ``process_results`` (Go's package and imports, Rust's main and declaration, C++ includes)."""
    task, rec = HUMANEVALPACK[language].under("paper"), records(language)[0]
    for case in BIGCODE[language]["cases"]:
        for mode in ("base", "chat"):
            assert task.postprocess(rec, case["completion"], mode) == case["cut"]
        # The documented difference: a failed console.assert throws.
        expected = case["program"]
        expected = JS_PRELUDE + expected if language == "js" else expected
        assert bigcode_program(rec, case["cut"], language) == expected
    assert "\nfunc" in task.protocol("base").stop if language == "go" else True


@pytest.mark.parametrize("language", LANGUAGES)
def test_paper_canonical_solutions_pass_with_text_after_the_function(language: str) -> None:
    skip_without(language)
    task, recs = HUMANEVALPACK[language].under("paper"), records(language)
    completions = [c["completion"] for c in BIGCODE[language]["cases"]]
    prompt = recs[1]["prompt"]
    completions.append(prompt[len(prompt.rstrip()) :] + recs[1]["canonical_solution"])
    batch = [recs[0]] * (len(completions) - 1) + [recs[1]]
    graded = [task.postprocess(r, c, "base") for r, c in zip(batch, completions)]
    grades = task.grade(batch, graded, "base")
    assert [g.status for g in grades] == ["passed"] * len(batch), [g.reason for g in grades]


def test_go_chat_reply_with_its_own_package_and_imports_compiles_once() -> None:
    skip_without("go")
    task, rec = HUMANEVALPACK["go"], records("go")[0]
    reply = (
        '```go\npackage main\n\nimport (\n    "math"\n)\n\n'
        f"func HasCloseElements(numbers []float64, threshold float64) bool {{\n"
        f"{rec['canonical_solution']}```"
    )
    code = task.postprocess(rec, reply, "chat")
    assert [g.status for g in task.grade([rec], [code], "chat")] == ["passed"]


def test_go_imports_crypto_md5_when_used() -> None:
    rec = dict(records("go")[0], **{"import": ""})
    body = 'func F() [16]byte {\n    return md5.Sum([]byte("x"))\n}\n'
    program = assemble(rec, body, "go", "chat")
    assert '"crypto/md5"' in program and '"math"' not in program


def test_toolchain_report_names_the_debian_packages_of_what_is_missing() -> None:
    lines = toolchain_report(search_path="")
    assert [line.split(":")[0] for line in lines] == list(LANGUAGES)
    assert lines[0] == "python: the sandbox's Python"
    go = next(line for line in lines if line.startswith("go:"))
    assert "missing" in go and go.endswith(
        "apt-get install golang-go golang-github-stretchr-testify-dev"
    )


def test_paper_chat_generation_prompt_is_bigcodes(monkeypatch, tmp_path) -> None:
    """The harness renders a chat prompt with the task's system turn (none) and pre-fill."""
    import specialize.infer.generate as generate
    from specialize.eval.config import EvalConfig
    from specialize.eval.harness import generate_completions

    seen = []

    def fake_generate_text(model, tokenizer, prompts, max_new_tokens, **kwargs):
        seen.extend(tokenizer.decode(p) for p in prompts)
        return ["\n    return False\n"] * len(prompts)

    monkeypatch.setattr(generate, "generate_text", fake_generate_text)
    data = {"humanevalpack-python": str(FIXTURES / "humanevalpack-python.jsonl")}
    checkpoint = tmp_path / "ckpt"  # read for its generation defaults only (it has none)
    checkpoint.mkdir()
    (checkpoint / "metadata.json").write_text("{}")
    cfg = EvalConfig(
        tasks=["humanevalpack-python"],
        checkpoint=str(checkpoint),
        mode="chat",
        protocol="paper",
        data=data,
        output=str(tmp_path / "r.json"),
    )
    out = generate_completions(cfg, cfg.tasks, tmp_path / "c.jsonl", model=object())
    assert seen == [BIGCODE["python"]["chat_prompt"], *seen[1:]] and len(seen) == 2
    assert json.loads(out.read_text().splitlines()[0])["completion"] == "\n    return False\n"
