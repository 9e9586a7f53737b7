import json
import shutil
import sysconfig
import warnings
from pathlib import Path

import numpy
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from base.tokenizer import QwenTokenizer
from specialize.config import DataConfig
from specialize.data.prepare import prepare_directory
from specialize.data.pretrain import PretrainingSampler, build_dataloader, build_pretrain_datasets

SEQ = 64
STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def tok() -> QwenTokenizer:
    return QwenTokenizer.load()


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, tok: QwenTokenizer) -> dict[str, str]:
    """The stdlib ``json`` and ``email`` packages, one shard each."""
    out = tmp_path_factory.mktemp("shards")
    for name in ("json", "email"):
        prepare_directory([STDLIB / name], out / name, tok)
    return {name: str(out / name) for name in ("json", "email")}


def _num_tokens(prefix: str) -> int:
    shard = IndexedDataset(prefix)  # its arrays are views of an mmap closed when it is collected
    return int(shard.sequence_lengths.sum())


def _cfg(paths: list[str], **kw) -> DataConfig:
    return DataConfig(paths=paths, split=kw.pop("split", "90,10,0"), seq_length=SEQ, **kw)


def test_samples_are_windows_of_the_corpus(shards, tok, tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train, valid, test = build_pretrain_datasets(
            _cfg([shards["email"]]), tok, 1234, (300, 8, 0), tmp_path
        )
    assert not [w for w in caught if "pad token" in str(w.message)]
    assert test is None and len(train) >= 300 and len(valid) >= 8
    sample = train[0]
    assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}  # no dense mask
    assert sample["tokens"].shape == sample["labels"].shape == (SEQ,)
    assert torch.equal(sample["position_ids"], torch.arange(SEQ))
    assert torch.all(sample["loss_mask"] == 1)

    # Sample i is the (i')-th window of SEQ+1 tokens over the documents in document_index order,
    # where i' = shuffle_index[i]; tokens/labels are that window shifted by one.
    shard = IndexedDataset(shards["email"])
    stream = numpy.concatenate([shard[int(d)] for d in train.document_index])
    for i in (0, 1, len(train) - 1):
        j = int(train.shuffle_index[i])
        window = stream[j * SEQ : j * SEQ + SEQ + 1]
        item = train[i]
        assert item["tokens"].tolist() == window[:-1].tolist()
        assert item["labels"].tolist() == window[1:].tolist()


def test_document_resets(shards, tok, tmp_path: Path) -> None:
    cfg = _cfg(
        [shards["json"]], reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True
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


def test_deterministic_and_seeded(shards, tok, tmp_path: Path) -> None:
    cfg = _cfg([shards["json"]])
    first, _, _ = build_pretrain_datasets(cfg, tok, 7, (50, 0, 0), tmp_path)
    cached, _, _ = build_pretrain_datasets(cfg, tok, 7, (50, 0, 0), tmp_path)  # from the cache
    other, _, _ = build_pretrain_datasets(cfg, tok, 8, (50, 0, 0), tmp_path)
    assert all(torch.equal(first[i]["tokens"], cached[i]["tokens"]) for i in range(50))
    assert not all(torch.equal(first[i]["tokens"], other[i]["tokens"]) for i in range(50))


def test_blend_without_weights_repeats_to_the_requested_size(shards, tok, tmp_path: Path) -> None:
    paths = [shards["json"], shards["email"]]
    tokens = [_num_tokens(p) for p in paths]
    one_epoch = sum(tokens) // SEQ
    wanted = 3 * one_epoch
    train, _, _ = build_pretrain_datasets(_cfg(paths), tok, 1, (wanted, 0, 0), tmp_path)
    assert len(train) >= wanted
    counts = numpy.bincount(numpy.asarray(train.dataset_index), minlength=2)
    assert abs(counts[0] / counts.sum() - tokens[0] / sum(tokens)) < 0.01
    weighted, _, _ = build_pretrain_datasets(
        _cfg(paths, weights=[1.0, 1.0]), tok, 1, (400, 0, 0), tmp_path
    )
    assert numpy.bincount(numpy.asarray(weighted.dataset_index)).tolist() == [200, 200]


def test_split_without_documents(tmp_path: Path, tok) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"m{i}.py").write_text(f"x = {i}\n" * 50)
    prefix = str(tmp_path / "small")
    prepare_directory([src], Path(prefix), tok)
    cfg = _cfg([prefix], split="98,2,0")  # round(0.98 * 3) = 3: validation gets nothing
    with pytest.raises(ValueError, match=r"data.split='98,2,0'.*validation.*train 3, validation 0"):
        build_pretrain_datasets(cfg, tok, 1, (10, 4, 0), tmp_path / "cache")
    # Not asking for validation samples is fine (megatron-core would hang building it).
    train, valid, test = build_pretrain_datasets(cfg, tok, 1, (10, 0, 0), tmp_path / "cache")
    assert len(train) >= 10 and valid is None and test is None
    with pytest.raises(ValueError, match="data.split"):
        build_pretrain_datasets(_cfg([prefix], split="1,0"), tok, 1, (10, 0, 2), tmp_path)
    with pytest.raises(ValueError, match="data.split"):
        build_pretrain_datasets(_cfg([prefix], split="a,b"), tok, 1, (10, 0, 0), tmp_path)


def test_other_vocabulary_is_refused(shards, tok, tmp_path: Path) -> None:
    for suffix in (".bin", ".idx", ".manifest.json"):
        shutil.copy(shards["json"] + suffix, tmp_path / f"copy{suffix}")
    manifest_file = tmp_path / "copy.manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["tokenizer"]["sha256"] = "0" * 64
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(ValueError) as err:
        build_pretrain_datasets(_cfg([str(tmp_path / "copy")]), tok, 1, (10, 0, 0), tmp_path)
    assert "0" * 64 in str(err.value) and tok.sha256 in str(err.value)


def test_missing_prefix(tmp_path: Path, tok) -> None:
    with pytest.raises(FileNotFoundError, match=r"data.paths\[0\].*nothing"):
        build_pretrain_datasets(_cfg([str(tmp_path / "nothing")]), tok, 1, (10, 0, 0), tmp_path)


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


def test_dataloader_resumes_exactly(shards, tok, tmp_path: Path) -> None:
    train, _, _ = build_pretrain_datasets(_cfg([shards["json"]]), tok, 3, (64, 0, 0), tmp_path)
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
