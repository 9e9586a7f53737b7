import pickle
import sysconfig
import threading
import time
from pathlib import Path

import pytest

from base.tokenizer import (
    EOD_ID,
    IM_END_ID,
    IM_START_ID,
    NUM_RANKS,
    VOCAB_SIZE,
    QwenTokenizer,
)


@pytest.fixture(scope="module")
def tok() -> QwenTokenizer:
    return QwenTokenizer.load()


def test_known_ids(tok: QwenTokenizer) -> None:
    assert tok.encode("def hello():") == [750, 23811, 4555]
    assert tok.decode([750, 23811, 4555]) == "def hello():"


def test_digits_split_one_at_a_time(tok: QwenTokenizer) -> None:
    ids = tok.encode("12345")
    assert len(ids) == 5
    assert [tok.decode([i]) for i in ids] == list("12345")


def test_special_tokens(tok: QwenTokenizer) -> None:
    assert tok.vocab_size == 151851
    assert (tok.eod, tok.im_start, tok.im_end, tok.pad) == (151643, 151644, 151645, 151643)
    assert tok.encode_special("<|im_end|>") == 151645
    assert tok.encode_special("<|extra_0|>") == 151646
    assert tok.encode_special("<|extra_204|>") == 151850
    assert len(tok.special_tokens) == 208
    with pytest.raises(KeyError, match="not a Qwen special token"):
        tok.encode_special("<|extra_205|>")
    assert tok.decode([151644, 151645]) == "<|im_start|><|im_end|>"


def test_module_constants_are_the_loaded_tokenizers(tok: QwenTokenizer) -> None:
    # Modules that never load the vocabulary (export, generation, parity) use the constants.
    assert (EOD_ID, IM_START_ID, IM_END_ID) == (tok.eod, tok.im_start, tok.im_end)
    assert (EOD_ID, IM_START_ID, IM_END_ID, NUM_RANKS) == (151643, 151644, 151645, 151643)
    assert VOCAB_SIZE == tok.vocab_size == 151851
    assert tok.decode([NUM_RANKS - 1]) != "" and tok.decode([NUM_RANKS]) == "<|endoftext|>"


def test_special_strings_are_plain_text(tok: QwenTokenizer) -> None:
    text = "a<|endoftext|>b<|im_end|>"
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(ids) == text
    assert tok.encode_batch([text]) == [ids]


def test_identity(tok: QwenTokenizer) -> None:
    assert tok.sha256.startswith("b2b1b8df") and tok.sha256.endswith("a33186")
    assert tok.unique_identifiers == {"class": "QwenTokenizer", "vocab_sha256": tok.sha256}
    assert tok.vocab_file.name == "qwen.tiktoken" and tok.vocab_file.is_absolute()


def test_cached_per_path(tok: QwenTokenizer) -> None:
    assert QwenTokenizer.load(tok.vocab_file) is tok
    assert QwenTokenizer.load(str(tok.vocab_file.parent)) is tok  # a directory holding the file
    assert pickle.loads(pickle.dumps(tok)) is tok


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "qwen.tiktoken"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        QwenTokenizer.load(missing)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "qwen.tiktoken")):
        QwenTokenizer.load(tmp_path)  # a directory without the file


def _stdlib_sources() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(root.rglob("*.py")):
        if {"site-packages", "dist-packages"} & set(path.relative_to(root).parts):
            continue  # third-party packages are not the standard library
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return texts


def test_round_trips_the_standard_library(tok: QwenTokenizer) -> None:
    texts = _stdlib_sources()
    assert len(texts) >= 500
    start = time.perf_counter()
    batches = tok.encode_batch(texts, num_threads=2)
    mismatched = [i for i, (t, ids) in enumerate(zip(texts, batches)) if tok.decode(ids) != t]
    elapsed = time.perf_counter() - start
    assert not mismatched, f"{len(mismatched)} files do not round-trip"
    assert elapsed < 30, f"round trip of {len(texts)} files took {elapsed:.1f} s"


def test_each_thread_tokenizes_with_its_own_encoding(tok: QwenTokenizer) -> None:
    """Each thread gets an encoding of its own, once (the thread that loaded the tokenizer uses the
    shared one), and the same ids (see QwenTokenizer._encoding for why)."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / "json" / "decoder.py").read_text()
    here = tok._encoding()
    assert here is tok._encoding()
    seen = {}

    def in_thread(name: str) -> None:
        first = tok._encoding()
        seen[name] = (first, first is tok._encoding(), tok.encode(text), tok.encode_document(text))

    threads = [threading.Thread(target=in_thread, args=(name,)) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    (a, a_kept, a_ids, a_doc), (b, b_kept, b_ids, b_doc) = seen["a"], seen["b"]
    assert a_kept and b_kept
    assert len({id(a), id(b), id(here)}) == 3 and tok._enc not in (a, b)
    assert a_ids == b_ids == tok.encode(text) == tok._enc.encode_ordinary(text)
    assert a_doc.tolist() == b_doc.tolist() == tok.encode_document(text).tolist()
