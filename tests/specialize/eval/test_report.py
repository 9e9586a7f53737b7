"""`specialize compare`: the markdown report, its charts and the CLI's exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from specialize.eval.paper_numbers import PAPER_MODELS, paper_protocol
from specialize.eval.report import ReportError, compare, load_results

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "results"
FILES = [FIXTURES / name for name in ("base.json", "code.json", "math.json")]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, str]:
    """The fixtures compared once for the module: (output directory, report.md text)."""
    out = tmp_path_factory.mktemp("report")
    path = compare(FILES, out)
    return out, path.read_text(encoding="utf-8")


def test_scores_table_in_percent(report):
    _, text = report
    assert (
        "| model | source | humaneval pass@1 | mbpp pass@1 | gsm8k accuracy | math accuracy |"
        in text
    )
    assert "| qwen-7b | this project | 25.0 | 30.0 | 50.0 | 12.0 |" in text
    assert "| code-qwen-7b | this project | 42.7 | 41.0 | — | — |" in text
    assert "| math-qwen-chat-7b | this project | — | — | 62.2 | 17.0 |" in text


def test_deltas_against_first_file(report):
    _, text = report
    assert "## Change vs qwen-7b" in text
    assert "| code-qwen-7b | +17.7 | +11.0 | — | — |" in text
    # gsm8k ran with another protocol, math on other data: deltas marked as not comparable.
    assert "| math-qwen-chat-7b | — | — | +12.1 † | +5.0 † |" in text


def test_paper_reference_rows(report):
    _, text = report
    # qwen-7b measured gsm8k and math under `paper` in base mode, the code tasks under `robust`.
    assert "| Qwen-7B *(reported by the paper)* | paper, base | — | — | 51.7 | 11.6 |" in text
    assert "Code-Qwen-7B *(reported by the paper)*" not in text
    # Only gsm8k was measured under `paper` in chat mode (math-qwen-chat-7b).
    assert (
        "| Math-Qwen-Chat-14B *(reported by the paper)* | paper, chat | — | — | 69.8 | — |" in text
    )
    assert "Code-Qwen-Chat-7B *(reported by the paper)*" not in text  # no number left to show
    paper_protocols = text.split("## Paper protocols")[1]
    assert "| gsm8k | base | " + paper_protocol("gsm8k", "base").replace("|", "\\|") in text
    assert "| math | chat |" not in paper_protocols and "| humaneval |" not in paper_protocols


def test_paper_numbers_left_out_say_how_each_result_was_measured(report):
    _, text = report
    left_out = text.split("Paper numbers left out")[1].split("## ")[0]
    assert (
        "- **math**, chat (Qwen-Chat-7B, Qwen-Chat-14B, Math-Qwen-Chat-7B, Math-Qwen-Chat-14B): "
        "measured by qwen-7b under `paper` (base); math-qwen-chat-7b under `robust` (base)."
        in left_out
    )
    assert (
        "- **humaneval**, base (Qwen-7B, Qwen-14B, Code-Qwen-7B, Code-Qwen-14B): measured by "
        "qwen-7b under `robust` (base); code-qwen-7b under `robust` (base)." in left_out
    )
    assert "**gsm8k**" not in left_out


def test_paper_numbers_need_a_paper_run(tmp_path):
    # The same results measured under `robust` (a file from before protocols had names, too).
    robust = []
    for path in FILES:
        doc = json.loads(path.read_text(encoding="utf-8"))
        for entry in doc["tasks"].values():
            entry["protocol"].pop("name", None)
            entry["protocol"].pop("reference", None)
        robust.append(tmp_path / path.name)
        robust[-1].write_text(json.dumps(doc), encoding="utf-8")
    text = compare(robust, tmp_path / "out").read_text(encoding="utf-8")
    assert "*(reported by the paper)*" not in text
    assert (
        "- **gsm8k**, base (Qwen-7B, Qwen-14B): measured by qwen-7b under `robust` (base)" in text
    )
    assert "No paper numbers apply." in text
    assert "protocol name" not in text  # all robust: nothing to flag


def test_paper_numbers_match_reference_table():
    by_name = {m.name: m for m in PAPER_MODELS}
    assert by_name["Code-Qwen-14B"].scores == {"humaneval": 45.1, "mbpp": 51.4}
    assert by_name["Qwen-Chat-14B"].scores["math23k"] == 67.0
    assert by_name["Math-Qwen-Chat-7B"].scores == {
        "gsm8k": 62.5,
        "math": 17.2,
        "math401": 80.8,
        "math23k": 75.4,
    }
    # Blank cells of the paper's table stay absent.
    assert "math401" not in by_name["Qwen-7B"].scores


def test_protocol_and_data_warnings(report):
    _, text = report
    warnings = text.split("## Warnings")[1].split("##")[0]
    assert (
        "- **gsm8k**: scores are NOT comparable — protocol mode: qwen-7b=base, "
        "math-qwen-chat-7b=chat; protocol shots: qwen-7b=8, math-qwen-chat-7b=0;" in warnings
    )
    assert (
        "- **math**: scores are NOT comparable — protocol name: qwen-7b=paper, "
        "math-qwen-chat-7b=robust;" in warnings
    )
    assert "data sha256: qwen-7b=" + "d" * 64 in warnings
    assert "humaneval**: scores" not in warnings  # same protocol and data
    assert "- **mbpp** / code-qwen-7b: 3 missing, 1 errors of 500 (scored as failures)." in warnings
    assert "- **humaneval** / code-qwen-7b: 2 timed out of 164" in warnings


def test_protocol_and_counts_sections(report):
    _, text = report
    protocols = text.split("## Protocols")[1]
    assert (
        '| qwen-7b | paper | base | 8 | `["\\n\\n", "Question:"]` | 512 | — | — | gsm8k-number | — | '
        "QwenLM/Qwen:eval/evaluate_gsm8k.py@2df8e8ac450fa185c421a08b0090ef81826caa6e | "
        "gsm8k:main@test | `" + "c" * 64 + "` | 1319 |" in protocols
    )
    assert "| code-qwen-7b | robust | base | 3 |" in protocols  # a file without a protocol name
    assert "| code-qwen-7b | 500 | 205 | 3 | 295 | 0 | 1 |" in text


def test_charts_are_png_and_linked(report):
    out, text = report
    from matplotlib.image import imread

    for name in ("chart-code.png", "chart-math.png"):
        assert f"]({name})" in text
        path = out / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        pixels = imread(path)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300
        assert pixels.std() > 0.05  # bars and text drawn, not a blank canvas


def test_base_by_label(tmp_path):
    text = compare(FILES[:2], tmp_path, base="code-qwen-7b").read_text(encoding="utf-8")
    assert "## Change vs code-qwen-7b" in text
    assert "| qwen-7b | -17.7 | -11.0 | — | — |" in text
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["chart-code.png", "chart-math.png"]
    with pytest.raises(ReportError, match="no results file has that label"):
        compare(FILES[:2], tmp_path, base="nope")


def test_duplicate_labels_get_file_names(tmp_path):
    copy = tmp_path / "again.json"
    shutil.copy(FILES[0], copy)
    text = compare([FILES[0], copy], tmp_path / "out").read_text(encoding="utf-8")
    assert "| qwen-7b (again.json) | +0.0 | +0.0 | +0.0 | +0.0 |" in text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("{not json", "not a readable JSON file"),
        ({"format": "other-1", "model": {"label": "x"}, "tasks": {}}, "unknown format 'other-1'"),
        ({"format": "specialize-eval-1", "model": {"label": "x"}, "tasks": {}}, "no tasks"),
    ],
)
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ReportError, match=message):
        load_results(path)


def test_cli_end_to_end(tmp_path, capsys):
    from specialize.cli import main

    out = tmp_path / "report"
    with pytest.raises(SystemExit) as ok:
        main(["compare", *map(str, FILES), "-o", str(out), "--base", "qwen-7b"])
    assert ok.value.code == 0
    assert (out / "report.md").is_file() and (out / "chart-math.png").is_file()
    assert str(out / "report.md") in capsys.readouterr().out

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "specialize-eval-0", "tasks": {}}))
    with pytest.raises(SystemExit) as failed:
        main(["compare", str(FILES[0]), str(bad), "-o", str(tmp_path / "x")])
    assert failed.value.code == 2
    assert "unknown format" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing written for a bad input


def test_paper_rows_can_be_left_out(tmp_path):
    text = compare(FILES, tmp_path, paper=False).read_text(encoding="utf-8")
    assert "reported by the paper)*" not in text and "## Paper protocols" not in text
    assert "| base |" in text


def _with_machine(path: Path, out: Path, cpu: str, capability: str) -> Path:
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc["machine"] = {"cpu": cpu, "torch_cpu_capability": capability, "kernel_variables": {}}
    out.write_text(json.dumps(doc), encoding="utf-8")
    return out


def test_results_generated_on_different_cpu_kernels_are_flagged(tmp_path):
    base = _with_machine(FILES[0], tmp_path / "base.json", "Xeon", "AVX512")
    same = _with_machine(FILES[1], tmp_path / "code.json", "Xeon", "AVX512")
    text = compare([base, same], tmp_path / "same").read_text(encoding="utf-8")
    assert "different CPU kernels" not in text
    other = _with_machine(FILES[1], tmp_path / "code.json", "EPYC", "AVX2")
    text = compare([base, other], tmp_path / "other").read_text(encoding="utf-8")
    assert (
        "Generated on different CPU kernels (qwen-7b=Xeon AVX512; code-qwen-7b=EPYC AVX2)" in text
    )
