"""Citations of the paper resolve inside the repository: every ``docs/paper.md §N`` names a numbered
section of docs/paper.md, every ``paper §x.y`` a section of the paper that docs/paper.md
summarizes, and nothing cites a document the repository does not contain."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAPER_DOC = ROOT / "docs" / "paper.md"

HEADING = re.compile(r"^## (\d+)\. (.+)$", re.MULTILINE)
DOC_CITATION = re.compile(r"docs/paper\.md §(\d+)")
PAPER_CITATION = re.compile(r"\bpaper §(\d+(?:\.\d+)*)", re.IGNORECASE)
SECTION_REF = re.compile(r"§(\d+(?:\.\d+)*)")
# A document outside the repository that citations once pointed to.
OUTSIDE_CITATION = re.compile(r"REFERENCE(?:\.md|\s*§)")


def _repo_texts() -> dict[str, str]:
    """Every tracked or new (not ignored) text file of the checkout, by relative path."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    texts = {}
    for name in listed:
        path = ROOT / name
        if not path.is_file():  # deleted in the work tree, not yet committed
            continue
        try:
            texts[name] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # compressed fixtures
            continue
    return texts


def _sections() -> dict[int, str]:
    return {int(n): title for n, title in HEADING.findall(PAPER_DOC.read_text(encoding="utf-8"))}


def _summarized_paper_sections() -> set[str]:
    """The paper sections docs/paper.md covers: those its headings name, and any it cites."""
    text = PAPER_DOC.read_text(encoding="utf-8")
    covered = set(PAPER_CITATION.findall(text))
    for title in _sections().values():
        if "(paper " in title:
            covered.update(SECTION_REF.findall(title.split("(paper ", 1)[1]))
    return covered


def test_paper_doc_sections_are_numbered_in_order():
    numbers = list(_sections())
    assert numbers == list(range(1, len(numbers) + 1))
    assert len(numbers) >= 10


def test_every_doc_citation_names_a_section():
    sections = _sections()
    cited: dict[str, set[int]] = {}
    for name, text in _repo_texts().items():
        numbers = {int(n) for n in DOC_CITATION.findall(text)}
        if numbers:
            cited[name] = numbers
    # The recipes and the modules that take numbers from the paper cite it.
    assert {
        "configs/code_qwen/7b-cpt.yaml",
        "configs/code_qwen/14b-cpt.yaml",
        "configs/math_qwen/7b-chat-sft.yaml",
        "specialize/eval/paper_numbers.py",
        "code_qwen/tasks.py",
        "math_qwen/tasks.py",
    } <= set(cited)
    dangling = {name: sorted(n for n in ns if n not in sections) for name, ns in cited.items()}
    assert {name: ns for name, ns in dangling.items() if ns} == {}


def test_every_paper_citation_is_summarized():
    covered = _summarized_paper_sections()
    assert {"2.3", "2.5", "4.1", "4.2", "5.1"} <= covered

    def resolves(section: str) -> bool:
        # "paper §2" resolves when docs/paper.md covers any of §2's subsections.
        return any(c == section or c.startswith(section + ".") for c in covered)

    unresolved = [
        f"{name}: paper §{section}"
        for name, text in _repo_texts().items()
        for section in PAPER_CITATION.findall(text)
        if not resolves(section)
    ]
    assert unresolved == []


def test_nothing_cites_a_document_outside_the_repository():
    offending = [name for name, text in _repo_texts().items() if OUTSIDE_CITATION.search(text)]
    assert offending == []
