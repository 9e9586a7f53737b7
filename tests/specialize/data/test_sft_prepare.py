import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from base.tokenizer import QwenTokenizer
from specialize.data.chat import conversation, render
from specialize.data.output import OutputError
from specialize.data.sft_prepare import (
    SFTDataError,
    SFTOptions,
    pack_first_fit,
    prepare_sft,
    read_sft_manifest,
)
from specialize.data.sources import Source
from tests.locking import held_by_another_process

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def tok() -> QwenTokenizer:
    return QwenTokenizer.load()


def _chat(question: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


GOOD = [
    _chat("What is 2 + 3?", "2 + 3 = 5.\n#### 5"),
    {"prompt": "Name a prime.", "response": "7"},
    _chat("Write hello world in Python.", "print('hello world')"),
]


def _write(path: Path, lines: list) -> Path:
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    )
    return path


def test_bad_records_are_counted_with_file_and_line(tmp_path: Path, tok) -> None:
    lines = [
        GOOD[0],
        "{broken",
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": "not a list"},
        GOOD[1],
        _chat("long " * 200, "answer"),
        GOOD[2],
    ]
    data = _write(tmp_path / "chats.jsonl", lines)
    manifest = prepare_sft([Source("jsonl", str(data))], tmp_path / "out", tok, SFTOptions(64))
    assert manifest == read_sft_manifest(tmp_path / "out")
    assert manifest["records"] == 9 and manifest["samples"] == 3 and manifest["sequences"] == 3
    assert manifest["skipped"] == {
        "empty_content": 1,
        "invalid_json": 1,
        "no_assistant": 1,
        "too_long": 1,
        "unknown_role": 1,
        "wrong_type": 1,
    }
    assert manifest["skipped_examples"]["invalid_json"][0]["record"] == f"{data}:2"
    assert manifest["skipped_examples"]["too_long"][0]["record"] == f"{data}:8"
    with pytest.raises(SFTDataError, match=f"{data}:2"):
        prepare_sft(
            [Source("jsonl", str(data))], tmp_path / "x", tok, SFTOptions(64, on_error="fail")
        )


def test_samples_and_masks_are_stored_exactly(tmp_path: Path, tok) -> None:
    data = _write(tmp_path / "chats.jsonl", GOOD)
    manifest = prepare_sft([Source("jsonl", str(data))], tmp_path / "out", tok, SFTOptions(128))
    tokens = IndexedDataset(str(tmp_path / "out" / "tokens"))
    masks = IndexedDataset(str(tmp_path / "out" / "loss_mask"))
    learned = 0
    for i, record in enumerate(GOOD):
        ids, mask = render(conversation(record), tok)
        assert tokens[i].tolist() == ids and masks[i].tolist() == mask
        learned += sum(mask[1:])
    assert manifest["tokens"]["learned"] == learned
    positions = sum(len(tokens[i]) - 1 for i in range(3))
    assert manifest["tokens"]["masked"] == positions - learned
    assert manifest["tokens"]["padding"] == 3 * 128 - positions


def test_packing_fills_sequences_and_keeps_every_sample(tmp_path: Path, tok) -> None:
    data = _write(tmp_path / "chats.jsonl", GOOD * 10)
    packed = prepare_sft(
        [Source("jsonl", str(data))], tmp_path / "out", tok, SFTOptions(128, pack=True)
    )
    assert packed["samples"] == 30 and packed["sequences"] < 30
    tokens = IndexedDataset(str(tmp_path / "out" / "tokens"))
    per_sequence = [
        sum(
            len(tokens[s]) - 1
            for s in range(tokens.document_indices[d], tokens.document_indices[d + 1])
        )
        for d in range(packed["sequences"])
    ]
    assert max(per_sequence) <= 128 and sum(per_sequence) == packed["tokens"]["positions"]


def test_truncation_policy(tmp_path: Path, tok) -> None:
    data = _write(tmp_path / "chats.jsonl", [_chat("q", "word " * 100), _chat("q " * 100, "a")])
    manifest = prepare_sft(
        [Source("jsonl", str(data))], tmp_path / "out", tok, SFTOptions(64, overlong="truncate")
    )
    # The first keeps 65 tokens with some of its answer; the second would keep no answer.
    assert manifest["samples"] == 1 and manifest["truncated"] == 1
    assert manifest["skipped"] == {"nothing_learned": 1}


def test_first_fit_decreasing() -> None:
    bins = pack_first_fit([6, 5, 4, 3, 2], 8)
    assert sorted(map(sorted, bins)) == [[0, 4], [1, 3], [2]]
    assert pack_first_fit([8, 8], 8) == [[0], [1]]


def test_cli_prepare_and_inspect(tmp_path: Path) -> None:
    data = _write(tmp_path / "chats.jsonl", GOOD)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    base = [sys.executable, "-m", "specialize", "data"]
    out = tmp_path / "out"
    done = subprocess.run(
        [*base, "prepare-sft", str(data), "-o", str(out), "--seq-len", "64", "--pack"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "3 samples of 3 records in 2 sequences of 64 (packed)" in done.stdout
    shown = subprocess.run(
        [*base, "inspect-sft", str(out), "--n", "2"], env=env, capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    assert "«2 + 3 = 5.\n#### 5<|im_end|>»" in shown.stdout
    assert "«7<|im_end|>»" in shown.stdout and "learned" in shown.stdout
    bad = subprocess.run(
        [*base, "prepare-sft", str(tmp_path / "none.jsonl"), "-o", str(out), "--seq-len", "64"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "source not found" in bad.stderr


def test_bad_utf8_byte_skips_only_its_record_as_undecodable(tmp_path: Path, tok) -> None:
    lines = [json.dumps(_chat(f"What is {i} + 1?", f"{i + 1}")).encode() for i in range(300)]
    lines[150] = lines[150].replace(b"What", b"Wh\xe4t")  # latin-1, line 151
    data = tmp_path / "chats.jsonl"
    data.write_bytes(b"\n".join(lines) + b"\n")
    manifest = prepare_sft([Source("jsonl", str(data))], tmp_path / "out", tok, SFTOptions(64))
    assert manifest["records"] == 300 and manifest["samples"] == 299
    assert manifest["skipped"] == {"undecodable": 1}
    [example] = manifest["skipped_examples"]["undecodable"]
    assert example["record"] == f"{data}:151"


def test_pretraining_data_is_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 2, "shards": []}))
    with pytest.raises(ValueError, match="pretraining data .*data.format=pretrain"):
        read_sft_manifest(tmp_path)


def test_a_second_prepare_sft_on_the_same_output_is_refused(tmp_path: Path, tok) -> None:
    data = _write(tmp_path / "chats.jsonl", GOOD)
    with held_by_another_process(tmp_path / "out"):  # a run in progress
        with pytest.raises(OutputError, match="being written by another `data prepare-sft`"):
            prepare_sft([Source("jsonl", str(data))], tmp_path / "out", tok, SFTOptions(64))


# Runs prepare-sft and stops it once its temporaries are written, just before it publishes them.
_STOPPED_BEFORE_PUBLISHING = """
import sys, time
from base.tokenizer import QwenTokenizer
from specialize.data import sft_prepare
from specialize.data.sources import Source

def stop(*args):
    print("ready", flush=True)
    time.sleep(600)

sft_prepare._publish = stop
sft_prepare.prepare_sft(
    [Source("jsonl", sys.argv[1])], sys.argv[2], QwenTokenizer.load(), sft_prepare.SFTOptions(64)
)
"""


def test_killed_prepare_sft_leaves_no_temporaries_after_the_next_run(tmp_path: Path, tok):
    data = _write(tmp_path / "chats.jsonl", GOOD * 5)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = textwrap.dedent(_STOPPED_BEFORE_PUBLISHING)
    process = subprocess.Popen(
        [sys.executable, "-c", script, str(data), str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout.readline() == "ready\n"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    left = sorted(p.name for p in out.iterdir() if ".tmp" in p.name)
    assert left == [f"{n}.tmp{process.pid}" for n in ("loss_mask.bin", "loss_mask.idx")] + [
        f"{n}.tmp{process.pid}" for n in ("tokens.bin", "tokens.idx")
    ]
    manifest = prepare_sft([Source("jsonl", str(data))], out, tok, SFTOptions(64))
    clean = prepare_sft([Source("jsonl", str(data))], tmp_path / "clean", tok, SFTOptions(64))
    assert manifest == clean
    assert sorted(p.name for p in out.iterdir()) == sorted(
        p.name for p in (tmp_path / "clean").iterdir()
    )
    for name in ("tokens.bin", "tokens.idx", "loss_mask.bin", "loss_mask.idx"):
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()


def test_cli_prints_the_first_skipped_records(tmp_path: Path) -> None:
    data = _write(tmp_path / "chats.jsonl", [GOOD[0], "{broken", GOOD[1], "[1"] + ["{x"] * 3)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "specialize", "data", "prepare-sft", str(data)]
        + ["-o", str(tmp_path / "out"), "--seq-len", "64"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    shown = [line.strip() for line in done.stdout.splitlines()]
    at = shown.index("skipped 5 invalid_json")
    assert [line.split(": ")[0] for line in shown[at + 1 : at + 4]] == [
        f"{data}:{n}" for n in (2, 4, 5)
    ]
    assert "invalid JSON" in shown[at + 1]
    assert shown[at + 4].startswith("... 2 more (examples in")
