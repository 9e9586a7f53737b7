"""``specialize eval --tasks perplexity``: perplexity of a checkpoint on held-out text.

A likelihood task (``tasks.LikelihoodTask``), registered when this module is imported. Documents
are read from ``--data perplexity=PATH[,PATH...]`` (text files, directories of them, or JSONL with
a ``text`` field), tokenized with ``<|endoftext|>`` after each, concatenated in path order into
one stream, and cut into non-overlapping windows of each requested length; the loss is averaged
over every predicted token of every window (``specialize.infer.likelihood.perplexity_by_length``).
The result entry has the same shape as a generation task's, so ``specialize compare`` reads it;
its metrics are ``perplexity`` (at the first length) and ``perplexity@L`` per length, lower is
better.

``--long-context none,ntk,logn,ntk+logn,...`` measures the same windows once per combination of the
training-free context-extension options (``base.long_context``), as entries ``perplexity[VARIANT]``,
and writes a table and a chart of perplexity against length, one line per variant (the paper's
Table 3). Its computation is the same under either protocol (``robust``, ``paper``), so it
declares both (``--protocol paper --tasks gsm8k,perplexity`` works) and its results entry names
none. ``ntk`` is dynamic NTK-aware RoPE, ``logn`` LogN attention scaling, ``window``
layer-wise window attention: the lower half of the layers attend to at most the training length,
the upper half to everything.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from base.long_context_config import LongContextConfig
from specialize.checkpoint import read_architecture, resolve_checkpoint
from specialize.eval.config import PERPLEXITY, EvalConfig
from specialize.eval.tasks import PROTOCOLS, LikelihoodTask, LoadedModel, TaskError, register
from specialize.infer.likelihood import perplexity_by_length
from specialize.infer.model import load_model, stored_long_context

NAME = PERPLEXITY
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".c", ".h", ".js", ".java", ".go", ".rs", ".cpp")


def _documents(spec: str) -> Iterator[tuple[str, str]]:
    """(where, text) of every document named by a comma-separated list of paths."""
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        path = Path(part)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
            if not files:
                raise TaskError(f"--data {NAME}={part}: no {'/'.join(TEXT_SUFFIXES)} files in it")
            for file in files:
                yield str(file), _read(file)
        elif path.is_file() and path.name.endswith((".jsonl", ".jsonl.gz")):
            yield from _jsonl(path)
        elif path.is_file():
            yield str(path), _read(path)
        else:
            raise TaskError(f"--data {NAME}={part}: no such file or directory")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TaskError(f"{path}: not UTF-8 text ({e})") from None


def _jsonl(path: Path) -> Iterator[tuple[str, str]]:
    import gzip

    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise TaskError(
                    f"{path}:{number}: expected a JSON object with a 'text' field ({e})"
                ) from None
            yield f"{path}:{number}", str(text)


def token_stream(spec: str, tokenizer: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """The concatenated token ids of the documents, and the ``data`` entry of the results."""
    digest = hashlib.sha256()
    pieces, count = [], 0
    for _where, text in _documents(spec):
        digest.update(text.encode("utf-8"))
        pieces.append(tokenizer.encode_document(text))
        count += 1
    if not pieces:
        raise TaskError(f"--data {NAME}={spec}: no documents")
    tokens = np.concatenate(pieces)
    data = {"source": spec, "sha256": digest.hexdigest(), "records": count, "tokens": len(tokens)}
    return tokens, data


def evaluate_perplexity(
    model: Any,
    tokenizer: Any,
    spec: str | None,
    lengths: Sequence[int],
    limit: int | None = None,
) -> dict[str, Any]:
    """The results entry of the ``perplexity`` task (run on every rank of the model's world)."""
    if not spec:
        raise TaskError(f"task {NAME!r} needs its text: --data {NAME}=FILE_OR_DIR[,...]")
    if not lengths or any(n < 2 for n in lengths):
        raise TaskError(f"--lengths {list(lengths)}: each length must be at least 2 tokens")
    tokens, data = token_stream(spec, tokenizer)
    too_long = [n for n in lengths if n + 1 > len(tokens)]
    if too_long:
        raise TaskError(f"--lengths {too_long}: longer than the {len(tokens)} tokens of {spec}")
    max_windows = limit or len(tokens)
    by_length = perplexity_by_length(model, tokens, list(lengths), max_windows=max_windows)
    metrics = {"perplexity": float(by_length[lengths[0]])}
    metrics.update({f"perplexity@{n}": float(by_length[n]) for n in lengths})
    windows = {str(n): min(len(tokens) // (n + 1), max_windows) for n in lengths}
    return {
        "protocol": {
            "mode": "likelihood",
            "shots": 0,
            "stop": None,
            "max_new_tokens": None,
            "grader": "perplexity",
            "timeout": None,
            "lengths": list(lengths),
            "windows": windows,
        },
        "data": data,
        "metrics": metrics,
        "counts": {"total": sum(windows.values())},
        "samples": [],
    }


VARIANT_OPTIONS: dict[str, dict[str, Any]] = {
    "ntk": {"rope_scaling": "dynamic-ntk"},
    "logn": {"logn_attention": True},
    "window": {},  # filled per model: see variant_options
}


def variant_options(
    variant: str,
    num_layers: int,
    train_length: int,
    stored: LongContextConfig | None = None,
) -> LongContextConfig:
    """The ``load_model`` long-context options of ``none`` or ``+``-joined names of
    VARIANT_OPTIONS: each option not named is off; ``train_seq_length`` is the checkpoint's
    (``stored``)."""
    length = None if stored is None else stored.train_seq_length
    options = LongContextConfig(train_seq_length=length)
    if variant == "none":
        return options
    for name in variant.split("+"):
        if name not in VARIANT_OPTIONS:
            known = ", ".join(["none", *VARIANT_OPTIONS])
            raise TaskError(f"--long-context {variant!r}: unknown option {name!r} (known: {known})")
        if name == "window":
            lower = num_layers // 2
            windows = [train_length] * lower + [None] * (num_layers - lower)
            options = replace(options, layer_windows=windows)
        else:
            options = replace(options, **VARIANT_OPTIONS[name])
    return options


def evaluate_variants(
    checkpoint: str,
    tp: int,
    pp: int,
    variants: str,
    tokenizer: Any,
    spec: str | None,
    lengths: Sequence[int],
    limit: int | None,
    dtype: str | None = None,
) -> dict[str, dict[str, Any]]:
    """``perplexity[VARIANT]`` entries for comma-separated ``variants``, each measured on the
    checkpoint loaded with that option set (one such model in memory at a time) in ``dtype``
    (default: the checkpoint's own). The window and the length past which NTK and LogN act are
    the checkpoint's training length."""
    path = resolve_checkpoint(checkpoint)
    num_layers = read_architecture(path).num_layers
    stored = stored_long_context(path)
    trained = stored.train_seq_length or min(lengths)
    entries: dict[str, dict[str, Any]] = {}
    for variant in [v.strip() for v in variants.split(",") if v.strip()]:
        options = variant_options(variant, num_layers, trained, stored)
        model = None  # the previous variant's model is freed before the next one loads
        model, _ = load_model(path, tp, pp, long_context=options, dtype=dtype)
        entries[f"{NAME}[{variant}]"] = evaluate_perplexity(model, tokenizer, spec, lengths, limit)
    return entries


def write_length_table(
    entries: dict[str, dict[str, Any]], out_prefix: Path, title: str
) -> tuple[Path, Path]:
    """``<prefix>.md`` (variants x lengths) and ``<prefix>.png`` (perplexity against length)."""
    from matplotlib.figure import Figure

    variants = {name[len(NAME) + 1 : -1]: e for name, e in entries.items() if name.endswith("]")}
    lengths = next(iter(variants.values()))["protocol"]["lengths"]
    lines = [f"# {title}", "", "Perplexity by context length (lower is better).", ""]
    lines.append("| variant | " + " | ".join(str(n) for n in lengths) + " |")
    lines.append("|---|" + "---|" * len(lengths))
    for variant, entry in variants.items():
        cells = [f"{entry['metrics'][f'perplexity@{n}']:.2f}" for n in lengths]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    table = out_prefix.parent / f"{out_prefix.name}.md"
    table.write_text("\n".join(lines) + "\n", encoding="utf-8")
    fig = Figure(figsize=(5.5, 3.6), layout="constrained")
    ax = fig.add_subplot()
    for variant, entry in variants.items():
        ax.plot(
            lengths, [entry["metrics"][f"perplexity@{n}"] for n in lengths], "o-", label=variant
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    chart = out_prefix.parent / f"{out_prefix.name}.png"
    fig.savefig(chart, dpi=100)
    return table, chart


def data_spec(data: Mapping[str, str | os.PathLike[str]]) -> str | None:
    value = data.get(NAME)
    return None if value is None else str(value)


@dataclass(frozen=True, kw_only=True)
class Perplexity(LikelihoodTask):
    """The ``perplexity`` task: the results entry at ``cfg.lengths`` (default: the model's
    ``max_position_embeddings``), and one per ``cfg.long_context`` option set."""

    def data_inputs(self, value: str) -> list[tuple[str, tuple[str, ...] | None]]:
        # Comma-separated paths, and only the text files of a directory (not, e.g., the
        # __pycache__ an import may add to a source tree).
        return [(p.strip(), TEXT_SUFFIXES) for p in value.split(",") if p.strip()]

    def evaluate(self, loaded: LoadedModel, cfg: EvalConfig) -> dict[str, dict[str, Any]]:
        lengths = list(cfg.lengths or [loaded.max_position_embeddings])
        spec = data_spec(cfg.data)
        entries = {
            NAME: evaluate_perplexity(loaded.model, loaded.tokenizer, spec, lengths, cfg.limit)
        }
        if cfg.long_context:
            entries.update(
                evaluate_variants(
                    cfg.checkpoint,
                    cfg.tp,
                    cfg.pp,
                    ",".join(cfg.long_context),
                    loaded.tokenizer,
                    spec,
                    lengths,
                    cfg.limit,
                    loaded.dtype,
                )
            )
        return entries

    def write_outputs(self, entries: Mapping[str, Any], cfg: EvalConfig) -> str | None:
        if not cfg.long_context:
            return None
        prefix = Path(cfg.output).with_suffix(".perplexity")
        table, chart = write_length_table(dict(entries), prefix, cfg.model_label)
        return f"{table.read_text()}chart: {chart}\n"


TASK = register(
    Perplexity(
        name=NAME,
        domain="language",
        description=f"perplexity on --data {NAME}=PATH[,PATH]",
        protocols=PROTOCOLS,
    )
)
