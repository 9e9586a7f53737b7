"""Packed SFT: per-sample shifts, positions and attention; packed loss == unpacked loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from base.tokenizer import EOD_ID
from tests.conftest import gsm8k_train_lines
from tests.distributed import run_distributed

SEQ = 256


def _gsm8k_chats(path: Path, count: int, skip: int = 0) -> Path:
    lines = gsm8k_train_lines()[skip : skip + count]
    with path.open("w") as f:
        for line in lines:
            record = json.loads(line)
            f.write(json.dumps({"prompt": record["question"], "response": record["answer"]}) + "\n")
    return path


def _prepare(tmp: Path, name: str, pack: bool, count: int = 8, skip: int = 0) -> str:
    from base.tokenizer import QwenTokenizer
    from specialize.data.sft_prepare import SFTOptions, prepare_sft
    from specialize.data.sources import Source

    data = _gsm8k_chats(tmp / f"{name}.jsonl", count, skip)
    out = tmp / name
    prepare_sft([Source("jsonl", str(data))], out, QwenTokenizer.load(), SFTOptions(SEQ, pack=pack))
    return str(out)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("sft")
    return {"packed": _prepare(tmp, "packed", True), "unpacked": _prepare(tmp, "unpacked", False)}


def test_items_shift_per_sample_and_confine_attention(prepared) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from specialize.data.sft import SFTSequences

    packed = SFTSequences(prepared["packed"], SEQ, pad_id=EOD_ID, attention="mask")
    unpacked = SFTSequences(prepared["unpacked"], SEQ, pad_id=EOD_ID, attention="mask")
    assert unpacked.attention == "causal"  # one sample per sequence needs no mask
    assert len(packed) < len(unpacked) == 8
    raw = IndexedDataset(str(Path(prepared["packed"]) / "tokens"))
    starts = raw.document_indices
    index = max(range(len(packed)), key=lambda d: starts[d + 1] - starts[d])
    first, last = starts[index], starts[index + 1]
    assert last - first >= 2, "some packed sequence should hold several samples"
    item = packed[index]
    start = 0
    for sample in range(first, last):
        ids = torch.from_numpy(raw[sample].astype("int64"))
        n = len(ids) - 1
        assert torch.equal(item["tokens"][start : start + n], ids[:-1])
        assert torch.equal(item["labels"][start : start + n], ids[1:])
        assert torch.equal(item["position_ids"][start : start + n], torch.arange(n))
        mask = item["attention_mask"][0]
        # Inside the sample: causal; to any other sample: masked.
        block = mask[start : start + n, start : start + n]
        assert torch.equal(block, ~torch.tril(torch.ones(n, n, dtype=torch.bool)))
        assert mask[start : start + n, :start].all() and mask[start : start + n, start + n :].all()
        start += n
    assert item["loss_mask"][start:].sum() == 0  # padding learns nothing

    thd = SFTSequences(prepared["packed"], SEQ, pad_id=EOD_ID, attention="thd")[index]
    bounds = thd["cu_seqlens"][thd["cu_seqlens"] >= 0].tolist()
    assert bounds[0] == 0 and bounds[-1] == SEQ and len(bounds) == last - first + 2


@pytest.mark.parametrize("why_not_te", [None, "no CUDA device"])
def test_the_batch_builder_follows_the_resolved_spec(prepared, monkeypatch, why_not_te) -> None:
    """``model.spec=auto`` on a machine with Transformer Engine keeps packed samples apart by
    ``cu_seqlens`` (THD), since TE's causal attention would ignore a dense mask."""
    import base.spec
    from base.tokenizer import QwenTokenizer
    from specialize.config import ConfigError, load_config
    from specialize.data.sft import open_sft

    monkeypatch.setattr(base.spec, "why_not_te", lambda: why_not_te)
    paths = f"data.paths=[{prepared['packed']},{prepared['unpacked']}]"
    overrides = ["train.steps=1", "data.format=sft", f"data.seq_length={SEQ}", paths]
    cfg = load_config(None, [*overrides, "train.micro_batch_size=1"])
    assert cfg.model.spec == "auto"
    packed, unpacked = open_sft(cfg, QwenTokenizer.load()).datasets
    if why_not_te is None:
        assert packed.attention == "thd" and "attention_mask" not in packed[0]
        bounds = packed[0]["cu_seqlens"][packed[0]["cu_seqlens"] >= 0]
        assert bounds[0] == 0 and bounds[-1] == SEQ and len(bounds) > 2
        with pytest.raises(ConfigError, match=r"^train.micro_batch_size=2: packed SFT data"):
            load_config(None, [*overrides, "train.micro_batch_size=2"])
    else:
        assert packed.attention == "mask" and "cu_seqlens" not in packed[0]
        assert packed[0]["attention_mask"].shape == (1, SEQ, SEQ)
        load_config(None, [*overrides, "train.micro_batch_size=2"])
    assert unpacked.attention == "causal"  # one sample per sequence: the causal mask suffices


def test_packed_seq_params_from_a_micro_batch() -> None:
    from specialize.train.step import packed_seq_params

    cu = torch.tensor([[0, 5, 12, 16, -1, -1]], dtype=torch.int32)
    params = packed_seq_params(cu)
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.tolist() == [0, 5, 12, 16] and params.max_seqlen_q == 7
    with pytest.raises(ValueError, match="micro_batch_size=1"):
        packed_seq_params(torch.zeros(2, 6, dtype=torch.int32))


def _losses(rank: int, world_size: int, run_dir: str, dirs: dict[str, str]) -> dict:
    from specialize.config import derive, load_config
    from specialize.data.pretrain import build_dataloader
    from specialize.data.sft import SFTSequences
    from specialize.mcore.distributed import init_distributed, seed_all
    from specialize.train.engine import Engine

    out = {}
    for layout, overrides in (("pp1", ["parallel.tensor=2"]), ("pp2", ["parallel.pipeline=2"])):
        cfg = load_config(
            "configs/base/qwen-nano.yaml",
            [
                "train.steps=1",
                "schedule.warmup_steps=0",
                "train.global_batch_size=1",
                "train.micro_batch_size=1",
                f"data.seq_length={SEQ}",
                f"checkpoint.dir={run_dir}-{layout}",
                *overrides,
            ],
        )
        topo = init_distributed(cfg.parallel)
        seed_all(cfg.train.seed)
        engine = Engine.build(cfg, topo, derive(cfg, topo.world_size))
        for name, path in dirs.items():
            dataset = SFTSequences(path, SEQ, pad_id=EOD_ID, attention="mask")
            loader = build_dataloader(dataset, 1, 0, topo.data_rank, topo.data_parallel, 0)
            out[f"{layout}-{name}"] = engine.evaluate([loader], len(dataset))
    return out


def test_packed_loss_equals_unpacked_loss_at_pp1_and_pp2(prepared, tmp_path) -> None:
    losses = run_distributed(_losses, str(tmp_path / "run"), prepared)
    print(losses)
    for layout in ("pp1", "pp2"):
        packed, unpacked = losses[f"{layout}-packed"], losses[f"{layout}-unpacked"]
        assert abs(packed - unpacked) <= 1e-5, (layout, packed, unpacked)
    assert 5.0 < losses["pp1-packed"] < 20.0  # a real loss of a random model, not 0 or NaN


def _sample_logits(rank: int, world_size: int, run_dir: str, dirs: dict[str, str]) -> dict:
    from specialize.config import derive, load_config
    from specialize.data.sft import SFTSequences
    from specialize.mcore.distributed import init_distributed, seed_all
    from specialize.train.engine import Engine

    cfg = load_config(
        "configs/base/qwen-nano.yaml",
        [
            "train.steps=1",
            "schedule.warmup_steps=0",
            "train.global_batch_size=1",
            "train.micro_batch_size=1",
            f"data.seq_length={PAIR_SEQ}",
            f"checkpoint.dir={run_dir}",
        ],
    )
    topo = init_distributed(cfg.parallel)
    seed_all(cfg.train.seed)
    model = Engine.build(cfg, topo, derive(cfg, topo.world_size)).model[0].eval()
    out = {}
    with torch.no_grad():
        for name, path in dirs.items():
            item = SFTSequences(path, PAIR_SEQ, pad_id=EOD_ID, attention="mask")[0]
            logits = model(
                item["tokens"][None], item["position_ids"][None], item["attention_mask"][None]
            )
            out[name] = (logits[0], item["tokens"])
    return out


PAIR_SEQ = 768


def test_a_samples_logits_do_not_depend_on_its_neighbours(tmp_path) -> None:
    from base.tokenizer import QwenTokenizer
    from specialize.data.chat import conversation, render
    from specialize.data.sft_prepare import SFTOptions, prepare_sft
    from specialize.data.sources import Source

    tok = QwenTokenizer.load()
    lines = gsm8k_train_lines()[:30]
    records = [json.loads(line) for line in lines]
    records = [{"prompt": r["question"], "response": r["answer"]} for r in records]
    length = [len(render(conversation(r), tok)[0]) for r in records]
    order = sorted(range(len(records)), key=length.__getitem__)
    # The longest sample packed with each of the two shortest: first-fit decreasing puts the
    # longest first in both sequences, so only its neighbour differs.
    a, b, c = order[-1], order[0], order[1]
    assert length[a] + length[b] + length[c] - 3 <= PAIR_SEQ
    dirs = {}
    for name, pair in (("with-b", (a, b)), ("with-c", (a, c))):
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(records[i]) + "\n" for i in pair))
        prepare_sft(
            [Source("jsonl", str(data))], tmp_path / name, tok, SFTOptions(PAIR_SEQ, pack=True)
        )
        dirs[name] = str(tmp_path / name)
    out = run_distributed(_sample_logits, str(tmp_path / "run"), dirs, world_size=1)
    (logits_b, tokens_b), (logits_c, tokens_c) = out["with-b"], out["with-c"]
    n = length[a] - 1
    assert torch.equal(tokens_b[:n], tokens_c[:n]) and not torch.equal(tokens_b, tokens_c)
    diff = (logits_b[:n] - logits_c[:n]).abs().max().item()
    assert diff <= 1e-5, diff
    assert (logits_b[n:] - logits_c[n:]).abs().max().item() > 1e-2  # the neighbours differ


def _sft_run(rank: int, world_size: int, run_dir: str, data: str) -> dict:
    from specialize.config import load_config
    from specialize.train.run import train

    cfg = load_config(
        "configs/base/qwen-nano.yaml",
        [
            "data.format=sft",
            f"data.paths=[{data}]",
            "data.split=80,20,0",
            f"data.seq_length={SEQ}",
            "train.steps=6",
            "train.micro_batch_size=1",
            "train.global_batch_size=2",
            "train.eval_interval=6",
            "train.eval_steps=1",
            "schedule.warmup_steps=1",
            "optimizer.lr=3e-3",
            f"checkpoint.dir={run_dir}",
            "checkpoint.interval=6",
            "logging.progress=false",
            "logging.tensorboard=false",
        ],
    )
    trainer = train(cfg)
    return {"losses": trainer.history, "checkpoint": str(trainer.last_checkpoint)}


def test_sft_training_run_learns_and_records_its_data(prepared, tmp_path) -> None:
    out = run_distributed(_sft_run, str(tmp_path / "run"), prepared["packed"], world_size=1)
    losses = out["losses"]
    assert len(losses) == 6 and losses[-1] < losses[0]
    lineage = json.loads((Path(out["checkpoint"]) / "lineage.json").read_text())
    manifest = lineage["data_manifests"][prepared["packed"]]
    assert manifest["format"] == "sft-1" and len(manifest["manifest_sha256"]) == 64
