"""
End-to-end tests: the real daemon, started as a subprocess (``twistd -n
hsu-registry`` and the standalone ``hsu-registry`` command of the installed
package), spoken to over real TCP and unix sockets.

Every wait is bounded and fails with the daemon's output; every process a test
starts is killed in its cleanup if it is still running.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
from collections.abc import Callable
from typing import Any, TypeVar

from treq.client import HTTPClient
from twisted.internet import reactor as _global_reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import FailTest, SkipTest, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

reactor: Any = _global_reactor

T = TypeVar("T")

#: How long any one wait (start-up, a request, an exit) may take.
TIMEOUT = 15.0

BIN_DIR = os.path.dirname(sys.executable)
HSU_REGISTRY = os.path.join(BIN_DIR, "hsu-registry")
TWISTD = os.path.join(BIN_DIR, "twistd")
CURL = shutil.which("curl")

TCP_LISTENING = re.compile(rb"hsu-registry listening on tcp:([0-9.]+):(\d+)")
UNIX_LISTENING = re.compile(rb"hsu-registry listening on unix:(\S+)")
# A line written by twisted.logger's text observer: "2026-...+0000 [system] text".
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[[^\]]*\] ")
GO_DURATION = re.compile(r"^(\d+h)?(\d+m)?\d+s$")

# The seed README's "Using curl" section, verbatim.
SEED_PUBLISH_BODY = """{
    "moduleID": "test",
    "processID": 1234,
    "apis": [{
      "serviceIDs": ["service1"],
      "serverPort": 50051,
      "protocol": "grpc"
    }]
  }"""
# The seed's documented answer to GET /api/v1/discover/test after that publish.
SEED_DISCOVER = {
    "moduleID": "test",
    "apis": [{"serviceIDs": ["service1"], "serverPort": 50051, "protocol": "grpc"}],
}


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


class _Process(ProcessProtocol):
    """
    A child process whose output is collected, with bounded waits for a
    pattern in its output and for its end.
    """

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.stdout = b""
        self.stderr = b""
        self.reason: Failure | None = None
        self._patterns: list[tuple[str, re.Pattern[bytes], Deferred[re.Match[bytes]]]] = []
        self._ends: list[Deferred[_Process]] = []

    # -- ProcessProtocol ---------------------------------------------------

    def outReceived(self, data: bytes) -> None:
        self.stdout += data
        self._check()

    def errReceived(self, data: bytes) -> None:
        self.stderr += data
        self._check()

    def processEnded(self, reason: Failure) -> None:
        # Called once the process has exited and its pipes are closed, so
        # all of its output has been received.
        self.reason = reason
        self._check()
        patterns, self._patterns = self._patterns, []
        for stream, pattern, d in patterns:
            if not d.called:
                d.errback(
                    FailTest(
                        f"the process ended before {pattern.pattern!r} appeared on "
                        f"{stream}\n{self.describe()}"
                    )
                )
        ends, self._ends = self._ends, []
        for end in ends:
            if not end.called:
                end.callback(self)

    def _check(self) -> None:
        waiting = []
        for stream, pattern, d in self._patterns:
            if d.called:
                continue
            match = pattern.search(getattr(self, stream))
            if match is None:
                waiting.append((stream, pattern, d))
            else:
                d.callback(match)
        self._patterns = waiting

    # -- for the tests -----------------------------------------------------

    @property
    def ended(self) -> bool:
        return self.reason is not None

    @property
    def exit_code(self) -> int | None:
        assert self.reason is not None
        value = self.reason.value
        return value.exitCode if isinstance(value, ProcessDone | ProcessTerminated) else None

    @property
    def exit_signal(self) -> int | None:
        assert self.reason is not None
        value = self.reason.value
        return value.signal if isinstance(value, ProcessTerminated) else None

    def describe(self) -> str:
        if self.reason is None:
            status = "still running"
        else:
            status = f"exit code {self.exit_code}, signal {self.exit_signal}"
        return (
            f"command: {self.argv!r}\nstatus: {status}\n"
            f"--- stdout ---\n{_text(self.stdout)}\n--- stderr ---\n{_text(self.stderr)}"
        )

    def wait_for(
        self, pattern: re.Pattern[bytes], stream: str = "stderr", timeout: float = TIMEOUT
    ) -> Deferred[re.Match[bytes]]:
        """Fires with the first match of C{pattern} in C{stream} ("stdout" or "stderr")."""
        d: Deferred[re.Match[bytes]] = Deferred()
        self._patterns.append((stream, pattern, d))
        self._check()
        if self.ended and not d.called:
            self._patterns.remove((stream, pattern, d))
            d.errback(
                FailTest(
                    f"the process ended without {pattern.pattern!r} on {stream}\n{self.describe()}"
                )
            )
        return _bounded(d, timeout, f"{pattern.pattern!r} on {stream}", self.describe)

    def wait_for_end(self, timeout: float = TIMEOUT) -> Deferred[_Process]:
        """Fires with this process once it has ended (see L{reason})."""
        d: Deferred[_Process] = Deferred()
        if self.reason is not None:
            d.callback(self)
        else:
            self._ends.append(d)
        return _bounded(d, timeout, "the process to end", self.describe)

    def signal(self, name: str) -> None:
        assert self.transport is not None
        self.transport.signalProcess(name)


def _bounded(d: Deferred[T], timeout: float, what: str, describe: Callable[[], str]) -> Deferred[T]:
    """C{d}, failed with C{describe()} when it has not fired within C{timeout} seconds."""

    def timed_out(result: Any, seconds: float) -> Any:
        raise FailTest(f"timed out after {seconds:g}s waiting for {what}\n{describe()}")

    return d.addTimeout(timeout, reactor, onTimeoutCancel=timed_out)


@implementer(IAgentEndpointFactory)
class _UNIXEndpointFactory:
    """Connects every request of an Agent to one unix socket."""

    def __init__(self, path: str) -> None:
        self.path = path

    def endpointForURI(self, uri: Any) -> UNIXClientEndpoint:
        return UNIXClientEndpoint(reactor, self.path, timeout=int(TIMEOUT))


class _Response:
    """A finished HTTP response: status code, headers and the whole body."""

    def __init__(self, code: int, headers: Any, body: bytes) -> None:
        self.code = code
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def __repr__(self) -> str:
        return f"<HTTP {self.code} {self.body[:300]!r}>"


class E2ETestCase(TestCase):
    """Starts real daemons, HTTP clients and curl, and cleans up after them."""

    timeout = 120

    def setUp(self) -> None:
        if not os.path.exists(HSU_REGISTRY) or not os.path.exists(TWISTD):
            raise SkipTest(f"hsu-registry or twistd is not installed next to {sys.executable}")

    # -- places ------------------------------------------------------------

    def short_temp_dir(self) -> str:
        """A new directory under /tmp, short enough for unix socket paths."""
        path = tempfile.mkdtemp(prefix="hsu", dir="/tmp")
        self.addCleanup(shutil.rmtree, path, ignore_errors=True)
        return path

    # -- processes ---------------------------------------------------------

    def spawn(self, argv: list[str], cwd: str | None = None) -> _Process:
        """Start C{argv} (C{argv[0]} is the executable) and kill it in cleanup."""
        process = _Process(argv)
        if cwd is None:
            cwd = self.short_temp_dir()
        reactor.spawnProcess(process, argv[0], argv, env=dict(os.environ), path=cwd)
        self.addCleanup(self._reap, process)
        return process

    def _reap(self, process: _Process) -> Deferred[Any] | None:
        if process.ended:
            return None
        try:
            process.signal("KILL")
        except ProcessExitedAlready:
            pass
        return process.wait_for_end()

    def spawn_registry(self, *args: str) -> _Process:
        """The standalone C{hsu-registry} command; it logs to stderr."""
        return self.spawn([HSU_REGISTRY, *args])

    def spawn_twistd(self, *args: str, cwd: str | None = None) -> _Process:
        """C{twistd -n hsu-registry}, with no pidfile; it logs to stdout."""
        return self.spawn([TWISTD, "-n", "--pidfile=", "hsu-registry", *args], cwd=cwd)

    async def tcp_port(self, process: _Process, stream: str = "stderr") -> int:
        """The TCP port C{process} logs it listens on."""
        match = await process.wait_for(TCP_LISTENING, stream)
        return int(match.group(2))

    async def stop(self, process: _Process, signame: str = "TERM") -> _Process:
        """Send C{signame} to C{process} and wait for it to end."""
        process.signal(signame)
        await process.wait_for_end()
        return process

    async def run_to_end(self, argv: list[str]) -> _Process:
        """Run C{argv} to its end (bounded) and return it with its output."""
        process = self.spawn(argv)
        await process.wait_for_end()
        return process

    def assertExitCode(self, process: _Process, code: int) -> None:
        self.assertTrue(process.ended, process.describe())
        self.assertEqual((process.exit_code, process.exit_signal), (code, None), process.describe())

    def assertNoTraceback(self, process: _Process) -> None:
        for stream in (process.stdout, process.stderr):
            self.assertNotIn(b"Traceback", stream, process.describe())

    def assertOneErrorLine(self, process: _Process) -> str:
        """
        Apart from the daemon's own log records, C{process} wrote exactly one
        line to stderr, an C{hsu-registry: error:} line; return it.
        """
        lines = _text(process.stderr).splitlines()
        errors = [line for line in lines if not LOG_LINE.match(line)]
        self.assertEqual(len(errors), 1, process.describe())
        self.assertTrue(errors[0].startswith("hsu-registry: error:"), process.describe())
        return errors[0]

    # -- HTTP --------------------------------------------------------------

    def http_client(self, unix_path: str | None = None) -> HTTPClient:
        """A treq client with no persistent connections, over TCP or a unix socket."""
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        if unix_path is None:
            agent = Agent(reactor, pool=pool, connectTimeout=TIMEOUT)
        else:
            agent = Agent.usingEndpointFactory(reactor, _UNIXEndpointFactory(unix_path), pool=pool)
        return HTTPClient(agent)

    def request(
        self,
        client: HTTPClient,
        method: str,
        url: str,
        **kwargs: Any,
    ) -> Deferred[_Response]:
        """One request and its whole body, bounded by L{TIMEOUT}."""

        async def go() -> _Response:
            response = await client.request(method, url, **kwargs)
            body = await response.content()
            return _Response(response.code, response.headers, body)

        return _bounded(ensureDeferred(go()), TIMEOUT, f"{method} {url}", lambda: "(no response)")

    async def assertJSON(
        self,
        client: HTTPClient,
        method: str,
        url: str,
        code: int,
        **kwargs: Any,
    ) -> Any:
        """Request, check the status code and JSON content type, return the JSON body."""
        response = await self.request(client, method, url, **kwargs)
        self.assertEqual(response.code, code, response)
        self.assertEqual(response.header("content-type"), "application/json", response)
        return response.json()

    async def seed_flow(self, client: HTTPClient, base: str) -> None:
        """
        The seed README's curl session: health, publish, discover, unpublish,
        and discover again (404 "module not found").
        """
        health = await self.assertJSON(client, "GET", f"{base}/api/v1/health", 200)
        self.assertEqual(health["status"], "healthy")
        self.assertEqual((health["registeredModules"], health["totalAPIs"]), (0, 0))
        self.assertRegex(health["uptime"], GO_DURATION)

        published = await self.assertJSON(
            client,
            "POST",
            f"{base}/api/v1/publish",
            200,
            data=SEED_PUBLISH_BODY.encode("utf-8"),
            headers={"Content-Type": "application/json"},
        )
        self.assertEqual(published, {"success": True})

        health = await self.assertJSON(client, "GET", f"{base}/api/v1/health", 200)
        self.assertEqual((health["registeredModules"], health["totalAPIs"]), (1, 1))

        discovered = await self.assertJSON(client, "GET", f"{base}/api/v1/discover/test", 200)
        self.assertEqual(discovered, SEED_DISCOVER)

        unpublished = await self.assertJSON(client, "DELETE", f"{base}/api/v1/unpublish/test", 200)
        self.assertEqual(unpublished, {"success": True})

        missing = await self.assertJSON(client, "GET", f"{base}/api/v1/discover/test", 404)
        self.assertIs(missing["success"], False)
        self.assertEqual(missing["error"], "module not found")

    # -- curl --------------------------------------------------------------

    async def curl(self, *args: str) -> bytes:
        """Run curl with C{args}; it must exit 0; return what it wrote to stdout."""
        assert CURL is not None, "CurlTests are skipped without curl"
        process = await self.run_to_end([CURL, *args])
        self.assertExitCode(process, 0)
        return process.stdout


class TwistdTests(E2ETestCase):
    """C{twistd -n hsu-registry}, as a service manager would run it."""

    async def test_seedFlowOverTCPThenSIGTERM(self) -> None:
        """
        Under twistd on TCP port 0, the daemon logs its real port on stdout
        and serves the seed's flow: GET /api/v1/health answers healthy,
        POST /api/v1/publish with the seed's body answers {"success": true},
        GET /api/v1/discover/test answers exactly the seed's discover JSON,
        DELETE /api/v1/unpublish/test answers {"success": true}, and discover
        then answers 404 {"success": false, "error": "module not found"}.

        On SIGTERM it shuts down cleanly ("Main loop terminated.", "Server Shut
        Down.", no traceback); twistd then, by design (twisted.scripts.twistd
        runApp -> app._exitWithSignal), ends itself with that same signal, so
        the process status is "killed by SIGTERM", not exit code 0.  It
        leaves no file (pidfile, log) in its working directory.
        """
        cwd = self.short_temp_dir()
        process = self.spawn_twistd("--endpoint=tcp:0:interface=127.0.0.1", cwd=cwd)
        port = await self.tcp_port(process, "stdout")
        await self.seed_flow(self.http_client(), f"http://127.0.0.1:{port}")

        await self.stop(process, "TERM")
        self.assertIn(b"Main loop terminated.", process.stdout, process.describe())
        self.assertIn(b"Server Shut Down.", process.stdout, process.describe())
        self.assertEqual(
            (process.exit_code, process.exit_signal), (None, signal.SIGTERM), process.describe()
        )
        self.assertNoTraceback(process)
        self.assertEqual(os.listdir(cwd), [])


class StandaloneTests(E2ETestCase):
    """The standalone C{hsu-registry} command with the seed's flags."""

    async def test_seedFlowOverTCPAddressThenSIGTERM(self) -> None:
        """
        C{--transport=tcp --tcp-address=127.0.0.1:0} listens on a free
        loopback port, logs it on stderr, serves the seed's full flow
        (health, publish, discover equal to the seed's JSON, unpublish,
        discover 404 "module not found"), logs no exposure warning, and exits
        with code 0 on SIGTERM.
        """
        process = self.spawn_registry("--transport=tcp", "--tcp-address=127.0.0.1:0")
        port = await self.tcp_port(process)
        await self.seed_flow(self.http_client(), f"http://127.0.0.1:{port}")

        await self.stop(process, "TERM")
        self.assertExitCode(process, 0)
        self.assertNoTraceback(process)
        self.assertNotIn(b"no authentication", process.stderr, process.describe())

    async def test_seedFlowOverTCPThenSIGINT(self) -> None:
        """
        The standalone command on TCP serves GET /api/v1/health and exits with
        code 0 on SIGINT (Ctrl-C) as well.
        """
        process = self.spawn_registry("--endpoint=tcp:0:interface=127.0.0.1")
        port = await self.tcp_port(process)
        health = await self.assertJSON(
            self.http_client(), "GET", f"http://127.0.0.1:{port}/api/v1/health", 200
        )
        self.assertEqual(health["status"], "healthy")

        await self.stop(process, "INT")
        self.assertExitCode(process, 0)
        self.assertNoTraceback(process)

    async def test_seedFlowOverUnixSocketThenSIGINT(self) -> None:
        """
        C{--transport=unix --socket-path=DIR/sub/registry.sock} creates the
        missing directory (with no group or other permissions), serves the
        seed's full flow over the unix socket (HTTP with Host: localhost), and
        exits with code 0 on SIGINT.
        """
        directory = self.short_temp_dir()
        path = os.path.join(directory, "sub", "registry.sock")
        process = self.spawn_registry("--transport=unix", f"--socket-path={path}")
        match = await process.wait_for(UNIX_LISTENING)
        self.assertEqual(_text(match.group(1)), path)
        subdir = os.stat(os.path.dirname(path))
        self.assertTrue(stat.S_ISDIR(subdir.st_mode))
        self.assertEqual(stat.S_IMODE(subdir.st_mode) & 0o077, 0, oct(subdir.st_mode))

        await self.seed_flow(self.http_client(unix_path=path), "http://localhost")

        await self.stop(process, "INT")
        self.assertExitCode(process, 0)
        self.assertNoTraceback(process)


class UnixSocketTests(E2ETestCase):
    """The care a unix socket gets: mode, removal, stale and live sockets."""

    async def test_modeIs0600AndSocketRemovedOnSIGTERM(self) -> None:
        """
        While the daemon runs, its unix socket has mode 0600 and answers
        GET /api/v1/health; after a clean SIGTERM shutdown (exit code 0) the
        socket file is gone.
        """
        path = os.path.join(self.short_temp_dir(), "registry.sock")
        process = self.spawn_registry(f"--socket-path={path}")
        await process.wait_for(UNIX_LISTENING)

        st = os.stat(path)
        self.assertTrue(stat.S_ISSOCK(st.st_mode))
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o600, oct(st.st_mode))
        health = await self.assertJSON(
            self.http_client(unix_path=path), "GET", "http://localhost/api/v1/health", 200
        )
        self.assertEqual(health["status"], "healthy")

        await self.stop(process, "TERM")
        self.assertExitCode(process, 0)
        self.assertFalse(os.path.exists(path), process.describe())

    async def test_staleSocketIsRemoved(self) -> None:
        """
        A socket file left behind with nothing listening on it (as by a
        crashed daemon) is removed: the daemon starts on that path, logs the
        removal, and answers GET /api/v1/health there.
        """
        path = os.path.join(self.short_temp_dir(), "registry.sock")
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(path)
        stale.close()
        self.assertTrue(stat.S_ISSOCK(os.stat(path).st_mode))

        process = self.spawn_registry(f"--socket-path={path}")
        await process.wait_for(UNIX_LISTENING)
        self.assertIn(b"Removing stale socket", process.stderr, process.describe())
        health = await self.assertJSON(
            self.http_client(unix_path=path), "GET", "http://localhost/api/v1/health", 200
        )
        self.assertEqual(health["status"], "healthy")

        await self.stop(process, "TERM")
        self.assertExitCode(process, 0)

    def live_unix_listener(self, path: str) -> socket.socket:
        """A bound, listening unix socket on C{path}, closed in cleanup."""
        live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(live.close)
        live.bind(path)
        live.listen(5)
        return live

    async def test_liveSocketIsNotTakenOver(self) -> None:
        """
        When a live server answers on the socket path, the daemon refuses to
        start: a non-zero exit code, one "hsu-registry: error:" line on
        stderr and no traceback; the live server's socket file is left alone
        and still accepts connections.
        """
        path = os.path.join(self.short_temp_dir(), "registry.sock")
        self.live_unix_listener(path)

        process = await self.run_to_end([HSU_REGISTRY, f"--socket-path={path}"])
        self.assertTrue(process.exit_code, process.describe())
        self.assertIsNone(process.exit_signal, process.describe())
        self.assertNoTraceback(process)
        line = self.assertOneErrorLine(process)
        self.assertIn(path, line)
        self.assertNotIn(b"hsu-registry listening", process.stderr, process.describe())

        self.assertTrue(stat.S_ISSOCK(os.stat(path).st_mode))
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)  # answered at once by the listen backlog
        finally:
            probe.close()

    async def test_liveSocketStderrIsExactlyOneLine(self) -> None:
        """
        When the daemon cannot take the socket path from a live server, all
        of stderr is the single "hsu-registry: error:" line (cli.py's
        contract: "one line on stderr, not a traceback").
        """
        path = os.path.join(self.short_temp_dir(), "registry.sock")
        self.live_unix_listener(path)

        process = await self.run_to_end([HSU_REGISTRY, f"--socket-path={path}"])
        self.assertTrue(process.exit_code, process.describe())
        lines = _text(process.stderr).splitlines()
        self.assertEqual(len(lines), 1, process.describe())
        self.assertTrue(lines[0].startswith("hsu-registry: error:"), process.describe())


class StartupFailureTests(E2ETestCase):
    """The daemon cannot start: a short message and an exit code, never a traceback."""

    def taken_tcp_port(self) -> int:
        """A loopback TCP port this test process listens on."""
        port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    async def test_tcpPortTaken(self) -> None:
        """
        When its TCP port is already taken, C{hsu-registry} exits with code 1,
        writes one "hsu-registry: error:" line naming the address (and
        nothing but its log records besides) to stderr, and no traceback.
        """
        port = self.taken_tcp_port()
        process = await self.run_to_end(
            [HSU_REGISTRY, f"--endpoint=tcp:{port}:interface=127.0.0.1"]
        )
        self.assertExitCode(process, 1)
        self.assertNoTraceback(process)
        line = self.assertOneErrorLine(process)
        self.assertIn(f"127.0.0.1:{port}", line)

    async def test_tcpPortTakenStderrIsExactlyOneLine(self) -> None:
        """
        When its TCP port is already taken, all of C{hsu-registry}'s stderr is
        exactly one line (cli.py's contract: "when it cannot listen it exits
        with code 1 and one line on stderr").
        """
        port = self.taken_tcp_port()
        process = await self.run_to_end(
            [HSU_REGISTRY, f"--endpoint=tcp:{port}:interface=127.0.0.1"]
        )
        self.assertExitCode(process, 1)
        lines = _text(process.stderr).splitlines()
        self.assertEqual(len(lines), 1, process.describe())
        self.assertTrue(lines[0].startswith("hsu-registry: error:"), process.describe())

    async def test_badStaleAfterIsAUsageError(self) -> None:
        """
        C{--stale-after=bogus} is a usage error: exit code 2, a message naming
        --stale-after on stderr, no traceback, and nothing is served.
        """
        process = await self.run_to_end([HSU_REGISTRY, "--stale-after=bogus"])
        self.assertExitCode(process, 2)
        self.assertIn(b"--stale-after", process.stderr, process.describe())
        self.assertTrue(process.stderr.startswith(b"hsu-registry: "), process.describe())
        self.assertNoTraceback(process)
        self.assertNotIn(b"listening", process.stderr, process.describe())


class ServingTests(E2ETestCase):
    """What the running daemon serves, and to whom."""

    async def test_nonLoopbackEndpointWarns(self) -> None:
        """
        Listening on all interfaces (tcp:0:interface=0.0.0.0) logs a warning
        that the API has "no authentication"; the daemon still serves
        GET /api/v1/health and exits 0 on SIGTERM.
        """
        process = self.spawn_registry("--endpoint=tcp:0:interface=0.0.0.0")
        warning = await process.wait_for(re.compile(rb"^.*no authentication.*$", re.M))
        self.assertIn(b"#warn]", warning.group(0))
        self.assertIn(b"tcp:0:interface=0.0.0.0", warning.group(0))
        port = await self.tcp_port(process)
        health = await self.assertJSON(
            self.http_client(), "GET", f"http://127.0.0.1:{port}/api/v1/health", 200
        )
        self.assertEqual(health["status"], "healthy")

        await self.stop(process, "TERM")
        self.assertExitCode(process, 0)

    async def test_tcpAndUnixEndpointsShareOneRegistry(self) -> None:
        """
        With a TCP and a unix endpoint at once, both serve the same registry:
        a module published over TCP is discovered over the unix socket, and
        once unpublished over the unix socket, discover over TCP answers 404.
        """
        path = os.path.join(self.short_temp_dir(), "registry.sock")
        process = self.spawn_registry(
            "--endpoint=tcp:0:interface=127.0.0.1", f"--endpoint=unix:{path}"
        )
        port = await self.tcp_port(process)
        await process.wait_for(UNIX_LISTENING)
        tcp, unix = self.http_client(), self.http_client(unix_path=path)
        tcp_base, unix_base = f"http://127.0.0.1:{port}", "http://localhost"

        published = await self.assertJSON(
            tcp,
            "POST",
            f"{tcp_base}/api/v1/publish",
            200,
            data=SEED_PUBLISH_BODY.encode("utf-8"),
            headers={"Content-Type": "application/json"},
        )
        self.assertEqual(published, {"success": True})
        discovered = await self.assertJSON(unix, "GET", f"{unix_base}/api/v1/discover/test", 200)
        self.assertEqual(discovered, SEED_DISCOVER)
        health = await self.assertJSON(unix, "GET", f"{unix_base}/api/v1/health", 200)
        self.assertEqual(health["registeredModules"], 1)

        await self.assertJSON(unix, "DELETE", f"{unix_base}/api/v1/unpublish/test", 200)
        missing = await self.assertJSON(tcp, "GET", f"{tcp_base}/api/v1/discover/test", 404)
        self.assertEqual(missing["error"], "module not found")

        await self.stop(process, "TERM")
        self.assertExitCode(process, 0)
        self.assertFalse(os.path.exists(path))

    async def test_bodyOverLimitIs413(self) -> None:
        """
        With --max-body-size=1000, a POST /api/v1/publish of 5000 bytes (with
        Content-Length) answers 413 with a JSON body {"success": false,
        "error": ...}, and the daemon still answers GET /api/v1/health.
        """
        process = self.spawn_registry(
            "--endpoint=tcp:0:interface=127.0.0.1", "--max-body-size=1000"
        )
        port = await self.tcp_port(process)
        client = self.http_client()
        base = f"http://127.0.0.1:{port}"

        body = b"x" * 5000
        response = await self.request(
            client,
            "POST",
            f"{base}/api/v1/publish",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        self.assertEqual(response.code, 413, response)
        self.assertEqual(response.header("content-type"), "application/json", response)
        refused = response.json()
        self.assertIs(refused["success"], False)
        self.assertIsInstance(refused["error"], str)
        self.assertIn("1000", refused["error"])

        health = await self.assertJSON(client, "GET", f"{base}/api/v1/health", 200)
        self.assertEqual(health["status"], "healthy")

        await self.stop(process, "TERM")
        self.assertExitCode(process, 0)
        self.assertNoTraceback(process)


class CurlTests(E2ETestCase):
    """The seed README's "Using curl" commands, run as written with the real curl."""

    skip = None if CURL is not None else "curl is not installed"

    async def test_seedCurlCommandsOverTCP(self) -> None:
        """
        The README's curl commands (port changed to the daemon's): health
        answers healthy, the multi-line -d publish answers {"success": true},
        discover answers the seed's JSON, unpublish answers
        {"success": true}, and discover afterwards answers "module not found".
        """
        process = self.spawn_registry("--transport=tcp", "--tcp-address=127.0.0.1:0")
        port = await self.tcp_port(process)
        base = f"http://127.0.0.1:{port}"

        health = json.loads(await self.curl(f"{base}/api/v1/health"))
        self.assertEqual(health["status"], "healthy")
        published = await self.curl(
            "-X",
            "POST",
            f"{base}/api/v1/publish",
            "-H",
            "Content-Type: application/json",
            "-d",
            SEED_PUBLISH_BODY,
        )
        self.assertEqual(json.loads(published), {"success": True})
        discovered = await self.curl(f"{base}/api/v1/discover/test")
        self.assertEqual(json.loads(discovered), SEED_DISCOVER)
        unpublished = await self.curl("-X", "DELETE", f"{base}/api/v1/unpublish/test")
        self.assertEqual(json.loads(unpublished), {"success": True})
        missing = json.loads(await self.curl(f"{base}/api/v1/discover/test"))
        self.assertEqual((missing["success"], missing["error"]), (False, "module not found"))

        await self.stop(process, "TERM")
        self.assertExitCode(process, 0)

    async def test_seedCurlHealthOverUnixSocket(self) -> None:
        """
        The README's C{curl --unix-socket PATH http://localhost/api/v1/health}
        answers healthy.
        """
        path = os.path.join(self.short_temp_dir(), "hsu-registry.sock")
        process = self.spawn_registry("--transport=unix", f"--socket-path={path}")
        await process.wait_for(UNIX_LISTENING)

        health = json.loads(
            await self.curl("--unix-socket", path, "http://localhost/api/v1/health")
        )
        self.assertEqual(health["status"], "healthy")
        self.assertEqual((health["registeredModules"], health["totalAPIs"]), (0, 0))

        await self.stop(process, "TERM")
        self.assertExitCode(process, 0)


# A module process: publishes over the unix socket as itself, says so, waits.
_BOUND_MODULE = """
import os, sys, time
from hsu_registry.client import BlockingRegistryClient, RemoteAPI, RemoteModuleAPI
client = BlockingRegistryClient(sys.argv[1])
client.publish_apis([RemoteAPI("doomed", [RemoteModuleAPI(["svc"], 9999, "http")])])
print("published", os.getpid(), flush=True)
time.sleep(120)
"""


class ProcessBoundTests(E2ETestCase):
    """A module killed with SIGKILL disappears without waiting for staleness."""

    async def test_killedModuleIsRemovedAtOnce(self) -> None:
        """
        A module that publishes over the unix socket as its own process is
        bound to it (C{GET /api/v1/modules/{id}} says so); C{kill -9} of that
        process removes it, which a blocking catalog query sees as the next
        change, and the daemon logs why.
        """
        if not os.path.isdir("/proc/self"):
            raise SkipTest("no /proc on this host")
        path = os.path.join(self.short_temp_dir(), "registry.sock")
        registry = self.spawn_registry(f"--endpoint=unix:{path}")
        await registry.wait_for(UNIX_LISTENING)
        module = self.spawn([sys.executable, "-c", _BOUND_MODULE, f"unix://{path}"])
        match = await module.wait_for(re.compile(rb"published (\d+)"), "stdout")
        pid = int(match.group(1))

        client = self.http_client(unix_path=path)
        response = await self.request(client, "GET", "http://localhost/api/v1/modules/doomed")
        self.assertEqual(response.code, 200, response)
        entry = response.json()
        self.assertEqual((entry["processBound"], entry["boundPID"]), (True, pid))
        index = response.header("x-hsu-index")

        module.signal("KILL")
        response = await self.request(
            client, "GET", f"http://localhost/api/v1/modules?index={index}&wait=10s"
        )
        self.assertEqual(response.json(), {"modules": []})
        self.assertEqual(int(response.header("x-hsu-index") or 0), int(index or 0) + 1)
        await registry.wait_for(re.compile(rb"Expired module doomed: its process %d exited" % pid))
        response = await self.request(client, "GET", "http://localhost/api/v1/discover/doomed")
        self.assertEqual(response.code, 404)
        await self.stop(registry)
        self.assertExitCode(registry, 0)
        self.assertNoTraceback(registry)


class HealthCheckE2ETests(E2ETestCase):
    """The daemon checks the APIs published with a check."""

    async def test_httpCheckOfALocalService(self) -> None:
        """
        An API published with an HTTP check turns C{passing} (a blocking
        catalog query sees the change), and C{?passing=true} then lists it;
        when the service starts answering 503 it turns C{critical} and
        C{?passing=true} leaves it out.
        """

        class Health(Resource):
            isLeaf = True
            code = 200

            def render_GET(self, request: Any) -> bytes:
                request.setResponseCode(self.code)
                return b"ok"

        health = Health()
        service = reactor.listenTCP(0, Site(health), interface="127.0.0.1")
        self.addCleanup(service.stopListening)
        registry = self.spawn_registry("--endpoint=tcp:0:interface=127.0.0.1")
        base = f"http://127.0.0.1:{await self.tcp_port(registry)}/api/v1"
        client = self.http_client()
        published = {
            "moduleID": "web",
            "processID": 0,
            "apis": [
                {
                    "serviceIDs": ["web"],
                    "serverPort": service.getHost().port,
                    "protocol": "http",
                    "check": {"http": "/healthz", "interval": "1s", "timeout": "1s"},
                }
            ],
        }
        response = await self.request(
            client, "POST", f"{base}/publish", data=json.dumps(published).encode()
        )
        self.assertEqual(response.code, 200, response)

        async def next_status(index: str | None) -> tuple[str, str | None]:
            answer = await self.request(client, "GET", f"{base}/modules/web?index={index}&wait=10s")
            return answer.json()["apis"][0]["status"], answer.header("x-hsu-index")

        # The first checks may time out on a starved machine (the service
        # answers from this process): wait, through such critical results,
        # for passing; a check that never passes fails after ten changes.
        status: str = "unknown"
        index: str | None = "1"
        for _ in range(10):
            status, index = await next_status(index)
            if status == "passing":
                break
        self.assertEqual(status, "passing")
        for _ in range(10):
            answer = await self.request(client, "GET", f"{base}/discover/web?passing=true")
            if len(answer.json()["apis"]) == 1:
                break
            # A later check timed out meanwhile: wait for the next change.
            status, index = await next_status(index)
        else:
            self.fail("never listed by ?passing=true")

        health.code = 503
        while status == "passing":
            status, index = await next_status(index)
        self.assertEqual(status, "critical")
        answer = await self.request(client, "GET", f"{base}/services/web?passing=true")
        self.assertEqual(answer.json(), {"serviceID": "web", "providers": []})
        await registry.wait_for(re.compile(rb"API 0 of module web is critical \(was passing\)"))
        await self.stop(registry)
        self.assertExitCode(registry, 0)
        self.assertNoTraceback(registry)
