"""A clone is self-sufficient: nothing in it reads beside the checkout, and the data its tests read
is in the repository with its licence."""

import re
import subprocess
from pathlib import Path

from tests.conftest import GSM8K_TRAIN, MATH401_SAMPLE

ROOT = Path(__file__).resolve().parents[1]
# Path(__file__)[.resolve()] followed by .parent steps and/or .parents[k]
ANCESTOR = re.compile(r"Path\(__file__\)(?:\.resolve\(\))?((?:\.parent\b)*)(?:\.parents\[(\d+)\])?")


def _python_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [ROOT / name for name in listed]


def test_no_file_reaches_beside_the_checkout():
    files = _python_files()
    assert ROOT / "tests" / "conftest.py" in files
    outside = []
    for file in files:
        for match in ANCESTOR.finditer(file.read_text(encoding="utf-8")):
            steps = match.group(1).count(".parent")
            if match.group(2) is not None:
                steps += int(match.group(2)) + 1
            ancestor = file.parents[steps - 1] if steps else file
            if not ancestor.is_relative_to(ROOT):
                outside.append(f"{file.relative_to(ROOT)}: {match.group(0)}")
    assert outside == []


def test_the_data_the_tests_read_is_in_the_checkout_with_its_licence():
    for data in (GSM8K_TRAIN, MATH401_SAMPLE):
        assert data.is_file() and data.resolve().is_relative_to(ROOT)
        assert (data.parent / "README.md").is_file()
    assert "MIT License" in (GSM8K_TRAIN.parent / "LICENSE").read_text()
