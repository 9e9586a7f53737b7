import json
import os
from pathlib import Path

import numpy
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from base.tokenizer import QwenTokenizer
from specialize.data.prepare import prepare_directory, read_manifest

GOOD = {
    "a.py": "x = 1\n",
    "pkg/b.py": 'def f():\n    return "<|endoftext|> 12345"\n',
    "pkg/sub/c.py": "# ünïcödé ✓ 漢字\nprint('hi')\n",
}


@pytest.fixture(scope="module")
def tok() -> QwenTokenizer:
    return QwenTokenizer.load()


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    for name, text in GOOD.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    (root / "pkg" / "bad.py").write_bytes(b"s = '\xff\xfe'\n")
    (root / "empty.py").write_bytes(b"")
    (root / "notes.txt").write_text("not python\n")
    return root


def test_manifest_counts(src: Path, tmp_path: Path, tok: QwenTokenizer) -> None:
    prefix = tmp_path / "out" / "shard"
    manifest = prepare_directory([src], prefix, tok)
    assert manifest == read_manifest(prefix)
    assert manifest["inputs"]["files"] == 5  # the .py files, including the two skipped
    assert manifest["documents"] == 3
    assert manifest["skipped"] == {"unreadable": 0, "undecodable": 1, "empty": 1}
    assert {(f["path"], f["reason"]) for f in manifest["skipped_files"]} == {
        ("0/pkg/bad.py", "undecodable"),
        ("0/empty.py", "empty"),
    }
    assert manifest["tokenizer"]["sha256"] == tok.sha256
    assert manifest["tool"]["version"] == "0.1.0"
    assert sorted(p.name for p in prefix.parent.iterdir()) == [
        "shard.bin",
        "shard.idx",
        "shard.manifest.json",
    ]


def test_shard_holds_the_exact_tokens(src: Path, tmp_path: Path, tok: QwenTokenizer) -> None:
    prefix = tmp_path / "shard"
    manifest = prepare_directory([src], prefix, tok, num_threads=1)
    ds = IndexedDataset(str(prefix))
    # Files in walk order: a directory's files before its subdirectories.
    expected = [tok.encode(GOOD[name]) + [tok.eod] for name in ("a.py", "pkg/b.py", "pkg/sub/c.py")]
    assert len(ds) == 3
    assert [ds[i].tolist() for i in range(3)] == expected
    assert ds[0].dtype == numpy.int32
    assert manifest["tokens"] == sum(map(len, expected)) == int(ds.sequence_lengths.sum())
    assert tok.decode(ds[1][:-1].tolist()) == GOOD["pkg/b.py"]  # special strings stay text


def test_inputs_hash_is_content_addressed(src: Path, tmp_path: Path, tok: QwenTokenizer) -> None:
    first = prepare_directory([src], tmp_path / "one", tok)
    again = prepare_directory([src], tmp_path / "two", tok)
    assert first["inputs"]["sha256"] == again["inputs"]["sha256"]
    assert (tmp_path / "one.bin").read_bytes() == (tmp_path / "two.bin").read_bytes()
    (src / "a.py").write_text("x = 2\n")
    changed = prepare_directory([src], tmp_path / "three", tok)
    assert changed["inputs"]["sha256"] != first["inputs"]["sha256"]


def test_unreadable_file_is_counted(src: Path, tmp_path: Path, tok: QwenTokenizer) -> None:
    os.symlink(src / "missing-target.py", src / "dangling.py")
    manifest = prepare_directory([src], tmp_path / "shard", tok)
    assert manifest["skipped"]["unreadable"] == 1
    assert manifest["documents"] == 3


def test_several_sources_and_extensions(src: Path, tmp_path: Path, tok: QwenTokenizer) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "d.py").write_text("y = 2\n")
    manifest = prepare_directory([src, other], tmp_path / "shard", tok, extensions=(".py", ".txt"))
    assert manifest["inputs"]["files"] == 7
    assert manifest["documents"] == 5


class _FailingTokenizer:
    def __init__(self, tok: QwenTokenizer) -> None:
        self.tok = tok
        self.sha256, self.eod, self.vocab_size = tok.sha256, tok.eod, tok.vocab_size

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        raise KeyboardInterrupt  # as if the run were stopped mid-way


def test_interrupted_run_leaves_the_old_shard(
    src: Path, tmp_path: Path, tok: QwenTokenizer
) -> None:
    prefix = tmp_path / "shard"
    prepare_directory([src], prefix, tok)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("shard*")}
    (src / "a.py").write_text("changed = True\n")
    with pytest.raises(KeyboardInterrupt):
        prepare_directory([src], prefix, _FailingTokenizer(tok))
    assert {p.name: p.read_bytes() for p in tmp_path.glob("shard*")} == before


def test_no_documents_is_an_error(tmp_path: Path, tok: QwenTokenizer) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "empty.py").write_bytes(b"")
    with pytest.raises(ValueError, match="no documents"):
        prepare_directory([tmp_path / "src"], tmp_path / "shard", tok)
    assert list(tmp_path.glob("shard*")) == []


def test_missing_source(tmp_path: Path, tok: QwenTokenizer) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        prepare_directory([tmp_path / "nowhere"], tmp_path / "shard", tok)


def test_manifest_is_json(src: Path, tmp_path: Path, tok: QwenTokenizer) -> None:
    prepare_directory([src], tmp_path / "shard", tok)
    text = (tmp_path / "shard.manifest.json").read_text()
    assert json.loads(text)["format"] == 1
    with pytest.raises(FileNotFoundError, match="nothing"):
        read_manifest(tmp_path / "nothing")
