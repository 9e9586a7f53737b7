"""Pretraining datasets over prepared directories and bare prefixes, and the resumable loader.

The fixtures write their own shards with megatron-core's ``IndexedDatasetBuilder`` and a
``manifest.json`` beside them, so these tests do not depend on how ``specialize data prepare``
lays out its output. Every document starts with a marker token unique to it, so a test can tell
which documents a dataset read.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy
import pytest
import torch
from megatron.core.datasets.gpt_dataset import GPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from base.tokenizer import QwenTokenizer
from specialize.config import ConfigError, DataConfig
from specialize.data.pretrain import (
    PretrainingSampler,
    Shard,
    blend_weights,
    build_dataloader,
    build_pretrain_datasets,
)

SEQ = 64
MARKER = 1000  # document k of a fixture starts with token MARKER + k
FILLER = 5000  # the other tokens are drawn from [FILLER, eod)


@pytest.fixture(scope="module")
def tok() -> QwenTokenizer:
    return QwenTokenizer.load()


class Corpus:
    """Synthetic documents ending in ``<|endoftext|>``, each opened by its own marker token."""

    def __init__(self, eod: int, seed: int = 0) -> None:
        self.eod = eod
        self.rng = numpy.random.default_rng(seed)
        self.count = 0

    def documents(self, n: int, lo: int = 20, hi: int = 200) -> list[numpy.ndarray]:
        docs = []
        for _ in range(n):
            body = self.rng.integers(FILLER, self.eod, int(self.rng.integers(lo, hi)))
            docs.append(numpy.concatenate([[MARKER + self.count], body, [self.eod]]))
            self.count += 1
        return [d.astype(numpy.int32) for d in docs]


def write_shard(prefix: Path, docs: list[numpy.ndarray]) -> Path:
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=numpy.int32)
    for doc in docs:
        builder.add_document(doc, [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return prefix


def write_directory(out: Path, shards: list[list[numpy.ndarray]], tok: QwenTokenizer) -> Path:
    """A prepared-data directory: ``shard-NNNNN.bin/.idx`` and ``manifest.json``."""
    out.mkdir(parents=True)
    entries = []
    for j, docs in enumerate(shards):
        write_shard(out / f"shard-{j:05d}", docs)
        entries.append(
            {"prefix": f"shard-{j:05d}", "documents": len(docs), "tokens": sum(map(len, docs))}
        )
    manifest = {
        "format": 2,
        "shards": entries,
        "documents": sum(e["documents"] for e in entries),
        "tokens": sum(e["tokens"] for e in entries),
        "tokenizer": {"sha256": tok.sha256, "vocab_size": tok.vocab_size, "eod": tok.eod},
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _tokens(prefix: str | Path) -> int:
    shard = IndexedDataset(str(prefix))  # its arrays are views of an mmap closed when collected
    return int(shard.sequence_lengths.sum())


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, tok: QwenTokenizer) -> dict[str, Path]:
    """``one``: a directory of one shard; ``two``: of a large and a small shard; ``bare``: a prefix."""
    out = tmp_path_factory.mktemp("data")
    corpus = Corpus(tok.eod)
    return {
        "one": write_directory(out / "one", [corpus.documents(60)], tok),
        "two": write_directory(out / "two", [corpus.documents(30), corpus.documents(10)], tok),
        "bare": write_shard(out / "bare", corpus.documents(25)),
    }


def _cfg(paths: list, **kw) -> DataConfig:
    return DataConfig(
        paths=[str(p) for p in paths], split=kw.pop("split", "90,10,0"), seq_length=SEQ, **kw
    )


def _documents(*prefixes: str | Path) -> set[int]:
    """The markers of every document in these shards."""
    markers = set()
    for prefix in prefixes:
        shard = IndexedDataset(str(prefix))
        markers |= {int(shard[k][0]) - MARKER for k in range(len(shard))}
    return markers


def _markers(dataset, indices) -> set[int]:
    seen = set()
    for i in indices:
        item = dataset[i]
        ids = torch.cat([item["tokens"], item["labels"][-1:]])
        seen |= {int(t) - MARKER for t in ids if MARKER <= t < FILLER}
    return seen


# ----------------------------------------------------------------------------- samples


def test_samples_are_windows_of_the_corpus(data, tok, tmp_path: Path) -> None:
    train, valid, test = build_pretrain_datasets(
        _cfg([data["one"]]), tok, 1234, (300, 8, 0), tmp_path
    )
    assert isinstance(train, GPTDataset)  # one shard: no blend
    assert test is None and len(train) >= 300 and len(valid) >= 8
    sample = train[0]
    assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}  # no dense mask
    assert sample["tokens"].shape == sample["labels"].shape == (SEQ,)
    assert torch.equal(sample["position_ids"], torch.arange(SEQ))
    assert torch.all(sample["loss_mask"] == 1)  # pad is not eod: <|endoftext|> is trained

    # Sample i is the (i')-th window of SEQ+1 tokens over the documents in document_index order,
    # where i' = shuffle_index[i]; tokens/labels are that window shifted by one.
    shard = IndexedDataset(str(data["one"] / "shard-00000"))
    stream = numpy.concatenate([shard[int(d)] for d in train.document_index])
    for i in (0, 1, len(train) - 1):
        j = int(train.shuffle_index[i])
        window = stream[j * SEQ : j * SEQ + SEQ + 1]
        item = train[i]
        assert item["tokens"].tolist() == window[:-1].tolist()
        assert item["labels"].tolist() == window[1:].tolist()


def test_document_resets(data, tok, tmp_path: Path) -> None:
    cfg = _cfg(
        [data["one"]], reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True
    )
    train, _, _ = build_pretrain_datasets(cfg, tok, 1, (200, 0, 0), tmp_path)
    for i in range(len(train)):
        item = train[i]
        eods = (item["tokens"] == tok.eod).nonzero().flatten().tolist()
        if eods and 0 < eods[0] < SEQ - 1:
            break
    else:
        pytest.fail("no sample with a document boundary")
    p = eods[0]
    assert item["attention_mask"].shape == (1, SEQ, SEQ)
    assert item["position_ids"][p + 1] == 0 and item["position_ids"][p] == p
    assert item["loss_mask"][p] == 0 and item["loss_mask"][p + 1] == 1
    assert item["attention_mask"][0, p + 1, p]  # True = masked: no attention across documents
    assert not item["attention_mask"][0, p, p - 1]


def test_document_resets_with_transformer_engine_give_thd_boundaries(data, tok, tmp_path) -> None:
    """TE's causal attention ignores a dense mask; its documents are ``cu_seqlens`` instead, the
    same blocks as GPTDataset's mask."""
    from specialize.train.step import packed_seq_params

    cfg = _cfg([data["one"]], reset_attention_mask=True)
    masked, _, _ = build_pretrain_datasets(cfg, tok, 1, (200, 0, 0), tmp_path / "mask")
    thd, _, _ = build_pretrain_datasets(cfg, tok, 1, (200, 0, 0), tmp_path / "thd", thd=True)
    several = 0
    for i in range(20):
        reference, item = masked[i], thd[i]
        assert "attention_mask" not in item and torch.equal(item["tokens"], reference["tokens"])
        cu_seqlens = item["cu_seqlens"]
        assert cu_seqlens.shape == (SEQ + 1,) and cu_seqlens.dtype == torch.int32
        bounds = cu_seqlens[cu_seqlens >= 0]
        assert torch.all(cu_seqlens[len(bounds) :] == -1)
        # A document ends after each <|endoftext|>: the forward step's THD parameters ...
        eods = (item["tokens"] == tok.eod).nonzero().flatten() + 1
        expected = [0, *[int(e) for e in eods if e < SEQ], SEQ]
        params = packed_seq_params(cu_seqlens[None])
        assert params.qkv_format == "thd" and params.cu_seqlens_q.tolist() == expected
        assert params.max_seqlen_q == max(b - a for a, b in zip(expected, expected[1:]))
        # ... and GPTDataset's mask (True = masked) are the same block-diagonal causal pattern.
        segment = torch.repeat_interleave(
            torch.arange(len(expected) - 1), torch.tensor(expected).diff()
        )
        allowed = torch.tril(torch.ones(SEQ, SEQ, dtype=torch.bool))
        allowed &= segment[:, None] == segment[None, :]
        assert torch.equal(reference["attention_mask"][0], ~allowed)
        several += len(expected) > 3
    assert several, "some sample should hold several documents"
    # Micro-batches of one sequence carry [1, SEQ + 1] boundaries to the forward step.
    batch = next(build_dataloader(thd, 1, 0, 0, 1, 0))
    assert batch["cu_seqlens"].shape == (1, SEQ + 1)


def test_deterministic_and_seeded(data, tok, tmp_path: Path) -> None:
    cfg = _cfg([data["two"]])
    first, _, _ = build_pretrain_datasets(cfg, tok, 7, (50, 0, 0), tmp_path)
    cached, _, _ = build_pretrain_datasets(cfg, tok, 7, (50, 0, 0), tmp_path)  # from the cache
    other, _, _ = build_pretrain_datasets(cfg, tok, 8, (50, 0, 0), tmp_path)
    assert all(torch.equal(first[i]["tokens"], cached[i]["tokens"]) for i in range(50))
    assert not all(torch.equal(first[i]["tokens"], other[i]["tokens"]) for i in range(50))


# ----------------------------------------------------------------------------- directories


def test_directory_reads_every_document_of_every_shard(data, tok, tmp_path: Path) -> None:
    shards = [data["two"] / "shard-00000", data["two"] / "shard-00001"]
    tokens = [_tokens(p) for p in shards]
    wanted = 4 * sum(tokens) // SEQ  # four epochs
    train, _, _ = build_pretrain_datasets(
        _cfg([data["two"]], split="100,0,0"), tok, 1, (wanted, 0, 0), tmp_path
    )
    # Expanded to its shards in manifest order, weighted by tokens (no data.weights).
    assert [d.dataset_path for d in train.datasets] == [str(p) for p in shards]
    assert numpy.allclose(train.weights, [t / sum(tokens) for t in tokens])
    counts = numpy.bincount(numpy.asarray(train.dataset_index), minlength=2)
    assert abs(counts[0] / counts.sum() - tokens[0] / sum(tokens)) < 0.01
    assert {int(train[i]["dataset_id"]) for i in range(20)} == {0, 1}
    assert _markers(train, range(len(train))) == _documents(*shards)


def test_weights_are_split_over_a_directory_by_tokens(data, tok, tmp_path: Path) -> None:
    shards = [data["two"] / "shard-00000", data["two"] / "shard-00001"]
    tokens = [_tokens(p) for p in shards]
    cfg = _cfg([data["two"], data["bare"]], weights=[0.75, 0.25], split="100,0,0")
    train, _, _ = build_pretrain_datasets(cfg, tok, 1, (2000, 0, 0), tmp_path)
    expected = [0.75 * t / sum(tokens) for t in tokens] + [0.25]
    assert [d.dataset_path for d in train.datasets] == [str(p) for p in [*shards, data["bare"]]]
    assert numpy.allclose(train.weights, expected)
    counts = numpy.bincount(numpy.asarray(train.dataset_index), minlength=3)
    assert numpy.allclose(counts / counts.sum(), expected, atol=0.01)
    assert _markers(train, range(len(train))) == _documents(*shards, data["bare"])

    # A weight of 0 leaves its path out.
    only, _, _ = build_pretrain_datasets(
        _cfg([data["two"], data["bare"]], weights=[1.0, 0.0]), tok, 1, (100, 0, 0), tmp_path
    )
    assert [d.dataset_path for d in only.datasets] == [str(p) for p in shards]


def test_blend_weights() -> None:
    class Index:  # what Shard reads of an IndexedDataset: documents of 10 tokens
        def __init__(self, n: int) -> None:
            self.sequence_lengths = numpy.full(n, 10)

    parts = [Shard(0, "a", Index(3)), Shard(0, "b", Index(1)), Shard(1, "c", Index(2))]
    assert blend_weights(parts, [0.8, 0.2]) == pytest.approx([0.6, 0.2, 0.2])
    assert blend_weights(parts, None) == [30.0, 10.0, 20.0]


def test_blend_without_weights_repeats_to_the_requested_size(data, tok, tmp_path: Path) -> None:
    paths = [data["bare"], data["two"] / "shard-00000"]  # a directory's shard is a bare prefix
    tokens = [_tokens(p) for p in paths]
    wanted = 3 * sum(tokens) // SEQ
    train, _, _ = build_pretrain_datasets(_cfg(paths), tok, 1, (wanted, 0, 0), tmp_path)
    assert len(train) >= wanted
    counts = numpy.bincount(numpy.asarray(train.dataset_index), minlength=2)
    assert abs(counts[0] / counts.sum() - tokens[0] / sum(tokens)) < 0.01
    weighted, _, _ = build_pretrain_datasets(
        _cfg(paths, weights=[1.0, 1.0]), tok, 1, (400, 0, 0), tmp_path
    )
    assert numpy.bincount(numpy.asarray(weighted.dataset_index)).tolist() == [200, 200]


def test_a_small_shard_sits_out_a_split_it_has_no_documents_in(tok, tmp_path: Path) -> None:
    corpus = Corpus(tok.eod)
    big, small = corpus.documents(40), corpus.documents(3)  # round(0.9 * 3) = 3: no validation
    path = write_directory(tmp_path / "data", [big, small], tok)
    train, valid, _ = build_pretrain_datasets(_cfg([path]), tok, 1, (100, 8, 0), tmp_path)
    assert len(train.datasets) == 2
    assert isinstance(valid, GPTDataset) and valid.dataset_path == str(path / "shard-00000")
    # Validation holds the last 4 documents of the large shard, none of which train sees.
    assert _markers(valid, range(len(valid))) == set(range(36, 40))
    assert not _markers(train, range(len(train))) & set(range(36, 40))


def test_split_without_documents(tok, tmp_path: Path) -> None:
    path = write_directory(tmp_path / "small", [Corpus(tok.eod).documents(3)], tok)
    cfg = _cfg([path], split="98,2,0")  # round(0.98 * 3) = 3: validation gets nothing
    with pytest.raises(
        ConfigError, match=r"data.split='98,2,0'.*validation.*train 3, validation 0"
    ):
        build_pretrain_datasets(cfg, tok, 1, (10, 4, 0), tmp_path / "cache")
    # Not asking for validation samples is fine (megatron-core would hang building it).
    train, valid, test = build_pretrain_datasets(cfg, tok, 1, (10, 0, 0), tmp_path / "cache")
    assert len(train) >= 10 and valid is None and test is None
    with pytest.raises(ConfigError, match="data.split"):
        build_pretrain_datasets(_cfg([path], split="1,0"), tok, 1, (10, 0, 2), tmp_path)
    with pytest.raises(ConfigError, match="data.split"):
        build_pretrain_datasets(_cfg([path], split="a,b"), tok, 1, (10, 0, 0), tmp_path)


# ----------------------------------------------------------------------------- start-up errors


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_manifest(path: Path, **changes) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(changes)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_other_vocabulary_is_refused(data, tok, tmp_path: Path) -> None:
    path = _copy(data["two"], tmp_path / "other")
    _edit_manifest(path, tokenizer={"sha256": "0" * 64, "vocab_size": 1000, "eod": 999})
    with pytest.raises(ConfigError) as err:
        build_pretrain_datasets(_cfg([data["one"], path]), tok, 1, (10, 0, 0), tmp_path)
    assert f"data.paths[1]={str(path)!r}" in str(err.value)
    assert "0" * 64 in str(err.value) and tok.sha256 in str(err.value)


def test_missing_shard(data, tok, tmp_path: Path) -> None:
    path = _copy(data["two"], tmp_path / "broken")
    (path / "shard-00001.idx").unlink()
    with pytest.raises(ConfigError, match=r"data.paths\[0\].*shard-00001.idx"):
        build_pretrain_datasets(_cfg([path]), tok, 1, (10, 0, 0), tmp_path)


def test_directory_needs_a_manifest_with_shards(data, tok, tmp_path: Path) -> None:
    path = _copy(data["two"], tmp_path / "data")
    _edit_manifest(path, shards=[])
    with pytest.raises(ConfigError, match=r"data.paths\[0\].*lists no shards"):
        build_pretrain_datasets(_cfg([path]), tok, 1, (10, 0, 0), tmp_path)
    _edit_manifest(path, format=1)
    with pytest.raises(ConfigError, match=r"data.paths\[0\].*format 1"):
        build_pretrain_datasets(_cfg([path]), tok, 1, (10, 0, 0), tmp_path)
    (path / "manifest.json").write_text("{")
    with pytest.raises(ConfigError, match=r"data.paths\[0\].*manifest.json is not readable JSON"):
        build_pretrain_datasets(_cfg([path]), tok, 1, (10, 0, 0), tmp_path)
    (path / "manifest.json").unlink()
    with pytest.raises(ConfigError, match=r"data.paths\[0\].*without manifest.json"):
        build_pretrain_datasets(_cfg([path]), tok, 1, (10, 0, 0), tmp_path)


def test_sft_data_as_pretraining_data_names_the_path_and_field(data, tok, tmp_path: Path):
    path = _copy(data["two"], tmp_path / "sft")
    _edit_manifest(path, format="sft-1")
    with pytest.raises(ConfigError) as err:
        build_pretrain_datasets(_cfg([data["one"], path]), tok, 1, (10, 0, 0), tmp_path)
    assert f"data.paths[1]={str(path)!r} is SFT data" in str(err.value)
    assert "set data.format=sft" in str(err.value)


def test_missing_path(tmp_path: Path, tok) -> None:
    with pytest.raises(ConfigError, match=r"data.paths\[0\].*nothing.*missing nothing.bin"):
        build_pretrain_datasets(_cfg([tmp_path / "nothing"]), tok, 1, (10, 0, 0), tmp_path)


def test_bare_prefixes_work_with_one_warning(data, tok, tmp_path: Path, caplog) -> None:
    paths = [data["bare"], data["two"] / "shard-00001"]
    with caplog.at_level(logging.WARNING, logger="specialize.data.pretrain"):
        train, _, _ = build_pretrain_datasets(
            _cfg([data["one"], *paths]), tok, 1, (200, 0, 0), tmp_path
        )
    assert len(train.datasets) == 3
    warnings = [r.getMessage() for r in caplog.records if r.name == "specialize.data.pretrain"]
    assert len(warnings) == 1
    assert all(str(p) in warnings[0] for p in paths) and str(data["one"]) not in warnings[0]
    assert "tokenizer" in warnings[0]


# ----------------------------------------------------------------------------- sampler


def _batches(total: int, consumed: int, mbs: int, rank: int, dp: int) -> list[list[int]]:
    return list(PretrainingSampler(total, consumed, mbs, rank, dp))


def test_sampler_slices_and_resumes() -> None:
    ranks = [_batches(50, 0, 2, r, 3) for r in range(3)]
    assert ranks[0][:2] == [[0, 1], [6, 7]] and ranks[2][0] == [4, 5]
    flat = [i for r in ranks for b in r for i in b]
    assert sorted(flat) == list(range(48))  # disjoint, trailing partial stride dropped
    for rank in range(3):
        full = ranks[rank]
        for k in (0, 6, 24, 48):
            assert _batches(50, k, 2, rank, 3) == full[k // 6 :]
    assert len(PretrainingSampler(50, 12, 2, 0, 3)) == 6
    assert _batches(10, 3, 2, 1, 2) == [[5, 6]]  # any consumed count continues sequentially
    with pytest.raises(ValueError):
        PretrainingSampler(10, 11, 1, 0, 1)


def test_dataloader_resumes_exactly(data, tok, tmp_path: Path) -> None:
    train, _, _ = build_pretrain_datasets(_cfg([data["one"]]), tok, 3, (64, 0, 0), tmp_path)
    full = list(build_dataloader(train, 2, 0, 1, 2, num_workers=0))
    assert full[0]["tokens"].shape == (2, SEQ)
    assert torch.equal(full[0]["tokens"][0], train[2]["tokens"])
    resumed = list(build_dataloader(train, 2, 8, 1, 2, num_workers=0))
    assert len(resumed) == len(full) - 2
    for a, b in zip(resumed, full[2:]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other_rank = next(build_dataloader(train, 2, 0, 0, 2, num_workers=0))
    assert torch.equal(other_rank["tokens"][0], train[0]["tokens"])
    with_worker = list(build_dataloader(train, 2, 8, 1, 2, num_workers=1))
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(with_worker, resumed))
