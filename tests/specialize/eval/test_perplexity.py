"""``specialize eval --tasks perplexity``: documents from files, directories or JSONL; perplexity by
length with each long-context variant; errors name the file and line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from base.long_context_config import LongContextConfig
from base.tokenizer import QwenTokenizer
from specialize.eval.perplexity import token_stream, variant_options
from specialize.eval.tasks import TaskError

ROOT = Path(__file__).resolve().parents[3]


def test_documents_from_files_directories_and_jsonl(tmp_path):
    tokenizer = QwenTokenizer.load()
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("def a():\n    return 1\n")
    (tmp_path / "pkg" / "b.bin").write_bytes(b"\x00\x01")  # not a text suffix: not read
    (tmp_path / "notes.txt").write_text("plain text")
    (tmp_path / "docs.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    spec = f"{tmp_path / 'pkg'},{tmp_path / 'notes.txt'},{tmp_path / 'docs.jsonl'}"
    tokens, data = token_stream(spec, tokenizer)
    expected = [
        t
        for text in ("def a():\n    return 1\n", "plain text", "one", "two")
        for t in tokenizer.encode_document(text).tolist()
    ]
    assert tokens.tolist() == expected  # path order, <|endoftext|> after each document
    assert data["records"] == 4 and data["tokens"] == len(expected) and len(data["sha256"]) == 64


def test_bad_data_is_named(tmp_path):
    tokenizer = QwenTokenizer.load()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(TaskError, match=r"bad.jsonl:2: expected a JSON object with a 'text'"):
        token_stream(str(bad), tokenizer)
    with pytest.raises(TaskError, match="no such file or directory"):
        token_stream(str(tmp_path / "missing"), tokenizer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TaskError, match="no .* files in it"):
        token_stream(str(tmp_path / "empty"), tokenizer)


def test_variants_are_option_sets():
    assert variant_options("none", 4, 256).rope_scaling == "none"
    both = variant_options("ntk+logn", 4, 256)
    assert both.rope_scaling == "dynamic-ntk" and both.logn_attention is True
    assert variant_options("window", 4, 256).layer_windows == [256, 256, None, None]
    # Each variant starts from all options off but keeps the checkpoint's training length.
    stored = LongContextConfig(logn_attention=True, layer_windows=[8, 8, 8, 8], train_seq_length=64)
    assert variant_options("ntk", 4, 64, stored) == LongContextConfig(
        rope_scaling="dynamic-ntk", train_seq_length=64
    )
    with pytest.raises(TaskError, match="unknown option 'yarn'"):
        variant_options("ntk+yarn", 4, 256)


def test_cli_perplexity_by_length_with_variants(tmp_path):
    from tests.distributed import run_distributed
    from tests.specialize.infer.test_generate import _save

    ckpt = run_distributed(_save, str(tmp_path / "run"), world_size=1)  # qwen-nano, trained at 128
    text = tmp_path / "long.txt"
    text.write_text(Path(json.__file__).read_text() * 2)
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "specialize", "eval", ckpt, "--tasks", "perplexity"]
        + ["--data", f"perplexity={text}", "--lengths", "64,256", "--limit", "2"]
        + ["--long-context", "none,ntk+logn,window", "-o", str(out)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    tasks = json.loads(out.read_text())["tasks"]
    assert list(tasks) == [
        "perplexity",
        "perplexity[none]",
        "perplexity[ntk+logn]",
        "perplexity[window]",
    ]
    ppl = {name: entry["metrics"] for name, entry in tasks.items()}
    assert tasks["perplexity"]["protocol"]["windows"] == {"64": 2, "256": 2}
    # At or below the training length (128) every option leaves the model as it is ...
    assert ppl["perplexity[ntk+logn]"]["perplexity@64"] == ppl["perplexity[none]"]["perplexity@64"]
    assert ppl["perplexity[window]"]["perplexity@64"] == ppl["perplexity[none]"]["perplexity@64"]
    assert ppl["perplexity"] == ppl["perplexity[none]"]  # the checkpoint's own options: none
    # ... past it, they change what the model computes.
    assert (
        ppl["perplexity[ntk+logn]"]["perplexity@256"] != ppl["perplexity[none]"]["perplexity@256"]
    )
    assert ppl["perplexity[window]"]["perplexity@256"] != ppl["perplexity[none]"]["perplexity@256"]
    table = out.with_suffix(".perplexity.md").read_text()
    assert "| variant | 64 | 256 |" in table and "| ntk+logn |" in table
    assert out.with_suffix(".perplexity.png").read_bytes()[:4] == b"\x89PNG"


def test_perplexity_runs_under_either_protocol():
    # Its computation has no protocol of its own, so `--protocol paper --tasks gsm8k,perplexity`
    # must not stop at it.
    from specialize.eval.perplexity import TASK
    from specialize.eval.tasks import PAPER, PROTOCOLS, get_task

    assert TASK.protocols == PROTOCOLS
    assert get_task("perplexity").under(PAPER).protocol_name == PAPER
    assert get_task("gsm8k").under(PAPER).protocol_name == PAPER
