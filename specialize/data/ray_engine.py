"""``data prepare --engine ray``: the per-document work on the actors of a Ray cluster.

Why Ray rather than datatrove: the distributed run must write what the local one writes, byte for
byte, so it has to run this project's own per-document code (readers, filters, tokenizer,
decontamination, MinHash band keys) and keep its dedup semantics (first occurrence in source order
wins, against the documents *kept* so far). datatrove brings its own pipeline steps and its own
MinHash (huggingface/datatrove, src/datatrove/pipeline/dedup/minhash.py @03a9d9a: SHA-1 hashes of
nltk word 5-grams of simplified text, 14 buckets of 8, then bucket, union-find cluster and filter
passes), which would remove different documents; using it would mean wrapping our steps in its
executor and not using the part that is datatrove's. Ray is a general engine: a pool of actors,
each holding the processor once, fed in order, restarted and retried by Ray when a worker or node
dies, on a laptop (``ray.init()``) or a cluster (``RAY_ADDRESS``, KubeRay, ``ray start`` on Slurm
nodes). Its core API rather than Ray Data: Ray Data's readers would replace ours (its JSON reader
fails a whole file on one bad line, where ours counts the line), it takes the input list up front
where ours is streamed, and its ordered streaming adds nothing to an ordered pool of actors.

What runs where. The driver (the ``specialize data prepare`` process) lists the documents in their
global order exactly as the local engine does and sends batches of references to the actors;
directory and file sources are sent as paths or fsspec URLs and read by the actor, rows of
JSONL/Parquet/``datasets`` sources are read by the driver and travel with the batch. An actor
reads, decodes, filters, tokenizes, checks decontamination and computes the MinHash band keys: the
whole cost of a document. Results come back in submission order and the driver does what it does
locally: exact and near dedup against everything kept before (a set lookup per document and band),
the shards, the manifest, resumption. Both engines share that code (``prepare._prepare``), which is
why their shards are the same bytes.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
INSTALL_HINT = "pip install '.[scale]' (requirements/scale.txt pins its version)"
IN_FLIGHT_PER_WORKER = 4  # batches queued per actor: it never waits for the driver between two


class EngineError(ValueError):
    """The Ray engine cannot run; the message says why in one line."""


def _import_ray():
    try:
        import ray
    except ImportError:
        raise EngineError(
            f"--engine ray needs Ray, which is not installed: {INSTALL_HINT}"
        ) from None
    return ray


class _Worker:
    """A Ray actor applying the pool's function, fetched once from the object store.

    The function comes with every call as a reference inside a list (which Ray passes as is),
    not as a constructor argument: a restarted actor fetches it again on its first call, and
    nothing of the actor's state has to outlive it.
    """

    def __init__(self) -> None:
        from specialize.plugins import load_plugins

        load_plugins()  # the domain packages' languages and filters, as in the driver
        self.function: Callable[[list], list] | None = None

    def _load(self, shipped: list) -> Callable[[list], list]:
        if self.function is None:
            import ray

            function, tokenizer_sha256 = ray.get(shipped[0]), shipped[1]
            tokenizer = getattr(function, "tokenizer", None)
            if tokenizer is not None and tokenizer.sha256 != tokenizer_sha256:
                raise EngineError(
                    f"the vocabulary {tokenizer.vocab_file} on node {self.node()} differs from "
                    "the driver's; install the same package on every node"
                )
            self.function = function
        return self.function

    def ready(self, shipped: list, locations: list[str]) -> str:
        """This actor's node, once it holds the function and can read ``locations``."""
        from specialize.data.sources import exists

        self._load(shipped)
        for location in locations:  # a node without the shared mount would count every
            if not exists(location):  # document unreadable: say so once instead
                raise EngineError(
                    f"node {self.node()} cannot read the source {location}; sources must be on "
                    "a filesystem every node mounts, or URLs every node can read"
                )
        return self.node()

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def apply(self, shipped: list, batch: list) -> list:
        return self._load(shipped)(batch)


@contextlib.contextmanager
def connected() -> Iterator[Any]:
    """The ``ray`` module, connected to the cluster at ``RAY_ADDRESS`` (a new local one if unset);
    a connection this process already has is used and left open."""
    ray = _import_ray()
    if ray.is_initialized():
        yield ray
        return
    address = os.environ.get("RAY_ADDRESS") or None
    _check_reachable(address)
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    except ConnectionError as e:
        raise EngineError(
            f"cannot connect to the Ray cluster at RAY_ADDRESS={address}: {e}"
        ) from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _check_reachable(address: str | None, timeout: float = 10.0) -> None:
    """A ``host:port`` that does not answer is an error now: ``ray.init`` would retry it for
    minutes, printing warnings."""
    match = re.fullmatch(r"(?:ray://)?\[?([^\[\]/]+?)\]?:(\d+)", address or "")
    if match is None:  # unset (a new local instance), "auto", "local"
        return
    host, port = match.group(1), int(match.group(2))
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise EngineError(
            f"cannot reach the Ray cluster at RAY_ADDRESS={address}: {e.strerror or e}; start it "
            "(`ray start --head`) or unset RAY_ADDRESS for a new local one"
        ) from None


class RayPool:
    """``workers`` actors (one CPU each; 0: one per CPU of the cluster) applying ``function``;
    each checks at start that it can read ``locations`` (the sources its batches name)."""

    def __init__(
        self,
        ray: Any,
        function: Callable[[list], list],
        workers: int,
        locations: Sequence[str] = (),
    ) -> None:
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if workers == 0:
            workers = cpus
        if not 1 <= workers <= cpus:
            raise EngineError(
                f"--workers {workers}: the Ray cluster has {cpus} CPUs (one per worker); "
                "ask for fewer, or 0 for one per CPU"
            )
        self.ray = ray
        start = time.perf_counter()
        sha256 = getattr(getattr(function, "tokenizer", None), "sha256", None)
        actor = ray.remote(num_cpus=1, max_restarts=-1, max_task_retries=-1)(_Worker)
        # One copy in the object store, not one per actor, kept alive for actor restarts.
        self.shipped = [ray.put(function), sha256]
        self.actors = [actor.remote() for _ in range(workers)]
        try:
            ready = ray.get([a.ready.remote(self.shipped, list(locations)) for a in self.actors])
        except ray.exceptions.RayTaskError as e:
            self.close()
            cause = e.cause if isinstance(e.cause, EngineError) else e
            raise EngineError(f"a Ray worker could not start: {_first_line(cause)}") from None
        except ray.exceptions.RayError as e:
            self.close()
            raise EngineError(f"a Ray worker could not start: {_first_line(e)}") from None
        self.nodes = collections.Counter(ready)  # node id: workers on it
        self.start_seconds = time.perf_counter() - start
        self.batches = [0] * workers  # per actor: what the distribution looked like
        logger.info(
            "ray: %d workers on %d nodes, started in %.1f s",
            workers,
            len(self.nodes),
            self.start_seconds,
        )

    def map(self, items: Iterator[tuple[int, Item]]) -> Iterator[tuple[int, Item, list]]:
        """(key, batch, results) in input order. Each batch goes to the actor with the fewest
        outstanding; at most ``IN_FLIGHT_PER_WORKER`` per actor, so the input is read ahead by a
        bounded amount (a corpus does not fit in memory)."""
        ray = self.ray
        outstanding = [0] * len(self.actors)
        pending: collections.deque = collections.deque()  # (key, batch, actor, ref), input order
        limit = IN_FLIGHT_PER_WORKER * len(self.actors)

        def collect_head() -> tuple[int, Item, list]:
            key, batch, index, ref = pending.popleft()
            try:
                results = ray.get(ref)
            except ray.exceptions.RayTaskError as e:  # the function's own error, as raised locally
                raise e.cause if isinstance(e.cause, Exception) else e from None
            except ray.exceptions.RayError as e:
                raise EngineError(f"a Ray worker failed: {_first_line(e)}") from None
            outstanding[index] -= 1
            return key, batch, results

        for key, batch in items:
            index = min(range(len(self.actors)), key=outstanding.__getitem__)
            ref = self.actors[index].apply.remote(self.shipped, batch)
            outstanding[index] += 1
            self.batches[index] += 1
            pending.append((key, batch, index, ref))
            while len(pending) >= limit:
                yield collect_head()
        while pending:
            yield collect_head()

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextlib.contextmanager
def pool(
    function: Callable[[list], list], workers: int, locations: Sequence[str] = ()
) -> Iterator[RayPool]:
    """A ``RayPool`` on the cluster at ``RAY_ADDRESS``, its actors gone on exit."""
    with connected() as ray:
        workers_pool = RayPool(ray, function, workers, locations)
        try:
            yield workers_pool
        finally:
            logger.info(
                "ray: batches per worker %s, workers per node %s",
                workers_pool.batches,
                dict(workers_pool.nodes),
            )
            workers_pool.close()
