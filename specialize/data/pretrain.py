"""Training datasets over prepared data, and a data loader that resumes at any sample.

Each ``data.paths`` entry is a directory written by ``specialize data prepare`` (``manifest.json``
plus Megatron indexed shards ``shard-NNNNN.bin``/``.idx``) or a bare Megatron prefix
(``PREFIX.bin``/``.idx`` from other tools). megatron-core's ``GPTDataset`` (one shard) or
``BlendedDataset`` (several) turns the documents into shuffled ``seq_length`` windows; each item is
a dict of ``tokens``, ``labels``, ``loss_mask``, ``position_ids``, with
``data.reset_attention_mask`` also the document boundaries, and for a blend ``dataset_id`` (the
shard a sample came from). The boundaries are ``attention_mask`` (True = masked, GPTDataset's
block-diagonal causal mask) with the local spec, and ``cu_seqlens`` (a document ends after each
``<|endoftext|>``, padded with -1) with Transformer Engine, whose causal attention ignores a dense
mask; the forward step turns ``cu_seqlens`` into THD ``PackedSeqParams``. The checks here catch
what megatron-core would turn into a hang or a silently short dataset.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy
import torch
import torch.distributed as dist
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from torch.utils.data import DataLoader, Dataset

from base.tokenizer import QwenTokenizer
from specialize.config import ConfigError, DataConfig, Derived, RecipeConfig
from specialize.data.sft_prepare import FORMAT as SFT_FORMAT
from specialize.mcore.distributed import Topology

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 2


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


@dataclass(frozen=True)
class Shard:
    """One opened Megatron indexed dataset and the ``data.paths`` entry it belongs to."""

    source: int
    """Index of the ``data.paths`` entry."""
    prefix: str
    """Absolute path without ``.bin``/``.idx``."""
    dataset: IndexedDataset = field(repr=False)

    @property
    def documents(self) -> int:
        return len(self.dataset.sequence_lengths)

    @property
    def tokens(self) -> int:
        return int(self.dataset.sequence_lengths.sum())


def read_data_manifest(path: str | os.PathLike, where: Optional[str] = None) -> Optional[dict]:
    """The manifest of a prepared-data directory, or None for a bare Megatron prefix.

    Raises ConfigError, naming ``where`` (default: the path), for a directory without a readable
    ``manifest.json``.
    """
    path = Path(path)
    if not path.is_dir():
        return None
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise ConfigError(
            f"{where or path}: a directory without {MANIFEST}; give a directory written by "
            "`specialize data prepare` or a Megatron prefix (PREFIX.bin/.idx without the suffix)"
        )
    try:
        with manifest_file.open(encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where or path}: {manifest_file} is not readable JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise ConfigError(f"{where or path}: {manifest_file} is not a manifest (a JSON object)")
    return manifest


def data_manifest_records(paths: list[str]) -> dict:
    """What pins the data of each ``data.paths`` entry, as lineage records it."""
    manifests = {}
    for data_path in paths:
        path = Path(data_path) / "manifest.json"  # a `data prepare(-sft)` directory; else None
        if not path.is_file():
            manifests[data_path] = None
            continue
        text = path.read_bytes()
        manifest = json.loads(text)
        # The manifest's own hash pins the data (it holds the input hashes and counts) whatever
        # its kind; a few fields are copied for people reading the lineage.
        manifests[data_path] = {
            "manifest_sha256": hashlib.sha256(text).hexdigest(),
            "format": manifest.get("format"),
            "documents": manifest.get("documents"),
            "sequences": manifest.get("sequences"),
            "tokens": manifest.get("tokens"),
            "tokenizer_sha256": (manifest.get("tokenizer") or {}).get("sha256"),
        }
    return manifests


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


def _missing_files(prefix: str | os.PathLike) -> list[str]:
    return [
        os.path.basename(f"{prefix}{suffix}")
        for suffix in (".bin", ".idx")
        if not os.path.isfile(f"{prefix}{suffix}")
    ]


def _directory_prefixes(where: str, path: Path, tokenizer: QwenTokenizer) -> list[str]:
    """The shard prefixes a prepared directory's manifest lists, after checking its tokenizer."""
    manifest = read_data_manifest(path, where)
    manifest_file = path / MANIFEST
    if manifest.get("format") == SFT_FORMAT:
        raise ConfigError(
            f"{where} is SFT data (written by `data prepare-sft`), not pretraining data; "
            "set data.format=sft to train on it"
        )
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ConfigError(
            f"{where}: {manifest_file} has format {manifest.get('format')!r}, this version reads "
            f"format {MANIFEST_FORMAT}; prepare the data again with `specialize data prepare`"
        )
    vocab = (manifest.get("tokenizer") or {}).get("sha256")
    if vocab != tokenizer.sha256:
        raise ConfigError(
            f"{where} was tokenized with vocabulary sha256 {vocab}, but the model's tokenizer "
            f"({tokenizer.vocab_file}) has sha256 {tokenizer.sha256}; prepare the data again "
            "with this tokenizer (model.tokenizer)"
        )
    entries = manifest.get("shards")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: {manifest_file} lists no shards; the directory holds no data")
    prefixes = []
    for j, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("prefix"), str):
            raise ConfigError(f"{where}: {manifest_file} shards[{j}] has no 'prefix'")
        prefix = path / entry["prefix"]
        missing = _missing_files(prefix)
        if missing:
            raise ConfigError(
                f"{where}: shard {entry['prefix']!r} listed in {MANIFEST} is missing "
                f"({', '.join(str(path / m) for m in missing)}); the directory is incomplete, "
                "prepare it again"
            )
        prefixes.append(str(prefix))
    return prefixes


def open_shards(data_cfg: DataConfig, tokenizer: QwenTokenizer) -> list[Shard]:
    """Every shard of every ``data.paths`` entry, in order, checked against ``tokenizer``.

    A directory expands to its manifest's shards; a bare prefix is one shard whose tokenizer
    cannot be checked (there is no manifest), which is logged once.
    """
    if not data_cfg.paths:
        raise ConfigError(
            "data.paths: empty; give the directories written by `specialize data prepare`"
        )
    shards, bare = [], []
    for i, path in enumerate(data_cfg.paths):
        where = f"data.paths[{i}]={path!r}"
        if Path(path).is_dir():
            prefixes = _directory_prefixes(where, Path(path), tokenizer)
        else:
            missing = _missing_files(path)
            if missing:
                raise ConfigError(
                    f"{where}: neither a prepared-data directory nor a Megatron prefix (missing "
                    f"{', '.join(missing)}); write it with `specialize data prepare`"
                )
            prefixes = [path]
            bare.append(path)
        for prefix in prefixes:
            dataset = IndexedDataset(os.path.abspath(prefix), multimodal=False, mmap=True)
            if numpy.iinfo(dataset.index.dtype).max < tokenizer.vocab_size - 1:
                raise ConfigError(
                    f"{where}: {prefix}: token dtype {dataset.index.dtype.__name__} cannot hold "
                    f"the {tokenizer.vocab_size} Qwen token ids; it was written for another "
                    "tokenizer"
                )
            shards.append(Shard(i, dataset.path_prefix, dataset))
    if bare and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        log.warning(
            "data.paths %s: bare Megatron prefixes without %s; cannot check that they were "
            "tokenized with the model's tokenizer (sha256 %s)",
            ", ".join(bare),
            MANIFEST,
            tokenizer.sha256,
        )
    return shards


def _check_weights(data_cfg: DataConfig) -> None:
    weights = data_cfg.weights
    if weights is not None and (
        len(weights) != len(data_cfg.paths) or min(weights) < 0 or sum(weights) <= 0
    ):
        raise ConfigError(
            f"data.weights={weights}: need {len(data_cfg.paths)} non-negative weights (one per "
            "data.paths entry) with a positive sum"
        )


def blend_weights(shards: list[Shard], weights: Optional[list[float]]) -> list[float]:
    """One weight per shard: each ``data.paths`` weight split over its shards by their tokens.

    Without ``weights`` every shard weighs its tokens, i.e. the blend is proportional to size.
    """
    if weights is None:
        return [float(s.tokens) for s in shards]
    source_tokens: dict[int, int] = {}
    for s in shards:
        source_tokens[s.source] = source_tokens.get(s.source, 0) + s.tokens
    return [
        weights[s.source] * s.tokens / source_tokens[s.source] if source_tokens[s.source] else 0.0
        for s in shards
    ]


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


def document_attention(cfg: RecipeConfig) -> str:
    """How a pretraining sample's documents are kept apart: ``causal`` (they are not, without
    ``data.reset_attention_mask``), ``mask`` (local spec) or ``thd`` (te spec). Under THD, RoPE
    counts positions from each document's start whatever ``data.reset_position_ids`` says; with
    attention confined to the document only relative positions enter, so the scores are the same."""
    if not cfg.data.reset_attention_mask:
        return "causal"
    return "thd" if cfg.model.resolved_spec() == "te" else "mask"


def document_cu_seqlens(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """Where the documents of a window start and end: [0, ..., len(tokens)], padded with -1 to
    ``len(tokens) + 1`` entries (a fixed shape for the collate). A document ends after its
    ``eod`` token, as in GPTDataset's mask (``_get_ltor_masks_and_position_ids``)."""
    length = tokens.numel()
    ends = (tokens == eod).nonzero().flatten() + 1
    inner = ends[ends < length].to(torch.int32)
    bounds = torch.cat(
        [
            torch.zeros(1, dtype=torch.int32, device=tokens.device),
            inner,
            torch.full((1,), length, dtype=torch.int32, device=tokens.device),
        ]
    )
    cu_seqlens = torch.full((length + 1,), -1, dtype=torch.int32, device=tokens.device)
    cu_seqlens[: bounds.numel()] = bounds
    return cu_seqlens


class DocumentBoundaries(Dataset):
    """A pretraining dataset's samples with ``cu_seqlens`` (see ``document_cu_seqlens``)."""

    def __init__(self, dataset: Dataset, eod: int) -> None:
        self.dataset, self.eod = dataset, eod

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        item["cu_seqlens"] = document_cu_seqlens(item["tokens"], self.eod)
        return item


def _gpt_config(
    data_cfg: DataConfig,
    tokenizer: QwenTokenizer,
    seed: int,
    cache_dir: Path,
    blend: tuple[list[str], Optional[list[float]]],
    thd: bool = False,
) -> GPTDatasetConfig:
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=data_cfg.seq_length,
        blend=blend,
        split=data_cfg.split,
        path_to_cache=str(cache_dir),
        tokenizer=MegatronTokenizerView.of(tokenizer),
        reset_position_ids=data_cfg.reset_position_ids,
        reset_attention_mask=data_cfg.reset_attention_mask,
        eod_mask_loss=data_cfg.eod_mask_loss,
        # Without document resets the model applies its own causal mask, and with THD boundaries
        # TE builds its own per document; a dense per-sample [1, s, s] mask would only cost memory.
        create_attention_mask=data_cfg.reset_attention_mask and not thd,
    )


def build_pretrain_datasets(
    data_cfg: DataConfig,
    tokenizer: QwenTokenizer,
    seed: int,
    num_samples: tuple[int, int, int],
    cache_dir: Path,
    *,
    thd: bool = False,
) -> tuple[Dataset, Optional[Dataset], Optional[Dataset]]:
    """Train, validation and test datasets with at least ``num_samples`` samples each.

    With ``thd`` (``document_attention`` of the run), ``data.reset_attention_mask`` gives each
    sample ``cu_seqlens`` instead of a dense ``attention_mask``.

    A split with 0 requested samples is not built (None). Every shard is split by documents in
    ``data.split`` ratios; a shard left without documents in a split (the small last shard of a
    directory, typically) sits that split out, as long as its ``data.paths`` entry still has
    documents there. A ``data.paths`` entry of weight 0 is left out. Index caches go to
    ``cache_dir``. Call on every rank: with a process group, rank 0 builds the caches while the
    others wait.
    """
    if len(num_samples) != 3 or min(num_samples) < 0:
        raise ValueError(f"num_samples={num_samples}: expected three non-negative counts")
    _parse_split(data_cfg.split)
    _check_weights(data_cfg)
    shards = open_shards(data_cfg, tokenizer)
    if data_cfg.weights is not None:  # megatron-core's BlendedDataset asserts positive weights
        shards = [s for s in shards if data_cfg.weights[s.source] > 0]
    sources = sorted({s.source for s in shards})
    everything = ([s.prefix for s in shards], None)
    split_matrix = _gpt_config(data_cfg, tokenizer, seed, cache_dir, everything).split_matrix

    # GPTDataset loops forever when a split without documents is built, even for 0 samples:
    # each split is built on its own, from the shards that have documents in it.
    members: list[list[Shard]] = []
    for i, name in enumerate(SPLITS):
        in_split = [s for s in shards if _split_documents(s.documents, split_matrix[i])]
        members.append(in_split)
        if num_samples[i] == 0:
            continue
        for source in sources:
            if any(s.source == source for s in in_split):
                continue
            path = data_cfg.paths[source]
            own = [s for s in shards if s.source == source]
            per_split = [sum(_split_documents(s.documents, b) for s in own) for b in split_matrix]
            raise ConfigError(
                f"data.split={data_cfg.split!r} leaves the {name} split of {path!r} with no "
                f"documents (documents per split: "
                f"{', '.join(f'{n} {c}' for n, c in zip(SPLITS, per_split))}), "
                f"but {num_samples[i]} {name} samples are requested; change data.split or "
                "add documents"
            )

    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    datasets: list[Optional[Dataset]] = [None, None, None]
    with _process_group():
        for i, name in enumerate(SPLITS):
            if num_samples[i] == 0:
                continue
            in_split = members[i]
            weights = None  # one shard: a plain GPTDataset, no blend
            if len(in_split) > 1:
                # Explicit weights for a blend: without them megatron-core blends one epoch of
                # each shard and caps the split there, so a longer run would run dry.
                weights = blend_weights(in_split, data_cfg.weights)
            blend = ([s.prefix for s in in_split], weights)
            config = _gpt_config(data_cfg, tokenizer, seed, cache_dir, blend, thd)
            # The other splits keep their bookends (so this one keeps its documents) but are
            # not built.
            config.split_matrix = [b if k == i else None for k, b in enumerate(split_matrix)]
            sizes = [num_samples[i] if k == i else 0 for k in range(len(SPLITS))]
            built = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
            datasets[i] = built[i]
            got = 0 if built[i] is None else len(built[i])
            if got < num_samples[i]:
                raise RuntimeError(
                    f"the {name} dataset has {got} samples, {num_samples[i]} were requested"
                )
            if thd and data_cfg.reset_attention_mask:
                datasets[i] = DocumentBoundaries(datasets[i], tokenizer.eod)
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


class TrainingData:
    """This rank's train/validation iterators over ``self.train``/``self.valid`` (set by the
    subclass): one iterator per model chunk, since every pipeline stage and virtual chunk reads
    the same micro-batches (tokens for the first, labels for the last, boundaries for all)."""

    cfg: RecipeConfig
    topo: Topology
    train: Dataset
    valid: Optional[Dataset]

    def _loader(self, dataset: Dataset, consumed: int):
        return build_dataloader(
            dataset,
            micro_batch_size=self.cfg.train.micro_batch_size,
            consumed_samples=consumed,
            data_parallel_rank=self.topo.data_rank,
            data_parallel_size=self.topo.data_parallel,
            num_workers=self.cfg.data.num_workers,
        )

    def _iterators(self, dataset: Dataset, consumed: int) -> list:
        return [
            iter(self._loader(dataset, consumed))
            for _ in range(self.cfg.parallel.virtual_pipeline or 1)
        ]

    def train_iterators(self, consumed_samples: int) -> list:
        return self._iterators(self.train, consumed_samples)

    def validation_iterators(self) -> Optional[list]:
        return None if self.valid is None else self._iterators(self.valid, 0)


class PretrainData(TrainingData):
    """Train/validation iterators over Megatron indexed datasets (GPTDataset) for this rank."""

    def __init__(
        self, cfg: RecipeConfig, topo: Topology, derived: Derived, tokenizer: QwenTokenizer
    ) -> None:
        self.cfg, self.topo = cfg, topo
        global_batch = cfg.train.global_batch_size
        eval_samples = cfg.train.eval_steps * global_batch if cfg.train.eval_interval else 0
        cache_dir = Path(cfg.data.cache_dir or Path(cfg.checkpoint.dir) / "data_cache")
        # GPTDataset keys its index cache by shard path, not content: data replaced in place
        # (data.allow_changed) must not reuse the old data's sample indices.
        cache_dir = cache_dir / _data_digest(cfg.data.paths)
        # Rank 0 writes GPTDataset's index cache; the others then read it instead of racing it.
        for turn in (True, False):
            if (topo.rank == 0) == turn:
                self.train, self.valid, _ = build_pretrain_datasets(
                    cfg.data,
                    tokenizer,
                    cfg.train.seed,
                    (derived.steps * global_batch, eval_samples, 0),
                    cache_dir,
                    thd=document_attention(cfg) == "thd",
                )
            dist.barrier()


def _data_digest(paths: list[str]) -> str:
    """A short name for the data of ``paths`` as their manifests pin it."""
    records = data_manifest_records(paths)
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()[:16]
