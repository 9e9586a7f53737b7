"""Check a Math401 file against the ``math401`` task before trusting its scores: the file loads,
and for every record the grader accepts the target (alone, and after its echoed query), accepts
it moved by less than the 1e-3 tolerance and rejects it moved by more.

    python -m math_qwen.check_math401 math401.jsonl [--records 401]

Math401 publishes no licence, so the project does not ship it; its tests use a sample in the same
schema and this script checks the real file wherever it is. Exit status: 0 when every record
passes, 1 when some fail (the first few are printed), 2 when the file cannot be read as Math401
records or has another number of records than ``--records``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from math_qwen import graders
from specialize.eval.tasks import TaskError, get_task

SHOWN = 5
# The grader's tolerance is |pred - target| < 1e-3: just inside and just outside of it.
INSIDE, OUTSIDE = Decimal("0.0009"), Decimal("0.002")


def record_faults(record: Mapping[str, Any]) -> list[str]:
    """What the grader gets wrong about ``record`` (empty when nothing)."""
    response = str(record["response"]).strip()
    try:
        target = Decimal(response)
    except InvalidOperation:
        return [f"target {response!r} is not a number"]
    expectations = {
        "the target": (response, True),
        "the query and the target": (f"{record['query']}{response}", True),
        f"the target - {INSIDE}": (str(target - INSIDE), True),
        f"the target + {OUTSIDE}": (str(target + OUTSIDE), False),
    }
    faults = []
    for name, (completion, correct) in expectations.items():
        try:
            grade = graders.math401(record, completion)
        except ValueError as e:
            return [str(e)]
        if grade["correct"] is not correct:
            verdict = "wrong" if correct else "correct"
            faults.append(f"{name} ({completion!r}) grades {verdict}")
    return faults


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m math_qwen.check_math401", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("path", help="a Math401 file (.jsonl, .jsonl.gz or .json)")
    parser.add_argument("--records", type=int, help="the number of records the file must have")
    args = parser.parse_args(argv)
    try:
        records = get_task("math401").load(args.path)
    except TaskError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.records is not None and len(records) != args.records:
        print(
            f"error: {args.path}: {len(records)} records, expected {args.records}", file=sys.stderr
        )
        return 2
    failing = [(i, faults) for i, r in enumerate(records) if (faults := record_faults(r))]
    for i, faults in failing[:SHOWN]:
        print(f"{args.path}: record {i + 1} ({records[i]['query']!r}): {'; '.join(faults)}")
    if failing:
        print(f"{args.path}: {len(failing)} of {len(records)} records fail", file=sys.stderr)
        return 1
    print(f"{args.path}: all {len(records)} records grade as expected")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
