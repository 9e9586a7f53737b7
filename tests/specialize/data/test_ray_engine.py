"""``data prepare --engine ray`` on a local two-node Ray cluster (one CPU per node): the same bytes
as the local engine, dedup across workers, and resumption after a killed worker or driver."""

import hashlib
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil  # a core dependency (megatron-core's checkpoint saver needs it)
import pytest

from base.tokenizer import QwenTokenizer
from specialize.data.filters import resolve_filter_names
from specialize.data.prepare import PrepareOptions, prepare, read_manifest
from specialize.data.ray_engine import EngineError
from specialize.data.sources import Source, parse_source
from specialize.plugins import load_plugins
from tests.conftest import STDLIB
from tests.specialize.data.test_prepare import fifo_corpus as blocking_corpus

ray = pytest.importorskip("ray", reason="the scale extra (make test installs it)")

load_plugins()
REPO = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes of one CPU each on this machine, reached through RAY_ADDRESS as a user's
    cluster is."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    previous = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = cluster.address
    try:
        yield cluster
    finally:
        if previous is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = previous
        cluster.shutdown()


@pytest.fixture(scope="module")
def tok() -> QwenTokenizer:
    return QwenTokenizer.load()


def _shards(out: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.iterdir())
        if p.suffix in (".bin", ".idx")
    }


def _spread(caplog: pytest.LogCaptureFixture) -> tuple[list[int], dict[str, int]]:
    """(batches per worker, workers per node) that the engine logged for the last run."""
    lines = [r.getMessage() for r in caplog.records if r.name == "specialize.data.ray_engine"]
    last = [line for line in lines if line.startswith("ray: batches per worker")][-1]
    batches, nodes = re.match(
        r"ray: batches per worker (\[.*\]), workers per node (\{.*\})", last
    ).groups()
    return json.loads(batches), json.loads(nodes.replace("'", '"'))


def test_stdlib_shards_and_manifest_equal_the_local_engine(
    cluster, tmp_path: Path, tok: QwenTokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    source = [parse_source(str(STDLIB))]
    options = PrepareOptions(
        filters=tuple(resolve_filter_names("all")), shard_documents=400, workers=2
    )
    local = prepare(source, tmp_path / "local", tok, options)
    distributed = prepare(
        source, tmp_path / "ray", tok, PrepareOptions(**{**options.__dict__, "engine": "ray"})
    )

    assert local == distributed  # the manifest: counts, examples, hashes (it has no timings)
    assert local["input_documents"] > 1500 and len(local["shards"]) >= 4
    removed = local["removed"]
    assert removed["exact-dedup"] > 0 and removed["near-dedup"] > 0 and removed["empty"] > 0
    assert _shards(tmp_path / "local") == _shards(tmp_path / "ray")
    assert len(_shards(tmp_path / "ray")) == 2 * len(local["shards"])
    batches, nodes = _spread(caplog)
    assert len(batches) == 2 and min(batches) > 0  # both workers did work,
    assert sorted(nodes.values()) == [1, 1]  # one on each node

    # The engine is how, not what: either engine finds the other's output complete, after
    # checking its inputs (on the cluster, for the Ray engine).
    caplog.clear()
    again = prepare(
        source, tmp_path / "local", tok, PrepareOptions(**{**options.__dict__, "engine": "ray"})
    )
    assert again == local
    assert "is complete" in caplog.text and "unchanged" in caplog.text


def _words(rng: random.Random, count: int) -> list[str]:
    return [
        rng.choice(["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa"])
        + str(rng.randrange(1000))
        for _ in range(count)
    ]


def test_duplicates_split_across_two_workers_are_removed_once(
    cluster, tmp_path: Path, tok: QwenTokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    # Batches of one document go to the workers in turn (the pool's order), so each pair below
    # is split: its first document on one node, its near (or exact) duplicate on the other.
    caplog.set_level(logging.INFO)
    rng = random.Random(0)
    root = tmp_path / "src"
    root.mkdir()
    texts = []
    for _ in range(4):
        words = _words(rng, 400)
        near = list(words)
        near[200] = "changed"  # one word of 400: Jaccard of 5-gram sets ~0.98
        texts += [" ".join(words) + "\n", " ".join(near) + "\n"]
    exact = " ".join(_words(rng, 50)) + "\n"
    texts += [exact, exact]
    for i, text in enumerate(texts):
        (root / f"doc{i:02d}.py").write_text(text, encoding="utf-8")

    options = PrepareOptions(
        filters=("exact-dedup", "near-dedup"), workers=2, batch_documents=1, engine="ray"
    )
    manifest = prepare([Source("directory", str(root))], tmp_path / "out", tok, options)
    batches, nodes = _spread(caplog)
    assert batches == [5, 5] and sorted(nodes.values()) == [1, 1]
    assert manifest["removed"]["near-dedup"] == 4 and manifest["removed"]["exact-dedup"] == 1
    assert manifest["removed_examples"]["near-dedup"] == [f"0/doc{i:02d}.py" for i in (1, 3, 5, 7)]
    assert manifest["removed_examples"]["exact-dedup"] == ["0/doc09.py"]
    assert manifest["documents"] == 5  # the first of each pair


def _cli(out: Path, source: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "specialize", "data", "prepare", str(source), "-o", str(out),
        "--extensions", ".py", "--shard-documents", "20", *extra,
    ]  # fmt: skip


@pytest.fixture
def fifo_corpus(tmp_path: Path) -> tuple[Path, Path, bytes]:
    """test_prepare's corpus whose 66th file is a FIFO: a run blocks on it after 2 shards."""
    return blocking_corpus(tmp_path)


def _wait_for(path: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not path.exists():
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.5)  # as far as it goes: a worker is stuck on the FIFO


def _clean_output(tmp_path: Path, source: Path, blocked: Path, content: bytes) -> Path:
    """The local engine's output of the corpus with the FIFO replaced by its content."""
    blocked.unlink()
    blocked.write_bytes(content)
    clean = tmp_path / "clean"
    subprocess.run(_cli(clean, source, "--workers", "1"), check=True, capture_output=True)
    return clean


def _ray_workers() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if cmdline.startswith("ray::_Worker"):
            found.append(process)
    return found


def test_killed_workers_are_restarted_and_the_output_is_unchanged(
    cluster, tmp_path: Path, fifo_corpus
) -> None:
    source, blocked, content = fifo_corpus
    out = tmp_path / "ray"
    process = subprocess.Popen(
        _cli(out, source, "--engine", "ray", "--workers", "2"),
        start_new_session=True,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(out / "shard-00001.json", process)
        workers = _ray_workers()
        assert len(workers) == 2
        for worker in workers:  # every worker, the one blocked on the FIFO among them
            worker.kill()
        # Ray restarts them and retries their batches; the retry reads the FIFO again.
        writer = threading.Thread(target=lambda: blocked.write_bytes(content), daemon=True)
        writer.start()
        writer.join(timeout=120)
        assert not writer.is_alive(), "no restarted worker read the blocked document"
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, stderr
    assert {w.pid for w in _ray_workers()}.isdisjoint({w.pid for w in workers})
    clean = _clean_output(tmp_path, source, blocked, content)
    assert read_manifest(out) == read_manifest(clean)
    assert _shards(out) == _shards(clean) and len(_shards(clean)) == 10


def test_killed_driver_resumes_to_identical_shards(cluster, tmp_path: Path, fifo_corpus) -> None:
    source, blocked, content = fifo_corpus
    out = tmp_path / "ray"
    command = _cli(out, source, "--engine", "ray", "--workers", "2")
    process = subprocess.Popen(command, start_new_session=True, stderr=subprocess.DEVNULL)
    _wait_for(out / "shard-00001.json", process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "manifest.json").exists() and not (out / "shard-00002.json").exists()

    clean = _clean_output(tmp_path, source, blocked, content)
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "after 2 finished shards" in result.stderr
    assert sorted(os.listdir(out)) == sorted(os.listdir(clean))
    assert _shards(out) == _shards(clean)
    assert read_manifest(out) == read_manifest(clean)


def test_more_workers_than_the_cluster_has_cpus_is_one_error(cluster, tmp_path: Path, tok):
    options = PrepareOptions(filters=(), workers=3, engine="ray")
    with pytest.raises(EngineError, match=r"--workers 3: the Ray cluster has 2 CPUs"):
        prepare([Source("directory", str(STDLIB / "json"))], tmp_path / "out", tok, options)


def test_a_source_a_node_cannot_read_is_one_error_not_every_document_unreadable(
    cluster, tmp_path: Path
) -> None:
    # What a node without the shared mount sees; every node checks before any batch is sent.
    from specialize.data import ray_engine
    from specialize.data.prepare import _input_keys

    missing = str(tmp_path / "not-mounted")
    with pytest.raises(EngineError, match=r"^a Ray worker could not start: node \w+ cannot read "):
        with ray_engine.pool(_input_keys, 2, [str(STDLIB / "json"), missing]):
            pass
    with ray_engine.pool(_input_keys, 2, [str(STDLIB / "json"), f"file://{STDLIB}"]) as pool:
        assert sorted(pool.nodes.values()) == [1, 1]


def test_without_ray_the_engine_is_a_one_line_error(tmp_path: Path) -> None:
    # The default path never imports Ray; asking for the engine without it names the extra.
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from specialize.cli import main\n"
        f"sys.exit(main(['data', 'prepare', {str(STDLIB / 'json')!r}, '-o', "
        f"{str(tmp_path / 'out')!r}, '--engine', 'ray']))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "data prepare: --engine ray needs Ray, which is not installed: pip install '.[scale]' "
        "(requirements/scale.txt pins its version)"
    ]
    local = subprocess.run(
        [sys.executable, "-c", code.replace("'--engine', 'ray'", "'--filters', 'none'")],
        capture_output=True,
        text=True,
    )
    assert local.returncode == 0, local.stderr


def test_an_unreachable_cluster_is_one_error_at_once(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "specialize", "data", "prepare", str(STDLIB / "json"), "-o",
         str(tmp_path / "out"), "--engine", "ray"],
        env={**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}"},
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert time.monotonic() - start < 30  # not Ray's minutes of reconnecting
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"data prepare: cannot reach the Ray cluster at RAY_ADDRESS=127.0.0.1:{port}: Connection "
        "refused; start it (`ray start --head`) or unset RAY_ADDRESS for a new local one"
    ]
