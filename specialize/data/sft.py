"""SFT training data: prepared chat samples -> micro-batches with per-sample loss masks.

Each item is one training sequence of ``seq_length`` positions holding one sample (unpacked) or
several (packed). Per sample, inputs are its tokens but the last and labels its tokens but the
first, with the sample's loss mask shifted the same way, so no sample predicts into another.
Position ids restart at every sample. Attention stays inside each sample:

- local spec: ``attention_mask`` [1, s, s], True = masked, block-diagonal causal (megatron-core's
  unfused softmax applies a given mask as is);
- Transformer Engine spec: ``cu_seqlens`` (padded with -1 to a fixed length), turned into THD
  ``PackedSeqParams`` by the forward step, which TE's fused attention and megatron's RoPE honour;
- unpacked samples need neither: the causal mask already hides the padding after the sample.

Every pipeline stage reads the same micro-batch, so the boundaries are known in every stage.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy
import torch
import torch.distributed as dist
from megatron.core.datasets.indexed_dataset import IndexedDataset
from torch.utils.data import Dataset

from base.tokenizer import QwenTokenizer
from specialize.config import ConfigError, Derived, RecipeConfig
from specialize.data.pretrain import SPLITS, TrainingData, _parse_split
from specialize.data.sft_prepare import LOSS_MASK, TOKENS, read_sft_manifest
from specialize.mcore.distributed import Topology

ATTENTION = ("causal", "mask", "thd")


class SFTSequences(Dataset):
    """The training sequences of one prepared directory (``data prepare-sft`` output)."""

    def __init__(self, path: str | Path, seq_length: int, pad_id: int, attention: str) -> None:
        if attention not in ATTENTION:
            raise ValueError(f"attention {attention!r}: expected one of {ATTENTION}")
        self.path, self.seq_length, self.pad_id = str(path), seq_length, pad_id
        self.manifest = read_sft_manifest(path)
        self.packed = bool(self.manifest["options"]["pack"])
        self.attention = attention if self.packed else "causal"
        self.tokens = IndexedDataset(str(Path(path) / TOKENS))
        self.masks = IndexedDataset(str(Path(path) / LOSS_MASK))
        self.documents = self.tokens.document_indices  # sequence i = samples [d[i], d[i+1])

    def __len__(self) -> int:
        return len(self.documents) - 1

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        length = self.seq_length
        tokens = numpy.full(length, self.pad_id, dtype=numpy.int64)
        labels = numpy.full(length, self.pad_id, dtype=numpy.int64)
        loss_mask = numpy.zeros(length, dtype=numpy.float32)
        position_ids = numpy.zeros(length, dtype=numpy.int64)
        segment = numpy.zeros(length, dtype=numpy.int64)
        bounds = [0]
        for sample in range(self.documents[index], self.documents[index + 1]):
            ids, mask = self.tokens[sample], self.masks[sample]
            start, n = bounds[-1], len(ids) - 1
            if start + n > length:
                raise ValueError(
                    f"{self.path}: sequence {index} holds more than {length} positions; it was "
                    f"prepared for seq_length {self.manifest['options']['seq_length']}"
                )
            tokens[start : start + n] = ids[:-1]
            labels[start : start + n] = ids[1:]
            loss_mask[start : start + n] = mask[1:]
            position_ids[start : start + n] = numpy.arange(n)
            segment[start : start + n] = len(bounds) - 1
            bounds.append(start + n)
        if bounds[-1] < length:  # the padding is a segment of its own: it attends only itself
            position_ids[bounds[-1] :] = numpy.arange(length - bounds[-1])
            segment[bounds[-1] :] = len(bounds) - 1
            bounds.append(length)
        item = {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.from_numpy(position_ids),
        }
        if self.attention == "mask":
            causal = numpy.tril(numpy.ones((length, length), dtype=bool))
            same = segment[:, None] == segment[None, :]
            item["attention_mask"] = torch.from_numpy(~(causal & same))[None]
        elif self.attention == "thd":
            cu_seqlens = numpy.full(length + 1, -1, dtype=numpy.int32)
            cu_seqlens[: len(bounds)] = bounds
            item["cu_seqlens"] = torch.from_numpy(cu_seqlens)
        return item


class _Subset(Dataset):
    """``dataset`` at ``indices``, cycled to ``length`` items, reshuffled every pass (epoch)."""

    def __init__(self, dataset: Dataset, indices: numpy.ndarray, length: int, seed: int) -> None:
        self.dataset, self.indices, self.length, self.seed = dataset, indices, length, seed
        self._epoch, self._order = -1, indices

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        epoch, offset = divmod(index, len(self.indices))
        if epoch != self._epoch:
            rng = numpy.random.RandomState((self.seed + epoch) % 2**32)
            self._epoch, self._order = epoch, self.indices[rng.permutation(len(self.indices))]
        return self.dataset[int(self._order[offset])]


def sft_attention(cfg: RecipeConfig) -> str:
    """How packed samples are kept apart: THD with TE (whose causal attention ignores a dense
    mask), a dense mask with the local spec. ``validate`` holds THD to one sequence per
    micro-batch."""
    return "thd" if cfg.model.resolved_spec() == "te" else "mask"


def open_sft(cfg: RecipeConfig, tokenizer: QwenTokenizer) -> torch.utils.data.ConcatDataset:
    if not cfg.data.paths:
        raise ConfigError("data.paths: no SFT data; write it with `specialize data prepare-sft`")
    if cfg.data.weights is not None:
        raise ConfigError(
            "data.weights: SFT data is read whole (every sample once per epoch); blend by "
            "preparing the mix, or by listing a directory twice in data.paths"
        )
    parts = []
    for i, path in enumerate(cfg.data.paths):
        where = f"data.paths[{i}]={path!r}"
        try:
            manifest = read_sft_manifest(path)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"{where}: {e}") from None
        if manifest["tokenizer"]["sha256"] != tokenizer.sha256:
            raise ConfigError(
                f"{where} was tokenized with vocabulary sha256 {manifest['tokenizer']['sha256']}, "
                f"but the model's tokenizer has sha256 {tokenizer.sha256}"
            )
        prepared = manifest["options"]["seq_length"]
        if prepared > cfg.data.seq_length or (
            manifest["options"]["pack"] and prepared != cfg.data.seq_length
        ):
            raise ConfigError(
                f"{where} was prepared for --seq-len {prepared}, but data.seq_length is "
                f"{cfg.data.seq_length}; prepare it again or change data.seq_length"
            )
        attention = sft_attention(cfg) if manifest["options"]["pack"] else "causal"
        parts.append(SFTSequences(path, cfg.data.seq_length, tokenizer.eod, attention))
    return torch.utils.data.ConcatDataset(parts)


def split_indices(count: int, split: str, seed: int) -> list[numpy.ndarray]:
    """Sequence indices of the train/validation/test splits: a seeded permutation, cut by ratio."""
    ratios = numpy.asarray(_parse_split(split) + [0.0] * (3 - len(_parse_split(split))))
    bounds = numpy.round(numpy.cumsum(ratios / ratios.sum()) * count).astype(int)
    order = numpy.random.RandomState(seed).permutation(count)
    return [order[a:b] for a, b in zip([0, *bounds[:-1]], bounds)]


class SFTData(TrainingData):
    """Train/validation iterators over prepared SFT data."""

    def __init__(
        self, cfg: RecipeConfig, topo: Topology, derived: Derived, tokenizer: QwenTokenizer
    ) -> None:
        self.cfg, self.topo = cfg, topo
        sequences = open_sft(cfg, tokenizer)
        parts = split_indices(len(sequences), cfg.data.split, cfg.train.seed)
        global_batch = cfg.train.global_batch_size
        wanted = [derived.steps * global_batch, 0, 0]
        if cfg.train.eval_interval:
            wanted[1] = cfg.train.eval_steps * global_batch
        for name, indices, count in zip(SPLITS, parts, wanted):
            if count and not len(indices):
                raise ConfigError(
                    f"data.split={cfg.data.split!r} leaves no {name} sequences of "
                    f"{len(sequences)}, but {count} {name} samples are requested"
                )
        self.epochs = wanted[0] / max(len(parts[0]), 1)
        self.train = _Subset(sequences, parts[0], wanted[0], cfg.train.seed)
        self.valid = _Subset(sequences, parts[1], wanted[1], cfg.train.seed) if wanted[1] else None
        if topo.rank == 0:
            logging.getLogger("specialize").info(
                "SFT data: %d train / %d validation sequences; %d steps = %.2f epochs",
                len(parts[0]),
                len(parts[1]),
                derived.steps,
                self.epochs,
            )
        if dist.is_initialized():
            dist.barrier()
