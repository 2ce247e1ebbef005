"""
Processes the benchmark starts: the installed daemon, the reference server
and helper Python modules, each bounded in time and always stopped.

Everything runs in a L{Workspace}: a short temporary directory (unix socket
paths must stay short) that is every child's working directory, holds its log
file and its sockets, and remembers every child so that closing the
workspace kills whatever is still running.  Children also get
C{PR_SET_PDEATHSIG}, so they die with the harness even when it is killed.

Python helpers (C{python -m bench.X}) run with a C{PYTHONPATH} holding only a
link to this C{bench} package, not the source tree beside it, so they import
the I{installed} C{hsu_registry}, the same code as the daemon.
"""

from __future__ import annotations

import ctypes
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType

from bench.probe import Target

__all__ = [
    "Server",
    "Workspace",
    "await_server",
    "cpu_times",
    "open_files_limit",
    "raise_open_files",
    "read_status_kib",
    "spawn_daemon",
    "start_daemon",
    "start_reference",
    "venv_command",
]

# The real directory: a section run by the bench imports this package
# through its parent's workspace link (/tmp/hsub-*/py/bench), whose private
# directory another uid (the abuse section's flooder) cannot traverse.
BENCH_DIR = os.path.dirname(os.path.realpath(__file__))
LISTENING = re.compile(r"listening on (tcp:127\.0\.0\.1:(\d+)|unix:(\S+))")
_PR_SET_PDEATHSIG = 1


def venv_command(name: str) -> str:
    """The console script C{name} next to this Python, else on C{$PATH}."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.exists(beside):
        return beside
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed next to {sys.executable}")
    return found


def read_status_kib(pid: int, name: str = "VmRSS") -> int:
    """A C{kB} field of C{/proc/PID/status} (C{VmRSS}, C{VmHWM}, ...), in KiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise KeyError(f"no {name} in /proc/{pid}/status")


def cpu_times(pid: int) -> tuple[float, float]:
    """
    A process's CPU time in ms: utime+stime of C{/proc/PID/stat} (clock
    ticks) and the sum of its threads' C{schedstat} (nanoseconds).
    """
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    stat_ms = ticks * 1000.0 / os.sysconf("SC_CLK_TCK")
    sched_ns = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat", "rb") as f:
                sched_ns += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return stat_ms, sched_ns / 1e6


def _die_with_parent() -> None:
    """In the child before exec: be killed when the harness dies (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


@dataclass
class Server:
    """A running server process, where it listens, and its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: str
    tcp: Target | None = None
    unix: Target | None = None

    @property
    def pid(self) -> int:
        """The server's process ID."""
        return self.process.pid

    def target(self, transport: str) -> Target:
        """Where it listens over C{transport} (C{"tcp"} or C{"unix"})."""
        found = self.tcp if transport == "tcp" else self.unix
        if found is None:
            raise ValueError(f"{self.name} does not listen over {transport}")
        return found

    def rss_kib(self) -> int:
        """Its resident set size now, in KiB."""
        return read_status_kib(self.pid, "VmRSS")

    def stop(self, timeout: float = 15.0) -> int | None:
        """Stop it (SIGTERM, then SIGKILL); its exit status."""
        return stop_process(self.process, timeout)

    def read_log(self) -> str:
        """Its whole log, so far."""
        with open(self.log_path, "rb") as log:
            return log.read().decode("utf-8", "replace")

    def check_alive(self) -> None:
        """Raise when it has exited."""
        if self.process.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.process.returncode}: {log_tail(self.log_path)}"
            )


def log_tail(path: str, size: int = 2000) -> str:
    """The end of a log file, for error messages."""
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - size))
            return log.read().decode("utf-8", "replace")
    except OSError as e:
        return f"(no log: {e})"


def stop_process(process: subprocess.Popen[bytes], timeout: float = 15.0) -> int | None:
    """SIGTERM, then SIGKILL after C{timeout} seconds; the exit status (None if unknown)."""
    if process.poll() is None:
        try:
            process.send_signal(signal.SIGTERM)
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
        except ProcessLookupError:
            pass
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


@dataclass
class Workspace:
    """A temporary directory for one benchmark run, and the processes started in it."""

    root: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="hsub-", dir="/tmp"))
    _children: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _counter: int = 0

    def __post_init__(self) -> None:
        self.pythonpath = os.path.join(self.root, "py")
        os.mkdir(self.pythonpath)
        os.symlink(BENCH_DIR, os.path.join(self.pythonpath, "bench"))

    def __enter__(self) -> Workspace:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Kill every child still running and remove the directory."""
        for child in self._children:
            if child.poll() is None:
                child.kill()
                try:
                    child.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        shutil.rmtree(self.root, ignore_errors=True)

    def new_path(self, stem: str) -> str:
        """A fresh path in the workspace (nothing is created there)."""
        self._counter += 1
        return os.path.join(self.root, f"{stem}{self._counter}")

    def env(self, bench_importable: bool = False) -> dict[str, str]:
        """The environment of a child: this one, with C{PYTHONPATH} only for bench helpers."""
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        if bench_importable:
            env["PYTHONPATH"] = self.pythonpath
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def python_module(self, module: str, *args: str) -> list[str]:
        """The argv running C{python -m module args} (see L{env} for its path)."""
        return [sys.executable, "-m", module, *args]

    def spawn(
        self,
        argv: Sequence[str],
        log_path: str | None = None,
        bench_importable: bool = False,
    ) -> subprocess.Popen[bytes]:
        """Start C{argv} in the workspace, stdout and stderr to C{log_path} (or nowhere)."""
        if log_path is None:
            output = subprocess.DEVNULL
            child = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                cwd=self.root,
                env=self.env(bench_importable),
                preexec_fn=_die_with_parent,
            )
        else:
            with open(log_path, "wb") as log:
                child = subprocess.Popen(
                    list(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    cwd=self.root,
                    env=self.env(bench_importable),
                    preexec_fn=_die_with_parent,
                )
        self._children.append(child)
        return child

    def installed_package(self, name: str = "hsu_registry") -> tuple[str, str, str]:
        """
        Where the children import package C{name} from, its version, and a
        SHA-256 of its C{.py} files (the version alone does not tell builds apart).
        """
        code = (
            "import hashlib, os, sys\n"
            f"import {name} as p\n"
            "root = os.path.dirname(p.__file__)\n"
            "h = hashlib.sha256()\n"
            "for d, dirs, files in sorted(os.walk(root)):\n"
            "    dirs.sort()\n"
            "    for f in sorted(files):\n"
            "        if f.endswith('.py'):\n"
            "            h.update(os.path.relpath(os.path.join(d, f), root).encode())\n"
            "            h.update(open(os.path.join(d, f), 'rb').read())\n"
            "print(root); print(p.__version__); print(h.hexdigest()[:16])\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            cwd=self.root,
            env=self.env(bench_importable=True),
            timeout=60,
        )
        if done.returncode != 0:
            raise RuntimeError(f"cannot import {name}: {done.stderr[-1000:]}")
        location, version, digest = done.stdout.split()
        return location, version, digest

    def run_python(self, module: str, args: Sequence[str], timeout: float) -> str:
        """
        Run C{python -m module args} to its end (killed after C{timeout}
        seconds) and return its stdout; raise when it fails.
        """
        argv = self.python_module(module, *args)
        try:
            done = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                cwd=self.root,
                env=self.env(bench_importable=True),
                timeout=timeout,
                preexec_fn=_die_with_parent,
            )
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"{module} did not finish within {timeout:.0f}s") from e
        if done.returncode != 0:
            raise RuntimeError(
                f"{module} {' '.join(args)} exited with {done.returncode}: "
                f"{done.stderr.decode('utf-8', 'replace')[-2000:]}"
            )
        return done.stdout.decode("utf-8")


def wait_listening(
    name: str, process: subprocess.Popen[bytes], log_path: str, count: int, timeout: float
) -> list[Target]:
    """
    Wait until C{process} has logged C{count} "listening on" lines (in at most
    C{timeout} seconds) and return where it listens.
    """
    deadline = time.monotonic() + timeout
    while True:
        with open(log_path, "rb") as log:
            text = log.read().decode("utf-8", "replace")
        found = []
        for match in LISTENING.finditer(text):
            if match.group(2):
                found.append(Target.tcp(int(match.group(2))))
            else:
                found.append(Target.unix(match.group(3)))
        if len(found) >= count:
            return found
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}: {log_tail(log_path)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not listen within {timeout:.0f}s: {log_tail(log_path)}")
        time.sleep(0.01)


def await_server(
    name: str, process: subprocess.Popen[bytes], log_path: str, count: int, timeout: float = 30.0
) -> Server:
    """
    Wait until C{process} listens on C{count} endpoints (in at most C{timeout}
    seconds, see L{wait_listening}); the L{Server}.  On failure it is left
    running: stopping it is the caller's choice.
    """
    server = Server(name, process, log_path)
    for target in wait_listening(name, process, log_path, count, timeout):
        if target.transport == "tcp":
            server.tcp = target
        else:
            server.unix = target
    return server


def _awaited(name: str, process: subprocess.Popen[bytes], log_path: str, count: int) -> Server:
    """L{await_server}, stopping the process when it fails."""
    try:
        return await_server(name, process, log_path, count)
    except BaseException:
        stop_process(process)
        raise


def spawn_daemon(
    workspace: Workspace,
    name: str,
    extra_args: Sequence[str] = (),
    wrapper: Sequence[str] = (),
    unix: bool = True,
) -> tuple[subprocess.Popen[bytes], str]:
    """
    Start the installed C{hsu-registry} command (run by C{wrapper}, an argv
    prefix, if any), listening on an ephemeral TCP port on 127.0.0.1 and,
    when C{unix}, on a unix socket in the workspace; not waited for (see
    L{await_server}).  Its log (one line per publish) goes to a file, never
    to a pipe that could fill up.  The process and its log's path.
    """
    argv = [*wrapper, venv_command("hsu-registry"), "--endpoint=tcp:0:interface=127.0.0.1"]
    if unix:
        socket_path = os.path.join(workspace.new_path(f"{name}-sock"), "registry.sock")
        argv.append(f"--endpoint=unix:{socket_path}")
    argv.extend(extra_args)
    log_path = workspace.new_path(f"{name}-log")
    return workspace.spawn(argv, log_path), log_path


def start_daemon(
    workspace: Workspace,
    name: str,
    extra_args: Sequence[str] = (),
    wrapper: Sequence[str] = (),
    unix: bool = True,
) -> Server:
    """L{spawn_daemon}, then L{await_server} (30 s; the daemon is stopped on failure)."""
    process, log_path = spawn_daemon(workspace, name, extra_args, wrapper, unix)
    return _awaited(name, process, log_path, 2 if unix else 1)


def start_reference(workspace: Workspace, bodies_path: str) -> Server:
    """The bare twisted.web reference (L{bench.reference}) on TCP and a unix socket."""
    socket_path = workspace.new_path("reference-") + ".sock"
    argv = workspace.python_module(
        "bench.reference",
        "--endpoint=tcp:0:interface=127.0.0.1",
        f"--endpoint=unix:{socket_path}",
        f"--bodies={bodies_path}",
    )
    log_path = workspace.new_path("reference-log")
    process = workspace.spawn(argv, log_path, bench_importable=True)
    return _awaited("reference", process, log_path, 2)


def open_files_limit(pid: int) -> int | None:
    """The soft C{Max open files} of a process."""
    try:
        with open(f"/proc/{pid}/limits", encoding="ascii") as limits:
            for line in limits:
                if line.startswith("Max open files"):
                    value = line.split()[3]
                    return int(value) if value.isdigit() else None
    except OSError:
        pass
    return None


def raise_open_files(needed: int, to_hard: bool = False) -> tuple[int, int]:
    """
    Raise this process's soft RLIMIT_NOFILE to C{needed}, or with C{to_hard}
    to the hard limit (children, daemons included, inherit it); the limits.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise RuntimeError(
            f"{needed} open files are needed and the hard limit is {hard}: "
            "raise it (ulimit -Hn) or ask for less"
        )
    if to_hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    elif soft != resource.RLIM_INFINITY and soft < needed:
        target = needed
    else:
        target = soft
    if target != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)
