"""Corpus preparation throughput: ``specialize data prepare`` vs raw tiktoken on the same texts.

Peer: ``tiktoken``'s ``encode_ordinary_batch`` over the standard library's ``.py`` files (read and
decoded beforehand, untimed) with ``num_threads = workers``. Ours: ``prepare()`` over the same
directory with the same number of workers (threads, or processes with ``--processes``), timed from the call to the finished manifest:
reading, the filters (``--filters`` choice, default: size, long lines, generated/minified/
alphanumeric heuristics, HumanEval decontamination including building its n-gram index, exact
dedup), tokenization, EOD, writing the shards and the manifest. Interpreter start-up and imports are
excluded for both. Both report tokens/s of what they produced; ours produces fewer tokens when
filters remove documents, which counts against it. Rounds alternate (peer, ours) and the median
is reported.

    .venv/bin/python bench/data_prepare.py [--workers 2] [--rounds 3] [--filters default,none]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a plain script from any directory
    sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*not installed")

from base.tokenizer import QwenTokenizer  # noqa: E402
from specialize.data.filters import resolve_filter_names  # noqa: E402
from specialize.data.prepare import PrepareOptions, prepare  # noqa: E402
from specialize.data.sources import Source, SourceOptions, iter_documents  # noqa: E402
from specialize.plugins import load_plugins  # noqa: E402


def read_texts(source: Source, options: SourceOptions) -> list[str]:
    texts = []
    for ref in iter_documents([source], options):
        try:
            texts.append(Path(ref.path).read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, TypeError):
            continue
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default=sysconfig.get_paths()["stdlib"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--filters", default="default,none", help="filter sets to measure")
    parser.add_argument("--batch-documents", type=int, default=PrepareOptions.batch_documents)
    parser.add_argument("--processes", action="store_true", help="workers as processes")
    parser.add_argument("--json", default=None, help="write all numbers here")
    args = parser.parse_args()

    load_plugins()
    tokenizer = QwenTokenizer.load()
    source = Source("directory", str(Path(args.source).resolve()))
    source_options = SourceOptions(extensions=(".py",))
    texts = read_texts(source, source_options)
    encoding = tokenizer._enc
    results: dict[str, list[float]] = {"tiktoken": []}
    tokens: dict[str, int] = {}
    filter_sets = args.filters.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            start = time.perf_counter()
            ids = encoding.encode_ordinary_batch(texts, num_threads=args.workers)
            elapsed = time.perf_counter() - start
            tokens["tiktoken"] = sum(map(len, ids))
            results["tiktoken"].append(tokens["tiktoken"] / elapsed)
            del ids
            for spec in filter_sets:
                options = PrepareOptions(
                    source_options,
                    filters=tuple(resolve_filter_names(spec)),
                    workers=args.workers,
                    processes=args.processes,
                    batch_documents=args.batch_documents,
                )
                out = Path(tmp) / f"{spec}-{round_index}"
                start = time.perf_counter()
                manifest = prepare([source], out, tokenizer, options)
                elapsed = time.perf_counter() - start
                tokens[spec] = manifest["tokens"]
                results.setdefault(spec, []).append(manifest["tokens"] / elapsed)

    peer = statistics.median(results["tiktoken"])
    print(
        f"{len(texts):,} files, {sum(map(len, texts)) / 1e6:.1f} M characters, "
        f"workers {args.workers}, {args.rounds} rounds, load average {os.getloadavg()[0]:.2f}"
    )
    print(f"{'':28} {'tokens':>12} {'tokens/s (median)':>18} {'range':>23} {'vs tiktoken':>12}")
    for name, rates in results.items():
        label = (
            "tiktoken encode_ordinary_batch" if name == "tiktoken" else f"prepare --filters {name}"
        )
        median = statistics.median(rates)
        print(
            f"{label:28.28} {tokens[name]:>12,} {median:>18,.0f} "
            f"{min(rates):>11,.0f}-{max(rates):<11,.0f} {median / peer:>11.2f}x"
        )
    if args.json:
        record = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "files": len(texts),
            "workers": args.workers,
            "tokens": tokens,
            "tokens_per_second": results,
        }
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
