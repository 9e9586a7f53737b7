"""The sandbox: results and limits, and hostile programs contained in every isolation mode that
this machine offers (skipped, with the reason, where a mode is unavailable)."""

import errno
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import replace
from functools import cache
from pathlib import Path

import pytest

from code_sandbox import (
    ERROR,
    FAILED,
    PASSED,
    TIMEOUT,
    Program,
    RunResult,
    Sandbox,
    SandboxConfig,
    SandboxError,
)

ROOT = os.geteuid() == 0
MODES = ("auto", "basic", "user-namespaces")


def _world_readable(path: str) -> bool:
    path = os.path.realpath(path)
    while True:
        if os.stat(path).st_mode & 0o005 != 0o005:
            return False
        if os.path.dirname(path) == path:
            return True
        path = os.path.dirname(path)


def _basic_python() -> str | None:
    """An interpreter a random uid can read (basic mode as root has no mount namespace to make
    this project's interpreter visible), or this one when the uid does not change."""
    if not ROOT or _world_readable(sys.base_prefix):
        return sys.executable
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(candidate) and _world_readable(os.path.dirname(candidate)):
            return candidate
    return None


@cache
def _config(mode: str) -> SandboxConfig | str:
    """The config of ``mode``, or why the mode cannot run here."""
    if mode == "basic":
        python = _basic_python()
        if python is None:
            return "no interpreter other users can read, needed by basic mode as root"
        config = SandboxConfig(isolation="basic", python=python)
    else:
        config = SandboxConfig(isolation=mode)
    try:
        Sandbox(config).describe()
    except SandboxError as e:
        return str(e)
    return config


def sandbox(mode: str = "auto", **overrides) -> Sandbox:
    config = _config(mode)
    if isinstance(config, str):
        pytest.skip(f"isolation {mode!r} unavailable: {config}")
    return Sandbox(replace(config, **overrides))


def _marked(token: str) -> list[int]:
    """Host pids of processes whose name (comm) is ``token``: hostile programs name themselves
    first, so survivors can be found in any mode (their pids differ inside a PID namespace)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() == token:
                    found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


def _owned_by(uid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    found.append(int(entry))
            except OSError:
                continue
    return found


def _assert_nothing_survives(token: str, result: RunResult) -> None:
    deadline = time.monotonic() + 3.0
    while _marked(token) or (result.uid and _owned_by(result.uid)):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert _marked(token) == []
    if result.uid is not None:
        assert _owned_by(result.uid) == []


def _name_self(token: str) -> str:
    return f"import ctypes\nctypes.CDLL(None).prctl(15, {token.encode()!r}, 0, 0, 0)\n"


# ---- results ----


def test_exit_status_signal_and_output():
    sb = sandbox()
    ok = sb.run("print('hello')\nimport sys\nprint('warn', file=sys.stderr)")
    assert (ok.status, ok.exit_code, ok.stdout, ok.stderr) == (PASSED, 0, "hello\n", "warn\n")
    assert ok.passed and 0 < ok.duration <= ok.wall_time

    code = sb.run("import sys\nsys.exit(3)")
    assert (code.status, code.exit_code, code.signal) == (FAILED, 3, None)
    message = sb.run("raise SystemExit('bad input')")
    assert (message.exit_code, message.stderr) == (1, "bad input\n")

    raised = sb.run("def f():\n    raise ValueError('boom')\nf()")
    assert raised.status == FAILED and raised.exit_code == 1
    # The traceback starts in the program: no frame of the launcher.
    assert raised.stderr.splitlines()[1].startswith('  File "') and "main.py" in raised.stderr
    assert raised.stderr.rstrip().endswith("ValueError: boom") and "<string>" not in raised.stderr

    syntax = sb.run("def broken(:\n")
    assert syntax.status == FAILED and "SyntaxError" in syntax.stderr

    killed = sb.run("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)")
    assert (killed.status, killed.exit_code, killed.signal) == (FAILED, None, signal.SIGSEGV)


def test_normal_interpreter_exit_semantics():
    """Non-daemon threads finish and atexit handlers run before the (fast) exit."""
    result = sandbox().run(
        "import atexit, threading, time\n"
        "atexit.register(lambda: print('atexit'))\n"
        "threading.Thread(target=lambda: (time.sleep(0.2), print('thread'))).start()\n"
        "print('main')\n"
    )
    assert result.status == PASSED and result.stdout == "main\nthread\natexit\n"


@pytest.mark.parametrize("mode", MODES)
def test_standard_library_in_isolated_mode(mode):
    result = sandbox(mode).run(
        "import collections, decimal, fractions, hashlib, heapq, itertools, json, math, re\n"
        "import string, typing, os, sys\n"
        "assert '' not in sys.path and os.getcwd() not in sys.path, sys.path\n"
        "assert not any('site-packages' in p for p in sys.path), sys.path\n"
        "assert sys.flags.no_site and sys.flags.no_user_site\n"
        "assert hash('abc') == hash('abc') and os.environ['PYTHONHASHSEED'] == '0'\n"
        "print(hashlib.sha256(b'x').hexdigest()[:8], json.dumps(sorted({'b', 'a'})))\n"
    )
    assert result.status == PASSED, result.stderr
    assert result.stdout == '2d711642 ["a", "b"]\n'


def test_same_hash_seed_gives_same_set_order():
    program = "print(list({'apple', 'pear', 'fig', 'kiwi', 'plum', 'lime'}))"
    first, second = sandbox().run_many([program, program], workers=2)
    assert first.stdout == second.stdout and first.passed


def test_output_is_captured_up_to_the_cap_without_blocking_the_program():
    result = sandbox(max_output_bytes=1000).run(
        "import sys\nsys.stdout.write('x' * 2_000_000)\nsys.stderr.write('e' * 5000)\nprint('end')"
    )
    assert result.status == PASSED and result.truncated
    assert result.stdout == "x" * 1000 and result.stderr == "e" * 1000
    assert not sandbox().run("print('short')").truncated


def test_command_programs_and_exec_errors():
    sb = sandbox()
    shell = sb.run(Program('echo "$0 in $PWD"; exit 4', language="sh", command=("sh", "{file}")))
    assert shell.status == FAILED and shell.exit_code == 4
    assert shell.stdout.startswith("main in /") and shell.isolation == sb.describe()["isolation"]
    missing = sb.run(Program("x", language="nope", command=("no-such-program-here", "{file}")))
    assert missing.status == ERROR and "cannot exec 'no-such-program-here'" in missing.error


def test_invalid_programs_and_configs_are_rejected():
    with pytest.raises(SandboxError, match="needs a command"):
        Program("x", language="go")
    with pytest.raises(SandboxError, match="plain file name"):
        Program("x", filename="../escape.py")
    with pytest.raises(SandboxError, match="timeout"):
        SandboxConfig(timeout=0)
    with pytest.raises(SandboxError, match="isolation"):
        SandboxConfig(isolation="docker")
    with pytest.raises(SandboxError, match="workers"):
        sandbox().run_many(["pass"], workers=0)


def test_run_many_keeps_order_and_runs_in_parallel():
    programs = [f"import time\ntime.sleep(0.5)\nprint({i})" for i in range(6)]
    start = time.monotonic()
    results = sandbox().run_many(programs, workers=3)
    elapsed = time.monotonic() - start
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(6)]
    assert elapsed < 6 * 0.5 * 0.8, elapsed  # sequential would take at least 3 s


def test_program_inherits_no_descriptors_but_stdio():
    result = sandbox().run(
        "import os\n"
        "def is_open(fd):\n"
        "    try:\n"
        "        os.fstat(fd)\n"
        "        return True\n"
        "    except OSError:\n"
        "        return False\n"
        "print([fd for fd in range(1024) if is_open(fd)])\n"
    )
    assert result.stdout == "[0, 1, 2]\n"


@pytest.mark.parametrize("mode", MODES)
def test_program_holds_no_capabilities_even_after_exec(mode):
    result = sandbox(mode).run(
        "import os, sys\n"
        "sys.stdout.write(''.join(l for l in open('/proc/self/status') if l.startswith('Cap')))\n"
        "sys.stdout.flush()\n"
        "os.execv('/bin/sh', ['sh', '-c', 'grep ^Cap /proc/self/status'])\n"
    )
    assert result.status == PASSED, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 10  # five sets, before and after exec
    for line in lines:
        name, value = line.split()
        if name != "CapBnd:" or ROOT:  # without root there is no bounding set to empty
            assert int(value, 16) == 0, (mode, line)


def test_a_dead_fork_server_is_replaced():
    with sandbox() as sb:
        assert sb.run("print(1)").stdout == "1\n"
        server = sb._server[0]
        server.process.kill()
        server.process.wait()
        assert sb.run("print(2)").stdout == "2\n"
        assert sb._server[0] is not server and sb._server[0].alive()
    assert sb._server[0] is None  # closed by the with block


def _below_a_fresh_mount(path: str, python: str = sys.base_prefix) -> bool:
    """Whether the sandbox replaces an ancestor of ``path`` by an empty tmpfs: /dev/shm, and /tmp
    unless the interpreter lives there."""
    tmp = os.path.realpath("/tmp") + "/"
    fresh = ["/dev/shm"] + ([] if os.path.realpath(python).startswith(tmp) else ["/tmp"])
    return any(os.path.realpath(path).startswith(os.path.realpath(r) + "/") for r in fresh)


def _seen_inside(sb: Sandbox, paths: list[str]) -> list[list[str] | None]:
    """Each path's listing inside the sandbox, None where it does not exist there."""
    result = sb.run(
        f"import json, os\npaths = {paths!r}\n"
        "print(json.dumps([sorted(os.listdir(p)) if os.path.exists(p) else None for p in paths]))"
    )
    assert result.status == PASSED, result.error or result.stderr  # the interpreter still works
    return json.loads(result.stdout)


def test_hidden_paths_are_empty_inside():
    paths = [str(Path.cwd()), str(Path.home())]
    sb = sandbox(hidden_paths=tuple(paths))
    if sb.describe()["isolation"] == "basic":
        pytest.skip("hidden_paths needs a mount namespace")
    # Below the private /tmp (a checkout cloned there) a path does not exist at all.
    assert _seen_inside(sb, paths) == [None if _below_a_fresh_mount(p) else [] for p in paths]
    assert os.listdir(Path.cwd())


@pytest.mark.parametrize("mode", ("auto", "user-namespaces"))
def test_bind_paths_from_below_the_private_tmp_are_mounted(mode):
    """A bind source below /tmp (a package of a venv made there) is mounted although the sandbox
    replaces /tmp before it mounts the binds; read-only and on the program's sys.path."""
    probe = sandbox(mode)
    if probe.describe()["isolation"] == "basic":
        pytest.skip("bind_paths needs a mount namespace")
    source = Path(tempfile.mkdtemp(prefix="sandbox-bind-", dir="/tmp"))
    try:
        source.chmod(0o755)
        (source / "probe_module.py").write_text("VALUE = 42\n")
        (source / "probe_module.py").chmod(0o644)
        config = replace(
            probe.config,
            bind_paths={str(source): "/tmp/bound/pkg"},
            python_path=("/tmp/bound/pkg",),
        )
        with Sandbox(config) as sb:
            result = sb.run(
                Program(
                    "import probe_module\nprint(probe_module.VALUE)\n"
                    "open('/tmp/bound/pkg/probe_module.py', 'a')\n",
                    timeout=10,
                )
            )
        assert result.stdout.strip() == "42", result.error or result.stderr
        assert "Read-only file system" in result.stderr or "Permission denied" in result.stderr
    finally:
        shutil.rmtree(source)


@pytest.mark.parametrize("mode", ("auto", "user-namespaces"))
@pytest.mark.parametrize("parent", ("/tmp", "/dev/shm"))
def test_hidden_paths_below_the_private_tmp_or_dev_shm_are_out_of_sight(mode, parent):
    """A hidden directory below a mount the sandbox replaces by a fresh tmpfs (a checkout cloned
    under /tmp) no longer exists once that tmpfs is mounted: the run must not fail on it, and
    neither it nor its files may be visible; a hidden directory elsewhere is still covered."""
    if not os.path.isdir(parent) or not os.path.isdir("/var/tmp"):
        pytest.skip(f"needs {parent} and /var/tmp")
    probe = sandbox(mode)
    if probe.describe()["isolation"] == "basic":
        pytest.skip("hidden_paths needs a mount namespace")
    below = Path(tempfile.mkdtemp(prefix="sandbox-hidden-", dir=parent))
    kept = Path(tempfile.mkdtemp(prefix="sandbox-hidden-", dir="/var/tmp"))  # not replaced
    try:
        for secret in (below, kept):
            (secret / "secret.txt").write_text("secret")
        paths = [str(below), str(below / "secret.txt"), str(kept), str(kept / "secret.txt")]
        with Sandbox(replace(probe.config, hidden_paths=(str(below), str(kept)))) as sb:
            seen = _seen_inside(sb, paths)
        if _below_a_fresh_mount(str(below)):
            assert seen == [None, None, [], None]
        else:  # /tmp is the host's when the interpreter lives there: covered like any path
            assert seen == [[], None, [], None]
        assert os.listdir(below) == os.listdir(kept) == ["secret.txt"]  # the host's are intact
    finally:
        shutil.rmtree(below)
        shutil.rmtree(kept)


def test_hidden_paths_below_tmp_are_covered_when_the_interpreter_keeps_tmp(tmp_path):
    """An interpreter under /tmp keeps the host's /tmp visible: a hidden path below it is then
    covered by an empty tmpfs like any other."""
    probe = sandbox("user-namespaces")  # the caller's uid: no random uid that must read python
    if not (os.path.realpath(tmp_path) + "/").startswith(os.path.realpath("/tmp") + "/"):
        pytest.skip("pytest's temporary directory is not under /tmp")
    python = tmp_path / "bin" / "python3"
    python.parent.mkdir()
    python.symlink_to(os.path.realpath(sys.executable))
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "secret.txt").write_text("secret")
    assert not _below_a_fresh_mount(str(secret), python=str(python.parent))
    config = replace(probe.config, python=str(python), hidden_paths=(str(secret),))
    with Sandbox(config) as sb:
        assert _seen_inside(sb, [str(secret), str(tmp_path)]) == [[], ["bin", "secret"]]


UNPRIVILEGED_CALLER = """
import json, socket, sys
sys.path.insert(0, sys.argv[1])
from code_sandbox import Sandbox, SandboxConfig
token = sys.argv[2]
with Sandbox(SandboxConfig(python=sys.executable, timeout=1.0, max_processes=16)) as sb:
    info = sb.describe()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        hostile = sb.run(
            "import socket\\n"
            "try:\\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=1)\\n"
            "    print('CONNECTED')\\n"
            "except OSError as e:\\n"
            "    print('refused', e.errno)\\n"
            "try:\\n"
            f"    open({sys.argv[1] + '/' + token!r}, 'w')\\n"
            "    print('WROTE')\\n"
            "except OSError as e:\\n"
            "    print('refused', e.errno)\\n"
        )
        server.settimeout(0.3)
        try:
            server.accept()
            arrived = True
        except TimeoutError:
            arrived = False
    bomb = sb.run(
        "import ctypes, os, time\\n"
        f"ctypes.CDLL(None).prctl(15, {token.encode()!r}, 0, 0, 0)\\n"
        "while True:\\n"
        "    try:\\n"
        "        os.fork()\\n"
        "    except OSError:\\n"
        "        time.sleep(0.001)\\n"
    )
print(json.dumps({"info": info, "hostile": hostile.stdout, "arrived": arrived,
                  "bomb": bomb.status}))
"""


@pytest.mark.slow
def test_unprivileged_caller_gets_user_namespaces_or_basic_mode():
    """The default config run by an ordinary user (uid 65534 here), through an interpreter
    that user can read: namespaces without root, or the seccomp fallback."""
    import json
    import subprocess

    python = "/usr/bin/python3"
    repo = str(Path(__file__).resolve().parents[2])
    if not ROOT or not os.path.exists(python) or not _world_readable(repo):
        pytest.skip("needs root to switch to another uid, /usr/bin/python3 and a readable repo")
    token = "sbx" + secrets.token_hex(6)
    done = subprocess.run(
        [python, "-c", UNPRIVILEGED_CALLER, repo, token],
        user=65534,
        group=65534,
        extra_groups=[],
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["info"]["isolation"] in ("user-namespaces", "basic")
    namespaces = report["info"]["isolation"] == "user-namespaces"
    connect_error = errno.ENETUNREACH if namespaces else errno.EACCES  # no route, or seccomp
    write_error = errno.EROFS if namespaces else errno.EACCES  # read-only view, or permissions
    if namespaces and _below_a_fresh_mount(repo, python=python):
        write_error = errno.ENOENT  # a checkout under /tmp is not in the private /tmp at all
    assert report["hostile"].split() == ["refused", str(connect_error), "refused", str(write_error)]
    assert not report["arrived"] and report["bomb"] == "timeout"
    assert not (Path(repo) / token).exists()
    deadline = time.monotonic() + 3.0
    while _marked(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _marked(token) == []


def test_describe_reports_the_active_containment():
    info = sandbox().describe()
    assert set(info) == {"isolation", "network", "user", "processes", "filesystem"}
    if ROOT:  # this project's evaluation machines: root with namespaces
        assert (info["isolation"], info["network"]) == ("namespaces", "netns")
        assert info["processes"] == "PID namespace"


# ---- environment and working directory ----


@pytest.mark.parametrize("mode", MODES)
def test_parent_environment_and_secrets_are_not_visible(mode, monkeypatch):
    secret = "s3cr3t-" + secrets.token_hex(8)
    monkeypatch.setenv("SECRET_TOKEN", secret)
    result = sandbox(mode).run(
        "import os\n"
        "print(sorted(os.environ))\n"
        "for path in ('/proc/%d/environ' % " + str(os.getpid()) + ", '/proc/1/environ',\n"
        "             '/proc/self/environ'):\n"
        "    try:\n"
        "        print(path, open(path, 'rb').read())\n"
        "    except OSError as e:\n"
        "        print(path, 'refused', e.errno)\n"
    )
    assert result.status == PASSED, result.stderr
    assert secret not in result.stdout + result.stderr
    assert result.stdout.splitlines()[0] == str(
        sorted(["HOME", "LANG", "PATH", "PYTHONHASHSEED", "TMPDIR"])
    )


def test_working_directory_is_fresh_private_and_removed():
    program = (
        "import os\n"
        "print(os.getcwd(), os.environ['HOME'], os.environ['TMPDIR'], sorted(os.listdir('.')))\n"
        "open('out.txt', 'w').write('data')\n"
    )
    first, second = sandbox().run_many([program, program], workers=2)
    assert first.status == second.status == PASSED
    cwd, home, tmp, listing = first.stdout.split(" ", 3)
    assert cwd == home == tmp and listing.strip() == "['main.py']"
    assert cwd != second.stdout.split()[0]
    assert not os.path.exists(cwd) and not os.path.exists(second.stdout.split()[0])


# ---- hostile programs ----


@pytest.mark.parametrize("mode", MODES)
def test_infinite_loop_times_out_and_leaves_nothing(mode):
    token = "sbx" + secrets.token_hex(6)
    start = time.monotonic()
    result = sandbox(mode, timeout=1.0).run(
        _name_self(token) + "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()  # leaves the process group: must still be killed\n"
        "    while True:\n"
        "        time.sleep(1)\n"
        "while True:\n"
        "    pass\n"
    )
    assert result.status == TIMEOUT and result.exit_code is None
    assert 1.0 <= result.duration < 1.5 and time.monotonic() - start < 4.0
    _assert_nothing_survives(token, result)


def test_backstop_kills_a_launcher_that_does_not_finish(monkeypatch):
    """The parent's own deadline, for a launcher that never reports (simulated by moving the
    parent's deadline before the supervisor's): the launcher's group dies, and with it all."""
    import code_sandbox as sandbox_module

    monkeypatch.setattr(sandbox_module, "_GRACE", -0.7)
    token = "sbx" + secrets.token_hex(6)
    result = sandbox(timeout=1.0).run(_name_self(token) + "while True:\n    pass\n")
    assert result.status == TIMEOUT and "process group was killed" in result.error
    assert result.wall_time < 3.0
    _assert_nothing_survives(token, result)


def test_cpu_time_limit():
    result = sandbox(timeout=20.0, cpu_seconds=1).run("while True:\n    pass\n")
    assert (result.status, result.signal) == (TIMEOUT, signal.SIGXCPU)
    assert result.duration < 5.0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["auto", "basic"])
def test_fork_bomb_is_bounded_and_killed(mode):
    if not ROOT:
        pytest.skip("RLIMIT_NPROC bounds a fork bomb only for a uid of its own (root parent)")
    token = "sbx" + secrets.token_hex(6)
    limit = 16
    host_before = len(os.listdir("/proc"))
    peak = 0
    running = True

    def watch() -> None:
        nonlocal peak
        while running:
            peak = max(peak, len(_marked(token)))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = sandbox(mode, timeout=2.0, max_processes=limit).run(
            _name_self(token) + "import os, time\n"
            "while True:\n"
            "    try:\n"
            "        if os.fork() == 0:\n"
            "            try:\n"
            "                os.setsid()\n"
            "            except OSError:\n"
            "                pass\n"
            "    except OSError:\n"
            "        time.sleep(0.001)\n"
        )
    finally:
        running = False
        watcher.join()
    assert result.status == TIMEOUT and result.uid is not None
    assert limit // 2 <= peak <= limit, peak  # it did fork, and RLIMIT_NPROC held
    _assert_nothing_survives(token, result)
    assert len(os.listdir("/proc")) <= host_before + 10
    assert sandbox(mode).run("print('still fine')").stdout == "still fine\n"


@pytest.mark.parametrize("mode", ["auto", "basic"])
def test_memory_hog_fails_and_host_is_fine(mode):
    sb = sandbox(mode, memory_bytes=512 << 20)
    at_once = sb.run("x = bytearray(4 << 30)\n")
    assert at_once.status == FAILED and "MemoryError" in at_once.stderr
    growing = sb.run("chunks = []\nwhile True:\n    chunks.append(bytearray(32 << 20))\n")
    assert growing.status == FAILED and "MemoryError" in growing.stderr
    assert growing.duration < 2.0
    assert sb.run("print(len(bytearray(64 << 20)))").stdout == f"{64 << 20}\n"


def _write_attempts(targets: list[Path]) -> str:
    return (
        "import os\n"
        f"for path in {[str(t) for t in targets]!r}:\n"
        "    try:\n"
        "        os.makedirs(os.path.dirname(path), exist_ok=True)\n"
        "        with open(path, 'w') as f:\n"
        "            f.write('escaped')\n"
        "        print('WROTE', path)\n"
        "    except OSError as e:\n"
        "        print('refused', path, e.strerror)\n"
    )


@pytest.mark.parametrize("mode", MODES)
def test_writes_outside_the_working_directory_do_not_happen(mode, tmp_path):
    name = f"sandbox-escape-{secrets.token_hex(6)}.txt"
    world_writable = tmp_path / "open"
    world_writable.mkdir()
    world_writable.chmod(0o777)
    targets = [
        tmp_path / name,  # a directory the test was given
        world_writable / name,
        tmp_path / "new-dir" / name,
        Path.cwd() / name,  # the parent's working directory
        Path.home() / name,  # the parent's HOME
    ]
    if mode != "basic":  # world-writable host paths: writable in basic mode (documented)
        targets += [Path("/var/tmp") / name, Path("/dev/shm") / name]
    sb = sandbox(mode)
    try:
        result = sb.run(_write_attempts(targets))
        assert result.status == PASSED, result.stderr
        assert [t for t in targets if t.exists()] == []
    finally:
        for target in targets:
            target.unlink(missing_ok=True)
    assert not (tmp_path / "new-dir").exists()
    if mode != "basic":
        # Paths under the private /tmp and /dev/shm are written there, invisibly to the host;
        # everything else is refused by the read-only view, not only by permissions.
        private = ("/tmp/", "/dev/shm/")
        for target in targets:
            line = next(
                x
                for x in result.stdout.splitlines()
                if x.endswith(str(target)) or f" {target} " in x
            )
            expected = "WROTE" if str(target).startswith(private) else "refused"
            assert line.startswith(expected), line
            if str(target).startswith("/var/tmp/"):  # world-writable on the host
                assert line.endswith("Read-only file system"), line
            elif expected == "refused":  # the sandbox uid may not even reach it
                assert line.endswith(("Read-only file system", "Permission denied")), line


@pytest.mark.parametrize("mode", MODES)
def test_files_outside_cannot_be_deleted(mode, tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    victim = open_dir / "victim.txt"
    victim.write_text("precious")
    open_dir.chmod(0o777)
    victim.chmod(0o666)
    in_home = Path.home() / f"sandbox-victim-{secrets.token_hex(6)}.txt"
    in_home.write_text("precious")
    in_home.chmod(0o666)
    try:
        result = sandbox(mode).run(
            "import os, shutil\n"
            f"for path in {[str(keep), str(victim), str(in_home)]!r}:\n"
            "    for attempt in (os.remove, lambda p: open(p, 'w').close()):\n"
            "        try:\n"
            "            attempt(path)\n"
            "            print('DAMAGED', path)\n"
            "        except OSError as e:\n"
            "            print('refused', path, e.strerror)\n"
            f"shutil.rmtree({str(tmp_path)!r}, ignore_errors=True)\n"
        )
        assert result.status == PASSED, result.stderr
        for path in (keep, victim, in_home):
            assert path.read_text() == "precious"
        assert "DAMAGED" not in result.stdout
    finally:
        in_home.unlink()


NETWORK_MODES = [
    pytest.param("auto", {}, id="auto"),
    pytest.param("basic", {}, id="basic-seccomp"),
    pytest.param("basic", {"seccomp": False}, id="basic-python-prelude"),
    pytest.param("user-namespaces", {}, id="user-namespaces"),
]


@pytest.mark.parametrize(("mode", "overrides"), NETWORK_MODES)
def test_connection_to_a_host_listener_never_arrives(mode, overrides):
    sb = sandbox(mode, **overrides)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        attempts = [
            "socket.create_connection(('127.0.0.1', PORT), timeout=1).sendall(b'leak')",
            "socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'leak', ('127.0.0.1', PORT))",
        ]
        if overrides.get("seccomp", True):  # below Python: only the kernel can refuse this
            attempts.append(
                "fd = ctypes.CDLL(None, use_errno=True).socket(2, 1, 0)\n"
                "    if fd < 0:\n"
                "        raise OSError(ctypes.get_errno(), 'libc socket() refused')\n"
                "    addr = b'\\x02\\x00' + (PORT).to_bytes(2, 'big')\n"
                "    addr += b'\\x7f\\0\\0\\x01' + bytes(8)  # sockaddr_in 127.0.0.1:PORT\n"
                "    if ctypes.CDLL(None).connect(fd, addr, 16) != 0:\n"
                "        raise OSError('libc connect() failed')"
            )
        program = "import ctypes, socket\n" + "".join(
            f"try:\n    {a.replace('PORT', str(port))}\n    print('CONNECTED')\n"
            "except OSError as e:\n    print('refused', repr(e))\n"
            for a in attempts
        )
        result = sb.run(program)
        assert result.status == PASSED, result.stderr
        outcomes = [line.split()[0] for line in result.stdout.splitlines()]
        assert outcomes == ["refused"] * len(attempts), result.stdout
        expected = {"auto": "netns", "user-namespaces": "netns"}.get(
            mode, "seccomp" if overrides.get("seccomp", True) else "python-prelude"
        )
        if mode == "auto" and not ROOT:
            expected = result.network  # whichever auto chose; the refusal is what matters
        assert result.network == expected
        server.settimeout(0.5)
        with pytest.raises(TimeoutError):
            server.accept()
