"""The processes ``specialize gpu-check`` starts under torchrun; rank 0 writes a JSON result.

``train OUT RECIPE [key=value ...] [--no-save]`` runs a recipe with the functions behind
``specialize train`` (``load_config``, ``check_machine``, ``run.train``) and records its losses,
the trainer's metrics and the peak of ``torch.cuda.max_memory_allocated`` over the ranks.
``--no-save`` trains without checkpoints or TensorBoard (a throughput measurement).

``probe OUT`` (no torchrun) reports the CUDA devices, whether Transformer Engine imports, its
version, and whether it can run FP8 here.

``isolation OUT RUN_CONFIG CHECKPOINT PACKED_A PACKED_B`` loads the checkpoint into the model of a
run's recipe and compares the logits of the first sample of two packed sequences that differ only
in what follows it, attention kept apart the way that recipe trains (THD with the te spec).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def _rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _write(path: str, doc: dict[str, Any]) -> None:
    if _rank0():
        tmp = Path(path).with_name(f".{Path(path).name}.tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, path)


def peak_memory(device: torch.device) -> int | None:
    """Max over the ranks of ``torch.cuda.max_memory_allocated`` (None without CUDA)."""
    if device.type != "cuda":
        return None
    peak = torch.tensor([torch.cuda.max_memory_allocated(device)], device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return int(peak.item())


def layer_class(engine) -> str:
    """The class of the first layer's QKV projection: which layer spec the engine built."""
    module = engine.model[0].module
    return type(module.decoder.layers[0].self_attention.linear_qkv).__name__


def _train_without_saving(cfg):
    """``run.train`` without the checkpointer, TensorBoard or run-directory lock."""
    from base.tokenizer import QwenTokenizer
    from specialize.config import derive
    from specialize.mcore.distributed import init_distributed, seed_all
    from specialize.train.callbacks import ConsoleLogger
    from specialize.train.engine import Engine
    from specialize.train.run import build_data, check_data_and_vocab
    from specialize.train.trainer import Trainer

    tokenizer = QwenTokenizer.load(cfg.model.tokenizer)
    check_data_and_vocab(cfg, tokenizer)
    topo = init_distributed(cfg.parallel)
    derived = derive(cfg, topo.world_size)
    seed_all(cfg.train.seed)
    engine = Engine.build(cfg, topo, derived)
    data = build_data(cfg, topo, derived, tokenizer)
    trainer = Trainer(cfg, topo, derived, engine, data, callbacks=[ConsoleLogger()])
    trainer.fit()
    return trainer


def train_job(out: str, recipe: str, overrides: list[str], save: bool) -> None:
    from specialize.config import check_machine, load_config
    from specialize.train.run import train

    cfg = load_config(recipe, overrides)
    check_machine(cfg)
    trainer = train(cfg) if save else _train_without_saving(cfg)
    # The run's metrics gain its peak memory, which the console line does not log.
    trainer.metrics["max_memory_allocated"] = peak_memory(trainer.topo.device)
    _write(
        out,
        {
            "losses": trainer.history,
            "start_step": trainer.start_step,
            "resumed_from": str(trainer.resumed_from) if trainer.resumed_from else None,
            "checkpoint": str(trainer.last_checkpoint) if trainer.last_checkpoint else None,
            "metrics": trainer.metrics,
            "layer": layer_class(trainer.engine),
            "world_size": trainer.topo.world_size,
        },
    )


def _first_sample_end(item: dict[str, torch.Tensor]) -> int:
    """Positions of a packed sequence's first sample (position ids restart at the next one)."""
    restarts = (item["position_ids"][1:] == 0).nonzero()
    return int(restarts[0]) + 1 if len(restarts) else len(item["position_ids"])


def isolation_job(out: str, run_config: str, ckpt: str, packed: list[str]) -> None:
    from base.tokenizer import QwenTokenizer
    from specialize.checkpoint import resolve_checkpoint
    from specialize.checkpoint.state import load_weights
    from specialize.config import derive, load_config
    from specialize.data.sft import SFTSequences, sft_attention
    from specialize.mcore.distributed import init_distributed, seed_all
    from specialize.train.engine import Engine
    from specialize.train.step import packed_seq_params

    scratch = Path(out).with_suffix(".run")
    cfg = load_config(run_config, ["init.checkpoint=null", f"checkpoint.dir={scratch}"])
    topo = init_distributed(cfg.parallel)
    seed_all(cfg.train.seed)
    engine = Engine.build(cfg, topo, derive(cfg, topo.world_size))
    load_weights(engine, resolve_checkpoint(ckpt))
    model = engine.model[0].eval()
    attention = sft_attention(cfg)
    eod = QwenTokenizer.load(cfg.model.tokenizer).eod
    logits, ends = [], []
    with torch.no_grad():
        for path in packed:
            item = SFTSequences(path, cfg.data.seq_length, eod, attention)[0]
            batch = {k: v[None].to(topo.device) for k, v in item.items()}
            packed_params = (
                packed_seq_params(batch["cu_seqlens"]) if "cu_seqlens" in batch else None
            )
            output = model(
                batch["tokens"],
                batch["position_ids"],
                batch.get("attention_mask"),
                packed_seq_params=packed_params,
            )
            logits.append(output[0].float())
            ends.append(_first_sample_end(item))
    n = ends[0]
    if ends[1] != n:
        raise ValueError(f"the first samples differ in length ({ends[0]} vs {ends[1]})")
    diff = (logits[0] - logits[1]).abs()
    _write(
        out,
        {
            "attention": attention,
            "layer": layer_class(engine),
            "sample_positions": n,
            "same": float(diff[:n].max()),
            "neighbours": float(diff[n:].max()),
            "scale": float(logits[0][:n].abs().max()),
        },
    )


def probe_job(out: str) -> None:
    doc: dict[str, Any] = {"count": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    if doc["count"]:
        props = torch.cuda.get_device_properties(0)
        doc.update(
            name=props.name, capability=[props.major, props.minor], memory_bytes=props.total_memory
        )
    try:
        import transformer_engine
        import transformer_engine.pytorch as te

        doc["te_version"] = str(transformer_engine.__version__)
        if doc["count"]:
            # Delayed and per-tensor current scaling share this test (TE v2.9,
            # transformer_engine/pytorch/quantization.py, NVIDIA/TransformerEngine@70f53666).
            available, reason = te.is_fp8_available(return_reason=True)
            doc.update(fp8=bool(available), fp8_reason=str(reason))
    except Exception as e:  # an ABI mismatch with torch shows here, not as a crash of the check
        doc["te_error"] = f"{type(e).__name__}: {e}"
    _write(out, doc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specialize.gpu_check.worker")
    sub = parser.add_subparsers(dest="job", required=True)
    tr = sub.add_parser("train")
    tr.add_argument("out")
    tr.add_argument("recipe")
    tr.add_argument("overrides", nargs="*")
    tr.add_argument("--no-save", action="store_true")
    sub.add_parser("probe").add_argument("out")
    iso = sub.add_parser("isolation")
    iso.add_argument("out")
    iso.add_argument("run_config")
    iso.add_argument("checkpoint")
    iso.add_argument("packed", nargs=2)
    args = parser.parse_args(argv)

    if args.job == "probe":  # before megatron-core is imported: torch and TE only
        probe_job(args.out)
        return 0
    from specialize.cli import _setup_logging
    from specialize.mcore.distributed import shutdown

    _setup_logging()
    try:
        if args.job == "train":
            train_job(args.out, args.recipe, args.overrides, save=not args.no_save)
        else:
            isolation_job(args.out, args.run_config, args.checkpoint, args.packed)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
