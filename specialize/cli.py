"""The ``specialize`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from specialize.config import ConfigError, derive, describe, load_config, summary

# megatron-core announces every optional kernel it falls back from; on CPU these are expected.
for _message in (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    "full scope is deprecated",
):
    warnings.filterwarnings("ignore", message=f".*{_message}")


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its INFO lines describe internals


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.recipe, args.overrides)
    if args.dry_run:
        world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
        print(summary(cfg, derive(cfg, world), world))
        return 0
    from specialize.distributed import shutdown
    from specialize.run import train

    try:
        trainer = train(cfg)
        if trainer.is_rank0 and trainer.last_checkpoint is not None:
            first, last = trainer.history[:1], trainer.history[-1:]
            if first and last:
                print(f"loss {first[0]:.4f} -> {last[0]:.4f} over {len(trainer.history)} steps")
            print(f"checkpoint: {trainer.last_checkpoint}")
    finally:
        shutdown()
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    import json

    from base.tokenizer import QwenTokenizer
    from specialize.data.prepare import prepare_directory

    tokenizer = QwenTokenizer.load(args.tokenizer)
    extensions = tuple(e if e.startswith(".") else f".{e}" for e in args.extensions.split(","))
    exclude = (
        {}
        if args.exclude is None
        else {"exclude_dirs": tuple(d for d in args.exclude.split(",") if d)}
    )
    manifest = prepare_directory(
        [Path(s) for s in args.sources],
        Path(args.output),
        tokenizer,
        extensions=extensions,
        num_threads=args.workers,
        **exclude,
    )
    print(
        json.dumps(
            {k: manifest[k] for k in ("documents", "tokens", "skipped") if k in manifest}, indent=2
        )
    )
    return 0


def _convert(run, *args, **kwargs) -> dict | None:
    """Run a conversion; a bad checkpoint is a message and exit code 2, not a traceback."""
    from base.hf_checkpoint import HFCheckpointError
    from specialize.distributed import shutdown

    try:
        return run(*args, **kwargs)
    except HFCheckpointError as e:
        print(f"conversion error: {e}", file=sys.stderr)
        return None
    finally:
        shutdown()


def cmd_convert_import(args: argparse.Namespace) -> int:
    import json

    from specialize.convert import import_hf

    report = _convert(import_hf, args.hf, args.output, tp=args.tp, pp=args.pp, dtype=args.dtype)
    if report is None:
        return 2
    print(json.dumps(report, indent=2))
    print(f"checkpoint: {args.output} (train with init={args.output})")
    return 0


def cmd_convert_export(args: argparse.Namespace) -> int:
    import json

    from specialize.convert import export_hf

    report = _convert(export_hf, args.checkpoint, args.output, fmt=args.format)
    if report is None:
        return 2
    print(json.dumps(report, indent=2))
    return 0


def cmd_convert_verify(args: argparse.Namespace) -> int:
    from specialize.convert import verify
    from specialize.distributed import shutdown
    from specialize.verify import ParityError

    try:
        lines = verify(args.hf, args.ckpt, tp=args.tp, pp=args.pp, tolerance=args.tolerance)
    except ParityError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"parity check FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        shutdown()
    if int(os.environ.get("RANK", "0")) == 0:
        print("\n".join(lines) + "\nparity check passed")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.recipe:
        from specialize.config import to_yaml

        print(to_yaml(load_config(args.recipe, args.overrides)))
        return 0
    for key, default, doc in describe():
        print(f"{key} = {default}\n    {doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specialize", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train", help="train a recipe (run under torchrun for several processes)"
    )
    train.add_argument("recipe", help="YAML recipe")
    train.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. train.steps=10 init=ckpt/base"
    )
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config and derived numbers, then exit",
    )
    train.add_argument(
        "--world-size", type=int, default=None, help="process count assumed by --dry-run"
    )
    train.set_defaults(func=cmd_train)

    data = sub.add_parser("data", help="prepare training data").add_subparsers(
        dest="data_command", required=True
    )
    prepare = data.add_parser(
        "prepare", help="tokenize directories of text/code files into Megatron .bin/.idx"
    )
    prepare.add_argument("sources", nargs="+", help="directories to read")
    prepare.add_argument(
        "-o",
        "--output",
        required=True,
        help="output prefix (writes PREFIX.bin/.idx/.manifest.json)",
    )
    prepare.add_argument("--extensions", default=".py", help="comma-separated file extensions")
    prepare.add_argument(
        "--exclude",
        default=None,
        help="comma-separated directory names to skip (default: site-packages, dist-packages, __pycache__, .git)",
    )
    prepare.add_argument("--workers", type=int, default=2, help="tokenizer threads")
    prepare.add_argument(
        "--tokenizer", default=None, help="qwen.tiktoken path (default: the packaged one)"
    )
    prepare.set_defaults(func=cmd_data_prepare)

    convert = sub.add_parser("convert", help="convert checkpoints").add_subparsers(
        dest="convert_command", required=True
    )
    imp = convert.add_parser(
        "import", help="Hugging Face Qwen (v1 or Qwen2 layout) -> megatron-core checkpoint"
    )
    imp.add_argument(
        "--hf", required=True, help="Hugging Face checkpoint directory (config.json + weights)"
    )
    imp.add_argument("-o", "--output", required=True, help="checkpoint directory to write")
    imp.add_argument(
        "--tp", type=int, default=1, help="tensor-parallel size it is meant for (checked)"
    )
    imp.add_argument(
        "--pp", type=int, default=1, help="pipeline-parallel size it is meant for (checked)"
    )
    imp.add_argument(
        "--dtype",
        choices=("bf16", "fp32"),
        default=None,
        help="cast (default: keep the stored dtype)",
    )
    imp.set_defaults(func=cmd_convert_import)
    exp = convert.add_parser("export", help="megatron-core checkpoint -> Hugging Face directory")
    exp.add_argument(
        "checkpoint", help="checkpoint directory or run directory (its newest checkpoint)"
    )
    exp.add_argument("-o", "--output", required=True, help="directory to write")
    exp.add_argument(
        "--format",
        choices=("qwen2", "qwen"),
        default="qwen2",
        help="qwen2: Qwen2ForCausalLM names (loads in transformers without remote code); qwen: Qwen v1 names",
    )
    exp.set_defaults(func=cmd_convert_export)
    ver = convert.add_parser(
        "verify", help="per-layer parity of a checkpoint against transformers (torchrun for TP/PP)"
    )
    ver.add_argument(
        "--hf", required=True, help="Hugging Face checkpoint directory (the reference)"
    )
    ver.add_argument("--ckpt", required=True, help="megatron-core checkpoint (or run directory)")
    ver.add_argument("--tp", type=int, default=1)
    ver.add_argument("--pp", type=int, default=1)
    ver.add_argument(
        "--tolerance", type=float, default=1e-4, help="max |Δ| per layer and on the logits (fp32)"
    )
    ver.set_defaults(func=cmd_convert_verify)

    config = sub.add_parser("config", help="show every config field, or a recipe resolved")
    config.add_argument("recipe", nargs="?")
    config.add_argument("overrides", nargs="*")
    config.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> None:
    _setup_logging()
    args = build_parser().parse_args(argv)
    try:
        sys.exit(args.func(args))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # errors with a message meant for the user, not a traceback
        from specialize.checkpoint import CheckpointError

        if not isinstance(e, CheckpointError):
            raise
        print(f"checkpoint error: {e}", file=sys.stderr)
        sys.exit(2)
