"""The ``specialize`` command line.

Each command imports what it runs inside its handler: torch and megatron-core take seconds to
import, and ``specialize --help`` or ``specialize config`` should not wait for them.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
import warnings
from pathlib import Path

from specialize import gpu_check
from specialize.config import (
    ConfigError,
    check_machine,
    derive,
    describe,
    load_config,
)
from specialize.eval.config import DTYPES as EVAL_DTYPES
from specialize.eval.config import EvalConfig, SamplingConfig
from specialize.eval.tasks import MODES, PROTOCOLS
from specialize.plan import DEFAULT_HEADROOM, DEFAULT_MFU, DTYPES, FP8_EFFICIENCY, GPUS

# megatron-core announces every optional kernel it falls back from; on CPU these are expected. Its
# checkpoint loader also calls a torch API that torch has deprecated (not ours to change).
for _message in (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    "full scope is deprecated",
    "`load_state_dict` is deprecated",
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
    # A dry run plans a run whose init may not be imported yet; the summary marks it missing.
    cfg = load_config(args.recipe, args.overrides, require_paths=not args.dry_run)
    check_machine(cfg, planning=args.dry_run)
    if args.dry_run:
        from specialize.train.dry_run import stages_summary, summary

        world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
        if cfg.stages:
            print(stages_summary(cfg, world), end="")
        else:
            print(summary(cfg, derive(cfg, world), world))
        return 0
    from specialize.mcore.distributed import shutdown
    from specialize.train.run import train, train_stages

    try:
        if cfg.stages:
            runs = train_stages(cfg)
            if int(os.environ.get("RANK", "0")) == 0:
                for run in runs:
                    print(f"{run.stage.label}: {_result(run.trainer) or 'finished earlier'}")
                last = runs[-1]
                if last.trainer is None or last.trainer.finished:
                    print(f"checkpoint: {last.stage.final_checkpoint}")
                else:
                    print(f"stopped in {last.stage.label}; run the recipe again to continue")
        else:
            trainer = train(cfg)
            if trainer.is_rank0 and trainer.last_checkpoint is not None:
                if trainer.history:
                    print(_result(trainer))
                print(f"checkpoint: {trainer.last_checkpoint}")
    except FloatingPointError as e:  # a non-finite or spiking step stopped the run, unsaved
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"training stopped: {e}", file=sys.stderr)
        return 1
    finally:
        shutdown()
    return 0


def _result(trainer) -> str | None:
    """``loss a -> b over n steps`` of a trainer that ran (None if it did not)."""
    if trainer is None:
        return None
    history = trainer.history
    if not history:
        return f"nothing left to train (at step {trainer.step})"
    return f"loss {history[0]:.4f} -> {history[-1]:.4f} over {len(history)} steps"


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from base.tokenizer import QwenTokenizer
    from specialize.data.filters import FilterSettings, resolve_filter_names
    from specialize.data.prepare import PrepareOptions, prepare
    from specialize.data.sources import SourceError, SourceOptions, parse_source
    from specialize.eval.tasks import TaskError
    from specialize.plugins import load_plugins

    load_plugins()  # languages, corpus filters and evaluation tasks of the domain packages

    def names(value: str | None) -> tuple[str, ...] | None:
        return None if value is None else tuple(p.strip() for p in value.split(",") if p.strip())

    try:
        task_data = tuple(_key_value(item, "--task-data") for item in args.task_data)
        extensions = names(args.extensions)
        options = PrepareOptions(
            sources=SourceOptions(
                extensions=extensions
                and tuple(e if e.startswith(".") else f".{e}" for e in extensions),
                text_field=args.text_field,
                language_field=args.language_field,
                **({} if args.exclude is None else {"exclude_dirs": names(args.exclude)}),
            ),
            filters=tuple(resolve_filter_names(args.filters)),
            settings=FilterSettings(
                max_bytes=args.max_bytes,
                max_line_length=args.max_line_length,
                max_mean_line_length=args.max_mean_line_length,
                min_alphanumeric_fraction=args.min_alphanumeric_fraction,
            ),
            near_dedup_threshold=args.near_dedup_threshold,
            decontaminate=names(args.decontaminate) or (),
            task_data=task_data,
            decontamination_ngram=args.decontamination_ngram,
            shard_documents=args.shard_documents,
            workers=(0 if args.engine == "ray" else 2) if args.workers is None else args.workers,
            processes=args.processes,
            engine=args.engine,
        )
        manifest = prepare(
            [parse_source(s) for s in args.sources],
            args.output,
            QwenTokenizer.load(args.tokenizer),
            options,
            progress=sys.stderr.isatty(),
            rebuild=args.rebuild,
        )
    except (SourceError, TaskError, ValueError, FileNotFoundError) as e:
        print(f"data prepare: {e}", file=sys.stderr)
        return 2
    print(
        f"{args.output}: {manifest['documents']:,} of {manifest['input_documents']:,} documents, "
        f"{manifest['tokens']:,} tokens in {len(manifest['shards'])} shards"
    )
    _print_removals("removed", manifest["removed"], manifest["removed_examples"], args.output)
    for language, counts in manifest["languages"].items():
        print(f"  {language}: {counts['documents']:,} documents, {counts['tokens']:,} tokens")
    return 0


def _print_removals(verb: str, counts: dict, examples: dict, output: str) -> None:
    """Each reason's count, with its first few examples as ``where: detail``."""
    for reason, n in counts.items():
        if not n:
            continue
        print(f"  {verb} {n:,} {reason}")
        shown = examples.get(reason, [])[:3]
        for example in shown:
            if isinstance(example, str):
                print(f"    {example}")
            else:
                where = example.get("document") or example.get("record")
                print(f"    {where}: {example['detail']}")
        if n > len(shown):
            print(f"    ... {n - len(shown):,} more (examples in {output}/manifest.json)")


def cmd_data_prepare_sft(args: argparse.Namespace) -> int:
    from base.tokenizer import QwenTokenizer
    from specialize.data.sft_prepare import SFTDataError, SFTOptions, prepare_sft
    from specialize.data.sources import SourceError, parse_source

    try:
        options = SFTOptions(
            seq_length=args.seq_len,
            pack=args.pack,
            mask_policy=args.mask_policy,
            overlong=args.overlong,
            on_error=args.on_error,
            **({} if args.system is None else {"system": args.system}),
        )
        sources = [parse_source(s) for s in args.files]
        for source in sources:
            if source.kind not in ("jsonl", "parquet", "hub"):
                raise SourceError(
                    f"{source.location}: expected .jsonl, .jsonl.gz, .parquet or hf:NAME"
                )
        manifest = prepare_sft(sources, args.output, QwenTokenizer.load(args.tokenizer), options)
    except (SourceError, SFTDataError, ValueError, FileNotFoundError) as e:
        print(f"data prepare-sft: {e}", file=sys.stderr)
        return 2
    tokens = manifest["tokens"]
    print(
        f"{args.output}: {manifest['samples']:,} samples of {manifest['records']:,} records in "
        f"{manifest['sequences']:,} sequences of {args.seq_len} ({'packed' if args.pack else 'one each'})"
    )
    print(
        f"  tokens: {tokens['learned']:,} learned, {tokens['masked']:,} masked "
        f"({tokens['learned_fraction']:.1%} learned), {tokens['padding']:,} padding"
    )
    _print_removals("skipped", manifest["skipped"], manifest["skipped_examples"], args.output)
    if manifest["truncated"]:
        print(f"  truncated {manifest['truncated']:,}")
    return 0


def cmd_data_inspect_sft(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.text import Text

    from base.tokenizer import QwenTokenizer
    from specialize.data.sft_prepare import inspect_samples, read_sft_manifest

    try:
        manifest = read_sft_manifest(args.path)
        samples = inspect_samples(args.path, QwenTokenizer.load(args.tokenizer), args.n)
    except (FileNotFoundError, ValueError) as e:
        print(f"data inspect-sft: {e}", file=sys.stderr)
        return 2
    console = Console(highlight=False)
    color = console.is_terminal
    legend = "learned tokens in green, masked in grey" if color else "learned tokens between «»"
    console.print(f"{args.path}: {manifest['samples']:,} samples; {legend}")
    for i, runs in enumerate(samples):
        console.rule(f"sample {i}")
        text = Text()
        for piece, learned in runs:
            if color:
                text.append(piece, style="bold green" if learned else "bright_black")
            else:
                text.append(f"«{piece}»" if learned else piece)
        console.print(text)
    tokens = manifest["tokens"]
    console.rule()
    console.print(
        f"learned {tokens['learned']:,} of {tokens['positions']:,} tokens "
        f"({tokens['learned_fraction']:.1%}); {tokens['padding']:,} padding positions; mask "
        f"policy {manifest['options']['mask_policy']}"
    )
    return 0


def _key_value(item: str, flag: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key or not value:
        raise ValueError(f"{flag} {item!r}: expected NAME=VALUE")
    return key, value


def _convert(run, *args, **kwargs) -> dict | None:
    """Run a conversion; a bad checkpoint is a message and exit code 2, not a traceback."""
    from base.hf_checkpoint import HFCheckpointError
    from specialize.mcore.distributed import shutdown

    try:
        return run(*args, **kwargs)
    except HFCheckpointError as e:
        print(f"conversion error: {e}", file=sys.stderr)
        return None
    finally:
        shutdown()


def cmd_convert_import(args: argparse.Namespace) -> int:
    import json

    from specialize.convert.hf import import_hf

    report = _convert(
        import_hf,
        args.hf,
        args.output,
        tp=args.tp,
        pp=args.pp,
        dtype=args.dtype,
        allow_nonfinite=args.allow_nonfinite,
    )
    if report is None:
        return 2
    print(json.dumps(report, indent=2))
    print(f"checkpoint: {args.output} (train with init={args.output})")
    return 0


def cmd_convert_export(args: argparse.Namespace) -> int:
    import json

    from specialize.convert.hf import export_hf

    report = _convert(export_hf, args.checkpoint, args.output, fmt=args.format)
    if report is None:
        return 2
    print(json.dumps(report, indent=2))
    return 0


def cmd_convert_verify(args: argparse.Namespace) -> int:
    from base.hf_checkpoint import HFCheckpointError
    from specialize.convert.parity import ParityError, verify
    from specialize.mcore.distributed import shutdown

    try:
        lines = verify(args.hf, args.ckpt, tp=args.tp, pp=args.pp, tolerance=args.tolerance)
    except ParityError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"parity check FAILED: {e}", file=sys.stderr)
        return 1
    except HFCheckpointError as e:
        print(f"conversion error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    if int(os.environ.get("RANK", "0")) == 0:
        print("\n".join(lines) + "\nparity check passed")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Write a comparison report (markdown + PNG charts) of `specialize eval` results files."""
    from specialize.eval.report import ReportError, compare

    try:
        report = compare(args.results, args.output, base=args.base, paper=not args.no_paper)
    except ReportError as e:
        print(f"compare: {e}", file=sys.stderr)
        return 2
    print(f"report: {report}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from specialize.eval.config import load_eval_config
    from specialize.eval.tasks import TaskError
    from specialize.plugins import PluginError

    try:
        overrides, given = _eval_flags(args)
        cfg = load_eval_config(args.config, overrides, given)
        from specialize.eval.run import run  # torch and megatron-core: once the config is good

        run(cfg, progress=sys.stderr.isatty())
    except (TaskError, PluginError, ValueError, OSError) as e:
        print(f"eval: {e}", file=sys.stderr)
        return 2
    return 0


# A word after `eval` is a key=value override when its key is a field name (dotted), else the
# checkpoint: a checkpoint path may hold "=" (runs/lr=3e-5) but not only word characters before it.
_OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=")
# `eval` flags whose EvalConfig field is under `sampling`; the others are fields of their name.
_SAMPLING_FLAGS = tuple(f.name for f in dataclasses.fields(SamplingConfig))
_EVAL_FLAGS = tuple(f.name for f in dataclasses.fields(EvalConfig) if f.name != "checkpoint")


def _eval_flags(args: argparse.Namespace) -> tuple[list[str], dict[str, object]]:
    """The ``key=value`` words of ``specialize eval``, and the flags given (no defaults: those
    are ``EvalConfig``'s) as ``EvalConfig`` fields."""
    words = [args.checkpoint] if "checkpoint" in args else []
    words += getattr(args, "overrides", [])
    overrides = [word for word in words if _OVERRIDE.match(word)]
    checkpoints = [word for word in words if not _OVERRIDE.match(word)]
    if len(checkpoints) > 1:
        raise ValueError(f"one checkpoint, got {' '.join(checkpoints)} (overrides are key=value)")
    flags = vars(args)
    given: dict[str, object] = {name: flags[name] for name in _EVAL_FLAGS if name in flags}
    if checkpoints:
        given["checkpoint"] = checkpoints[0]
    if "tasks" in flags:
        given["tasks"] = _names(flags["tasks"])
    if "data" in flags:
        given["data"] = dict(_key_value(item, "--data") for item in flags["data"])
    if "lengths" in flags:
        try:
            given["lengths"] = [int(n) for n in _names(flags["lengths"])]
        except ValueError:
            raise ValueError(
                f"--lengths {flags['lengths']!r}: expected comma-separated integers"
            ) from None
    if "long_context" in flags:
        given["long_context"] = _names(flags["long_context"])
    sampling = {name: flags[name] for name in _SAMPLING_FLAGS if name in flags}
    if sampling:
        given["sampling"] = sampling
    return overrides, given


def _names(value: str) -> list[str]:
    """``a, b,`` as ``[a, b]``."""
    return [part.strip() for part in value.split(",") if part.strip()]


class _HelpWithTasks(argparse.Action):
    """``eval --help``: the usual help, then the tasks the installed plugins register. The
    plugins are imported only here, so other commands (and ``eval`` itself) do not pay for it."""

    def __init__(
        self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None
    ):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.print_help()
        print(f"\n{_task_listing()}")
        parser.exit()


def _task_listing() -> str:
    """One line per task: name, the modes it can be evaluated in, description."""
    from specialize.eval import perplexity  # noqa: F401  (registers the perplexity task)
    from specialize.eval.tasks import LikelihoodTask, TaskError, get_task, task_names
    from specialize.plugins import PluginError

    try:
        names = task_names()
    except PluginError as e:
        return f"tasks: cannot list them: {e}"
    rows = []
    for name in names:
        task = get_task(name)
        if isinstance(task, LikelihoodTask):
            rows.append((name, "needs a checkpoint", task.description))
            continue
        modes = []
        for mode in MODES:
            try:
                task.protocol(mode)
                modes.append(mode)
            except TaskError:
                pass
        rows.append((name, ", ".join(modes) or "data only", task.description))
    width = max(len(name) for name, _, _ in rows)
    modes_width = max(len(modes) for _, modes, _ in rows)
    lines = [f"  {n:<{width}}  {m:<{modes_width}}  {d}" for n, m, d in rows]
    return "tasks (--tasks; modes for --mode):\n" + "\n".join(lines)


def cmd_pipeline(args: argparse.Namespace) -> int:
    import shlex

    from specialize.pipeline import Pipeline, StepFailed, load_pipeline

    cfg = load_pipeline(args.pipeline, args.overrides)
    rerun = shlex.join(["specialize", "pipeline", args.pipeline, *args.overrides])
    pipeline = Pipeline(cfg, rerun=rerun)
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    unknown = sorted(set(only or ()) - {s.name for s in cfg.steps})
    if unknown:
        print(f"pipeline: --only {', '.join(unknown)}: no such step", file=sys.stderr)
        return 2
    try:
        pipeline.run(only)
    except StepFailed as e:
        print(f"pipeline: {e}", file=sys.stderr)
        return 1
    for step in cfg.steps:
        report = pipeline.step_dir(step) / "report.md"
        if step.kind == "compare" and report.is_file():
            text = report.read_text()
            scores = text.split("## Scores", 1)[1].split("\n## ", 1)[0]
            print(f"{report}:\n## Scores{scores}")
    print(f"lineage: {pipeline.root / 'lineage.json'}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from specialize.plan import PlanError, format_plan, load_recipe_for_plan, plan

    configs = load_recipe_for_plan(args.recipe, args.overrides)
    out = []
    try:
        for cfg in configs:
            result = plan(
                cfg,
                args.gpus,
                args.gpu,
                tp=args.tp,
                pp=args.pp,
                mfu=args.mfu,
                micro_batch=args.micro_batch,
                dtype=args.dtype,
                headroom=args.headroom,
                fp8_speedup=args.fp8_speedup,
            )
            out.append(format_plan(result))
    except PlanError as e:
        print(f"plan: {e}", file=sys.stderr)
        return 2
    print("\n".join(out), end="")
    return 0


def cmd_gpu_check(args: argparse.Namespace) -> int:
    from specialize.gpu_check.checks import CHECKS

    try:
        selected = gpu_check.select(args.only, [c.name for c in CHECKS])
    except ValueError as e:
        print(f"gpu-check: {e}", file=sys.stderr)
        return 2
    work = Path(args.work_dir)
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"gpu-check: --work-dir {work}: {e.strerror or e}", file=sys.stderr)
        return 2
    return gpu_check.gpu_check(work, selected, args.timeout)


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
        help="print the resolved config and derived numbers (per stage: length, warmup, resets, "
        "init and LR curve), then exit",
    )
    train.add_argument(
        "--world-size", type=int, default=None, help="process count assumed by --dry-run"
    )
    train.set_defaults(func=cmd_train)

    data = sub.add_parser("data", help="prepare training data").add_subparsers(
        dest="data_command", required=True
    )
    prepare = data.add_parser(
        "prepare",
        help="filter, deduplicate, decontaminate and tokenize a corpus into Megatron shards",
        description="Sources: directories of source files (language by extension), single "
        "files, .jsonl/.jsonl.gz and .parquet files with a text field, or hf:NAME[:CONFIG][@SPLIT] "
        "datasets. Re-running skips finished shards whose input documents are unchanged (changed "
        "ones are an error, or replaced with --rebuild); an interrupted run resumes.",
    )
    prepare.add_argument(
        "sources",
        nargs="+",
        help="directories, files (local paths or fsspec URLs such as s3://...) or hf:NAME datasets",
    )
    prepare.add_argument(
        "-o", "--output", required=True, help="output directory (shards + manifest.json)"
    )
    prepare.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="where the per-document work runs: local (this machine) or ray (the Ray cluster at "
        "RAY_ADDRESS, or a new local one; needs pip install '.[scale]'); the output is the same",
    )
    prepare.add_argument(
        "--workers",
        type=int,
        default=None,
        help="local: worker threads (default 2; 0: none, all inline); ray: actors of one CPU "
        "each (default 0: one per CPU of the cluster)",
    )
    prepare.add_argument(
        "--processes",
        action="store_true",
        help="run the workers as processes: for many cores, where the Python parts that hold "
        "the GIL would limit threads",
    )
    prepare.add_argument(
        "--filters",
        default="default",
        help="comma-separated filters, or default (all but near-dedup), all, none "
        "(none: the corpus was cleaned elsewhere)",
    )
    prepare.add_argument(
        "--extensions",
        default=None,
        help="comma-separated file extensions to take from directories (default: every known "
        "language)",
    )
    prepare.add_argument(
        "--exclude",
        default=None,
        help="comma-separated directory names to skip (default: site-packages, dist-packages, "
        "__pycache__, .git)",
    )
    prepare.add_argument("--text-field", default="text", help="text field of JSONL/Parquet rows")
    prepare.add_argument(
        "--language-field", default=None, help="language field of JSONL/Parquet rows"
    )
    prepare.add_argument(
        "--decontaminate",
        default="humaneval",
        help="evaluation tasks whose prompts/solutions are removed from the corpus "
        "(comma-separated registry names; tasks without packaged data need --task-data)",
    )
    prepare.add_argument(
        "--task-data",
        action="append",
        default=[],
        metavar="TASK=PATH",
        help="local data file of an evaluation task (repeatable)",
    )
    prepare.add_argument(
        "--decontamination-ngram", type=int, default=13, help="n-gram length for decontamination"
    )
    prepare.add_argument(
        "--near-dedup-threshold", type=float, default=0.85, help="MinHash Jaccard threshold"
    )
    prepare.add_argument("--max-bytes", type=int, default=1_000_000, help="size filter cap")
    prepare.add_argument("--max-line-length", type=int, default=1000, help="long-lines cap")
    prepare.add_argument(
        "--max-mean-line-length", type=float, default=100.0, help="minified: mean line cap"
    )
    prepare.add_argument(
        "--min-alphanumeric-fraction", type=float, default=0.25, help="alphanumeric: floor"
    )
    prepare.add_argument(
        "--shard-documents", type=int, default=50_000, help="input documents per shard"
    )
    prepare.add_argument(
        "--tokenizer", default=None, help="qwen.tiktoken path (default: the packaged one)"
    )
    prepare.add_argument(
        "--rebuild",
        action="store_true",
        help="discard an earlier output in the directory (from other inputs or options) and "
        "prepare it anew",
    )
    prepare.set_defaults(func=cmd_data_prepare)

    sft = data.add_parser(
        "prepare-sft",
        help="chat JSONL -> ChatML token ids + loss masks (optionally packed) for SFT",
        description='Records: {"messages": [{"role", "content"}, ...]} or {"prompt", "response"} '
        '(optionally "system"), in .jsonl/.jsonl.gz/.parquet files or hf:NAME datasets.',
    )
    sft.add_argument("files", nargs="+", help="JSONL/Parquet files or hf:NAME datasets")
    sft.add_argument("-o", "--output", required=True, help="output directory")
    sft.add_argument("--seq-len", type=int, required=True, help="positions per training sequence")
    sft.add_argument("--pack", action="store_true", help="pack several samples per sequence")
    sft.add_argument(
        "--mask-policy",
        default="assistant",
        choices=("assistant", "qwen-repo"),
        help="assistant: learn assistant turns and their <|im_end|>; qwen-repo: also every "
        "turn's <|im_start|>/<|im_end|>/newline",
    )
    sft.add_argument("--system", default=None, help="system prompt for records without one")
    sft.add_argument(
        "--overlong", default="drop", choices=("drop", "truncate"), help="samples over --seq-len"
    )
    sft.add_argument(
        "--on-error", default="skip", choices=("skip", "fail"), help="bad records: count or stop"
    )
    sft.add_argument("--tokenizer", default=None, help="qwen.tiktoken path")
    sft.set_defaults(func=cmd_data_prepare_sft)

    inspect = data.add_parser(
        "inspect-sft", help="show prepared SFT samples with learned and masked tokens marked"
    )
    inspect.add_argument("path", help="a `data prepare-sft` output directory")
    inspect.add_argument("--n", type=int, default=3, help="samples to show")
    inspect.add_argument("--tokenizer", default=None, help="qwen.tiktoken path")
    inspect.set_defaults(func=cmd_data_inspect_sft)

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
    imp.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="import tensors holding NaN/Inf (default: refuse them, naming the first)",
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

    comp = sub.add_parser(
        "compare",
        help="compare `specialize eval` results: report.md + PNG charts, paper numbers as "
        "reference rows",
    )
    comp.add_argument("results", nargs="+", help="results JSON files, one model each")
    comp.add_argument("-o", "--output", required=True, help="directory for report.md and charts")
    comp.add_argument(
        "--base", default=None, help="label of the model deltas are taken against (default: first)"
    )
    comp.add_argument(
        "--no-paper",
        action="store_true",
        help="leave out the paper's numbers (the tasks ran on other data, e.g. generated problems)",
    )
    comp.set_defaults(func=cmd_compare)

    ev = sub.add_parser(
        "eval",
        help="score model completions on evaluation tasks (HumanEval, MBPP, GSM8K, MATH, ...)",
        description='Completions: JSONL lines {"task", "id", "completion"}; several lines per id '
        "give pass@k. Prompts, stop sequences and grading follow each task's protocol in --mode. "
        "Every option is also a field of an eval config (--max-new-tokens is max_new_tokens, "
        "--samples/--temperature/--top-p/--seed/--repetition-penalty are sampling.*): --config "
        "FILE reads one, "
        "key=value words override it (data.mbpp=PATH, sampling.temperature=0.8), and the flags "
        "given override both.",
        add_help=False,
        argument_default=argparse.SUPPRESS,  # unset flags keep the config's value
    )
    ev.add_argument(
        "-h", "--help", action=_HelpWithTasks, help="show this help and the tasks, then exit"
    )
    ev.add_argument(
        "checkpoint",
        nargs="?",
        help="checkpoint to generate completions from (greedy by default); with --score, only "
        "recorded as where the completions came from",
    )
    ev.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="overrides of the config's fields, e.g. limit=5 data.gsm8k=PATH (right after the "
        "checkpoint, or after --config FILE)",
    )
    ev.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="eval config YAML (fields as the flags; configs/eval/example.yaml)",
    )
    ev.add_argument("--score", metavar="COMPLETIONS.jsonl", help="completions to grade")
    ev.add_argument("--tasks", help="comma-separated task names, e.g. humaneval,gsm8k")
    ev.add_argument(
        "--data",
        action="append",
        metavar="TASK=PATH",
        help="local data file of a task, in its published schema (repeatable)",
    )
    ev.add_argument(
        "--mode",
        choices=MODES,
        help="base: few-shot completion prompts; chat: 0-shot ChatML user turn",
    )
    ev.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        help="robust (default): this project's prompts and graders; paper: the script behind the "
        "paper's number, byte for byte (results record which)",
    )
    ev.add_argument("--label", help="model name in the results (default: file stem)")
    ev.add_argument("--workers", type=int, help="parallel sandboxed program runs")
    ev.add_argument("-o", "--output", help="results JSON to write (required)")
    ev.add_argument("--limit", type=int, help="first N problems of each task")
    ev.add_argument("--samples", type=int, help="completions per problem (pass@k)")
    ev.add_argument(
        "--max-new-tokens",
        type=int,
        help="generation budget instead of each task protocol's (recorded in the results)",
    )
    ev.add_argument("--temperature", type=float, help="0: greedy")
    ev.add_argument("--top-p", type=float, help="nucleus sampling threshold")
    ev.add_argument("--seed", type=int, help="sampling seed")
    ev.add_argument(
        "--repetition-penalty",
        type=float,
        help="transformers' repetition penalty, 1: none (default: the protocol's; under paper, "
        "the reference script's, usually the checkpoint's generation_config.json)",
    )
    ev.add_argument("--tp", type=int, help="tensor parallel size (run under torchrun)")
    ev.add_argument("--pp", type=int, help="pipeline parallel size (torchrun)")
    ev.add_argument(
        "--dtype",
        choices=EVAL_DTYPES,
        help="precision the checkpoint runs in (default: its training run's precision.dtype, "
        "fp8 as bf16; an import's stored dtype); recorded in the results",
    )
    ev.add_argument(
        "--lengths",
        help="task perplexity: comma-separated context lengths (default: the model's "
        "max_position_embeddings); --limit caps the windows per length",
    )
    ev.add_argument(
        "--long-context",
        metavar="VARIANTS",
        help="task perplexity: also measure with each of these comma-separated option sets, e.g. "
        "none,ntk,logn,ntk+logn,ntk+logn+window (ntk: dynamic NTK RoPE, logn: LogN attention, "
        "window: training-length windows in the lower half of the layers); writes "
        "RESULTS.perplexity.md and .png",
    )
    ev.set_defaults(func=cmd_eval)

    pipe = sub.add_parser(
        "pipeline",
        help="run a pipeline: data, training recipes, evaluation and report as named steps",
    )
    pipe.add_argument("pipeline", help="pipeline YAML (configs/demo/factory.yaml, ...)")
    pipe.add_argument("overrides", nargs="*", help="key=value overrides, e.g. dir=runs/other")
    pipe.add_argument("--only", default=None, help="comma-separated step names to run")
    pipe.set_defaults(func=cmd_pipeline)

    plan = sub.add_parser(
        "plan",
        help="per-GPU memory, a TP/PP/micro-batch that fits, step time and GPU-hours of a recipe",
    )
    plan.add_argument("recipe", help="YAML recipe")
    plan.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.seq_length=4096")
    plan.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    plan.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="GPU type")
    plan.add_argument("--tp", type=int, default=None, help="pin tensor-parallel size")
    plan.add_argument("--pp", type=int, default=None, help="pin pipeline-parallel size")
    plan.add_argument("--micro-batch", type=int, default=None, help="micro-batch of the recipe row")
    plan.add_argument("--dtype", choices=DTYPES, default=None, help="default: the recipe's")
    plan.add_argument(
        "--mfu",
        type=float,
        default=DEFAULT_MFU,
        help=f"fraction of the BF16 peak achieved by the compute (default {DEFAULT_MFU})",
    )
    plan.add_argument(
        "--fp8-speedup",
        type=float,
        default=None,
        help=f"FP8 speedup on GEMM FLOPs (default FP8/BF16 peak ratio x {FP8_EFFICIENCY})",
    )
    plan.add_argument(
        "--headroom",
        type=float,
        default=DEFAULT_HEADROOM,
        help=f"fraction of GPU memory a layout may use; the rest stays free for the allocator's "
        f"cache and fragmentation (default {DEFAULT_HEADROOM})",
    )
    plan.set_defaults(func=cmd_plan)

    check = sub.add_parser(
        "gpu-check",
        help="check the GPU path on this machine's GPUs: TE, specs, TP/PP/SP, resume, eval, FP8, "
        "throughput against the plan",
        description=gpu_check.__doc__.split("\n\n", 1)[1].rsplit("\n\n", 1)[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit code: 0 all checks that ran passed, 1 a check failed, 3 no CUDA device",
    )
    check.add_argument(
        "--work-dir",
        default=gpu_check.DEFAULT_WORK_DIR,
        help=f"data, runs, logs and gpu-check.json (default {gpu_check.DEFAULT_WORK_DIR})",
    )
    check.add_argument(
        "--only", default=None, help="comma-separated check numbers or names, e.g. 1,fp8"
    )
    check.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        help="seconds any one command may take before its check fails (default 3600)",
    )
    check.set_defaults(func=cmd_gpu_check)

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
