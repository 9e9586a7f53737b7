"""`python -m math_qwen.check_math401 PATH`: the whole-set check of a Math401 file."""

import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

from math_qwen import graders
from math_qwen.check_math401 import main, record_faults
from tests.conftest import MATH401_SAMPLE

ROOT = Path(__file__).resolve().parents[2]


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def test_math401_check_passes_the_sample_and_counts_its_records(capsys):
    assert main([str(MATH401_SAMPLE)]) == 0
    assert capsys.readouterr().out == f"{MATH401_SAMPLE}: all 46 records grade as expected\n"
    assert main([str(MATH401_SAMPLE), "--records", "46"]) == 0
    assert main([str(MATH401_SAMPLE), "--records", "401"]) == 2
    assert "46 records, expected 401" in capsys.readouterr().err


def test_math401_check_fails_on_a_gold_answer_that_does_not_grade(tmp_path, capsys):
    path = _write(
        tmp_path / "m.jsonl",
        [{"query": "2+5=", "response": "7"}, {"query": "3+4=", "response": "seven"}],
    )
    assert main([str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == f"{path}: record 2 ('3+4='): target 'seven' is not a number\n"
    assert captured.err == f"{path}: 1 of 2 records fail\n"


def test_math401_check_catches_a_grader_with_a_wider_tolerance(monkeypatch):
    record = {"query": "0.7*0.4=", "response": "0.2800"}
    assert record_faults(record) == []
    monkeypatch.setattr(graders, "MATH401_TOLERANCE", Fraction(1, 100))
    assert record_faults(record) == ["the target + 0.002 ('0.2820') grades correct"]


def test_math401_check_refuses_a_file_that_is_not_math401(tmp_path, capsys):
    path = _write(tmp_path / "m.jsonl", [{"question": "2+5=", "answer": "7"}])
    assert main([str(path)]) == 2
    assert "missing field 'query'" in capsys.readouterr().err


def test_math401_check_runs_as_a_module():
    done = subprocess.run(
        [sys.executable, "-m", "math_qwen.check_math401", str(MATH401_SAMPLE)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "all 46 records grade as expected" in done.stdout
