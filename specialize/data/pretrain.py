"""Training datasets over prepared shards, and a data loader that resumes at any sample.

megatron-core's ``GPTDataset`` (one shard) or ``BlendedDataset`` (several) turns the documents into
shuffled ``seq_length`` windows; each item is a dict of ``tokens``, ``labels``, ``loss_mask``,
``position_ids``, with ``data.reset_attention_mask`` also ``attention_mask`` (True = masked), and
for a blend ``dataset_id`` (the shard a sample came from). The checks here catch what megatron-core
would turn into a hang or a silently short dataset.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from torch.utils.data import DataLoader, Dataset

from base.tokenizer import QwenTokenizer
from specialize.config import ConfigError, DataConfig
from specialize.data.prepare import bin_path, idx_path, manifest_path, read_manifest

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class MegatronTokenizerView:
    """The four attributes GPTDataset reads from a tokenizer (its type is not checked).

    ``pad`` is deliberately not Qwen's ``eod``: GPTDataset zeroes the loss on every pad id and
    rewrites it to 0, which would silently untrain ``<|endoftext|>``. -1 never occurs in a shard;
    it is also what megatron-core falls back to, with a warning, when pad collides with eod.
    """

    eod: int
    vocab_size: int
    unique_identifiers: dict = field(hash=False)  # names the vocabulary in the index-cache hash
    pad: int = -1

    @classmethod
    def of(cls, tokenizer: QwenTokenizer) -> MegatronTokenizerView:
        return cls(tokenizer.eod, tokenizer.vocab_size, dict(tokenizer.unique_identifiers))


def _parse_split(split: str) -> list[float]:
    try:
        ratios = [float(part) for part in split.split(",")]
    except ValueError:
        ratios = []
    if not 1 <= len(ratios) <= 3 or min(ratios) < 0 or sum(ratios) <= 0:
        raise ConfigError(
            f"data.split={split!r}: expected up to three non-negative ratios with a positive sum, "
            "e.g. '98,2,0'"
        )
    return ratios


def _open_shards(data_cfg: DataConfig, tokenizer: QwenTokenizer) -> list[IndexedDataset]:
    """Check every prefix exists and was tokenized with ``tokenizer``; open its index."""
    if not data_cfg.paths:
        raise ConfigError(
            "data.paths: empty; give the prefixes written by `specialize data prepare`"
        )
    shards = []
    for i, prefix in enumerate(data_cfg.paths):
        where = f"data.paths[{i}]={prefix!r}"
        missing = [p.name for p in (bin_path(prefix), idx_path(prefix)) if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{where}: no indexed dataset at this prefix (missing {', '.join(missing)}); "
                "write it with `specialize data prepare`"
            )
        if manifest_path(prefix).is_file():
            vocab = read_manifest(prefix).get("tokenizer", {}).get("sha256")
            if vocab != tokenizer.sha256:
                raise ConfigError(
                    f"{where} was tokenized with vocabulary sha256 {vocab}, but the model's "
                    f"tokenizer ({tokenizer.vocab_file}) has sha256 {tokenizer.sha256}; "
                    "prepare the data again with this tokenizer (model.tokenizer)"
                )
        shard = IndexedDataset(os.path.abspath(prefix), multimodal=False, mmap=True)
        if numpy.iinfo(shard.index.dtype).max < tokenizer.vocab_size - 1:
            raise ConfigError(
                f"{where}: token dtype {shard.index.dtype.__name__} cannot hold the "
                f"{tokenizer.vocab_size} Qwen token ids; it was written for another tokenizer"
            )
        shards.append(shard)
    return shards


def _split_documents(num_documents: int, bookends: Optional[tuple[float, float]]) -> int:
    # The same rounding as BlendedMegatronDatasetBuilder._build_megatron_dataset_splits.
    if bookends is None:
        return 0
    return int(round(bookends[1] * num_documents)) - int(round(bookends[0] * num_documents))


@contextlib.contextmanager
def _process_group() -> Iterator[None]:
    """A world of one while building, when no process group exists (tests, tools).

    megatron-core 0.16.1's BlendedDataset calls torch.distributed.get_rank() on an index-cache miss
    without checking that a process group exists.
    """
    if torch.distributed.is_initialized():
        yield
        return
    torch.distributed.init_process_group(
        "gloo", store=torch.distributed.HashStore(), rank=0, world_size=1
    )
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def build_pretrain_datasets(
    data_cfg: DataConfig,
    tokenizer: QwenTokenizer,
    seed: int,
    num_samples: tuple[int, int, int],
    cache_dir: Path,
) -> tuple[Dataset, Optional[Dataset], Optional[Dataset]]:
    """Train, validation and test datasets with at least ``num_samples`` samples each.

    A split with 0 requested samples is not built (None). Index caches go to ``cache_dir``. Call
    on every rank: with a process group, rank 0 builds the caches while the others wait.
    """
    if len(num_samples) != 3 or min(num_samples) < 0:
        raise ValueError(f"num_samples={num_samples}: expected three non-negative counts")
    _parse_split(data_cfg.split)
    shards = _open_shards(data_cfg, tokenizer)
    prefixes = [shard.path_prefix for shard in shards]

    weights = data_cfg.weights
    if weights is not None:
        if len(weights) != len(prefixes) or min(weights) < 0 or sum(weights) <= 0:
            raise ConfigError(
                f"data.weights={weights}: need {len(prefixes)} non-negative weights (one per "
                "data.paths entry) with a positive sum"
            )
    elif len(prefixes) > 1:
        # Without weights megatron-core blends one epoch of each shard and caps the split there,
        # so a run asking for more samples would run dry. Weigh by tokens instead, which keeps
        # "proportional to size" and lets every shard repeat as needed.
        weights = [float(shard.sequence_lengths.sum()) for shard in shards]
    if len(prefixes) == 1:
        weights = None  # one shard: a plain GPTDataset, no blend

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=data_cfg.seq_length,
        blend=(prefixes, weights),
        split=data_cfg.split,
        path_to_cache=str(cache_dir),
        tokenizer=MegatronTokenizerView.of(tokenizer),
        reset_position_ids=data_cfg.reset_position_ids,
        reset_attention_mask=data_cfg.reset_attention_mask,
        eod_mask_loss=data_cfg.eod_mask_loss,
        # Without document resets the model applies its own causal mask; a dense per-sample
        # [1, s, s] mask would only cost memory.
        create_attention_mask=data_cfg.reset_attention_mask,
    )

    # GPTDataset loops forever when a split without documents is built, even for 0 samples:
    # splits nobody asks samples of are dropped from the split matrix (it only sets their
    # bookends; the others keep their documents), and requested ones must have documents.
    counts = [
        [_split_documents(len(s.sequence_lengths), b) for b in config.split_matrix] for s in shards
    ]
    for i, name in enumerate(SPLITS):
        if num_samples[i] == 0:
            config.split_matrix[i] = None
            continue
        for prefix, per_split in zip(data_cfg.paths, counts):
            if per_split[i] == 0:
                raise ConfigError(
                    f"data.split={data_cfg.split!r} leaves the {name} split of {prefix!r} with no "
                    f"documents (documents per split: "
                    f"{', '.join(f'{n} {c}' for n, c in zip(SPLITS, per_split))}), "
                    f"but {num_samples[i]} {name} samples are requested; change data.split or "
                    "add documents"
                )

    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    with _process_group():
        datasets = BlendedMegatronDatasetBuilder(
            GPTDataset, list(num_samples), lambda: True, config
        ).build()
    for name, wanted, dataset in zip(SPLITS, num_samples, datasets):
        if wanted and (dataset is None or len(dataset) < wanted):
            got = 0 if dataset is None else len(dataset)
            raise RuntimeError(f"the {name} dataset has {got} samples, {wanted} were requested")
    return datasets[0], datasets[1], datasets[2]


class PretrainingSampler:
    """Micro-batches of sample indices in dataset order, starting at ``consumed_samples``.

    The scheme of Megatron-LM's ``MegatronPretrainingSampler``, which lives in megatron.training
    (not part of megatron-core): the samples are read in strides of micro_batch_size x
    data_parallel_size and rank r takes the r-th micro-batch of each stride, so a resumed run
    continues exactly where the interrupted one stopped. A trailing partial stride is dropped.
    The datasets are already shuffled, so the order here is sequential.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
    ) -> None:
        if micro_batch_size < 1 or data_parallel_size < 1:
            raise ValueError("micro_batch_size and data_parallel_size must be >= 1")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(
                f"data_parallel_rank={data_parallel_rank} not in [0, {data_parallel_size})"
            )
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(
                f"consumed_samples={consumed_samples}: beyond the dataset's {total_samples} samples"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.stride = micro_batch_size * data_parallel_size
        self.offset = data_parallel_rank * micro_batch_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.stride

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(
            self.consumed_samples, self.total_samples - self.stride + 1, self.stride
        ):
            first = start + self.offset
            yield list(range(first, first + self.micro_batch_size))


def build_dataloader(
    dataset: Dataset,
    micro_batch_size: int,
    consumed_samples: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    num_workers: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches (dicts of [micro_batch_size, ...] tensors) from a sample count."""
    sampler = PretrainingSampler(
        len(dataset), consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
    return iter(loader)
