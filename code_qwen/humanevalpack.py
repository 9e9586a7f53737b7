"""HumanEvalPack "synthesize" (Muennighoff et al., OctoPack): HumanEval in six languages, one task
per language (``humanevalpack-python``, ``-js``, ``-java``, ``-go``, ``-cpp``, ``-rust``).

Records use the published ``bigcode/humanevalpack`` schema (hub config = language). Two protocols
(docs/paper.md §10):

- ``paper``: bigcode-evaluation-harness's ``humanevalsynthesize-LANG`` (``BIGCODE_HUMANEVALPACK``),
  prompt ``continue`` in ``base`` mode (the record's ``prompt``, stripped) and ``codeqwen`` in
  ``chat`` mode (a ChatML user turn holding the ``instruction``, no system turn, and the assistant
  turn pre-filled with the prompt, which the model continues). A completion is cut at the
  harness's stop words and by ``remove_last_block`` (Python: the first unindented line; the
  others: where the function's braces close), appended to the stripped prompt, and glued to the
  test as the harness does per language (``bigcode_program``: imports, ``fn main`` and the
  declaration's ``use`` line for Rust, ``package main``/imports for Go).
- ``robust``: ``base`` completes the prompt verbatim, cut the same way; ``chat`` sends the
  ``instruction`` after the default system turn and grades the first fenced block of the reply
  (else the whole reply) in place of the prompt, since the model writes the whole function; a Go
  reply's own ``package main`` and imports are kept out of the program's.

Every program, compilation included (it handles untrusted code), runs in ``sandbox``;
a completion passes when the program exits 0 within the language's timeout (py/js/java 10 s,
go 20 s, cpp 60 s, rust 300 s). A missing toolchain makes every sample of that language an
``error`` with a message saying so; ``available_languages`` lets callers skip such tasks first.
Known differences from the harness: a JavaScript ``console.assert`` that fails
throws (the harness fails a run that writes to stderr, which a failed assert does).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from code_qwen.execution import with_numpy
from code_qwen.tasks import CHAT_STOP, _CodeTask, extract_code, run_grade
from code_sandbox import ERROR, Program, RunResult, Sandbox, SandboxConfig
from specialize.eval.tasks import (
    PAPER,
    ROBUST,
    Grade,
    HubSource,
    Protocol,
    TaskError,
    check_mode,
    register,
    truncate,
)

LANGUAGES = ("python", "js", "java", "go", "cpp", "rust")
TIMEOUTS = {"python": 10.0, "js": 10.0, "java": 10.0, "go": 20.0, "cpp": 60.0, "rust": 300.0}
BIGCODE_COMMIT = "8fc5bae6479c4fbbb28c3f8b644f6a15b3f3b5bd"
# bigcode's --max_length_generation default (bigcode_eval main.py): prompt and completion together.
BIGCODE_MAX_LENGTH = 512
BIGCODE_HUMANEVALPACK = f"bigcode-project/bigcode-evaluation-harness:bigcode_eval/tasks/humanevalpack.py@{BIGCODE_COMMIT}"
# The harness's stop words (from CodeGeeX/MultiPL-E); only Python and Go cut at a new top-level
# definition, the others end where the function's closing brace does.
BASE_STOP = {
    "python": ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\nassert"),
    "js": (),
    "java": (),
    "go": ("\n//", "\nfunc main(", "struct", "\nfunc"),
    "cpp": (),
    "rust": (),
}
# The tools each language needs on the host (compilers and runtimes run inside the sandbox).
TOOLS = {
    "python": (),
    "js": ("node",),
    "java": ("javac", "java"),
    "go": ("go",),
    "cpp": ("g++",),
    "rust": ("rustc",),
}
PYTHON_IMPORTS = (
    # The harness's helper minus numpy (``robust``: the standard library only).
    "import math\nimport re\nimport sys\nimport copy\nimport datetime\nimport itertools\n"
    "import collections\nimport heapq\nimport statistics\nimport functools\nimport hashlib\n"
    "import string\nfrom typing import *\nfrom collections import *\n"
)
# The harness's IMPORT_HELPER["python"] itself; its sandbox provides numpy (``with_numpy``).
BIGCODE_PYTHON_IMPORTS = PYTHON_IMPORTS.replace(
    "import hashlib\n", "import hashlib\nimport numpy\nimport numpy as np\n"
)
CPP_IMPORTS = (
    "using namespace std;",
    "#include<stdlib.h>",
    "#include<algorithm>",
    "#include<cmath>",
    "#include<math.h>",
    "#include<numeric>",
    "#include<stdio.h>",
    "#include<vector>",
    "#include<set>",
    "#include<map>",
    "#include<queue>",
    "#include<stack>",
    "#include<list>",
    "#include<deque>",
    "#include<string>",
    "#include<climits>",
    "#include<cstring>",
    "#include<iostream>",
    "#include<sstream>",
    "#include<fstream>",
)
# BIGCODE_HUMANEVALPACK's IMPORT_HELPER["go"]: added when used (Go/162 needs crypto/md5).
# BIGCODE_HUMANEVALPACK's IMPORT_HELPER["cpp"] in its order (boost/any.hpp: Debian's libboost-dev).
BIGCODE_CPP_IMPORTS = (*CPP_IMPORTS[:14], "#include<boost/any.hpp>", *CPP_IMPORTS[14:])
GO_PACKAGES = (
    "math",
    "strings",
    "fmt",
    "strconv",
    "time",
    "bytes",
    "regexp",
    "sort",
    "math/rand",
    "crypto/md5",
)
# console.assert only prints; the pack's JS tests rely on it, so make a failed one exit non-zero.
JS_PRELUDE = (
    "console.assert = (cond, ...msg) => { if (!cond) { "
    "throw new Error('Assertion failed' + (msg.length ? ': ' + msg.join(' ') : '')); } };\n"
)
# JVM and rustc reserve far more address space than they use, and run many threads.
HEAVY_MEMORY = 16 << 30
HEAVY_PROCESSES = 256
JVM_FLAGS = "-Xmx512m -Xss8m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -XX:CICompilerCount=1"
_EXPOSED = "/tmp/.toolchain"
DEBIAN_GOPATH = "/usr/share/gocode"
TESTIFY = "github.com/stretchr/testify"


class ToolchainMissing(TaskError):
    """A language's compiler or runtime is not installed (or not usable by the sandbox)."""


def default_search_path() -> str:
    """Where toolchains are looked up: the sandbox's ``PATH``, then rustup's and Go's usual
    install directories (not on the sandbox's ``PATH``)."""
    extra = [os.path.expanduser("~/.cargo/bin"), "/usr/local/go/bin"]
    return ":".join([SandboxConfig().path, *extra])


@dataclass(frozen=True)
class Toolchain:
    """A language's tools as the sandbox sees them."""

    tools: Mapping[str, str]
    """Tool name -> absolute path to use inside the sandbox."""
    bind_paths: Mapping[str, str]
    """Host directories to bind into the sandbox (``SandboxConfig.bind_paths``)."""
    env: Mapping[str, str]
    """Extra environment for the program."""


def _world_readable(path: str) -> bool:
    path = os.path.realpath(path)
    while True:
        if os.stat(path).st_mode & 0o005 != 0o005:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


@cache
def _rust_sysroot(rustc: str) -> str:
    # rustup's shim execs the real compiler from a toolchain it finds through $HOME; the
    # sandbox has no such home, so the sysroot itself is exposed and its rustc run directly.
    out = subprocess.run(
        [rustc, "--print", "sysroot"], capture_output=True, text=True, timeout=60, check=True
    )
    return out.stdout.strip()


def find_toolchain(language: str, search_path: str | None = None) -> Toolchain:
    """The tools for ``language`` found on ``search_path`` (default ``default_search_path()``);
    raises ``ToolchainMissing`` naming what is missing."""
    if language not in LANGUAGES:
        raise TaskError(f"humanevalpack language {language!r}: expected one of {LANGUAGES}")
    path = default_search_path() if search_path is None else search_path
    tools: dict[str, str] = {}
    binds: dict[str, str] = {}
    env: dict[str, str] = {}
    for tool in TOOLS[language]:
        found = shutil.which(tool, path=path) if path else None
        if found is None:
            raise ToolchainMissing(
                f"toolchain {tool!r} not found (searched {path or 'an empty PATH'}): install it "
                f"or drop the task humanevalpack-{language}"
            )
        real = os.path.realpath(found)
        if tool == "rustc":
            try:
                root = _rust_sysroot(found)
            except (OSError, subprocess.SubprocessError) as e:
                raise ToolchainMissing(
                    f"toolchain 'rustc' at {found} does not work ({e}): install it or drop the "
                    "task humanevalpack-rust"
                ) from e
            real = os.path.join(root, "bin", "rustc")
        elif tool == "go":
            root = os.path.dirname(os.path.dirname(real))
        else:
            root = os.path.dirname(real)
        if not _world_readable(root):
            target = f"{_EXPOSED}-{language}-{tool.replace('+', 'p')}"
            binds[root] = target
            real, root = target + real[len(root) :], target
        if tool == "go":
            env["GOROOT"] = root
        tools[tool] = real
    if language == "go":
        # Module downloads are impossible without a network: tests must find testify in GOPATH,
        # e.g. Debian's golang-github-stretchr-testify-dev, which installs it in GOPATH mode.
        env.update(GOFLAGS="-mod=mod", GOPROXY="off", GOCACHE="/tmp/go-cache")
        if os.path.isdir(os.path.join(DEBIAN_GOPATH, "src", TESTIFY)):
            env.update(GO111MODULE="off", GOPATH=DEBIAN_GOPATH, GOFLAGS="")
    return Toolchain(tools, binds, env)


# Debian packages providing each language's tools (and what the tests and ``paper`` need besides).
DEBIAN_PACKAGES = {
    "python": (),
    "js": ("nodejs",),
    "java": ("default-jdk-headless",),
    "go": ("golang-go", "golang-github-stretchr-testify-dev"),
    "cpp": ("g++", "libboost-dev"),
    "rust": ("rustc",),
}


def toolchain_report(search_path: str | None = None) -> list[str]:
    """One line per language: the tools found, or what is missing and the Debian packages that
    provide it (``make test`` prints it first)."""
    lines = []
    for language in LANGUAGES:
        try:
            toolchain = find_toolchain(language, search_path)
        except ToolchainMissing as e:
            packages = " ".join(DEBIAN_PACKAGES[language])
            lines.append(f"{language}: missing ({e}); apt-get install {packages}")
            continue
        extra = []
        if language == "go" and toolchain.env.get("GO111MODULE") != "off":
            extra.append("testify not in Debian's GOPATH: golang-github-stretchr-testify-dev")
        if language == "cpp" and not os.path.exists("/usr/include/boost/any.hpp"):
            extra.append("no boost/any.hpp, which the paper protocol includes: libboost-dev")
        tools = ", ".join(toolchain.tools.values()) or "the sandbox's Python"
        lines.append(f"{language}: {tools}" + "".join(f"; {x}" for x in extra))
    return lines


def available_languages(search_path: str | None = None) -> list[str]:
    """The languages whose toolchain is installed here, so callers can skip the others."""
    available = []
    for language in LANGUAGES:
        try:
            find_toolchain(language, search_path)
        except ToolchainMissing:
            continue
        available.append(language)
    return available


def assemble(record: Mapping[str, Any], code: str, language: str, mode: str) -> str:
    """The program graded for ``code``: in ``base`` mode a completion of ``prompt``, in ``chat``
    mode a whole function that replaces it; then the record's test, with the harness's glue."""
    body = record["prompt"] + code if check_mode(mode) == "base" else code
    test = record["test"]
    if language == "python":
        return f"{PYTHON_IMPORTS}{body}\n{test}\n"
    if language == "js":
        return f"{JS_PRELUDE}{body}\n{test}\n"
    if language == "java":
        return f"{body}\n{test}\n"
    if language == "cpp":
        if mode == "chat":
            body = body.split("int main")[0]  # the pack's test brings its own main
        missing = "\n".join(line for line in CPP_IMPORTS if line not in body)
        # ``using namespace std`` must follow the includes, so it goes last.
        lines = missing.splitlines()
        if "using namespace std;" in lines:
            lines.remove("using namespace std;")
            lines.append("using namespace std;")
        return "\n".join(lines) + f"\n{body}\n{test}\n"
    if language == "rust":
        if mode == "base":
            body = record["declaration"] + code
        return f"\nfn main(){{ \n }} \n{body}\n{test}\n"
    if language == "go":
        body = body.replace(record.get("import", ""), "")
        # A whole-file reply brings its own package clause; the test setup has one.
        body = re.sub(r"^\s*package\s+main\s*$", "", body, flags=re.MULTILINE)
        setup = record.get("test_setup", "")
        used = [
            f'"{pkg}"'
            for pkg in GO_PACKAGES
            if pkg not in setup
            and f'"{pkg}"' not in body
            and any(
                f"{pkg.split('/')[-1]}." in line and not line.lstrip().startswith("//")
                for line in body.splitlines()
            )
        ]
        imports = "import (\n" + "".join(f"    {p}\n" for p in used) + ")\n" if used else ""
        return f"{setup}\n{imports}{body}\n{test}\n"
    raise TaskError(f"humanevalpack language {language!r}: expected one of {LANGUAGES}")


def remove_last_block(code: str, language: str) -> str:
    """BIGCODE_HUMANEVALPACK's ``remove_last_block`` (``HumanEvalPackGenerative``): ``code`` cut at
    the stop words, then Python at its first unindented line, the other languages where the
    function's braces close (Java's class brace counts as open too)."""
    for word in (*BASE_STOP[language], "<|endoftext|>"):
        if word in code:
            code = code[: code.find(word)]
    if language == "python":
        lines = code.split("\n")
        for i, line in enumerate(lines):
            if len(line.strip()) > 0 and line[0] != " " and line[0] != "\t":
                return "\n".join(lines[:i])
        return code
    open_brackets = 2 if language == "java" else 1
    for i, c in enumerate(code):
        if c == "{":
            open_brackets += 1
        elif c == "}":
            open_brackets -= 1
        if open_brackets == 0:
            return code[: i + 1]
    if language == "java":
        main_pos = code.find("public static void main")
        if main_pos != -1:
            code = code[:main_pos] + "}"
        if "}" in code:
            code = code[: code.rfind("}")] + "}"
        if code.count("{") - 1 == code.count("}"):
            code += "\n}"
    elif "}" in code:
        code = code[: code.rfind("}")] + "}"
    return code


def bigcode_program(record: Mapping[str, Any], completion: str, language: str) -> str:
    """The program BIGCODE_HUMANEVALPACK runs for a post-processed completion: the stripped prompt
    and the completion (``postprocess_generation``), the per-language changes of
    ``process_results``, then the test as ``code_eval_octopack`` appends it (``"\\n" + "\\n" +
    test``)."""
    g = record["prompt"].rstrip() + completion
    test = "\n" + record["test"]
    if language == "python":
        g = (BIGCODE_PYTHON_IMPORTS + g).strip()
    elif language == "js":
        g = JS_PRELUDE + g
    elif language == "cpp":
        g = ("\n".join(BIGCODE_CPP_IMPORTS) + "\n" + g.split("int main")[0]).strip()
    elif language == "java":
        g = g.replace("public class Main {\n    }", "").strip()
    elif language == "go":
        g = _bigcode_go(record, g, test)
    elif language == "rust":
        g = _bigcode_rust(record, g)
    else:
        raise TaskError(f"humanevalpack language {language!r}: expected one of {LANGUAGES}")
    return g + "\n" + test


def _bigcode_go(record: Mapping[str, Any], gen: str, test: str) -> str:
    setup = record["test_setup"] + "\n"
    for line in setup.split("\n"):
        line = line.replace("import", "").replace("(", "").replace(")", "").strip()
        if line.startswith('"') and line in gen:
            setup = setup.replace(line, "")
    g = setup + gen + "\n" + test
    other_pkgs = set()
    for pkg in GO_PACKAGES:
        if '"' + pkg + '"' not in g:
            p = pkg.split("/")[-1]
            # Used outside a comment (Go rejects an unused import).
            if any(p + "." in line and not line.strip().startswith("//") for line in g.split("\n")):
                other_pkgs.add('"' + p + '"')
    # As the harness: the import is the package's last path element (``"rand"`` for
    # math/rand), which compiles only when the prompt imports the full path itself.
    imports = ""
    if other_pkgs:
        imports = "import (\n" + "\n".join("    " + p for p in sorted(other_pkgs)) + "\n)\n"
    if "package main" in gen and "package main" in setup:
        gen = gen.replace("package main", "")
    return setup + imports + gen


def _bigcode_rust(record: Mapping[str, Any], g: str) -> str:
    new_gen = "" if "fn main()" in g else "fn main(){}\n"
    for line in record["declaration"].split("\n"):
        if line.strip() not in g:
            # Skip if the function is already present.
            if line.strip().startswith("fn") and line.strip().split("(")[0] in g:
                continue
            new_gen += line.strip() + "\n"
    # If fn main() is present twice, cut off before the second one.
    g = "fn main()".join(g.split("fn main()")[0:2])
    return new_gen + g


def program(source: str, language: str, toolchain: Toolchain, timeout: float) -> Program:
    """``source`` as a sandbox ``Program``: compiled (if needed) and run by the toolchain."""
    tool = {name: shlex.quote(p) for name, p in toolchain.tools.items()}
    if language == "python":
        return Program(source, timeout=timeout)
    if language == "js":
        script, name = f"{tool['node']} main.js", "main.js"
    elif language == "java":
        # The pack's test is ``public class Main`` using the prompt's ``class Solution``.
        flags = " ".join(f"-J{f}" for f in JVM_FLAGS.split())
        script = (
            f"{tool['javac']} {flags} -d classes Main.java && "
            f"{tool['java']} {JVM_FLAGS} -cp classes Main"
        )
        name = "Main.java"
    elif language == "cpp":
        script, name = f"{tool['g++']} -std=c++17 -o main main.cpp && ./main", "main.cpp"
    elif language == "rust":
        # ``rustc --test`` runs the pack's ``#[cfg(test)] mod tests``; one codegen unit keeps
        # rustc's thread count low.
        script = (
            f"{tool['rustc']} --edition 2021 --test -C codegen-units=1 -o main main.rs "
            "&& ./main --test-threads=1"
        )
        name = "main.rs"
    elif language == "go":
        script, name = f"{tool['go']} test main_test.go", "main_test.go"
    else:
        raise TaskError(f"humanevalpack language {language!r}: expected one of {LANGUAGES}")
    return Program(
        source,
        language=language,
        command=("sh", "-c", script),
        filename=name,
        timeout=timeout,
    )


def _missing(message: str) -> RunResult:
    return RunResult(ERROR, None, None, 0.0, 0.0, "", "", False, "none", "none", None, message)


@dataclass(frozen=True, kw_only=True)
class HumanEvalPackTask(_CodeTask):
    """One language of HumanEvalPack synthesize."""

    language: str
    """``python``, ``js``, ``java``, ``go``, ``cpp`` or ``rust`` (the hub config)."""
    search_path: str | None = None
    """Where the toolchain is looked up; None: ``default_search_path()``."""

    @property
    def timeout(self) -> float:
        """Seconds per program, compilation included (the harness's per-language value)."""
        return TIMEOUTS[self.language]

    def protocol(self, mode: str) -> Protocol:
        """0-shot in both modes; pass@k from sandboxed runs. ``paper`` stops at the harness's
        words in both modes (a chat model's end of turn too)."""
        base = check_mode(mode) == "base"
        if self.protocol_name == PAPER:
            stop = (*BASE_STOP[self.language], "<|endoftext|>")
            stop = stop if base else (*stop, "<|im_end|>")
            return Protocol(
                mode,
                0,
                stop,
                BIGCODE_MAX_LENGTH,
                "sandbox",
                self.timeout,
                PAPER,
                BIGCODE_HUMANEVALPACK,
                max_length=BIGCODE_MAX_LENGTH,  # the prompt counts against the budget
                repetition_penalty=None,  # the harness's HF model: the checkpoint's defaults
            )
        stop = ("<|endoftext|>", *BASE_STOP[self.language]) if base else CHAT_STOP
        return Protocol(mode, 0, stop, 512, "sandbox", self.timeout, ROBUST)

    def prompt(self, record: Mapping[str, Any], mode: str) -> str:
        """Base: the prompt (``robust``: verbatim, trailing newline kept; ``paper``: stripped, as
        the harness's ``get_prompt``). Chat: the instruction (``paper``: stripped)."""
        text = record["prompt"] if check_mode(mode) == "base" else record["instruction"]
        return text.strip() if self.protocol_name == PAPER else text

    def chat_system(self) -> str | None:
        """``paper``: none (the harness's ``codeqwen`` template has no system turn)."""
        return None if self.protocol_name == PAPER else super().chat_system()

    def prefill(self, record: Mapping[str, Any]) -> str:
        """``paper``: the prompt, right-stripped, which the model continues."""
        return record["prompt"].rstrip() if self.protocol_name == PAPER else ""

    def postprocess(self, record: Mapping[str, Any], completion: str, mode: str) -> str:
        """``remove_last_block`` of the completion (``paper``: right-stripped first, as the
        harness, whose generations still hold the stop word: a completion already cut before it
        can differ in the whitespace ending the function). ``robust`` chat: the first fenced
        block, else the whole reply."""
        if self.protocol_name == PAPER:
            text = completion if mode == "base" else truncate(completion, ("<|im_end|>",))
            return remove_last_block(text.rstrip(), self.language)
        text = truncate(completion, self.protocol(mode).stop)
        if mode == "base":
            return remove_last_block(text, self.language)
        return extract_code(text)

    def grade(
        self,
        records: Sequence[Mapping[str, Any]],
        completions: Sequence[str],
        mode: str,
        workers: int = 2,
    ) -> list[Grade]:
        """Each assembled program compiled and run in the sandbox; without the language's
        toolchain every sample is an ``error`` (see ``grade_runs`` for the message)."""
        return [run_grade(run) for run in self.grade_runs(records, completions, mode, workers)]

    def grade_runs(
        self,
        records: Sequence[Mapping[str, Any]],
        completions: Sequence[str],
        mode: str,
        workers: int = 2,
    ) -> list[RunResult]:
        """The sandbox's full report per completion (output, errors), in input order."""
        if len(records) != len(completions):
            raise ValueError(f"{len(records)} records but {len(completions)} completions")
        check_mode(mode)
        try:
            toolchain = find_toolchain(self.language, self.search_path)
        except ToolchainMissing as e:
            return [_missing(str(e)) for _ in records]
        if self.protocol_name == PAPER:  # a continuation of the prompt in both modes
            sources = [bigcode_program(r, c, self.language) for r, c in zip(records, completions)]
        else:
            sources = [assemble(r, c, self.language, mode) for r, c in zip(records, completions)]
        programs = [program(src, self.language, toolchain, self.timeout) for src in sources]
        heavy = self.language in ("java", "rust", "go")
        config = SandboxConfig(
            timeout=self.timeout,
            memory_bytes=HEAVY_MEMORY if heavy else SandboxConfig.memory_bytes,
            max_processes=HEAVY_PROCESSES if heavy else SandboxConfig.max_processes,
            max_open_files=1024 if heavy else SandboxConfig.max_open_files,
            tmpfs_bytes=512 << 20 if heavy else SandboxConfig.tmpfs_bytes,
            file_size_bytes=256 << 20 if heavy else SandboxConfig.file_size_bytes,
            env=dict(toolchain.env),
            bind_paths=dict(toolchain.bind_paths),
        )
        if self.language == "python":  # the harness's import helper imports numpy
            config = with_numpy(config)
        with Sandbox(config) as sandbox:
            return sandbox.run_many(programs, workers=workers)


LANGUAGE_NAMES = {
    "python": "Python",
    "js": "JavaScript",
    "java": "Java",
    "go": "Go",
    "cpp": "C++",
    "rust": "Rust",
}

HUMANEVALPACK = {
    language: register(
        HumanEvalPackTask(
            name=f"humanevalpack-{language}",
            domain="code",
            description=f"HumanEvalPack synthesize, {LANGUAGE_NAMES[language]}: 164 functions "
            "from docstrings (Muennighoff et al.)",
            hub=HubSource("bigcode/humanevalpack", config=language, split="test"),
            required_fields=(
                "task_id",
                "prompt",
                "declaration",
                "canonical_solution",
                "test",
                "entry_point",
                "instruction",
            ),
            reference_fields=("prompt", "canonical_solution"),
            id_field="task_id",
            protocols=(ROBUST, PAPER),
            language=language,
        )
    )
    for language in LANGUAGES
}
