"""``specialize train``: config → process groups → data, engine → trainer."""

from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist

from base.tokenizer import QwenTokenizer
from specialize.config import ConfigError, Derived, RecipeConfig, derive, to_yaml
from specialize.data.pretrain import build_dataloader, build_pretrain_datasets
from specialize.distributed import Topology, init_distributed, seed_all
from specialize.engine import Engine
from specialize.trainer import Trainer

log = logging.getLogger("specialize")


class PretrainData:
    """Train/validation iterators over Megatron indexed datasets for this rank.

    Every pipeline stage and model chunk reads the same micro-batches (the first stage needs the
    tokens, the last the labels, and all the attention mask), so each gets its own iterator."""

    def __init__(
        self, cfg: RecipeConfig, topo: Topology, derived: Derived, tokenizer: QwenTokenizer
    ) -> None:
        self.cfg, self.topo = cfg, topo
        self.chunks = cfg.parallel.virtual_pipeline or 1
        global_batch = cfg.train.global_batch_size
        eval_samples = cfg.train.eval_steps * global_batch if cfg.train.eval_interval else 0
        cache_dir = Path(cfg.data.cache_dir or Path(cfg.checkpoint.dir) / "data_cache")
        # Rank 0 writes GPTDataset's index cache; the others then read it instead of racing it.
        for turn in (True, False):
            if (topo.rank == 0) == turn:
                self.train, self.valid, _ = build_pretrain_datasets(
                    cfg.data,
                    tokenizer,
                    cfg.train.seed,
                    (derived.steps * global_batch, eval_samples, 0),
                    cache_dir,
                )
            dist.barrier()

    def _loader(self, dataset, consumed: int):
        return build_dataloader(
            dataset,
            micro_batch_size=self.cfg.train.micro_batch_size,
            consumed_samples=consumed,
            data_parallel_rank=self.topo.data_rank,
            data_parallel_size=self.topo.data_parallel,
            num_workers=self.cfg.data.num_workers,
        )

    def train_iterators(self, consumed_samples: int) -> list:
        return [iter(self._loader(self.train, consumed_samples)) for _ in range(self.chunks)]

    def validation_iterators(self) -> list | None:
        if self.valid is None:
            return None
        return [iter(self._loader(self.valid, 0)) for _ in range(self.chunks)]


def check_data_and_vocab(cfg: RecipeConfig, tokenizer: QwenTokenizer) -> None:
    if not cfg.data.paths:
        raise ConfigError(
            "data.paths: no training data; tokenize some with `specialize data prepare DIR -o PREFIX`"
        )
    padded = cfg.model.architecture().padded_vocab_size
    if tokenizer.vocab_size > padded:
        raise ConfigError(
            f"model.tokenizer: {tokenizer.vocab_file} has {tokenizer.vocab_size} tokens, more than the "
            f"{padded}-entry embedding of {cfg.model.preset}"
        )


def train(cfg: RecipeConfig) -> Trainer:
    """Run a whole training job in this process (one rank of a torchrun world)."""
    tokenizer = QwenTokenizer.load(cfg.model.tokenizer)
    check_data_and_vocab(cfg, tokenizer)
    topo = init_distributed(cfg.parallel)
    derived = derive(cfg, topo.world_size)
    seed_all(cfg.train.seed)
    if topo.rank == 0:
        Path(cfg.checkpoint.dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.checkpoint.dir) / "config.yaml").write_text(to_yaml(cfg))
        log.info(
            "%s: %s on %d process(es) (TP=%d PP=%d DP=%d), %d steps of %d tokens",
            cfg.name,
            cfg.model.preset,
            topo.world_size,
            cfg.parallel.tensor,
            cfg.parallel.pipeline,
            derived.data_parallel,
            derived.steps,
            derived.tokens_per_step,
        )
    engine = Engine.build(cfg, topo, derived)
    data = PretrainData(cfg, topo, derived, tokenizer)
    trainer = Trainer(cfg, topo, derived, engine, data)
    trainer.fit()
    return trainer
