"""A seeded generator of simple arithmetic word problems with GSM8K-style worked solutions.

Made for the CPU demo: a tiny model trained for minutes has to get measurably better at exact match
on held-out problems, so the problems are few templates over small operands (addition, subtraction
with a non-negative result, single-digit multiplication; an optional two-step template), and the
solution is one short line per step ending in GSM8K's final line ``#### N``::

    Q: Tom has 3 apples. Tom buys 4 more. How many apples does Tom have now?
    A: Tom has 3 + 4 = 7 apples now.
       #### 7

Solutions carry no GSM8K calculator annotations (``<<3+4=7>>``): they would only add tokens a tiny
model has to learn to copy.

Held-out split: every (name, object) pair belongs to exactly one split; one pair in
``ProblemConfig.test_every`` (a diagonal of the name × object grid, so every name and every object
still occurs in both splits) is reserved for ``"test"``. Held-out problems thus use the same
templates, skills and words, but in combinations never seen in training. Every question starts
with its name and contains "How many [more] <object>", so a question text determines its pair and
the two splits can never share a question.

    python -m math_qwen.word_problems --n 2000 --seed 0 --split train -o train.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from math_qwen.answers import ANSWER_MARKER

__all__ = [
    "SPLITS",
    "ProblemConfig",
    "generate",
    "main",
    "split_pairs",
    "to_chat",
    "write_jsonl",
]

SPLITS = ("train", "test")

NAMES = (
    "Tom", "Anna", "Ben", "Maria", "Sam", "Lily", "Jack", "Emma", "Leo", "Nora", "Omar", "Mia",
    "Ravi", "Sara", "Hugo", "Zoe", "Ivan", "Lucy", "Kofi", "Ella", "Pedro", "Yuki", "Max", "Ada",
)  # fmt: skip

# (singular, plural): a count of one reads "1 apple".
OBJECTS = (
    ("apple", "apples"), ("pencil", "pencils"), ("marble", "marbles"), ("book", "books"),
    ("cookie", "cookies"), ("sticker", "stickers"), ("flower", "flowers"), ("coin", "coins"),
    ("shell", "shells"), ("balloon", "balloons"), ("card", "cards"), ("toy car", "toy cars"),
    ("orange", "oranges"), ("stamp", "stamps"), ("candle", "candles"), ("cupcake", "cupcakes"),
)  # fmt: skip


@dataclass(frozen=True)
class ProblemConfig:
    """Operand ranges (inclusive) and the kinds of problems to generate."""

    add_range: tuple[int, int] = (1, 20)
    """Operands of addition; subtraction draws two of these and subtracts the smaller."""
    mul_range: tuple[int, int] = (2, 9)
    """Both factors of multiplication."""
    ops: tuple[str, ...] = ("add", "sub", "mul")
    """Problem kinds to draw from: "add", "sub", "mul" and the two-step "add_sub"."""
    test_every: int = 5
    """One (name, object) pair in this many is reserved for the held-out split."""

    def __post_init__(self) -> None:
        for field, (lo, hi) in (("add_range", self.add_range), ("mul_range", self.mul_range)):
            if not 0 <= lo <= hi:
                raise ValueError(f"{field} must be (lo, hi) with 0 <= lo <= hi, got {(lo, hi)}")
        unknown = set(self.ops) - set(_SAMPLERS)
        if not self.ops or unknown:
            raise ValueError(
                f"ops must be a non-empty subset of {sorted(_SAMPLERS)}, got {self.ops}"
            )
        if self.test_every < 2:
            raise ValueError(
                f"test_every must be >= 2 so both splits are non-empty, got {self.test_every}"
            )


@dataclass(frozen=True)
class _Template:
    op: str
    question: str
    solution: str  # the steps; the "#### N" line is appended


# Every question starts with {name} and contains "How many [more] {obj}" (see the module docstring).
_TEMPLATES = (
    _Template(
        "add",
        "{name} has {a} {a_obj}. {name} buys {b} more. How many {obj} does {name} have now?",
        "{name} has {a} + {b} = {r} {r_obj} now.",
    ),
    _Template(
        "add",
        "{name} has {a} {a_obj} and {other} has {b} {b_obj}. How many {obj} do they have together?",
        "Together they have {a} + {b} = {r} {r_obj}.",
    ),
    _Template(
        "add",
        "{name} found {a} {a_obj} on Monday and {b} {b_obj} on Tuesday. "
        "How many {obj} did {name} find in all?",
        "{name} found {a} + {b} = {r} {r_obj} in all.",
    ),
    _Template(
        "sub",
        "{name} has {a} {a_obj} and gives {b} of them to {other}. "
        "How many {obj} does {name} have left?",
        "{name} has {a} - {b} = {r} {r_obj} left.",
    ),
    _Template(
        "sub",
        "{name} had {a} {a_obj} but lost {b}. How many {obj} does {name} have now?",
        "{name} has {a} - {b} = {r} {r_obj} now.",
    ),
    _Template(
        "sub",
        "{name} has {a} {a_obj} and {other} has {b} {b_obj}. "
        "How many more {obj} does {name} have than {other}?",
        "{name} has {a} - {b} = {r} more {r_obj} than {other}.",
    ),
    _Template(
        "mul",
        "{name} has {a} {a_bags} with {b} {b_obj} in each bag. How many {obj} does {name} have in total?",
        "{name} has {a} * {b} = {r} {r_obj} in total.",
    ),
    _Template(
        "mul",
        "{name} gets {b} {b_obj} every day for {a} {a_days}. How many {obj} does {name} get?",
        "{name} gets {a} * {b} = {r} {r_obj}.",
    ),
    _Template(
        "add_sub",
        "{name} has {a} {a_obj}, buys {b} more and then gives {c} to {other}. "
        "How many {obj} does {name} have now?",
        "{name} has {a} + {b} = {s} {s_obj} after buying.\n{name} has {s} - {c} = {r} {r_obj} now.",
    ),
)


def _sample_add(rng: random.Random, cfg: ProblemConfig) -> dict[str, int]:
    a, b = rng.randint(*cfg.add_range), rng.randint(*cfg.add_range)
    return {"a": a, "b": b, "r": a + b}


def _sample_sub(rng: random.Random, cfg: ProblemConfig) -> dict[str, int]:
    # Larger minus smaller keeps the result non-negative without skewing toward small minuends.
    b, a = sorted((rng.randint(*cfg.add_range), rng.randint(*cfg.add_range)))
    return {"a": a, "b": b, "r": a - b}


def _sample_mul(rng: random.Random, cfg: ProblemConfig) -> dict[str, int]:
    a, b = rng.randint(*cfg.mul_range), rng.randint(*cfg.mul_range)
    return {"a": a, "b": b, "r": a * b}


def _sample_add_sub(rng: random.Random, cfg: ProblemConfig) -> dict[str, int]:
    a, b = rng.randint(*cfg.add_range), rng.randint(*cfg.add_range)
    c = rng.randint(min(cfg.add_range[0], a + b), a + b)  # never gives away more than there is
    return {"a": a, "b": b, "c": c, "s": a + b, "r": a + b - c}


_SAMPLERS: dict[str, Callable[[random.Random, ProblemConfig], dict[str, int]]] = {
    "add": _sample_add,
    "sub": _sample_sub,
    "mul": _sample_mul,
    "add_sub": _sample_add_sub,
}


_MAX_MISSES = 10_000


def split_pairs(split: str, test_every: int = 5) -> list[tuple[str, tuple[str, str]]]:
    """The (name, (singular, plural)) pairs a split draws from, in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [
        (name, obj)
        for i, name in enumerate(NAMES)
        for j, obj in enumerate(OBJECTS)
        if ((i + j) % test_every == 0) == (split == "test")
    ]


def generate(
    n: int, seed: int, split: str = "train", config: ProblemConfig | None = None
) -> list[dict[str, str]]:
    """``n`` distinct word problems of one split as ``{"id", "question", "solution", "answer"}``.

    The same (n, seed, split, config) always gives the same list; ``answer`` is the normalized final
    number, which is also what ``extract_answer(solution)`` returns.
    """
    cfg = config or ProblemConfig()
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    pairs = split_pairs(split, cfg.test_every)
    templates = [t for t in _TEMPLATES if t.op in cfg.ops]
    others = {name: [m for m in NAMES if m != name] for name in NAMES}
    # A string seed is hashed by random (sha512), so streams are stable across runs and platforms;
    # the split is part of it so train and test of one seed are not the same draws.
    rng = random.Random(f"math_qwen.word_problems:{split}:{seed}")
    records: list[dict[str, str]] = []
    seen: set[str] = set()
    misses = 0  # consecutive duplicates: many in a row means the problem space is used up
    while len(records) < n:
        if misses > _MAX_MISSES:
            raise ValueError(
                f"could only make {len(records)} distinct problems of {n}: widen the operand "
                "ranges or enable more ops"
            )
        template = rng.choice(templates)
        name, (singular, plural) = rng.choice(pairs)
        other = rng.choice(others[name])
        values = _SAMPLERS[template.op](rng, cfg)
        fields: dict[str, object] = {"name": name, "other": other, "obj": plural, **values}
        for key, value in values.items():
            fields[f"{key}_obj"] = singular if value == 1 else plural
        fields["a_bags"] = "bag" if values["a"] == 1 else "bags"
        fields["a_days"] = "day" if values["a"] == 1 else "days"
        question = template.question.format(**fields)
        if question in seen:
            misses += 1
            continue
        misses = 0
        seen.add(question)
        answer = str(values["r"])
        solution = f"{template.solution.format(**fields)}\n{ANSWER_MARKER} {answer}"
        records.append(
            {
                "id": f"{split}-{seed}-{len(records):06d}",
                "question": question,
                "solution": solution,
                "answer": answer,
            }
        )
    return records


def to_chat(record: dict[str, str], system: str | None = None) -> dict[str, list[dict[str, str]]]:
    """The SFT form of a problem: ``{"messages": [system?, user = question, assistant = solution]}``."""
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": record["question"]})
    messages.append({"role": "assistant", "content": record["solution"]})
    return {"messages": messages}


def main(argv: Sequence[str] | None = None) -> int:
    """Write generated problems as JSONL (chat messages or plain records)."""
    parser = argparse.ArgumentParser(
        prog="python -m math_qwen.word_problems", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--n", type=int, default=2000, help="number of problems")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=SPLITS, default="train")
    parser.add_argument("-o", "--output", default="-", help="JSONL file ('-' = stdout)")
    parser.add_argument(
        "--format",
        choices=("chat", "records", "gsm8k"),
        default="chat",
        help="chat: SFT messages; records: id/question/solution/answer; gsm8k: GSM8K's schema "
        "(question, answer = the worked solution ending '#### N'), for `specialize eval --data`",
    )
    parser.add_argument("--system", default=None, help="system message for --format chat")
    parser.add_argument("--add-range", type=int, nargs=2, default=(1, 20), metavar=("LO", "HI"))
    parser.add_argument("--mul-range", type=int, nargs=2, default=(2, 9), metavar=("LO", "HI"))
    parser.add_argument(
        "--ops", nargs="+", choices=sorted(_SAMPLERS), default=["add", "sub", "mul"]
    )
    args = parser.parse_args(argv)
    try:
        config = ProblemConfig(tuple(args.add_range), tuple(args.mul_range), tuple(args.ops))
        records = generate(args.n, args.seed, args.split, config)
    except ValueError as error:
        parser.error(str(error))
    if args.format == "records":
        rows = records
    elif args.format == "gsm8k":
        rows = [{"question": r["question"], "answer": r["solution"]} for r in records]
    else:
        rows = [to_chat(r, args.system) for r in records]
    write_jsonl(rows, args.output, f"{args.split} problems")
    return 0


def write_jsonl(rows: Sequence[dict], output: str, what: str) -> None:
    """Rows as JSON lines to ``output`` ('-' = stdout), saying on stderr how many were written."""
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if output == "-":
        sys.stdout.write(lines)
        return
    with open(output, "w", encoding="utf-8") as out:
        out.write(lines)
    print(f"wrote {len(rows)} {what} to {output}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
