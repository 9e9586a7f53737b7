"""``specialize data prepare``: sources -> filtered, deduplicated, tokenized Megatron shards.

Output, a directory::

    OUT/shard-00000.bin, .idx   megatron-core indexed dataset (int32 ids, one document + EOD each)
    OUT/shard-00000.state.npz   what later shards deduplicate against (digests, LSH band keys),
                                and every input document's digest (what a re-run checks)
    OUT/shard-00000.json        the shard's counts; written last, it marks the shard finished
    OUT/manifest.json           the whole run's counts, written when every shard is finished
    OUT/.lock                   held by the run writing the directory

The input documents are cut into shards of ``shard_documents`` in source order, so a shard's
content depends only on the inputs and options. Workers (threads, or processes) read, filter and
tokenize batches; the calling thread deduplicates in document order and writes. Re-running with the same
inputs and options skips finished shards; an interrupted run resumes at its first unfinished shard
and produces the same files as an uninterrupted one. Different options for an existing directory
are an error, and so are changed input documents of finished shards (each shard records its
documents' digests; a re-run reads and compares them), unless ``rebuild`` discards the old output.
One run at a time writes a directory (``output.locked``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import importlib.metadata
import itertools
import json
import logging
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy

from base.tokenizer import QwenTokenizer
from specialize.data.decontam import DEFAULT_NGRAM, NgramIndex
from specialize.data.dedup import LSHIndex, MinHasher, digest
from specialize.data.filters import (
    DECONTAMINATE,
    EXACT_DEDUP,
    NEAR_DEDUP,
    Document,
    FilterSettings,
    build_filters,
)
from specialize.data.output import locked, writing
from specialize.data.sources import (
    DocumentRef,
    Source,
    SourceOptions,
    iter_documents,
    open_binary,
)
from specialize.plugins import load_plugins

logger = logging.getLogger(__name__)

FORMAT = 2
MANIFEST = "manifest.json"
# Reasons a document is removed that no --filters choice turns off: there is no document.
INPUT_REASONS = ("unreadable", "malformed", "empty", "undecodable")
KEY_BYTES = 16  # a document's digest (dedup.digest)
MAX_EXAMPLES = 20  # names kept per removal reason; the counts are always complete
DEFAULT_DECONTAMINATION = ("humaneval",)  # the evaluation set available offline


def tool_version() -> str:
    try:
        return importlib.metadata.version("qwen-specialize")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class PrepareOptions:
    """Everything that decides the output, and how it is computed (the last three fields)."""

    sources: SourceOptions = field(default_factory=SourceOptions)
    filters: tuple[str, ...] = ()
    """Filter names in effect (see ``filters.resolve_filter_names``)."""
    settings: FilterSettings = field(default_factory=FilterSettings)
    near_dedup_threshold: float = 0.85
    """Estimated Jaccard similarity of token 5-gram sets above which a document is a duplicate."""
    decontaminate: tuple[str, ...] = DEFAULT_DECONTAMINATION
    """Evaluation tasks (registry names) whose prompts and solutions must not appear."""
    task_data: tuple[tuple[str, str], ...] = ()
    """(task, local file) for tasks whose data is not shipped offline."""
    decontamination_ngram: int = DEFAULT_NGRAM
    shard_documents: int = 50_000
    """Input documents per shard: the unit of resumption."""
    workers: int = 2
    """Worker threads, or processes with ``processes`` (0: all in the calling thread); with the
    ``ray`` engine, Ray actors of one CPU each (0: one per CPU of the cluster)."""
    processes: bool = False
    """Run the workers as processes (for many cores: the GIL-holding parts then scale too)."""
    batch_documents: int = 32
    engine: str = "local"
    """Where the per-document work runs: ``local`` (this machine's threads or processes) or
    ``ray`` (the Ray cluster at ``RAY_ADDRESS``, or a new local one; ``ray_engine``)."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def read_manifest(out_dir: str | os.PathLike) -> dict:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {out_dir}: not a finished `data prepare` output")
    return json.loads(path.read_text(encoding="utf-8"))


class _Processor:
    """Per-document work, run by the workers: read, decode, filter, tokenize. Stateless."""

    def __init__(
        self,
        tokenizer: QwenTokenizer,
        options: PrepareOptions,
        decontamination: Optional[NgramIndex],
        minhasher: Optional[MinHasher],
    ) -> None:
        self.tokenizer = tokenizer
        self.filters = build_filters(list(options.filters), options.settings)
        self.decontamination = decontamination
        self.minhasher = minhasher

    def __call__(self, batch: list[DocumentRef]) -> list[tuple]:
        """(reason or None, detail, digest, tokens, band keys) of each document: read, filtered and
        tokenized one by one, then decontaminated together (``NgramIndex.contaminated_many``),
        then the MinHash band keys of those left."""
        results = [self.process(ref) for ref in batch]
        tokenized = [i for i, result in enumerate(results) if result[0] is None]
        if self.decontamination is not None and tokenized:
            texts = [results[i][3][:-1] for i in tokenized]  # without the EOD
            flags = self.decontamination.contaminated_many(texts)
            for i, contaminated in zip(tokenized, flags):
                if contaminated:
                    results[i] = (DECONTAMINATE, "", results[i][2], None, None)
        if self.minhasher is not None:
            for i in tokenized:
                reason, detail, key, ids, _ = results[i]
                if reason is None:
                    results[i] = (None, "", key, ids, self.minhasher.band_keys(ids[:-1]))
        return results

    def process(self, ref: DocumentRef) -> tuple:
        """(reason or None, detail, digest, tokens, None): read, decode, the document filters
        and tokenization; decontamination and band keys follow per batch (``__call__``)."""
        data, reason, detail = _read(ref)
        if data is None:
            return reason, detail, b"", None, None
        key = digest(data)
        if not data or data.isspace():
            return "empty", "", key, None, None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            return "undecodable", f"byte {e.start}: {e.reason}", key, None, None
        document = Document(data, text, ref.language)
        for name, rejects in self.filters:
            if rejects(document):
                return name, "", key, None, None
        return None, "", key, self.tokenizer.encode_document(text), None


def _read(ref: DocumentRef) -> tuple[Optional[bytes], str, str]:
    """(bytes, "", "") of a document, or (None, reason, detail) of input that is none."""
    if ref.error is not None:
        return None, ref.error[0], ref.error[1]
    if ref.text is not None:
        return ref.text.encode("utf-8", "surrogatepass"), "", ""
    try:
        with open_binary(ref.path) as f:
            return f.read(), "", ""
    except OSError as e:
        return None, "unreadable", e.strerror or str(e)


def _input_keys(batch: list[DocumentRef]) -> list[bytes]:
    """What a shard's input hash takes of each document (as ``_Processor.process`` computes it)."""
    keys = []
    for ref in batch:
        data = _read(ref)[0]
        keys.append(b"" if data is None else digest(data))
    return keys


_worker: Optional[Callable] = None  # a worker process's processor (set by its initializer)


def _init_worker(processor: Callable) -> None:
    global _worker
    _worker = processor


def _run_worker(batch: list[DocumentRef]) -> list[tuple]:
    return _worker(batch)


ENGINES = ("local", "ray")


@contextlib.contextmanager
def _engine(
    function: Callable[[list[DocumentRef]], list], options: PrepareOptions, sources: list[Source]
) -> Iterator[Callable[[Iterator[tuple[int, list[DocumentRef]]]], Iterator[tuple]]]:
    """The ordered map of ``function`` over (shard, batch) items on the chosen engine."""
    if options.engine == "ray":
        from specialize.data import ray_engine

        # The workers read directory and file sources themselves; rows come with the batch.
        read = [s.location for s in sources if s.kind in ("directory", "file")]
        with ray_engine.pool(function, options.workers, read) as pool:
            yield pool.map
    else:
        yield lambda items: _ordered_map(function, items, options.workers, options.processes)


def _ordered_map(
    processor: Callable[[list[DocumentRef]], list],
    items: Iterator[tuple[int, list[DocumentRef]]],
    workers: int,
    processes: bool,
) -> Iterator[tuple[int, list[DocumentRef], list[tuple]]]:
    """(shard, batch, results) in input order, with up to 8 batches in flight per worker (a slow
    batch at the head must not leave the other workers idle; ``Executor.map`` would read the
    whole input ahead, and a corpus does not fit in memory).

    Threads by default: tokenization (tiktoken), hashing and the numpy filters release the GIL,
    and threads share the tokenizer and indexes without copying results between processes.
    Processes scale past the Python parts that hold the GIL, at the price of pickling.
    """
    if workers == 0:
        for shard, batch in items:
            yield shard, batch, processor(batch)
        return
    if processes:
        # fork: workers inherit the loaded tokenizer and indexes instead of rebuilding them.
        context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        executor = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=context, initializer=_init_worker, initargs=(processor,)
        )
        run = _run_worker
    else:
        executor = _thread_pool(workers)
        run = processor
    pending: collections.deque = collections.deque()
    try:
        for shard, batch in items:
            pending.append((shard, batch, executor.submit(run, batch)))
            if len(pending) >= 8 * workers:
                shard, batch, future = pending.popleft()
                yield shard, batch, future.result()
        while pending:
            shard, batch, future = pending.popleft()
            yield shard, batch, future.result()
    finally:  # stopped early (an error, a closed generator): drop what has not started
        futures = [future for _, _, future in pending]
        for future in futures:
            future.cancel()
        concurrent.futures.wait(futures)
        if processes:
            executor.shutdown()


_thread_pools: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_thread_pools_lock = threading.Lock()
os.register_at_fork(after_in_child=_thread_pools.clear)  # a child has none of these threads


def _thread_pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    """The process's ``workers`` worker threads. They outlive a run so that each builds its own
    tokenizer encoding once per process (``QwenTokenizer._encoding``: 0.08 s of held GIL each,
    a tenth of a run over the standard library if paid on every run)."""
    with _thread_pools_lock:
        pool = _thread_pools.get(workers)
        if pool is None:
            pool = concurrent.futures.ThreadPoolExecutor(
                workers, thread_name_prefix=f"prepare-{workers}"
            )
            _thread_pools[workers] = pool
        return pool


class _ShardWriter:
    """Collects one shard's kept documents and counts; publishes its files atomically."""

    def __init__(self, out_dir: Path, index: int, fingerprint: str, lsh_bands: int) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.out_dir, self.index, self.fingerprint = out_dir, index, fingerprint
        self.prefix = out_dir / shard_name(index)
        self.tmp_bin = Path(f"{self.prefix}.bin.tmp")
        self.builder = IndexedDatasetBuilder(str(self.tmp_bin), dtype=numpy.int32)
        self.inputs = hashlib.sha256()
        self.input_documents = self.documents = self.tokens = 0
        self.removed: collections.Counter = collections.Counter()
        self.examples: dict[str, list[dict]] = collections.defaultdict(list)
        self.languages: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
        self.digests: list[bytes] = []
        self.input_keys: list[bytes] = []  # every input document's, so a re-run can name a change
        self.bands: list[numpy.ndarray] = []
        self.lsh_bands = lsh_bands

    def add_input(self, key: bytes) -> None:
        self.input_documents += 1
        self.inputs.update(key)
        self.input_keys.append(key.ljust(KEY_BYTES, b"\0"))  # b"": input that is no document

    def remove(self, name: str, reason: str, detail: str) -> None:
        self.removed[reason] += 1
        if len(self.examples[reason]) < MAX_EXAMPLES:
            self.examples[reason].append({"document": name, "detail": detail} if detail else name)

    def keep(self, language: str, key: bytes, ids: numpy.ndarray, bands) -> None:
        self.builder.add_document(ids, [len(ids)])
        self.documents += 1
        self.tokens += len(ids)
        self.languages[language][0] += 1
        self.languages[language][1] += len(ids)
        self.digests.append(key)
        if bands is not None:
            self.bands.append(bands)

    def publish(self) -> dict:
        tmp_idx = Path(f"{self.prefix}.idx.tmp")
        self.builder.finalize(str(tmp_idx))
        self.builder.data_file.close()
        state = self.out_dir / f"{shard_name(self.index)}.state.npz"
        digests = _key_array(self.digests)
        bands = numpy.stack(self.bands) if self.bands else numpy.empty((0, self.lsh_bands))
        with open(f"{state}.tmp", "wb") as f:
            numpy.savez(
                f,
                digests=digests,
                bands=bands.astype(numpy.uint64),
                inputs=_key_array(self.input_keys),
            )
        os.replace(f"{state}.tmp", state)
        if self.documents:
            os.replace(self.tmp_bin, f"{self.prefix}.bin")
            os.replace(tmp_idx, f"{self.prefix}.idx")
        else:  # an empty indexed dataset would only trip up the training-side readers
            self.tmp_bin.unlink()
            tmp_idx.unlink()
        record = {
            "fingerprint": self.fingerprint,
            "index": self.index,
            "prefix": shard_name(self.index),
            "input_documents": self.input_documents,
            "inputs_sha256": self.inputs.hexdigest(),
            "documents": self.documents,
            "tokens": self.tokens,
            "removed": dict(sorted(self.removed.items())),
            "examples": dict(sorted(self.examples.items())),
            "languages": {
                lang: {"documents": d, "tokens": t}
                for lang, (d, t) in sorted(self.languages.items())
            },
        }
        _write_json(self.out_dir / f"{shard_name(self.index)}.json", record)
        return record

    def abort(self) -> None:
        try:
            self.builder.data_file.close()
        except OSError:  # its last flush, after a full disk: the file goes anyway
            pass
        self.tmp_bin.unlink(missing_ok=True)


def _key_array(keys: list[bytes]) -> numpy.ndarray:
    return numpy.frombuffer(b"".join(keys), dtype=numpy.uint8).reshape(-1, KEY_BYTES)


def _write_json(path: Path, value: dict) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _decontamination_index(
    tokenizer: QwenTokenizer, options: PrepareOptions
) -> tuple[Optional[NgramIndex], dict]:
    if DECONTAMINATE not in options.filters:
        return None, {}
    from specialize.eval.tasks import get_task

    paths = dict(options.task_data)
    texts: list[str] = []
    described = {}
    for name in options.decontaminate:
        task = get_task(name)
        records = task.load(paths.get(name))
        task_texts = task.reference_texts(records)
        texts += task_texts
        described[name] = {
            "records": len(records),
            "source": paths.get(name) or (str(task.hub) if task.hub else "packaged"),
            "sha256": hashlib.sha256("\0".join(task_texts).encode()).hexdigest(),
        }
    index = NgramIndex.build(tokenizer, texts, options.decontamination_ngram)
    return index, {
        "tasks": described,
        "ngram": options.decontamination_ngram,
        "ngrams": len(index),
        "sha256": index.sha256,
    }


def _fingerprint(sources: list[Source], tokenizer: QwenTokenizer, options, decontamination) -> str:
    decides = asdict(options)
    for how in ("workers", "processes", "batch_documents", "engine"):  # how, not what, is written
        decides.pop(how)
    blob = {
        "format": FORMAT,
        "sources": [s.to_dict() for s in sources],
        "options": decides,
        "tokenizer": tokenizer.sha256,
        "decontamination": decontamination.get("sha256"),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def _finished_shards(out_dir: Path, fingerprint: str) -> list[dict]:
    """The leading run of finished shards of an earlier run with the same fingerprint."""
    records = []
    while (path := out_dir / f"{shard_name(len(records))}.json").is_file():
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{out_dir} holds the output of `data prepare` with other sources or options "
                f"({path} differs); write to a new directory, or replace it with --rebuild"
            )
        records.append(record)
    return records


def _clean_unfinished(out_dir: Path, first: int) -> None:
    """Remove files of shards from ``first`` on, and temporaries, left by an interrupted run."""
    for path in out_dir.iterdir():
        name = path.name
        if name.endswith(".tmp") or (name.startswith("shard-") and int(name[6:11]) >= first):
            path.unlink()
    (out_dir / MANIFEST).unlink(missing_ok=True)


class ChangedInputError(ValueError):
    """Finished shards were prepared from input documents that have changed since."""


class _InputCheck:
    """Compares the input documents, in order, with what the finished shards recorded: each
    shard's count and combined hash, and (for shards written since they are kept) each
    document's digest, so the first changed document can be named."""

    def __init__(self, out_dir: Path, records: list[dict]) -> None:
        self.out_dir, self.records = out_dir, records
        self.shard, self.count, self.read = 0, 0, 0
        self.hash = hashlib.sha256()
        self.expected = self._recorded_keys(0)

    def _recorded_keys(self, shard: int) -> Optional[bytes]:
        if shard >= len(self.records):
            return None
        with numpy.load(self.out_dir / f"{shard_name(shard)}.state.npz") as state:
            return state["inputs"].tobytes() if "inputs" in state.files else None

    def _changed(self, what: str) -> ChangedInputError:
        return ChangedInputError(
            f"{self.out_dir} was prepared from other input: {what}; run the same command with "
            "--rebuild to prepare it anew (or write to a new directory)"
        )

    def add(self, shard: int, name: str, key: bytes) -> None:
        if shard != self.shard:
            self.end_shard()
        if shard >= len(self.records):
            raise self._changed(f"{name} is new (after the {self.read} documents read before)")
        record = self.records[shard]
        at = self.count * KEY_BYTES
        recorded = self.expected[at : at + KEY_BYTES] if self.expected is not None else None
        if self.count >= record["input_documents"] or (
            recorded is not None and recorded != key.ljust(KEY_BYTES, b"\0")
        ):
            raise self._changed(
                f"{name} differs from the document read in its place before (it is new or "
                f"changed, or the one before it was removed; in {shard_name(shard)})"
            )
        self.hash.update(key)
        self.count += 1
        self.read += 1

    def end_shard(self) -> None:
        record = self.records[self.shard]
        name = shard_name(self.shard)
        if self.count < record["input_documents"]:
            raise self._changed(
                f"input documents were removed ({name} was written from "
                f"{record['input_documents']}, {self.count} are left)"
            )
        if self.hash.hexdigest() != record["inputs_sha256"]:
            raise self._changed(f"the input documents of {name} changed")
        self.shard, self.count = self.shard + 1, 0
        self.hash = hashlib.sha256()
        self.expected = self._recorded_keys(self.shard)

    def finish(self) -> None:
        while self.shard < len(self.records):
            self.end_shard()


def _check_inputs(
    out_dir: Path,
    sources: list[Source],
    options: PrepareOptions,
    finished: list[dict],
    complete: bool,
) -> None:
    """Raise ChangedInputError unless the inputs of the ``finished`` shards are unchanged.

    Reads and hashes those documents again (not the ones after them, unless the output is
    ``complete``: then any further document is a change too).
    """
    start = time.perf_counter()
    documents = iter_documents(sources, options.sources)
    if not complete:
        documents = itertools.islice(documents, len(finished) * options.shard_documents)
    batches = _batches(documents, options.shard_documents, options.batch_documents, 0)
    check = _InputCheck(out_dir, finished)
    with _engine(_input_keys, replace(options, processes=False), sources) as ordered_map:
        for shard, batch, keys in ordered_map(batches):
            for ref, key in zip(batch, keys):
                check.add(shard, ref.name, key)
    check.finish()
    logger.info(
        "%s: the %d input documents of its finished shards are unchanged (checked in %.1f s)",
        out_dir,
        check.read,
        time.perf_counter() - start,
    )


def _batches(
    documents: Iterator[DocumentRef], shard_documents: int, batch_documents: int, skip_shards: int
) -> Iterator[tuple[int, list[DocumentRef]]]:
    """(shard index, batch) in order; the documents of the first ``skip_shards`` are passed over."""
    shard, in_shard, batch = 0, 0, []
    for ref in documents:
        if shard >= skip_shards:
            batch.append(ref)
            if len(batch) == batch_documents:
                yield shard, batch
                batch = []
        in_shard += 1
        if in_shard == shard_documents:
            if batch:
                yield shard, batch
                batch = []
            shard, in_shard = shard + 1, 0
    if batch:
        yield shard, batch


def prepare(
    sources: list[Source],
    out_dir: str | os.PathLike,
    tokenizer: QwenTokenizer,
    options: PrepareOptions,
    progress: bool = False,
    rebuild: bool = False,
) -> dict:
    """Write (or finish) the prepared dataset ``out_dir`` and return its manifest.

    Finished shards are kept only if their input documents are unchanged (else ChangedInputError);
    ``rebuild`` discards them instead.
    """
    if not sources:
        raise ValueError("no sources given")
    if options.shard_documents < 1 or options.batch_documents < 1 or options.workers < 0:
        raise ValueError("shard_documents and batch_documents must be >= 1, workers >= 0")
    if options.engine not in ENGINES:
        raise ValueError(f"engine {options.engine!r}: expected one of {', '.join(ENGINES)}")
    if options.engine == "ray" and options.processes:
        raise ValueError("--processes is for the local engine; Ray workers are processes already")
    out_dir = Path(out_dir).expanduser().resolve()
    with locked(out_dir, "data prepare"):
        return _prepare(sources, out_dir, tokenizer, options, progress, rebuild)


def _prepare(
    sources: list[Source],
    out_dir: Path,
    tokenizer: QwenTokenizer,
    options: PrepareOptions,
    progress: bool,
    rebuild: bool,
) -> dict:
    load_plugins()  # the languages and corpus filters of the domain packages

    decontamination, decontamination_info = _decontamination_index(tokenizer, options)
    fingerprint = _fingerprint(sources, tokenizer, options, decontamination_info)
    finished = [] if rebuild else _finished_shards(out_dir, fingerprint)
    if finished:
        complete = (out_dir / MANIFEST).is_file()
        if complete and read_manifest(out_dir).get("fingerprint") != fingerprint:
            complete = False
        _check_inputs(out_dir, sources, options, finished, complete)
        if complete:
            logger.info("%s is complete (%d shards); nothing to do", out_dir, len(finished))
            return read_manifest(out_dir)
    with writing(out_dir):
        _clean_unfinished(out_dir, len(finished))

    minhasher = MinHasher(threshold=options.near_dedup_threshold)
    exact = EXACT_DEDUP in options.filters
    near = NEAR_DEDUP in options.filters
    seen: set[bytes] = set()
    lsh = LSHIndex(minhasher.bands)
    for record in finished:  # rebuild the deduplication state from the finished shards
        with numpy.load(out_dir / f"{record['prefix']}.state.npz") as state:
            if exact:
                seen.update(bytes(row) for row in state["digests"])
            if near:
                lsh.add_many(state["bands"])
    if finished:
        logger.info("resuming %s after %d finished shards", out_dir, len(finished))

    processor = _Processor(tokenizer, options, decontamination, minhasher if near else None)
    batches = _batches(
        iter_documents(sources, options.sources),
        options.shard_documents,
        options.batch_documents,
        len(finished),
    )
    records = list(finished)
    writer: Optional[_ShardWriter] = None
    meter = _Meter(progress)
    with _engine(processor, options, sources) as ordered_map:
        try:
            for shard, batch, results in ordered_map(batches):
                with writing(out_dir):  # only the writes: a source's own errors are counted
                    if writer is None or writer.index != shard:
                        if writer is not None:
                            records.append(writer.publish())
                        writer = _ShardWriter(out_dir, shard, fingerprint, minhasher.bands)
                    tokens = writer.tokens
                    for ref, (reason, detail, key, ids, bands) in zip(batch, results):
                        writer.add_input(key)
                        if reason is None and exact:
                            if key in seen:
                                reason = EXACT_DEDUP
                            else:
                                seen.add(key)
                        if reason is None and near:
                            if lsh.seen(bands):
                                reason = NEAR_DEDUP
                            else:
                                lsh.add(bands)
                        if reason is None:
                            writer.keep(ref.language, key, ids, bands)
                        else:
                            writer.remove(ref.name, reason, detail)
                meter.update(len(batch), writer.tokens - tokens)
            if writer is not None:
                with writing(out_dir):
                    records.append(writer.publish())
                writer = None
        finally:
            meter.close()
            if writer is not None:
                writer.abort()

    manifest = _manifest(sources, tokenizer, options, fingerprint, decontamination_info, records)
    if manifest["documents"] == 0:
        raise ValueError(
            f"no documents to write from {', '.join(s.location for s in sources)}: "
            f"{manifest['input_documents']} read, removed: {manifest['removed']}"
        )
    with writing(out_dir):
        _write_json(out_dir / MANIFEST, manifest)
    _report(out_dir, manifest)
    return read_manifest(out_dir)  # as JSON has it (lists, not tuples), like a re-run returns


def _manifest(sources, tokenizer, options, fingerprint, decontamination, records) -> dict:
    removed: collections.Counter = collections.Counter()
    examples: dict[str, list] = {}
    languages: dict[str, dict[str, int]] = {}
    inputs = hashlib.sha256()
    for record in records:
        removed.update(record["removed"])
        inputs.update(record["inputs_sha256"].encode())
        for reason, names in record["examples"].items():
            examples.setdefault(reason, [])
            examples[reason] += names[: MAX_EXAMPLES - len(examples[reason])]
        for lang, counts in record["languages"].items():
            total = languages.setdefault(lang, {"documents": 0, "tokens": 0})
            total["documents"] += counts["documents"]
            total["tokens"] += counts["tokens"]
    reasons = list(INPUT_REASONS) + list(options.filters)
    return {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "inputs": {
            "sources": [s.to_dict() for s in sources],
            "options": asdict(options.sources),
            "sha256": inputs.hexdigest(),
        },
        "input_documents": sum(r["input_documents"] for r in records),
        "documents": sum(r["documents"] for r in records),
        "tokens": sum(r["tokens"] for r in records),
        "removed": {reason: removed.get(reason, 0) for reason in reasons},
        "removed_examples": examples,
        "languages": dict(sorted(languages.items(), key=lambda kv: -kv[1]["tokens"])),
        "filters": {
            "enabled": list(options.filters),
            "settings": asdict(options.settings),
            "near_dedup_threshold": options.near_dedup_threshold
            if NEAR_DEDUP in options.filters
            else None,
        },
        "decontamination": decontamination,
        "shards": [
            {"prefix": r["prefix"], "documents": r["documents"], "tokens": r["tokens"]}
            for r in records
            if r["documents"]
        ],
        "shard_documents": options.shard_documents,
        "dtype": "int32",
        "tokenizer": {
            "sha256": tokenizer.sha256,
            "vocab_size": tokenizer.vocab_size,
            "eod": tokenizer.eod,
        },
        "tool": {"name": "qwen-specialize", "version": tool_version()},
    }


def _report(out_dir: Path, manifest: dict) -> None:
    removed = {reason: n for reason, n in manifest["removed"].items() if n}
    logger.info(
        "wrote %s: %d of %d documents, %d tokens in %d shards",
        out_dir,
        manifest["documents"],
        manifest["input_documents"],
        manifest["tokens"],
        len(manifest["shards"]),
    )
    if removed:
        logger.warning(
            "removed %d documents (%s); examples in %s",
            sum(removed.values()),
            ", ".join(f"{n} {reason}" for reason, n in removed.items()),
            out_dir / MANIFEST,
        )


class _Meter:
    """A progress bar with documents/s and tokens/s (on a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.progress = None
        self.start = time.perf_counter()
        if not enabled:
            return
        from rich.progress import Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]prepare"),
            TextColumn("{task.completed:,} documents ({task.fields[docs_rate]:,.0f}/s)"),
            TextColumn("{task.fields[tokens]:,} tokens ({task.fields[tokens_rate]:,.0f}/s)"),
            TimeElapsedColumn(),
            transient=False,
        )
        self.task = self.progress.add_task(
            "prepare", total=None, tokens=0, docs_rate=0.0, tokens_rate=0.0
        )
        self.documents = self.tokens = 0
        self.progress.start()

    def update(self, documents: int, tokens: int) -> None:
        if self.progress is None:
            return
        self.documents += documents
        self.tokens += tokens
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.progress.update(
            self.task,
            completed=self.documents,
            tokens=self.tokens,
            docs_rate=self.documents / elapsed,
            tokens_rate=self.tokens / elapsed,
        )

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
