"""A seeded generator of small Python function problems in HumanEval's schema.

Made for the CPU demo: HumanEval is out of reach for a tiny model trained for minutes, so these are
functions it can learn in that time: arithmetic on the arguments, string and list transforms,
conditionals and loops over ranges, each body one to three lines in one canonical style (list
comprehensions, ``sum``/``len``/``min``/``max``)::

    def add_then_times_3(a: int, b: int) -> int:
        \"\"\"Return the sum of a and b multiplied by 3.
        >>> add_then_times_3(2, 5)
        21
        \"\"\"
        return (a + b) * 3

A problem is a template (``TEMPLATES``) filled with constants (its key); the function name and the
docstring are derived from both, the doctest examples and the 3-5 asserts of ``check`` from
arguments drawn from the seed, and their expected values from running the canonical body itself.

Held-out split, by template and by surface form: the ``held_out`` templates occur only in
``"test"``; they combine skills the training templates teach one at a time (``x * k + m`` from
``x * k`` and ``x + k``, clipping from ``min`` and ``max``, a filtered sum from filtering and
summing, ...) or reword one (``Return k more than x.``). Every key of the other templates
belongs to exactly one split by a stable hash (``test_percent`` percent to ``"test"``), whatever
the seed. A docstring's wording and constants determine its template and key, so no test prompt is
a training prompt, and no test problem shares a template and constants with one. Within a split,
templates are drawn uniformly and each template's keys are used once before any repeats (with other
examples). Records carry ``template`` and ``constants`` besides HumanEval's fields; their chat form
(``to_chat``) asks in the chat HumanEval wording and answers with the function in a fenced block.

    python -m code_qwen.synthetic_functions --n 2000 --split train --format chat -o train.jsonl
    python -m code_qwen.synthetic_functions --n 200 --split test -o heldout.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import random
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from code_qwen.tasks import robust_chat_prompt

__all__ = [
    "REPLIES",
    "SPLITS",
    "TEMPLATES",
    "Template",
    "generate",
    "main",
    "split_keys",
    "to_chat",
]

SPLITS = ("train", "test")
WORDS = (
    "apple", "banana", "cat", "river", "stone", "sun", "tree", "code",
    "moon", "paper", "green", "orange", "light", "sea", "robot", "tea",
)  # fmt: skip
_AFFIXES = ("re", "un", "pre", "ing", "ed", "er", "ly", "ness", "full", "less", "over", "mini")
_SEPARATORS = (
    ("dash", "-"), ("comma", ", "), ("space", " "), ("underscore", "_"), ("slash", "/"),
    ("colon", ":"), ("plus", "+"), ("dot", "."),
)  # fmt: skip
_LABELS = (
    ("big", "small"), ("high", "low"), ("yes", "no"), ("hot", "cold"), ("up", "down"),
    ("pass", "fail"),
)  # fmt: skip
_ARGS: dict[str, Callable[[random.Random], Any]] = {
    "int": lambda rng: rng.randint(0, 20),
    "str": lambda rng: rng.choice(WORDS),
    "list[int]": lambda rng: [rng.randint(0, 20) for _ in range(rng.randint(1, 6))],
    "list[str]": lambda rng: rng.sample(WORDS, rng.randint(1, 4)),
}
# Constants: factors and addends; thresholds within the range of int arguments and list elements,
# so both outcomes of a comparison occur; divisors small enough that multiples occur below n.
# Single digits: the tokenizer splits numbers into digits, and a one-token constant is what a model
# of a few million trunk parameters learns to copy from the docstring in minutes.
_K = range(2, 10)
_THRESHOLDS = range(1, 10)
_DIVISORS = range(2, 10)
_MAX_MISSES = 10_000


@dataclass(frozen=True)
class Template:
    """One kind of function; ``{field}``s in ``function``, ``doc`` and ``body`` are constants."""

    name: str
    """Stable id: part of every key's hash, so renaming a template moves its keys between splits."""
    function: str
    """The function's name, e.g. ``add_then_times_{k}``."""
    args: str
    """The parameters with annotations, e.g. ``a: int, b: int``; ``_ARGS`` draws each type."""
    returns: str
    """The return annotation."""
    doc: str
    """The docstring's first line."""
    body: str
    """The body, lines separated by ``\\n``, unindented."""
    params: tuple[tuple[str, Iterable[Any]], ...]
    """Constants: (field, values); a field ``a,b`` takes a pair of values."""
    held_out: bool = False
    """Only in ``"test"``."""

    def keys(self) -> list[dict[str, Any]]:
        """Every combination of constants, in a fixed order."""
        fields = [f.split(",") for f, _ in self.params]
        keys = []
        for combo in itertools.product(*(list(values) for _, values in self.params)):
            key: dict[str, Any] = {}
            for names, value in zip(fields, combo):
                key.update(zip(names, value) if len(names) > 1 else {names[0]: value})
            keys.append(key)
        return keys


def _t(
    name: str,
    function: str,
    args: str,
    returns: str,
    doc: str,
    body: str,
    *params: tuple[str, Iterable[Any]],
    held_out: bool = False,
) -> Template:
    return Template(name, function, args, returns, doc, body, params, held_out)


TEMPLATES = (
    # arithmetic on the arguments
    _t("add", "add_{k}", "x: int", "int", "Return x plus {k}.", "return x + {k}", ("k", _K)),
    _t("sub", "subtract_{k}", "x: int", "int", "Return x minus {k}.", "return x - {k}", ("k", _K)),
    _t("mul", "times_{k}", "x: int", "int", "Return x multiplied by {k}.", "return x * {k}",
       ("k", _K)),
    _t("mod", "remainder_{k}", "x: int", "int", "Return the remainder of x divided by {k}.",
       "return x % {k}", ("k", _DIVISORS)),
    _t("add_mul", "add_then_times_{k}", "a: int, b: int", "int",
       "Return the sum of a and b multiplied by {k}.", "return (a + b) * {k}", ("k", _K)),
    _t("mul_add", "scale_by_{k}_and_add", "a: int, b: int", "int",
       "Return a multiplied by {k}, plus b.", "return a * {k} + b", ("k", _K)),
    # conditionals
    _t("cap", "cap_at_{k}", "x: int", "int", "Return x, but at most {k}.", "return min(x, {k})",
       ("k", _THRESHOLDS)),
    _t("floor", "at_least_{k}", "x: int", "int", "Return x, but at least {k}.",
       "return max(x, {k})", ("k", _THRESHOLDS)),
    _t("label", "{hi}_or_{lo}_{k}", "x: int", "str",
       'Return "{hi}" if x is greater than {k}, otherwise "{lo}".',
       'if x > {k}:\n    return "{hi}"\nreturn "{lo}"', ("hi,lo", _LABELS), ("k", _THRESHOLDS)),
    # strings
    _t("repeat", "repeat_{k}_times", "s: str", "str", "Return s repeated {k} times.",
       "return s * {k}", ("k", range(2, 6))),
    _t("suffix", "add_suffix_{w}", "s: str", "str", 'Return s followed by "{w}".',
       'return s + "{w}"', ("w", _AFFIXES)),
    _t("prefix", "add_prefix_{w}", "s: str", "str", 'Return "{w}" followed by s.',
       'return "{w}" + s', ("w", _AFFIXES)),
    _t("upper_suffix", "upper_with_{w}", "s: str", "str",
       'Return s in upper case, followed by "{w}".', 'return s.upper() + "{w}"', ("w", _AFFIXES)),
    _t("reverse_prefix", "reverse_after_{w}", "s: str", "str",
       'Return "{w}" followed by s reversed.', 'return "{w}" + s[::-1]', ("w", _AFFIXES)),
    _t("head", "first_{k}_chars", "s: str", "str", "Return the first {k} characters of s.",
       "return s[:{k}]", ("k", range(1, 7))),
    _t("tail", "last_{k}_chars", "s: str", "str", "Return the last {k} characters of s.",
       "return s[-{k}:]", ("k", range(1, 7))),
    _t("count_char", "count_{c}", "s: str", "int", 'Return how many times "{c}" occurs in s.',
       'return s.count("{c}")', ("c", "aenort")),
    _t("join", "join_with_{sep_name}", "words: list[str]", "str",
       'Return the words joined by "{sep}".', 'return "{sep}".join(words)',
       ("sep_name,sep", _SEPARATORS)),
    # lists
    _t("sum_plus", "sum_plus_{k}", "xs: list[int]", "int", "Return the sum of xs plus {k}.",
       "return sum(xs) + {k}", ("k", _K)),
    _t("max_times", "max_times_{k}", "xs: list[int]", "int",
       "Return the largest element of xs multiplied by {k}.", "return max(xs) * {k}", ("k", _K)),
    _t("keep_above", "keep_above_{k}", "xs: list[int]", "list[int]",
       "Return the elements of xs that are greater than {k}, in order.",
       "return [x for x in xs if x > {k}]", ("k", _THRESHOLDS)),
    _t("map_add", "add_{k}_to_each", "xs: list[int]", "list[int]",
       "Return xs with {k} added to every element.", "return [x + {k} for x in xs]", ("k", _K)),
    _t("map_mul", "multiply_each_by_{k}", "xs: list[int]", "list[int]",
       "Return xs with every element multiplied by {k}.", "return [x * {k} for x in xs]",
       ("k", _K)),
    _t("count_above", "count_above_{k}", "xs: list[int]", "int",
       "Return how many elements of xs are greater than {k}.",
       "return len([x for x in xs if x > {k}])", ("k", _THRESHOLDS)),
    # loops over ranges
    _t("range_sum", "sum_times_{k}_below", "n: int", "int",
       "Return the sum of i * {k} for every i from 0 to n - 1.",
       "return sum([i * {k} for i in range(n)])", ("k", _K)),
    _t("range_count", "count_divisible_by_{k}", "n: int", "int",
       "Return how many numbers from 0 to n - 1 are divisible by {k}.",
       "return len([i for i in range(n) if i % {k} == 0])", ("k", _DIVISORS)),
    _t("range_list", "multiples_of_{k}", "n: int", "list[int]",
       "Return the first n multiples of {k}, starting with 0.",
       "return [i * {k} for i in range(n)]", ("k", _K)),
    # held out: combinations of the skills above, and one rewording
    _t("mul_add_const", "times_{k}_plus_{m}", "x: int", "int",
       "Return x multiplied by {k}, plus {m}.", "return x * {k} + {m}",
       ("k", range(2, 10)), ("m", range(1, 10)), held_out=True),
    _t("clip", "clip_{lo}_to_{hi}", "x: int", "int",
       "Return x, but at least {lo} and at most {hi}.", "return min(max(x, {lo}), {hi})",
       ("lo", range(1, 10)), ("hi", range(10, 20)), held_out=True),
    _t("upper_repeat", "upper_{k}_times", "s: str", "str",
       "Return s in upper case, repeated {k} times.", "return s.upper() * {k}",
       ("k", range(2, 6)), held_out=True),
    _t("sum_above", "sum_above_{k}", "xs: list[int]", "int",
       "Return the sum of the elements of xs that are greater than {k}.",
       "return sum([x for x in xs if x > {k}])", ("k", _THRESHOLDS), held_out=True),
    _t("map_filter", "times_{k}_above_{m}", "xs: list[int]", "list[int]",
       "Return the elements of xs that are greater than {m}, each multiplied by {k}.",
       "return [x * {k} for x in xs if x > {m}]", ("k", range(2, 10)), ("m", range(1, 16)),
       held_out=True),
    _t("range_sum_divisible", "sum_divisible_by_{k}", "n: int", "int",
       "Return the sum of the numbers from 0 to n - 1 that are divisible by {k}.",
       "return sum([i for i in range(n) if i % {k} == 0])", ("k", _DIVISORS), held_out=True),
    _t("add_reworded", "increase_by_{k}", "x: int", "int", "Return {k} more than x.",
       "return x + {k}", ("k", _K), held_out=True),
)  # fmt: skip


def key_split(template: Template, key: dict[str, Any], test_percent: int = 25) -> str:
    """The split of a template filled with ``key``: a stable hash (not Python's salted one)."""
    if template.held_out:
        return "test"
    text = f"{template.name}:{json.dumps(key, sort_keys=True)}"
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "big") % 100 < test_percent else "train"


def split_keys(split: str, test_percent: int = 25) -> dict[Template, list[dict[str, Any]]]:
    """Each template's keys in ``split`` (templates without any left out), in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0 < test_percent < 100:
        raise ValueError(f"test_percent must be in 1..99, got {test_percent}")
    keys = {t: [k for k in t.keys() if key_split(t, k, test_percent) == split] for t in TEMPLATES}
    return {t: k for t, k in keys.items() if k}


def generate(
    n: int, seed: int, split: str = "train", test_percent: int = 25
) -> list[dict[str, str]]:
    """``n`` problems of one split with distinct prompts, as HumanEval records plus the
    ``template`` and ``constants`` they were made from. The same arguments give the same list."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    keys = split_keys(split, test_percent)
    templates = list(keys)
    # A string seed is hashed by random (sha512): stable across runs and platforms.
    rng = random.Random(f"code_qwen.synthetic_functions:{split}:{seed}")
    pending: dict[Template, list[dict[str, Any]]] = {t: [] for t in templates}
    records: list[dict[str, str]] = []
    seen: set[str] = set()
    misses = 0  # consecutive repeats: many in a row means the problem space is used up
    while len(records) < n:
        if misses > _MAX_MISSES:
            raise ValueError(f"could only make {len(records)} distinct {split} problems of {n}")
        template = rng.choice(templates)
        if not pending[template]:
            pending[template] = rng.sample(keys[template], len(keys[template]))
        record = _problem(template, pending[template].pop(), rng)
        if record["prompt"] in seen:
            misses += 1
            continue
        misses = 0
        seen.add(record["prompt"])
        records.append({"task_id": f"synthetic/{split}-{seed}/{len(records)}", **record})
    return records


def _problem(template: Template, key: dict[str, Any], rng: random.Random) -> dict[str, str]:
    name = template.function.format(**key)
    body = "".join(f"    {line}\n" for line in template.body.format(**key).split("\n"))
    header = f"def {name}({template.args}) -> {template.returns}:\n"
    # Our own template code: running it gives the examples and asserts the body must satisfy.
    namespace: dict[str, Any] = {}
    exec(header + body, namespace)
    function = namespace[name]
    types = [arg.split(": ")[1] for arg in template.args.split(", ")]
    calls: dict[str, str] = {}  # the arguments as written -> the result's repr
    for _ in range(100):  # 7 distinct calls; every argument type offers far more
        values = [_ARGS[t](rng) for t in types]
        calls.setdefault(", ".join(map(repr, values)), repr(function(*values)))
        if len(calls) == 7:
            break
    written = list(calls)
    shown = written[: rng.randint(1, 2)]
    tested = written[len(shown) :][: rng.randint(3, 5)]
    doc = "".join(f"    >>> {name}({a})\n    {calls[a]}\n" for a in shown)
    prompt = f'{header}    """{template.doc.format(**key)}\n{doc}    """\n'
    asserts = "".join(f"    assert candidate({a}) == {calls[a]}\n" for a in tested)
    return {
        "prompt": prompt,
        "canonical_solution": body,
        "test": f"def check(candidate):\n{asserts}",
        "entry_point": name,
        "template": template.name,
        "constants": json.dumps(key, sort_keys=True),
    }


REPLIES = ("function", "body")


def to_chat(
    record: dict[str, str], system: str | None = None, reply: str = "function"
) -> dict[str, list[dict[str, str]]]:
    """The SFT form: the chat HumanEval instruction as the user turn, and in a fenced block the
    function (``reply="function"``: its signature and body, without the docstring the prompt
    already shows) or its body alone (``"body"``: what follows the prompt's stub, which the
    chat grading appends to the prompt; a small model need not copy the name)."""
    if reply not in REPLIES:
        raise ValueError(f"reply {reply!r}: expected one of {', '.join(REPLIES)}")
    signature = record["prompt"].split("\n", 1)[0]
    code = record["canonical_solution"]
    if reply == "function":
        code = f"{signature}\n{code}"
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": robust_chat_prompt(record)})
    messages.append({"role": "assistant", "content": f"```python\n{code}```"})
    return {"messages": messages}


def main(argv: Sequence[str] | None = None) -> int:
    """Write generated problems as JSONL: HumanEval records or SFT conversations."""
    parser = argparse.ArgumentParser(
        prog="python -m code_qwen.synthetic_functions", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--n", type=int, default=500, help="number of problems")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=SPLITS, default="train")
    parser.add_argument(
        "--format",
        choices=("humaneval", "chat"),
        default="humaneval",
        help="humaneval: the records (for `specialize eval --data synthetic-functions=FILE`); "
        "chat: SFT conversations (for `specialize data prepare-sft`)",
    )
    parser.add_argument("--test-percent", type=int, default=25, help="keys held out, in percent")
    parser.add_argument("--system", default=None, help="system message for --format chat")
    parser.add_argument(
        "--reply",
        choices=REPLIES,
        default="function",
        help="--format chat: answer with the whole function or with its body alone",
    )
    parser.add_argument("-o", "--output", default="-", help="JSONL file ('-' = stdout)")
    args = parser.parse_args(argv)
    try:
        records = generate(args.n, args.seed, args.split, args.test_percent)
    except ValueError as error:
        parser.error(str(error))
    if args.format == "humaneval":
        rows = records
    else:
        rows = [to_chat(r, args.system, args.reply) for r in records]
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if args.output == "-":
        sys.stdout.write(lines)
    else:
        with open(args.output, "w", encoding="utf-8") as out:
            out.write(lines)
        print(f"wrote {len(rows)} {args.split} problems to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
