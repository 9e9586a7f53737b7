"""Corpus preparation throughput: ``specialize data prepare`` vs raw tiktoken on the same texts.

Peer: ``tiktoken``'s ``encode_ordinary_batch`` over the standard library's ``.py`` files (read and
decoded beforehand, untimed) with ``num_threads = workers``. Ours: ``prepare()`` over the same
directory with the same number of workers (threads, or processes with ``--processes``), timed from the call to the finished manifest:
reading, the filters (``--filters`` choice, default: size, long lines, generated/minified/
alphanumeric heuristics, HumanEval decontamination including building its n-gram index, exact
dedup), tokenization, EOD, writing the shards and the manifest. Interpreter start-up and imports are
excluded for both. Both report tokens/s of what they produced; ours produces fewer tokens when
filters remove documents, which counts against it. A third row is tokenization alone as ``prepare``
does it (``encode_to_numpy`` in long-lived threads with an encoding each): the floor under ours.
Each round runs every contestant once, starting one further along the list than the round before
(whoever runs right after the peer pays for freeing its token lists); the median is reported.

With ``--engines local,ray`` each filter set also runs on the Ray engine (``--engine ray``, the
``scale`` extra): a local Ray instance with ``--workers`` CPUs is started once before the rounds
(its start-up is reported, not timed); each run is timed like the local one and includes starting
its actors and shipping them the processor. Both engines' shards are compared byte for byte.

    .venv/bin/python bench/data_prepare.py [--workers 2] [--rounds 3] [--filters default,none]
                                           [--engines local,ray]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import itertools
import json
import logging
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


FLOOR = "floor"


class _EncodingPerThread:
    """Raw tiktoken as ``prepare`` calls it: ``encode_to_numpy`` in long-lived threads that each
    have their own encoding (``QwenTokenizer._encoding``). Tokenization alone, without reading,
    filters or writing: the floor under ``prepare``'s time, to show what the rest costs."""

    def __init__(self, tokenizer, workers: int) -> None:
        self.tokenizer = tokenizer
        self.pool = concurrent.futures.ThreadPoolExecutor(workers)
        list(self.pool.map(self._count, [[] for _ in range(4 * workers)]))  # build the encodings

    def _count(self, texts: list[str]) -> int:
        encoding = self.tokenizer._encoding()
        return sum(len(encoding.encode_to_numpy(text, disallowed_special=())) for text in texts)

    def count_tokens(self, texts: list[str]) -> int:
        batches = [texts[i : i + 32] for i in range(0, len(texts), 32)]
        return sum(self.pool.map(self._count, batches))


class _PoolStarts(logging.Handler):
    """The seconds each Ray run spent starting its actors (the engine logs them)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seconds: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("ray: %d workers"):
            self.seconds.append(record.args[2])


def driver_rate(source: Source, options: PrepareOptions, tokenizer, out: Path) -> float:
    """tokens/s of what the driver does alone (listing, dedup, writing shards and manifest): the
    per-document results of one run are recorded, then replayed into a second run in place of
    the workers. With the Ray engine this bounds the cluster's rate, whatever its size."""
    import specialize.data.prepare as prepare_module

    recorded: dict[tuple[int, str], list] = {}
    engine = prepare_module._engine

    @contextlib.contextmanager
    def recording(function, options, sources):
        with engine(function, options, sources) as ordered_map:

            def record(items):
                for shard, batch, results in ordered_map(items):
                    recorded[shard, batch[0].name] = results
                    yield shard, batch, results

            yield record

    @contextlib.contextmanager
    def replaying(function, options, sources):
        yield lambda items: ((s, b, recorded[s, b[0].name]) for s, b in items)

    try:
        prepare_module._engine = recording
        prepare([source], out / "recorded", tokenizer, options)
        prepare_module._engine = replaying
        start = time.perf_counter()
        manifest = prepare([source], out / "replayed", tokenizer, options)
        return manifest["tokens"] / (time.perf_counter() - start)
    finally:
        prepare_module._engine = engine


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".bin", ".idx")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default=sysconfig.get_paths()["stdlib"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--filters", default="default,none", help="filter sets to measure")
    parser.add_argument("--batch-documents", type=int, default=PrepareOptions.batch_documents)
    parser.add_argument("--processes", action="store_true", help="workers as processes")
    parser.add_argument("--engines", default="local", help="local, ray or local,ray")
    parser.add_argument(
        "--driver", action="store_true", help="also measure the driver alone (see driver_rate)"
    )
    parser.add_argument("--json", default=None, help="write all numbers here")
    args = parser.parse_args()
    engines = args.engines.split(",")
    ray_start = None
    if "ray" in engines:
        import ray

        start = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - start
    pool_starts = _PoolStarts()
    engine_logger = logging.getLogger("specialize.data.ray_engine")
    engine_logger.addHandler(pool_starts)
    engine_logger.setLevel(logging.INFO)
    steady: dict[str, list[float]] = {}  # Ray runs' tokens/s without starting the actors

    load_plugins()
    tokenizer = QwenTokenizer.load()
    source = Source("directory", str(Path(args.source).resolve()))
    source_options = SourceOptions(extensions=(".py",))
    texts = read_texts(source, source_options)
    encoding = tokenizer._enc
    results: dict[str, list[float]] = {"tiktoken": [], FLOOR: []}
    tokens: dict[str, int] = {}
    same: dict[str, bool] = {}  # filter set: the Ray engine's shards equal the local ones
    filter_sets = args.filters.split(",")
    floor_pool = _EncodingPerThread(tokenizer, args.workers)

    def peer(round_index: int) -> None:
        start = time.perf_counter()
        ids = encoding.encode_ordinary_batch(texts, num_threads=args.workers)
        elapsed = time.perf_counter() - start
        tokens["tiktoken"] = sum(map(len, ids))
        results["tiktoken"].append(tokens["tiktoken"] / elapsed)

    def floor(round_index: int) -> None:
        start = time.perf_counter()
        count = floor_pool.count_tokens(texts)
        tokens[FLOOR] = count
        results[FLOOR].append(count / (time.perf_counter() - start))

    def ours(spec: str, engine: str, round_index: int) -> None:
        options = PrepareOptions(
            source_options,
            filters=tuple(resolve_filter_names(spec)),
            workers=args.workers,
            processes=args.processes and engine == "local",
            batch_documents=args.batch_documents,
            engine=engine,
        )
        name = spec if engine == "local" else f"{spec} ray"
        out = Path(tmp) / f"{name}-{round_index}"
        start = time.perf_counter()
        manifest = prepare([source], out, tokenizer, options)
        elapsed = time.perf_counter() - start
        tokens[name] = manifest["tokens"]
        results.setdefault(name, []).append(manifest["tokens"] / elapsed)
        if engine == "ray":
            busy = elapsed - pool_starts.seconds[-1]
            steady.setdefault(name, []).append(manifest["tokens"] / busy)

    runs = [peer, floor] + [
        functools.partial(ours, spec, engine)
        for spec, engine in itertools.product(filter_sets, engines)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            # Each round starts at the next contestant: whoever runs right after the peer pays
            # for its freed token lists (about 8 M Python ints), so no one is always that one.
            shift = round_index % len(runs)
            for run in runs[shift:] + runs[:shift]:
                run(round_index)
            for spec in filter_sets if {"local", "ray"} <= set(engines) else []:
                same[spec] = same.get(spec, True) and _shards(
                    Path(tmp) / f"{spec} ray-{round_index}"
                ) == _shards(Path(tmp) / f"{spec}-{round_index}")

        drivers = {}
        if args.driver:
            for spec in filter_sets:
                options = PrepareOptions(
                    source_options, filters=tuple(resolve_filter_names(spec)), workers=args.workers
                )
                drivers[spec] = driver_rate(
                    source, options, tokenizer, Path(tmp) / f"driver-{spec}"
                )

    peer = statistics.median(results["tiktoken"])
    print(
        f"{len(texts):,} files, {sum(map(len, texts)) / 1e6:.1f} M characters, "
        f"workers {args.workers}, {args.rounds} rounds, load average {os.getloadavg()[0]:.2f}"
    )
    if ray_start is not None:
        print(f"ray: local instance of {args.workers} CPUs started in {ray_start:.1f} s (untimed)")
    print(f"{'':40} {'tokens':>12} {'tokens/s (median)':>18} {'range':>23} {'vs tiktoken':>12}")
    for name, rates in results.items():
        if name == "tiktoken":
            label = "tiktoken encode_ordinary_batch"
        elif name == FLOOR:
            label = "tiktoken, an encoding per thread"
        elif name.endswith(" ray"):
            label = f"prepare --filters {name[:-4]} --engine ray"
        else:
            label = f"prepare --filters {name}"
        median = statistics.median(rates)
        print(
            f"{label:40.40} {tokens[name]:>12,} {median:>18,.0f} "
            f"{min(rates):>11,.0f}-{max(rates):<11,.0f} {median / peer:>11.2f}x"
        )
    for name, rates in steady.items():
        median = statistics.median(rates)
        print(
            f"{name[:-4]} --engine ray, actors' start-up excluded (median "
            f"{statistics.median(pool_starts.seconds):.2f} s): {median:,.0f} tokens/s, "
            f"{median / peer:.2f}x tiktoken"
        )
    for spec, equal in same.items():
        local = statistics.median(results[spec])
        whole = statistics.median(results[f"{spec} ray"]) / local
        busy = statistics.median(steady[f"{spec} ray"]) / local
        print(
            f"--filters {spec}: ray / local {whole:.2f}x ({busy:.2f}x without the actors' "
            f"start-up), shards {'byte-identical' if equal else 'DIFFERENT'} in every round"
        )
    for spec, rate in drivers.items():
        per_worker = statistics.median(results[spec]) / args.workers
        print(
            f"--filters {spec}: the driver alone {rate:,.0f} tokens/s, the work of "
            f"{rate / per_worker:.0f} workers at this machine's per-worker rate"
        )
    if args.json:
        record = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "files": len(texts),
            "workers": args.workers,
            "tokens": tokens,
            "tokens_per_second": results,
            "ray_start_seconds": ray_start,
            "ray_actor_start_seconds": pool_starts.seconds,
            "ray_tokens_per_second_without_actor_start": steady,
            "ray_shards_identical": same,
            "driver_tokens_per_second": drivers,
        }
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
