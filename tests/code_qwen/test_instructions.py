"""Code-instruction SFT data from Python sources: selection, conversations, held-out split."""

import ast
import json
import re
import textwrap

import pytest

from code_qwen.instructions import (
    collect_functions,
    function_instructions,
    main,
    module_split,
    multi_turn_chat,
    multi_turn_instructions,
)
from tests.conftest import STDLIB

REQUEST = re.compile(r"Write a Python function `(\w+)\((.*?)\)` to solve the following problem:\n")

INIT = '''\
"""A package."""


def greet(name):
    """Return a greeting for *name*.

    >>> greet("Ada")
    'Hello, Ada!'
    >>> greet("")  # doctest: +ELLIPSIS
    'Hello, ...'
    >>> len(greet("Bo"))
    10
    >>> helper = 1
    >>> greet(helper)
    'Hello, 1!'
    """
    return f"Hello, {name}!"
'''

AREA = '''
def area(width, height=1):
    """Return the area of a width by height rectangle."""
    return width * height
'''

SHAPES = (
    "import functools\n"
    + AREA
    + '''

def _hidden(x):
    """Private helper."""
    return x


def undocumented(x):
    return x


def long_one(x):
    """Too long to keep."""
'''
    + "    x += 1\n" * 40
    + '''    return x


@functools.lru_cache
def cached(x):
    """Decorated."""
    return x


def abstract(x):
    """Only a stub."""
    raise NotImplementedError


class Shape:
    """A shape."""

    def scale(self, factor):
        """Return the shape scaled by a factor."""
        return factor * 2

    async def fetch(self):
        """Fetch the shape."""
        return await self.load()
'''
)


@pytest.fixture
def tree(tmp_path):
    """A small source tree with one function of every kind the selection must tell apart."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text(INIT)
    (tmp_path / "pkg" / "shapes.py").write_text(SHAPES)
    (tmp_path / "pkg" / "copy_of_shapes.py").write_text(AREA)  # sorts before shapes.py
    (tmp_path / "broken.py").write_text("def oops(:\n    pass\n")
    (tmp_path / "latin.py").write_bytes(b"# -*- coding: utf-8 -*-\nx = '\xff'\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text('def helper():\n    """Doc."""\n    return 1\n')
    return tmp_path


def test_selects_public_short_documented_undecorated_functions_and_counts_the_rest(tree):
    samples, counts = collect_functions(tree, max_lines=30, split=None)
    assert [(s.module, s.qualname) for s in samples] == [
        ("pkg", "greet"),
        ("pkg.copy_of_shapes", "area"),  # the later copy in pkg.shapes is a duplicate
    ]
    assert counts == {
        "files": 5,  # tests/ is not read
        "unreadable": 1,
        "unparsable": 1,
        "functions": 8,
        "kept": 2,
        "duplicate": 1,
        "private": 1,
        "no_docstring": 1,
        "too_long": 1,
        "decorated": 1,
        "trivial": 1,
    }
    assert samples[1].signature == "area(width, height=1)"
    assert samples[1].source == AREA.strip("\n")
    # A longer limit keeps the long function.
    names = [s.qualname for s in collect_functions(tree, max_lines=60, split=None)[0]]
    assert "long_one" in names


def test_methods_are_dedented_and_named_by_their_class(tree):
    samples, _ = collect_functions(tree / "pkg" / "shapes.py", split=None, include_methods=True)
    methods = {s.qualname: s for s in samples if s.is_method}
    assert set(methods) == {"Shape.scale", "Shape.fetch"}
    assert methods["Shape.scale"].source.startswith("def scale(self, factor):\n    ")
    assert methods["Shape.fetch"].is_async
    assert methods["Shape.fetch"].module == "pkg.shapes"
    conversation = multi_turn_chat(methods["Shape.scale"])["messages"]
    assert conversation[0]["content"].startswith(
        "Write a Python method `scale(self, factor)` of the class `Shape` to solve"
    )


def test_a_short_stdlib_function_becomes_its_request_and_source():
    records, counts = function_instructions(STDLIB / "shlex.py", split=None)
    assert counts["files"] == 1 and counts["kept"] == len(records)
    by_name = {REQUEST.match(r["messages"][0]["content"])[1]: r for r in records}
    user, assistant = by_name["quote"]["messages"]
    assert (user["role"], assistant["role"]) == ("user", "assistant")
    assert user["content"] == (
        "Write a Python function `quote(s)` to solve the following problem:\n"
        "Return a shell-escaped version of the string *s*."
    )
    assert assistant["content"].startswith('def quote(s):\n    """Return a shell-escaped')
    assert assistant["content"] == textwrap.dedent(assistant["content"])


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_answer_parses_and_defines_the_requested_function(split):
    records, _ = function_instructions(STDLIB / "email", split=split, system="You code.")
    assert records
    for record in records:
        system, user, assistant = record["messages"]
        assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant"]
        assert system["content"] == "You code."
        name = REQUEST.match(user["content"])[1]
        (definition,) = ast.parse(assistant["content"]).body
        assert isinstance(definition, ast.FunctionDef) and definition.name == name
        assert user["content"].endswith(ast.get_docstring(definition))
        assert len(assistant["content"].splitlines()) <= 30


def test_held_out_split_is_disjoint_from_train_by_module_and_source():
    train, _ = collect_functions(STDLIB / "email", split="train")
    test, _ = collect_functions(STDLIB / "email", split="test")
    both, _ = collect_functions(STDLIB / "email", split=None)
    assert train and test
    assert not {s.module for s in train} & {s.module for s in test}
    assert not {s.source for s in train} & {s.source for s in test}
    assert {s.module for s in test} == {
        m for m in {s.module for s in both} if module_split(m) == "test"
    }
    assert sorted(train + test, key=both.index) == both
    assert module_split("email.utils") == module_split("email.utils")  # stable, not salted
    assert {module_split(f"m{i}", test_percent=30) for i in range(50)} == {"train", "test"}


def test_order_is_deterministic_and_limit_takes_a_prefix():
    first, counts = collect_functions(STDLIB / "email", split="train")
    again, _ = collect_functions(STDLIB / "email", split="train")
    assert first == again
    limited, limited_counts = collect_functions(STDLIB / "email", split="train", limit=5)
    assert limited == first[:5] and limited_counts["kept"] == 5
    assert limited_counts["files"] <= counts["files"]


def test_doctest_examples_become_a_test_that_passes(tree):
    (greet,) = [s for s in collect_functions(tree, split=None)[0] if s.name == "greet"]
    # The ELLIPSIS example, the statement and the example needing `helper` are left out.
    assert greet.doctest_asserts() == [
        "assert greet(\"Ada\") == 'Hello, Ada!'",
        'assert len(greet("Bo")) == 10',
    ]
    messages = multi_turn_chat(greet)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[2]["content"] == "Now write a pytest test for `greet` based on its examples."
    test = messages[3]["content"]
    assert test.startswith("from pkg import greet\n\n\ndef test_greet():\n")
    from code_sandbox import run

    program = greet.source + "\n" + test.split("\n", 1)[1] + "\ntest_greet()\n"
    assert run(program).status == "passed"


def test_stage_two_follow_ups_are_derived_from_the_source():
    records, counts = multi_turn_instructions(STDLIB / "email", split="train", min_doc_words=5)
    assert records and counts["kept"] == len(records)
    kinds = set()
    for record in records:
        request, source, follow_up, answer = (m["content"] for m in record["messages"])
        name = REQUEST.match(request)[1]
        (definition,) = ast.parse(source).body
        assert len(ast.get_docstring(definition).split()) >= 5
        if follow_up.startswith("Show the same function"):
            kinds.add("bare")
            (bare,) = ast.parse(answer).body
            assert bare.name == name and ast.get_docstring(bare) is None
            assert ast.dump(bare.body[0]) == ast.dump(definition.body[1])
        elif follow_up.startswith("In short"):
            kinds.add("explain")
            assert answer and " ".join(answer.split()) == answer
            assert answer.split()[0] in ast.get_docstring(definition)
        else:
            kinds.add("test")
            assert follow_up.startswith("Now write a pytest test")
            assert "assert " in answer and ast.parse(answer)
    assert {"bare", "explain"} <= kinds


def test_command_line_writes_the_requested_stage(tree, tmp_path, capsys):
    out = tmp_path / "sft.jsonl"
    assert main(["--stage", "2", "--split", "train", "--root", str(tree), "-o", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected, _ = multi_turn_instructions(tree, split="train")
    assert rows == expected and len(rows) == 2  # pkg and pkg.copy_of_shapes hash to train
    assert "conversations" in capsys.readouterr().err
    main(["--stage", "1", "--root", str(tree), "--limit", "1", "--system", "S"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows == function_instructions(tree, limit=1, system="S")[0] and len(rows) == 1
    main(["--stage", "1", "--split", "test", "--root", str(tree)])
    assert capsys.readouterr().out == ""  # every module of the tree hashes to train
    with pytest.raises(SystemExit):
        main(["--root", str(tree / "missing")])
