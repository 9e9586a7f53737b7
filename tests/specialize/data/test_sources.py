import gzip
import json
import os
from pathlib import Path

import pytest

from specialize.data.sources import (
    RowError,
    Source,
    SourceOptions,
    iter_documents,
    iter_rows,
    register_languages,
)

register_languages({".py": "python"})


def _lines(count: int) -> list[bytes]:
    return [json.dumps({"text": f"x = {i}\n"}).encode() for i in range(count)]


def _write(path: Path, lines: list[bytes]) -> Path:
    data = b"".join(line + b"\n" for line in lines)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


@pytest.mark.parametrize("name", ["corpus.jsonl", "corpus.jsonl.gz"])
def test_bad_utf8_byte_is_undecodable_on_its_own_line_and_every_other_line_is_kept(
    tmp_path: Path, name: str
) -> None:
    lines = _lines(1000)
    lines[500] = b'{"text": "bad \xff byte"}'  # line 501
    rows = list(iter_rows(Source("jsonl", str(_write(tmp_path / name, lines)))))
    errors = [(where, row) for where, row in rows if isinstance(row, Exception)]
    assert len(errors) == 1
    where, error = errors[0]
    assert where == "501" and isinstance(error, RowError) and error.reason == "undecodable"
    assert "byte 14" in str(error)
    good = [(where, row) for where, row in rows if not isinstance(row, Exception)]
    expected = [str(n) for n in range(1, 1001) if n != 501]
    assert [where for where, _ in good] == expected  # true line numbers, none shifted
    assert [row["text"] for _, row in good] == [f"x = {int(n) - 1}\n" for n in expected]


def test_truncated_gzip_keeps_the_lines_before_and_counts_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl.gz"
    data = gzip.compress(b"".join(line + b"\n" for line in _lines(5000)))
    path.write_bytes(data[: len(data) // 2])
    rows = list(iter_rows(Source("jsonl", str(path))))
    *good, (where, error) = rows
    complete = len(good)
    assert complete > 100 and all(not isinstance(row, Exception) for _, row in good)
    assert [row["text"] for _, row in good] == [f"x = {i}\n" for i in range(complete)]
    assert isinstance(error, RowError) and error.reason == "unreadable"
    assert where == str(complete + 1) and str(path) in str(error)
    assert "end-of-stream" in str(error)


def test_non_gzip_jsonl_gz_is_unreadable_at_line_1(tmp_path: Path) -> None:
    path = tmp_path / "plain.jsonl.gz"
    path.write_bytes(b"".join(line + b"\n" for line in _lines(3)))
    [(where, error)] = list(iter_rows(Source("jsonl", str(path))))
    assert where == "1" and isinstance(error, RowError) and error.reason == "unreadable"
    assert str(path) in str(error) and "Not a gzipped file" in str(error)


def test_invalid_json_is_its_own_reason(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.jsonl", [b"{broken", *_lines(1)])
    (where, error), (_, row) = list(iter_rows(Source("jsonl", str(path))))
    assert where == "1" and error.reason == "invalid_json" and row == {"text": "x = 0\n"}


def test_missing_text_field_is_told_apart_from_a_wrong_type(tmp_path: Path) -> None:
    lines = [{"text": "a = 1\n"}, {"content": "b", "id": 2}, {"text": 5}, {"text": None}, [1]]
    path = _write(tmp_path / "c.jsonl", [json.dumps(line).encode() for line in lines])
    refs = list(iter_documents([Source("jsonl", str(path))], SourceOptions()))
    assert refs[0].text == "a = 1\n" and refs[0].error is None
    assert [ref.error for ref in refs[1:]] == [
        ("malformed", "no field 'text' (fields: content, id)"),
        ("malformed", "'text' is a number, not a string"),
        ("malformed", "'text' is null, not a string"),
        ("malformed", "not a JSON object but a list"),
    ]
    assert [ref.name for ref in refs[1:]] == [f"0/c.jsonl:{n}" for n in (2, 3, 4, 5)]


def test_unlistable_directories_are_named_relative_to_their_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "src"
    (root / "sub").mkdir(parents=True)
    (root / "a.py").write_text("a = 1\n")
    (root / "sub" / "b.py").write_text("b = 1\n")
    listing = os.scandir
    denied: set[str] = set()

    def scandir(path):
        if str(path) in denied:  # what a directory without read permission gives
            raise PermissionError(13, "Permission denied", str(path))
        return listing(path)

    monkeypatch.setattr(os, "scandir", scandir)
    source = [Source("directory", str(root))]
    denied.add(str(root / "sub"))
    refs = list(iter_documents(source, SourceOptions()))
    assert [(ref.name, ref.error and ref.error[0]) for ref in refs] == [
        ("0/a.py", None),
        ("0/sub", "unreadable"),
    ]
    assert str(root / "sub") in refs[1].error[1]
    denied.add(str(root))
    [ref] = list(iter_documents(source, SourceOptions()))
    assert ref.name == "0/" and ref.error[0] == "unreadable" and str(root) in ref.error[1]


def _tree(root: Path) -> None:
    for name in ("b.py", "a.py", "notes.txt", "z/c.py", "z/y/d.py", "m/e.py", ".git/f.py"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"# {name}\n")
    os.symlink(root / "z", root / "link")  # a symlinked directory: listed, not descended into
    lines = [json.dumps({"text": f"x = {i}\n"}).encode() for i in range(3)]
    _write(root / "rows.jsonl.gz", lines[:1] + [b"{bad"] + lines[1:])


def test_a_file_url_lists_and_reads_the_same_documents_as_its_path(tmp_path: Path) -> None:
    from specialize.data.prepare import _read
    from specialize.data.sources import parse_source

    root = tmp_path / "src"
    _tree(root)
    url = f"file://{root}"
    assert parse_source(url) == Source("directory", url)
    assert parse_source(url + "/rows.jsonl.gz") == Source("jsonl", url + "/rows.jsonl.gz")
    options = SourceOptions(extensions=(".py",))
    by_path = list(iter_documents([Source("directory", str(root))], options))
    by_url = list(iter_documents([Source("directory", url)], options))
    names = ["0/a.py", "0/b.py", "0/m/e.py", "0/z/c.py", "0/z/y/d.py"]
    assert [ref.name for ref in by_path] == [ref.name for ref in by_url] == names
    assert [ref.path for ref in by_url] == [f"file://{root}/{n[2:]}" for n in names]
    assert [_read(ref) for ref in by_url] == [_read(ref) for ref in by_path]

    rows = [parse_source(str(root / "rows.jsonl.gz")), parse_source(url + "/rows.jsonl.gz")]
    by_path, by_url = (
        [(r.name[2:], r.text, r.error) for r in iter_documents([s], options)] for s in rows
    )
    assert by_path == by_url and len(by_url) == 4 and by_url[1][2][0] == "malformed"

    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.table({"text": ["a = 1\n", "b = 2\n"]}), root / "t.parquet")
    rows = [parse_source(str(root / "t.parquet")), parse_source(url + "/t.parquet")]
    by_path, by_url = ([(r.name, r.text) for r in iter_documents([s], options)] for s in rows)
    assert by_path == by_url == [("0/t.parquet:row 0", "a = 1\n"), ("0/t.parquet:row 1", "b = 2\n")]


def test_url_sources_that_cannot_be_read_are_one_error(tmp_path: Path) -> None:
    from specialize.data.sources import SourceError, parse_source

    with pytest.raises(SourceError, match=r"source not found: file://.*/missing"):
        parse_source(f"file://{tmp_path}/missing")
    with pytest.raises(
        SourceError, match=r"source nosuchprotocol://x: cannot read it through fsspec"
    ):
        parse_source("nosuchprotocol://x")


def test_an_unlistable_url_directory_is_counted_under_the_name_a_path_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fsspec.implementations.local import LocalFileSystem

    root = tmp_path / "src"
    (root / "sub").mkdir(parents=True)
    (root / "a.py").write_text("a = 1\n")
    listing = LocalFileSystem.ls

    def ls(self, path, detail=True, **kwargs):
        if str(path).rstrip("/") == str(root / "sub"):
            raise PermissionError(13, "Permission denied", str(path))
        return listing(self, path, detail=detail, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "ls", ls)
    refs = list(iter_documents([Source("directory", f"file://{root}")], SourceOptions()))
    assert [(ref.name, ref.error and ref.error[0]) for ref in refs] == [
        ("0/a.py", None),
        ("0/sub", "unreadable"),
    ]
