"""Seeded arithmetic expressions in Math401's schema (``{"query": "3+4=", "response": "7"}``).

The factory demo measures arithmetic on these because Math401 itself is not shipped offline; they
are graded by the ``math401`` task as they are. Operations: addition, subtraction with a
non-negative result, and multiplication, over small operands. Held-out split: an operand pair
``(a, b)`` belongs to ``"test"`` when ``(3a + b) % test_every == 0``, so no test expression (in
either operand order) is ever a training expression.

    python -m math_qwen.arithmetic --n 2000 --split train --format chat -o train.jsonl
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence

from math_qwen.word_problems import write_jsonl

SPLITS = ("train", "test")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def in_test(a: int, b: int, test_every: int = 5) -> bool:
    """The held-out rule, symmetric so ``a+b`` and ``b+a`` share a split."""
    low, high = sorted((a, b))
    return (3 * low + high) % test_every == 0


def generate(
    n: int, seed: int, split: str = "train", max_operand: int = 20, test_every: int = 5
) -> list[dict[str, str]]:
    """``n`` distinct expressions of one split as Math401 records."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    space = [
        (a, op, b)
        for a in range(max_operand + 1)
        for b in range(max_operand + 1)
        for op in OPS
        if not (op == "-" and b > a)
        and not (op == "*" and max(a, b) > 12)
        and in_test(a, b, test_every) == (split == "test")
    ]
    if n > len(space):
        raise ValueError(f"only {len(space)} distinct {split} expressions; ask for fewer")
    rng = random.Random(f"math_qwen.arithmetic:{split}:{seed}")
    chosen = rng.sample(space, n)
    return [{"query": f"{a}{op}{b}=", "response": str(OPS[op](a, b))} for a, op, b in chosen]


def to_chat(record: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    """The SFT form: the expression as the user turn, the number as the reply (as ``math401``
    prompts it in chat mode)."""
    return {
        "messages": [
            {"role": "user", "content": record["query"]},
            {"role": "assistant", "content": record["response"]},
        ]
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m math_qwen.arithmetic", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=SPLITS, default="train")
    parser.add_argument("--max-operand", type=int, default=20)
    parser.add_argument("--format", choices=("math401", "chat"), default="math401")
    parser.add_argument("-o", "--output", default="-")
    args = parser.parse_args(argv)
    try:
        records = generate(args.n, args.seed, args.split, args.max_operand)
    except ValueError as e:
        parser.error(str(e))
    rows = records if args.format == "math401" else [to_chat(r) for r in records]
    write_jsonl(rows, args.output, f"{args.split} expressions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
