"""Run untrusted programs (model-generated code) in a contained child process tree. Linux only.

One program (source text, plus a command for languages other than Python) runs per launch:

    parent (this module, any thread)
      └─ fork server S   python -s -S -c <_server>; one per Sandbox, started once; never runs
           │             a program; scrubbed environment, its own session, stdin /dev/null
           └─ launcher L   forked per run; own session (the backstop kills this group)
                └─ supervisor C   PID 1 of a new PID namespace when namespaces are available
                     └─ program P   own session; unprivileged; rlimits; no network; cwd = fresh
                                    temporary directory

The parent never runs program code. S receives a run's configuration and its stdout, stderr and
status pipes over a Unix socket; L closes that socket before anything else, so nothing below S can
ask for runs. Containment, by isolation mode (``SandboxConfig.isolation``; ``Sandbox.describe()``
and every ``RunResult`` say which one was active):

``namespaces`` (running as root, the default here): ``unshare`` of the network, PID, mount, IPC and
UTS namespaces. The network namespace has only a loopback interface that is down, so no connection
reaches any host or the host's 127.0.0.1. In the mount namespace (private propagation, nothing
leaks back) every mount is remounted read-only, ``/tmp`` and ``/dev/shm`` are fresh size-limited
tmpfs (the host's ``/tmp`` is invisible), the working directory is a tmpfs holding the program,
``/proc`` shows only the sandbox's processes, and ``hidden_paths`` are covered by empty tmpfs
(one below the private ``/tmp`` or ``/dev/shm``, e.g. a checkout under ``/tmp``, is already out of
sight and does not exist there). P runs as a random unused uid (``uid_range``) with no
supplementary groups, so RLIMIT_NPROC is enforced (it is not for root) and file permissions apply;
an interpreter the uid cannot read (e.g. installed under ``/root``) is bind-mounted read-only into
the private ``/tmp`` and ``sys.path`` follows it. A fork bomb therefore stops at
``max_processes``. When P ends or times out, C kills every process left (as PID 1 it inherits all
orphans, including those that called ``setsid`` to leave the process group) before it reports the
outcome, and its exit tears the namespaces down.

``user-namespaces`` (the default for a non-root user where unprivileged user namespaces are
allowed): the same namespaces and mounts inside a new user namespace that maps only the caller's
uid; P drops all capabilities. P keeps the caller's uid, so RLIMIT_NPROC counts per user namespace
and file permissions are the caller's (writes are still stopped by the read-only mounts). Forced
as root, this mode runs P as uid 0 without capabilities: RLIMIT_NPROC is then not enforced.

``basic`` (no namespaces: ``unshare`` refused, e.g. a container without CAP_SYS_ADMIN, or forced):
the program runs in the host temp dir. As root, P still gets a random uid (RLIMIT_NPROC enforced,
root-only paths closed), which must be able to read the interpreter (else every run is an
``error`` saying so). Sockets are refused by a seccomp filter (``socket()`` of any family and
``io_uring_setup`` fail with EACCES; x86_64 and aarch64), or, where seccomp is unavailable or
disabled, for Python programs only by a prelude that replaces ``socket.socket`` (best effort:
ctypes gets around it). C is a child subreaper: it kills P's process group and then every
remaining descendant until none is left. Limits of this mode: world-writable host paths
(``/tmp``, ``/var/tmp``, ``/dev/shm``) are writable and the host's processes are visible; without
root, P has the caller's uid and file permissions and can signal the caller's other processes
(S, L and C are not dumpable, so it cannot trace them).

In every mode: rlimits on CPU seconds, address space, file size, processes, open files, no core
files; ``PR_SET_NO_NEW_PRIVS`` (setuid binaries and file capabilities give nothing); no
capabilities (from root: an empty bounding set and securebits under which uid 0 gains none on
``execve``); a wall-clock timeout counted
from P's start, after which P and all its descendants are killed; C and P die with their parent
(``PR_SET_PDEATHSIG``); if a launcher has not finished ``_GRACE`` seconds after the timeout, the
parent has S kill its process group. P inherits no file descriptors but stdin (``/dev/null``),
stdout and stderr. The environment is built from scratch: ``PATH``, ``LANG``, ``HOME`` and
``TMPDIR`` (the working directory), ``PYTHONHASHSEED``, and ``SandboxConfig.env``; nothing is
inherited from the parent. stdout and stderr are captured up to ``max_output_bytes`` each (the
rest is read and dropped, so the program never blocks on a full pipe).

Python programs run in P's interpreter (forked from S, started with ``-s -S``: no site, no user
site, no ``.pth`` code; the standard library imports as usual) after every restriction is in
place, with a fresh ``__main__`` and ``sys.path`` without the working directory, as ``-I`` would
give. ``-E`` is not passed, so ``PYTHONHASHSEED`` (default ``0``) makes runs reproducible; the
environment is the sandbox's own, so no other ``PYTHON*`` variable can come in. The modules S
imported for itself (``ctypes``, ``socket``, ``select``, ``resource``) and ``preload`` are already
in ``sys.modules``; nothing else differs from a fresh interpreter. Other languages exec
``Program.command``.

Limits in all modes: reads are not restricted beyond file permissions (the whole file system is
visible read-only; hide sensitive trees with ``hidden_paths``); memory is limited per process
(RLIMIT_AS), so the total is ``max_processes * memory_bytes`` at worst (a cgroup would bound it;
this module does not manage cgroups); CPU time is limited per process and by the wall-clock
timeout, not by a share of the machine.
"""

from __future__ import annotations

import inspect
import marshal
import math
import os
import re
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from typing import Literal

PASSED, FAILED, TIMEOUT, ERROR = "passed", "failed", "timeout", "error"
ISOLATION_MODES = ("auto", "namespaces", "user-namespaces", "basic")
_GRACE = 10.0  # seconds the parent waits past the program's timeout before killing the launcher
_STATUS_CAP = 1 << 16


class SandboxError(RuntimeError):
    """The sandbox cannot run here (not Linux) or was configured inconsistently."""


@dataclass(frozen=True)
class SandboxConfig:
    """Limits and isolation for every program a ``Sandbox`` runs."""

    timeout: float = 3.0
    """Wall-clock seconds per program, counted from the program's start (set-up excluded)."""
    cpu_seconds: int | None = None
    """RLIMIT_CPU per process; None: the timeout rounded up, plus one second."""
    memory_bytes: int = 2 << 30
    """RLIMIT_AS (address space) per process."""
    file_size_bytes: int = 16 << 20
    """RLIMIT_FSIZE: the largest file a process may write."""
    max_processes: int = 32
    """RLIMIT_NPROC: processes and threads of the program's uid (enforced for a non-root uid)."""
    max_open_files: int = 64
    """RLIMIT_NOFILE."""
    max_output_bytes: int = 64 << 10
    """Bytes of stdout and of stderr kept, each; the rest is read and dropped."""
    tmpfs_bytes: int = 64 << 20
    """Size of the private ``/tmp`` and of the working directory in the namespace modes."""
    isolation: Literal["auto", "namespaces", "user-namespaces", "basic"] = "auto"
    """``auto``: namespaces as root, user namespaces otherwise, ``basic`` where refused. A forced
    mode that is unavailable makes every run an ``error``."""
    seccomp: bool = True
    """In ``basic`` mode, refuse sockets with a seccomp filter (else: Python prelude only)."""
    python: str = sys.executable
    """Interpreter of the launcher and of Python programs."""
    path: str = "/usr/local/bin:/usr/bin:/bin"
    """``PATH`` of the program (not the parent's)."""
    lang: str = "C.UTF-8"
    """``LANG`` of the program."""
    hash_seed: str = "0"
    """``PYTHONHASHSEED``: fixed so set and dict orders, and results, are reproducible."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment variables, set explicitly (never copied from the parent)."""
    uid_range: tuple[int, int] = (1_800_000_000, 1_816_777_216)
    """Half-open range of unused uids a root parent picks from at random per run."""
    hidden_paths: tuple[str, ...] = ()
    """Directories covered by an empty read-only tmpfs in the namespace modes; those below the
    private ``/tmp``, ``/dev/shm`` or working directory are absent there instead."""
    bind_paths: Mapping[str, str] = field(default_factory=dict)
    """Host directory -> path under the private ``/tmp`` where it is bind-mounted read-only
    (nosuid, nodev) in the namespace modes: exposes a toolchain the sandbox uid cannot reach
    (e.g. one installed under ``/root``). Without a mount namespace nothing is mounted, so a
    program using the target path fails with an ``error`` (exec) or ``failed`` status."""
    tmp_root: str | None = None
    """Where the per-run temporary directories are created; None: ``tempfile.gettempdir()``."""
    python_path: tuple[str, ...] = ()
    """Directories appended to a Python program's ``sys.path``, e.g. a ``bind_paths`` target
    holding one third-party package (the program sees no site-packages otherwise)."""
    preload: tuple[str, ...] = ()
    """Standard-library modules the fork server imports once, so programs find them already
    loaded (a start-up saving only; each program still starts from a fresh fork)."""

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise SandboxError(f"timeout must be positive, got {self.timeout}")
        for name in (
            "memory_bytes",
            "file_size_bytes",
            "max_processes",
            "max_open_files",
            "max_output_bytes",
            "tmpfs_bytes",
        ):
            if getattr(self, name) <= 0:
                raise SandboxError(f"{name} must be positive, got {getattr(self, name)}")
        if self.cpu_seconds is not None and self.cpu_seconds <= 0:
            raise SandboxError(f"cpu_seconds must be positive, got {self.cpu_seconds}")
        if self.isolation not in ISOLATION_MODES:
            raise SandboxError(f"isolation {self.isolation!r}: expected one of {ISOLATION_MODES}")
        low, high = self.uid_range
        if not 0 < low < high <= 2**32 - 1:
            raise SandboxError(f"uid_range {self.uid_range} is not a non-empty range of uids > 0")
        if any("=" in k or "\0" in k + v for k, v in self.env.items()):
            raise SandboxError("env names must not contain '=' and values no NUL bytes")
        if any(not p.startswith("/") for p in self.python_path):
            raise SandboxError(f"python_path {self.python_path}: entries must be absolute")
        for source, target in self.bind_paths.items():
            parts = target.split("/")
            if not source.startswith("/") or not target.startswith("/tmp/") or ".." in parts:
                raise SandboxError(
                    f"bind_paths {source!r} -> {target!r}: need an absolute source and a "
                    "target under /tmp/ without '..'"
                )


@dataclass(frozen=True)
class Program:
    """One program: Python source, or a source file run by ``command``."""

    source: str
    """The program text, written to ``filename`` in the working directory."""
    language: str = "python"
    """``python`` runs in the sandbox's interpreter when ``command`` is None; other languages
    need a ``command``."""
    command: tuple[str, ...] | None = None
    """argv to exec (searched in ``SandboxConfig.path``); ``{file}`` is replaced by ``filename``.
    E.g. ``("sh", "-c", "g++ {file} -o a && ./a")``."""
    filename: str | None = None
    """Name of the source file; default ``main.py`` for Python, ``main`` otherwise."""
    timeout: float | None = None
    """Overrides ``SandboxConfig.timeout`` for this program."""

    def __post_init__(self) -> None:
        if self.command is None and self.language != "python":
            raise SandboxError(f"language {self.language!r} needs a command")
        if self.command is not None and not self.command:
            raise SandboxError("command must not be empty")
        name = self.file_name
        if name in ("", ".", "..") or "/" in name or "\0" in name:
            raise SandboxError(f"filename {name!r} must be a plain file name")
        if self.timeout is not None and not self.timeout > 0:
            raise SandboxError(f"timeout must be positive, got {self.timeout}")

    @property
    def file_name(self) -> str:
        """The source file's name in the working directory."""
        if self.filename is not None:
            return self.filename
        return "main.py" if self.command is None else "main"


@dataclass(frozen=True)
class RunResult:
    """What happened to one program."""

    status: str
    """``passed`` (exit 0), ``failed`` (other exit or a signal), ``timeout`` (wall clock or CPU
    limit) or ``error`` (the sandbox could not run the program; see ``error``)."""
    exit_code: int | None
    """The program's exit code; None when it was killed by a signal or never started."""
    signal: int | None
    """The signal that killed the program, if any."""
    duration: float
    """Seconds from the program's start to its end, measured inside the sandbox."""
    wall_time: float
    """Seconds for the whole run seen by the parent, sandbox set-up and clean-up included."""
    stdout: str
    stderr: str
    truncated: bool
    """Whether stdout or stderr exceeded ``max_output_bytes`` and was cut."""
    isolation: str
    """The isolation mode that was active: ``namespaces``, ``user-namespaces`` or ``basic``."""
    network: str
    """How the network was closed: ``netns``, ``seccomp``, ``python-prelude`` or ``none``."""
    uid: int | None
    """The uid the program ran as, when it was changed from the parent's."""
    error: str | None = None
    """What went wrong in the sandbox itself (status ``error``), or the backstop kill."""

    @property
    def passed(self) -> bool:
        return self.status == PASSED


def _server():  # one self-contained function: it runs alone in a fresh interpreter
    """The fork server: ``python -s -S -c SOURCE CONTROL_FD PRELOAD``, one per ``Sandbox``.

    It imports what the sandbox needs once, then forks one launcher L per request received on
    the control socket (a config and the stdout, stderr and status pipes). L makes the
    namespaces and forks C; C sets up mounts and the working directory, forks P and supervises
    it; P drops privileges and returns the program to run (Python) or execs it. Only P ever
    returns from this function. The server itself never runs a program, so every P starts from
    the same clean interpreter. Status lines go to the parent on ``status_fd``.
    """
    import ctypes
    import marshal
    import os
    import resource
    import select
    import socket
    import sys
    import time

    control = socket.socket(fileno=int(sys.argv[1]))
    for name in marshal.loads(bytes.fromhex(sys.argv[2])):
        __import__(name)  # SandboxConfig.preload: modules every program would import anyway
    cfg = {}
    status_fd = -1
    libc = ctypes.CDLL(None, use_errno=True)
    devnull = os.open(os.devnull, os.O_RDWR)
    libc.mount.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_char_p,
    ]
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: a program of the same uid cannot trace S, L, C
    sigkill = 9
    ms_rdonly, ms_nosuid, ms_nodev, ms_noexec, ms_remount, ms_bind = 1, 2, 4, 8, 32, 4096
    ms_rec, ms_private = 16384, 1 << 18
    mount_options = {
        "ro": ms_rdonly,
        "nosuid": ms_nosuid,
        "nodev": ms_nodev,
        "noexec": ms_noexec,
        "noatime": 1024,
        "nodiratime": 2048,
        "relatime": 1 << 21,
        "strictatime": 1 << 24,
    }

    def report(*words):
        os.write(status_fd, (" ".join(map(str, words)) + "\n").encode("utf-8", "replace"))

    def check(ret, what):
        if ret != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def mount(source, target, fstype, flags, data=None):
        enc = [None if s is None else s.encode() for s in (source, target, fstype, data)]
        check(libc.mount(enc[0], enc[1], enc[2], flags, enc[3]), f"mount {target}")

    def unescape(path):  # mountinfo escapes space, tab, newline and backslash as \ooo
        parts = path.split("\\")
        return parts[0] + "".join(chr(int(p[:3], 8)) + p[3:] for p in parts[1:])

    def setup_mounts(workdir, files, uid):
        """The read-only view, private /tmp, /dev/shm, /proc and working directory; returns
        the interpreter directories moved for the sandbox uid (see moved_prefixes)."""
        # Private propagation first, so nothing below leaks into the host's mount namespace.
        mount(None, "/", None, ms_rec | ms_private)
        # Resolved in the host's view, before any mount below changes what the names mean.
        hidden = [os.path.realpath(path) for path in cfg["hidden_paths"]]
        # Opened now: a source below /tmp (a venv there) is out of reach once /tmp is replaced;
        # a bind mount from /proc/self/fd/N still finds it.
        binds = [
            (os.open(source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), target)
            for source, target in (cfg["bind_paths"] if cfg["hide_tmp"] else ())
        ]
        fresh = []  # replaced by an empty tmpfs: nothing of the host's below them is visible
        with open("/proc/self/mountinfo") as f:
            entries = [line.split() for line in f]
        for entry in entries:
            target = unescape(entry[4])
            flags = ms_remount | ms_bind | ms_rdonly
            for opt in entry[5].split(","):
                flags |= mount_options.get(opt, 0)  # locked flags must be kept in a user ns
            try:
                mount(None, target, None, flags)
            except OSError:
                if target == "/":
                    raise
        tmpfs = f"size={cfg['tmpfs_bytes']},mode=1777"
        if cfg["hide_tmp"]:
            fresh.append(os.path.realpath("/tmp"))
            mount("tmpfs", "/tmp", "tmpfs", ms_nosuid | ms_nodev, tmpfs)
        if cfg["hide_tmp"] and workdir.startswith("/tmp/"):
            os.makedirs(workdir, mode=0o700)
        else:
            fresh.append(os.path.realpath(workdir))
            mount("tmpfs", workdir, "tmpfs", ms_nosuid | ms_nodev, tmpfs)
        if os.path.isdir("/dev/shm"):
            fresh.append(os.path.realpath("/dev/shm"))
            mount(
                "tmpfs",
                "/dev/shm",
                "tmpfs",
                ms_nosuid | ms_nodev | ms_noexec,
                "size=16777216,mode=1777",
            )
        # Required, not optional: C's sweep finds the pids to kill in /proc, and the host's
        # /proc would name host processes there.
        mount("proc", "/proc", "proc", ms_nosuid | ms_nodev | ms_noexec)
        moved = {}
        if uid is not None and cfg["command"] is None and cfg["hide_tmp"]:
            moved = moved_prefixes()  # before hidden_paths may cover the interpreter
        for fd, target in binds:
            os.makedirs(target, 0o755, exist_ok=True)
            mount(f"/proc/self/fd/{fd}", target, None, ms_bind | ms_rec)
            os.close(fd)
            mount(None, target, None, ms_remount | ms_bind | ms_rdonly | ms_nosuid | ms_nodev)
        for path in hidden:
            if any(path == top or path.startswith(top + "/") for top in fresh):
                continue  # already out of sight, and no longer there to mount on
            mount(
                "tmpfs",
                path,
                "tmpfs",
                ms_rdonly | ms_nosuid | ms_nodev | ms_noexec,
                "size=4096,mode=755",
            )
        for name, data in files.items():
            with open(os.path.join(workdir, name), "wb") as f:
                f.write(data)
        return moved

    def world_readable(path):
        path = os.path.realpath(path)
        while True:
            if os.stat(path).st_mode & 0o005 != 0o005:
                return False
            parent = os.path.dirname(path)
            if parent == path:
                return True
            path = parent

    def moved_prefixes():
        """Bind the interpreter's directories that other users cannot read (e.g. a Python
        installed under /root) read-only into the private /tmp, for the sandbox uid."""
        moved = {}
        for i, prefix in enumerate(dict.fromkeys((sys.base_prefix, sys.base_exec_prefix))):
            if world_readable(prefix):
                continue
            target = f"/tmp/.sandbox-python-{i}"
            os.mkdir(target, 0o755)
            mount(prefix, target, None, ms_bind | ms_rec)
            mount(None, target, None, ms_remount | ms_bind | ms_rdonly | ms_nosuid | ms_nodev)
            moved[prefix] = target
        return moved

    def moved_path(path, moved):
        for prefix, target in moved.items():
            if path == prefix or path.startswith(prefix + "/"):
                return target + path[len(prefix) :]
        return path

    def own(workdir, uid):
        for name in [*os.listdir(workdir), "."]:
            os.chown(os.path.join(workdir, name), uid, uid)
        os.chmod(workdir, 0o700)

    def install_seccomp():
        # socket() of any family and io_uring_setup fail with EACCES; syscalls of another ABI
        # (i386 via int 0x80, x32) too, so they cannot be used to get around the filter.
        arch = {"x86_64": (0xC000003E, 41, 425), "aarch64": (0xC00000B7, 198, 425)}
        machine = arch.get(os.uname().machine)
        if machine is None:
            return False
        audit, nr_socket, nr_uring = machine

        class SockFilter(ctypes.Structure):
            _fields_ = [
                ("code", ctypes.c_ushort),
                ("jt", ctypes.c_ubyte),
                ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint),
            ]

        class SockFprog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

        insns = [
            (0x20, 0, 0, 4),  # A = seccomp_data.arch
            (0x15, 0, 5, audit),  # if A != audit: deny
            (0x20, 0, 0, 0),  # A = seccomp_data.nr
            (0x35, 3, 0, 0x40000000),  # x32 syscalls: deny
            (0x15, 2, 0, nr_socket),
            (0x15, 1, 0, nr_uring),
            (0x06, 0, 0, 0x7FFF0000),  # allow
            (0x06, 0, 0, 0x00050000 | 13),  # errno EACCES
        ]
        prog_filter = (SockFilter * len(insns))(*[SockFilter(*i) for i in insns])
        prog = SockFprog(len(insns), prog_filter)
        return libc.prctl(22, 2, ctypes.addressof(prog), 0, 0) == 0  # PR_SET_SECCOMP, FILTER

    def deny_sockets_in_python():
        import _socket
        import socket

        def refuse(*args, **kwargs):
            raise PermissionError(13, "network access is disabled in this sandbox")

        class RefusedSocket(socket.socket):
            def __init__(self, *args, **kwargs):
                refuse()

        socket.socket = socket.SocketType = _socket.socket = RefusedSocket
        socket.create_connection = socket.create_server = socket.fromfd = refuse

    def drop_privileges(ns, uid):
        if uid is not None or ns == "user-namespaces":  # CAP_SETPCAP is still held here
            # Securebits: uid 0 gains no capabilities from execve (SECBIT_NOROOT), ambient
            # capabilities cannot be raised, all locked. Then an empty bounding set.
            check(libc.prctl(28, 0xE3, 0, 0, 0), "PR_SET_SECUREBITS")
            with open("/proc/sys/kernel/cap_last_cap") as f:
                last_cap = int(f.read())
            for cap in range(last_cap + 1):
                check(libc.prctl(24, cap, 0, 0, 0), "PR_CAPBSET_DROP")
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)  # from root: clears every capability
        elif ns == "user-namespaces":
            header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, self
            check(libc.capset(header, (ctypes.c_uint32 * 6)()), "capset")  # all sets empty
        libc.prctl(4, 1, 0, 0, 0)  # P itself is an ordinary (dumpable) process again

    def program(ns, workdir, uid, moved, supervisor):  # P: restrict, drop privileges, run
        # Everything is imported before the uid changes: the new uid may not be able to read
        # the interpreter's own directories (see moved_prefixes).
        import builtins

        os.setsid()
        libc.prctl(1, sigkill, 0, 0, 0)  # PR_SET_PDEATHSIG: die with C
        if os.getppid() != supervisor:  # C died before the line above
            os._exit(125)
        os.set_inheritable(status_fd, False)
        check(libc.prctl(38, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")  # before seccomp, unprivileged
        command = cfg["command"]
        if ns:
            network = "netns"
        elif cfg["seccomp"] and install_seccomp():
            network = "seccomp"
        elif command is None:
            deny_sockets_in_python()
            network = "python-prelude"
        else:
            network = "none"
        cpu = cfg["cpu_seconds"]
        limits = [
            (resource.RLIMIT_CPU, cpu, cpu + 1),
            (resource.RLIMIT_AS, cfg["memory_bytes"], cfg["memory_bytes"]),
            (resource.RLIMIT_FSIZE, cfg["file_size_bytes"], cfg["file_size_bytes"]),
            (resource.RLIMIT_NPROC, cfg["max_processes"], cfg["max_processes"]),
            (resource.RLIMIT_NOFILE, cfg["max_open_files"], cfg["max_open_files"]),
            (resource.RLIMIT_CORE, 0, 0),
        ]
        for res, soft, hard in limits:
            _, cur_hard = resource.getrlimit(res)
            if cur_hard != resource.RLIM_INFINITY:  # raising a hard limit needs privileges
                soft, hard = min(soft, cur_hard), min(hard, cur_hard)
            resource.setrlimit(res, (soft, hard))
        drop_privileges(ns, uid)
        os.chdir(workdir)
        os.closerange(3, status_fd)  # the server's /dev/null and anything else inherited
        os.closerange(status_fd + 1, 1 << 16)
        report("ready", network, "-" if uid is None else uid)
        if command is not None:
            import _signal  # Python ignores these two; an exec'd program should not

            _signal.signal(_signal.SIGPIPE, _signal.SIG_DFL)
            _signal.signal(_signal.SIGXFSZ, _signal.SIG_DFL)
            # Search PATH by hand: os.execvp imports modules, which the new uid may not read.
            name = command[0]
            dirs = [""] if "/" in name else os.environ.get("PATH", "").split(":")
            problem = "not found"
            for d in dirs:
                try:
                    os.execve(os.path.join(d, name), list(command), os.environ)
                except OSError as e:
                    problem = e.strerror
            report("error", f"cannot exec {name!r}: {problem}")
            os._exit(127)
        os.close(status_fd)
        path = os.path.join(workdir, cfg["filename"])
        with open(path, "rb") as f:
            source = f.read()
        main = type(sys)("__main__")
        main.__file__ = path
        main.__builtins__ = builtins
        sys.modules["__main__"] = main
        sys.argv[:] = [path]
        sys.path[:] = [moved_path(p, moved) for p in sys.path if p]  # like -I: no cwd entry
        sys.path.extend(cfg["python_path"])
        if moved:  # packages imported at start-up (encodings, ...) look up submodules here
            for module in list(sys.modules.values()):
                search = getattr(module, "__path__", None)
                if isinstance(search, list):
                    search[:] = [moved_path(p, moved) for p in search]
            for name in ("prefix", "exec_prefix", "base_prefix", "base_exec_prefix"):
                setattr(sys, name, moved_path(getattr(sys, name), moved))
        return source, path, main.__dict__

    def wait_for(pid, timeout):
        """P's wait status, or None if it is still running after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # before Python 3.9 or Linux 5.3
            fd = None
        if fd is not None:
            while not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                if time.monotonic() >= deadline:
                    return None
        else:
            pause = 0.001
            while os.waitpid(pid, os.WNOHANG) == (0, 0):
                if time.monotonic() >= deadline:
                    return None
                time.sleep(pause)
                pause = min(pause * 2, 0.02)
        return os.waitpid(pid, 0)[1]

    def children():
        me = os.getpid()
        try:
            with open(f"/proc/{me}/task/{me}/children") as f:
                return [int(p) for p in f.read().split()]
        except OSError:  # kernel without CONFIG_PROC_CHILDREN: scan for our children
            kids = []
            for entry in os.listdir("/proc"):
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        stat = f.read()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                    kids.append(int(entry))
            return kids

    def sweep(pgid):
        """Kill every descendant of C (PID 1 of the namespace, or their subreaper): orphans of a
        killed process are re-parented to C, so repeat until C has no children left."""
        try:
            os.killpg(pgid, sigkill)
        except OSError:
            pass
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            while True:  # reap what has died
                try:
                    if os.waitpid(-1, os.WNOHANG)[0] == 0:
                        break
                except ChildProcessError:
                    return
            for pid in children():
                try:
                    os.kill(pid, sigkill)
                except OSError:
                    pass
            time.sleep(0.001)

    def supervise(ns):  # C
        libc.prctl(1, sigkill, 0, 0, 0)  # PR_SET_PDEATHSIG: die with L
        workdir, uid = cfg["workdir"], cfg["uid"]
        moved = {}
        if ns:
            files = {}
            for name in os.listdir(workdir):
                with open(os.path.join(workdir, name), "rb") as f:
                    files[name] = f.read()
            moved = setup_mounts(workdir, files, uid)
        else:
            libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come back to C
        if uid is not None and cfg["command"] is None and not (ns and cfg["hide_tmp"]):
            closed = [p for p in (sys.base_prefix, sys.base_exec_prefix) if not world_readable(p)]
            if closed:
                raise PermissionError(
                    f"the sandbox uid cannot read the interpreter's directory {closed[0]}; "
                    "without a mount namespace use an interpreter other users can read "
                    "(SandboxConfig.python)"
                )
        if uid is not None:
            own(workdir, uid)
        start = time.monotonic()
        me = os.getpid()
        pid = os.fork()
        if pid == 0:
            try:
                return program(ns, workdir, uid, moved, me)
            except Exception as e:
                report("error", f"program set-up: {type(e).__name__}: {e}")
                os._exit(125)
        os.dup2(devnull, 1)  # from now on only P and its descendants hold stdout and stderr
        os.dup2(devnull, 2)
        status = wait_for(pid, cfg["timeout"])
        duration = time.monotonic() - start
        if status is None:
            try:
                os.killpg(pid, sigkill)
            except OSError:
                os.kill(pid, sigkill)
            os.waitpid(pid, 0)
        # Kill every descendant before reporting, so that when the parent reads the outcome
        # nothing of the program is left (C is PID 1 of the namespace, or their subreaper).
        sweep(pid)
        if status is None:
            report("timeout", duration)
        elif os.WIFSIGNALED(status):
            report("signal", os.WTERMSIG(status), duration)
        else:
            report("exit", os.WEXITSTATUS(status), duration)
        os._exit(0)  # in a PID namespace, the kernel would now kill anything left in it

    def launch():  # L: its own session, the run's environment, namespaces, then C
        os.setsid()
        os.environ.clear()
        os.environ.update(cfg["env"])
        os.chdir(cfg["workdir"])
        report("pid", os.getpid())
        try:
            ns = unshare()
        except OSError as e:
            report("error", e.strerror)
            os._exit(125)
        report("mode", ns or "basic")
        pid = os.fork()
        if pid == 0:
            try:
                return supervise(ns)  # returns in P only
            except Exception as e:
                report("error", f"sandbox set-up: {type(e).__name__}: {e}")
                os._exit(125)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        status = os.waitpid(pid, 0)[1]
        if os.WIFSIGNALED(status):
            report("supervisor-killed", os.WTERMSIG(status))
        os._exit(0)

    def unshare():
        mode = cfg["isolation"]
        if mode == "basic":
            return ""
        root = os.geteuid() == 0
        user = mode == "user-namespaces" or (mode == "auto" and not root)
        if mode == "namespaces" and not root:
            raise OSError(1, "isolation 'namespaces' needs root; use 'user-namespaces'")
        uid, gid = os.getuid(), os.getgid()
        flags = 0x00020000 | 0x40000000 | 0x20000000 | 0x08000000 | 0x04000000  # NS NET PID IPC UTS
        if user:
            flags |= 0x10000000  # CLONE_NEWUSER
        if libc.unshare(flags) != 0:
            if mode == "auto":
                return ""
            err = ctypes.get_errno()
            raise OSError(err, f"isolation {mode!r} unavailable: unshare: {os.strerror(err)}")
        if user:
            # A non-dumpable process's /proc/self files belong to root: dumpable just for this.
            libc.prctl(4, 1, 0, 0, 0)
            for name, text in (
                ("setgroups", "deny"),
                ("uid_map", f"{uid} {uid} 1"),
                ("gid_map", f"{gid} {gid} 1"),
            ):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
            libc.prctl(4, 0, 0, 0, 0)
        return "user-namespaces" if user else "namespaces"

    # The server loop: a request is b"r" + config (with the three pipes attached) or b"k" + pid
    # (the parent's backstop: kill that launcher's process group, if it is one of ours).
    live = set()
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, 1 << 16, 3)
        except OSError:
            os._exit(0)
        if not message:
            os._exit(0)  # the parent closed the control socket, or died
        while live:  # reap finished launchers; an unreaped pid cannot be reused
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            live.discard(pid)
        if message[:1] == b"k":
            pid = int(message[1:])
            if pid in live:
                try:
                    os.killpg(pid, 9)
                except OSError:
                    pass
            continue
        pid = os.fork()
        if pid == 0:
            control.close()  # first: nothing below the server may send it requests
            cfg = marshal.loads(message[1:])
            out, err, status_fd = fds
            os.dup2(out, 1)
            os.dup2(err, 2)
            os.close(out)
            os.close(err)
            return launch()
        live.add(pid)
        for fd in fds:
            os.close(fd)


# P runs the program returned by _server at top level and exits as a normal interpreter would
# (non-daemon threads joined, atexit handlers run, stdio flushed), minus the interpreter teardown:
# os._exit saves several milliseconds per program. The traceback starts in the program.
_LAUNCHER_TAIL = """
import os
import sys
_source, _path, _globals = _server()
try:
    exec(compile(_source, _path, "exec"), _globals)
    _code = 0
except SystemExit as _e:
    _code = _e.code
    if _code is None:
        _code = 0
    elif not isinstance(_code, int):
        print(_code, file=sys.stderr)
        _code = 1
except BaseException as _e:
    _tb = _e.__traceback__.tb_next
    sys.excepthook(type(_e), _e.with_traceback(_tb), _tb)
    _code = 1
if "threading" in sys.modules:
    sys.modules["threading"]._shutdown()
import atexit
atexit._run_exitfuncs()
for _stream in (sys.stdout, sys.stderr):
    try:
        _stream.flush()
    except Exception:
        _code = 120
os._exit(_code & 0xFF)
"""


@cache
def _launcher_source() -> str:
    return inspect.getsource(_server) + _LAUNCHER_TAIL


class _ForkServer:
    """The parent's handle on one fork server process (see ``_server``)."""

    def __init__(self, python: str, env: Mapping[str, str], preload: Sequence[str]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.process = subprocess.Popen(
                [
                    python,
                    "-s",
                    "-S",
                    "-c",
                    _launcher_source(),
                    str(theirs.fileno()),
                    marshal.dumps(tuple(preload)).hex(),
                ],
                env=dict(env),
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        self.socket = ours

    def alive(self) -> bool:
        return self.process.poll() is None

    def submit(self, config: bytes, fds: Sequence[int]) -> None:
        # One SEQPACKET message per request: atomic, so threads may submit concurrently.
        socket.send_fds(self.socket, [b"r" + config], list(fds))

    def kill(self, pid: int) -> None:
        try:
            self.socket.send(b"k%d" % pid)
        except OSError:
            pass

    def close(self) -> None:
        self.socket.close()  # the server exits on end-of-file
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _close_server(holder: list[_ForkServer | None]) -> None:
    if holder[0] is not None:
        holder[0].close()
        holder[0] = None


class Sandbox:
    """Runs programs under one ``SandboxConfig``; thread-safe (each run is its own process
    tree). Starts a small fork server on first use; ``close()`` (or ``with``) stops it, as does
    garbage collection or the end of this process."""

    def __init__(self, config: SandboxConfig | None = None) -> None:
        if not sys.platform.startswith("linux"):
            raise SandboxError(f"the sandbox needs Linux, not {sys.platform}")
        self.config = config or SandboxConfig()
        self._description: dict[str, str] | None = None
        self._lock = threading.Lock()
        self._server: list[_ForkServer | None] = [None]
        self._finalizer = weakref.finalize(self, _close_server, self._server)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the fork server (running programs are not affected)."""
        with self._lock:
            _close_server(self._server)

    def run(self, program: Program | str) -> RunResult:
        """Run one program (a ``Program`` or Python source) and wait for it."""
        prog = Program(program) if isinstance(program, str) else program
        cfg = self.config
        timeout = prog.timeout or cfg.timeout
        started = time.monotonic()
        workdir = tempfile.mkdtemp(prefix="sandbox-", dir=cfg.tmp_root)
        try:
            with open(os.path.join(workdir, prog.file_name), "w", encoding="utf-8") as f:
                f.write(prog.source)
            return self._launch(prog, workdir, timeout, started)
        finally:
            _remove_tree(workdir)

    def run_many(self, programs: Sequence[Program | str], workers: int = 2) -> list[RunResult]:
        """Run ``programs`` with up to ``workers`` at a time; results in the input order."""
        if workers < 1:
            raise SandboxError(f"workers must be at least 1, got {workers}")
        if workers == 1 or len(programs) <= 1:
            return [self.run(p) for p in programs]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
            return list(pool.map(self.run, programs))

    def describe(self) -> dict[str, str]:
        """The containment actually active here, found by running an empty program once."""
        if self._description is None:
            r = self.run("pass")
            if r.status != PASSED:
                raise SandboxError(f"the sandbox cannot run programs: {r.error or r.stderr}")
            ns = r.isolation != "basic"
            self._description = {
                "isolation": r.isolation,
                "network": r.network,
                "user": (
                    f"a random unused uid per run (e.g. {r.uid}), no groups"
                    if r.uid is not None
                    else f"uid {os.geteuid()} (the caller's)"
                ),
                "processes": "PID namespace" if ns else "process group + subreaper sweep",
                "filesystem": (
                    "read-only mounts, private /tmp, /dev/shm and working directory (tmpfs)"
                    if ns
                    else "host temp dir as working directory; file permissions only"
                ),
            }
        return dict(self._description)

    def _environment(self, workdir: str) -> dict[str, str]:
        """The program's whole environment: built here, nothing copied from this process."""
        cfg = self.config
        return {
            "PATH": cfg.path,
            "LANG": cfg.lang,
            "HOME": workdir,
            "TMPDIR": workdir,
            "PYTHONHASHSEED": cfg.hash_seed,
            **cfg.env,
        }

    def _fork_server(self, restart: bool = False) -> _ForkServer:
        with self._lock:
            server = self._server[0]
            if restart or server is None or not server.alive():
                _close_server(self._server)
                # The server's environment fixes the interpreter's hash seed and locale for
                # every program; it has no per-run variables and nothing of this process.
                env = self._environment("/")
                server = self._server[0] = _ForkServer(self.config.python, env, self.config.preload)
            return server

    def _launch(self, prog: Program, workdir: str, timeout: float, started: float) -> RunResult:
        cfg = self.config
        uid = None
        if os.geteuid() == 0 and cfg.isolation != "user-namespaces":
            low, high = cfg.uid_range
            uid = low + secrets.randbelow(high - low)
        command = None
        if prog.command is not None:
            command = tuple(a.replace("{file}", prog.file_name) for a in prog.command)
        real_tmp = os.path.realpath("/tmp")
        python_root = os.path.realpath(
            sys.base_prefix if cfg.python == sys.executable else os.path.dirname(cfg.python)
        )
        launch_cfg = marshal.dumps(
            {
                "workdir": workdir,
                "env": self._environment(workdir),
                "filename": prog.file_name,
                "command": command,
                "timeout": float(timeout),
                "cpu_seconds": cfg.cpu_seconds or math.ceil(timeout) + 1,
                "memory_bytes": cfg.memory_bytes,
                "file_size_bytes": cfg.file_size_bytes,
                "max_processes": cfg.max_processes,
                "max_open_files": cfg.max_open_files,
                "tmpfs_bytes": cfg.tmpfs_bytes,
                "isolation": cfg.isolation,
                "seccomp": cfg.seccomp,
                "uid": uid,
                "hidden_paths": tuple(cfg.hidden_paths),
                "bind_paths": tuple(cfg.bind_paths.items()),
                "python_path": tuple(cfg.python_path),
                # An interpreter installed under /tmp must stay visible: then only the working
                # directory gets a private tmpfs.
                "hide_tmp": not (python_root + "/").startswith(real_tmp + "/"),
            }
        )
        pipes = [os.pipe() for _ in range(3)]  # stdout, stderr, status
        try:
            try:
                server = self._fork_server()
                try:
                    server.submit(launch_cfg, [w for _, w in pipes])
                except OSError:  # the server died since the last run: start another, once
                    server = self._fork_server(restart=True)
                    server.submit(launch_cfg, [w for _, w in pipes])
            finally:
                for _, w in pipes:
                    os.close(w)  # the launcher holds them now: end-of-file when it is done
        except OSError as e:
            for r, _ in pipes:
                os.close(r)
            return RunResult(
                ERROR,
                None,
                None,
                0.0,
                time.monotonic() - started,
                "",
                "",
                False,
                "none",
                "none",
                None,
                f"cannot start the sandbox: {e}",
            )
        out, err, status, truncated, backstop = _collect(
            [r for r, _ in pipes],
            time.monotonic() + timeout + _GRACE,
            cfg.max_output_bytes,
            server.kill,
        )
        note = None
        if not server.alive():
            note = f"the sandbox server exited with code {server.process.returncode}"
        return _result(status, out, err, truncated, backstop, time.monotonic() - started, note)


def _collect(
    fds: list[int], deadline: float, cap: int, kill: Callable[[int], None]
) -> tuple[str, str, str, bool, bool]:
    """Read stdout, stderr and the status pipe until all three close; past ``deadline``, have
    the launcher's process group killed. Returns (stdout, stderr, status, truncated, killed)."""
    out_fd, err_fd, status_fd = fds
    caps = {out_fd: cap, err_fd: cap, status_fd: _STATUS_CAP}
    bufs = {fd: bytearray() for fd in caps}
    cut = killed = False
    outcome = re.compile(rb"^(exit|signal|timeout) ", re.MULTILINE)
    try:
        with selectors.DefaultSelector() as sel:
            for fd in caps:
                sel.register(fd, selectors.EVENT_READ)
            while sel.get_map():
                if list(sel.get_map()) == [status_fd] and outcome.search(bufs[status_fd]):
                    break  # reported after every process of the program was gone
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if killed:
                        break  # still held open after the kill: stop waiting for them
                    killed = True
                    pid = re.search(rb"^pid (\d+)$", bytes(bufs[status_fd]), re.MULTILINE)
                    if pid is not None:
                        kill(int(pid.group(1)))
                    deadline = time.monotonic() + 2.0
                    continue
                for key, _ in sel.select(remaining):
                    data = os.read(key.fd, 1 << 16)
                    if not data:
                        sel.unregister(key.fd)
                        continue
                    buf = bufs[key.fd]
                    room = max(caps[key.fd] - len(buf), 0)
                    buf += data[:room]  # beyond the cap: read and dropped, writers never block
                    cut = cut or (len(data) > room and key.fd != status_fd)
    finally:
        for fd in fds:
            os.close(fd)
    text = {fd: bytes(b).decode("utf-8", "replace") for fd, b in bufs.items()}
    return text[out_fd], text[err_fd], text[status_fd], cut, killed


def _result(
    status: str,
    out: str,
    err: str,
    truncated: bool,
    backstop: bool,
    wall: float,
    note: str | None = None,
) -> RunResult:
    """Interpret the launcher's status lines."""
    isolation, network, uid = "none", "none", None
    outcome: list[str] | None = None
    errors: list[str] = []
    for line in status.splitlines():
        word, _, rest = line.partition(" ")
        if word == "mode":
            isolation = rest
        elif word == "ready":
            network, _, uid_text = rest.partition(" ")
            uid = None if uid_text == "-" else int(uid_text)
        elif word in ("exit", "signal", "timeout"):
            outcome = [word, *rest.split()]
        elif word == "error":
            errors.append(rest)
        elif word == "supervisor-killed":
            errors.append(f"sandbox supervisor killed by signal {rest}")

    def make(
        state: str, code: int | None, sig: int | None, duration: float, error: str | None
    ) -> RunResult:
        return RunResult(
            state, code, sig, duration, wall, out, err, truncated, isolation, network, uid, error
        )

    if outcome is None:
        if backstop:
            return make(
                TIMEOUT,
                None,
                None,
                0.0,
                "the launcher did not finish; its process group was killed",
            )
        why = "; ".join(errors) or note or "the launcher ended without a result"
        if not errors and err.strip():
            why += ": " + err.strip().splitlines()[-1]
        return make(ERROR, None, None, 0.0, why)
    if errors:  # only the sandbox writes error lines (set-up or exec failed)
        return make(ERROR, None, None, 0.0, "; ".join(errors))
    kind, *values = outcome
    if kind == "timeout":
        return make(TIMEOUT, None, None, float(values[0]), None)
    if kind == "signal":
        sig = int(values[0])
        state = TIMEOUT if sig == signal.SIGXCPU else FAILED
        return make(state, None, sig, float(values[1]), None)
    code = int(values[0])
    return make(PASSED if code == 0 else FAILED, code, None, float(values[1]), None)


def _remove_tree(path: str) -> None:
    """Remove a run's directory even if the program made parts of it unreadable."""

    def fix(func, target, _exc) -> None:  # type: ignore[no-untyped-def]
        try:
            os.chmod(os.path.dirname(target), 0o700)
            os.chmod(target, 0o700)
            func(target)
        except OSError:
            pass

    shutil.rmtree(path, onerror=fix)


def run(program: Program | str, config: SandboxConfig | None = None) -> RunResult:
    """Run one program in a ``Sandbox(config)``."""
    return Sandbox(config).run(program)


def run_many(
    programs: Sequence[Program | str], workers: int = 2, config: SandboxConfig | None = None
) -> list[RunResult]:
    """Run ``programs`` in a ``Sandbox(config)`` with ``workers`` in parallel, in input order."""
    return Sandbox(config).run_many(programs, workers)
