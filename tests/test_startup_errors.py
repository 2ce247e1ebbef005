"""
Errors a newcomer meets at start-up are one line that says what was being
done and what is wrong, never a traceback: bad endpoint strings, systemd
endpoints outside systemd, directories that cannot be created, a socket whose
lock a zombie holds, and (end to end) twistd on a port in use.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import tempfile
import time

from twisted.internet import reactor
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from hsu_registry.endpoints import (
    GO_CLIENT_DEFAULT_SOCKET,
    ListenerService,
    check_description,
    go_client_hint,
    prepare_unix_socket,
)
from hsu_registry.options import Options
from hsu_registry.service import makeService
from hsu_registry.stores.sqlite import StoreError, check_database
from hsu_registry.web.site import RegistrySite

from .test_e2e import HSU_REGISTRY, TWISTD, E2ETestCase, _text


def _usage_error(*argv: str) -> str:
    options = Options()
    try:
        options.parseOptions(list(argv))
    except usage.UsageError as e:
        return str(e)
    raise AssertionError(f"{argv} parsed")


def _file_in_the_way(case: SynchronousTestCase) -> str:
    """A path whose parent is a regular file: no one, root included, can create it."""
    base = tempfile.mkdtemp()
    case.addCleanup(lambda: subprocess.run(["rm", "-rf", base], check=False))
    blocker = os.path.join(base, "file")
    with open(blocker, "w"):
        pass
    return os.path.join(blocker, "sub")


class EndpointOptionTests(SynchronousTestCase):
    def test_bad_port_names_option_and_part(self) -> None:
        """C{--endpoint=tcp:abc} names the option, the description and the bad port."""
        message = _usage_error("--endpoint=tcp:abc")
        self.assertEqual(
            message, "--endpoint=tcp:abc: the port 'abc' is not a number from 0 to 65535"
        )
        self.assertNotIn("int()", message)

    def test_other_mistakes(self) -> None:
        """Each common mistake is said in terms of the description, not of Twisted's internals."""
        cases = {
            "tcp:99999": "the port '99999' is not a number from 0 to 65535",
            "tcp:80:backlog=x": "the backlog 'x' is not a number",
            "unix:/tmp/x.sock:mode=9z": "the mode '9z' is not an octal file mode",
            "tcp:80:bogus=1": "tcp endpoints have no option 'bogus'",
            "tcp6:80:interface=::1": "'interface' is given twice (escape ':'",
            "nonsense:1": "Unknown endpoint type",
            "unix:": "no socket path given",
        }
        for description, expected in cases.items():
            message = _usage_error(f"--endpoint={description}")
            self.assertTrue(message.startswith(f"--endpoint={description}: "), message)
            self.assertIn(expected, message)

    def test_good_descriptions(self) -> None:
        """Valid descriptions pass the check unchanged."""
        for description in (
            "tcp:17951:interface=127.0.0.1",
            "tcp6:0:interface=\\:\\:1",
            "unix:/tmp/x.sock:mode=660",
            "tcp:0:backlog=10",
        ):
            self.assertEqual(check_description(description).kind, description.split(":")[0])

    def test_systemd_without_sockets(self) -> None:
        """
        A C{systemd:} endpoint outside systemd (no LISTEN_FDS) is a usage
        error that says systemd passed no such socket and how to start it,
        instead of Twisted's IndexError or KeyError.
        """
        message = _usage_error("--endpoint=systemd:domain=INET:name=registry")
        self.assertIn("systemd passed no socket named 'registry'", message)
        self.assertIn("systemd-socket-activate --fdname=registry", message)
        message = _usage_error("--endpoint=systemd:domain=INET:index=0")
        self.assertIn("systemd passed no socket number 0", message)
        message = _usage_error("--endpoint=systemd:domain=BOGUS:index=0")
        self.assertIn("domain must be INET, INET6 or UNIX", message)


class DirectoryTests(SynchronousTestCase):
    def test_socket_directory_cannot_be_created(self) -> None:
        """The error names the socket's directory it could not create, and why."""
        directory = _file_in_the_way(self)
        path = os.path.join(directory, "registry.sock")
        error = self.assertRaises(CannotListenError, prepare_unix_socket, path, 0o600)
        self.assertIn(f"cannot create the socket's directory {directory}", str(error))
        self.assertIn("Not a directory", str(error))

    def test_state_directory_created(self) -> None:
        """
        C{--store=sqlite:DIR/registry.db} on a fresh machine creates DIR
        (mode 0700), as the socket's directory is created, instead of
        refusing to start.
        """
        base = tempfile.mkdtemp()
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", base], check=False))
        path = os.path.join(base, "lib", "hsu", "registry.db")
        options = Options()
        options.parseOptions([f"--store=sqlite:{path}"])
        makeService(options.config, MemoryReactorClock())
        self.assertTrue(os.path.isfile(path))
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode), 0o700)

    def test_state_directory_cannot_be_created(self) -> None:
        """When it cannot be created, the error says so, with the directory and the reason."""
        directory = _file_in_the_way(self)
        error = self.assertRaises(
            StoreError, check_database, os.path.join(directory, "registry.db")
        )
        self.assertIn(f"cannot create its directory {directory}", str(error))
        self.assertIn("Not a directory", str(error))


class LockTests(SynchronousTestCase):
    def test_zombie_holds_the_lock(self) -> None:
        """
        A restart while the killed daemon is still a zombie (its parent has
        not reaped it) says which process holds the socket's lock and why,
        instead of Twisted's bare "Cannot acquire lock".
        """
        directory = tempfile.mkdtemp(prefix="hsu", dir="/tmp")
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", directory], check=False))
        path = os.path.join(directory, "registry.sock")
        zombie = subprocess.Popen([sys.executable, "-c", "pass"])
        self.addCleanup(zombie.wait)
        deadline = time.monotonic() + 10
        while _state(zombie.pid) != "Z":  # it exits at once; bounded wait for the kernel
            self.assertLess(time.monotonic(), deadline, "the child did not become a zombie")
            time.sleep(0.01)
        os.symlink(str(zombie.pid), path + ".lock")
        listener = ListenerService(reactor, f"unix:{path}", RegistrySite(None))  # type: ignore[arg-type]
        error = self.assertRaises(CannotListenError, listener.privilegedStartService)
        self.assertIn(f"process {zombie.pid} holds the socket's lock file {path}.lock", str(error))
        self.assertIn("has not reaped it yet", str(error))
        self.assertNotIn("Cannot acquire lock", str(error))


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rpartition(b")")[2].split()[0].decode()


class GoClientSocketTests(SynchronousTestCase):
    def test_hint(self) -> None:
        """
        When the daemon listens on unix sockets but not where the Go client
        looks by default, the one line a Go module needs is logged.
        """
        hint = go_client_hint(["/var/run/hsu/registry.sock"])
        assert hint is not None
        self.assertIn(f"unix://{GO_CLIENT_DEFAULT_SOCKET}", hint)
        self.assertIn('URL: "unix:///var/run/hsu/registry.sock"', hint)
        self.assertIsNone(go_client_hint([GO_CLIENT_DEFAULT_SOCKET]))
        self.assertIsNone(go_client_hint([]))


class ForeignSocketTests(SynchronousTestCase):
    def test_another_users_socket_in_world_writable_directory(self) -> None:
        """
        Listening where the Go client looks (a world-writable directory such
        as /tmp) when another user's server already answers there is refused
        with a line that says whose socket it is and why that is a risk.
        """
        if os.geteuid() != 0:
            raise SkipTest("making a socket another user's needs root (CI runs as root)")
        directory = tempfile.mkdtemp(prefix="hsu", dir="/tmp")
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", directory], check=False))
        os.chmod(directory, 0o1777)
        path = os.path.join(directory, "hsu-registry.sock")
        squatter = socket.socket(socket.AF_UNIX)
        self.addCleanup(squatter.close)
        squatter.bind(path)
        squatter.listen(1)
        os.chown(path, 65534, 65534)
        error = self.assertRaises(CannotListenError, prepare_unix_socket, path, 0o600)
        self.assertIn("belongs to uid 65534, not to this daemon's uid 0", str(error))
        self.assertIn(f"in {directory} any local user can take this path first", str(error))
        self.assertTrue(os.path.exists(path))


class StoreExitCodeTests(E2ETestCase):
    async def test_unreadable_database_exits_1(self) -> None:
        """
        A database the daemon cannot use is a failure of its environment, not
        of its command line: both commands exit 1 with one line naming the
        file, and no traceback (a usage error exits 2).
        """
        directory = self.short_temp_dir()
        path = os.path.join(directory, "registry.db")
        with open(path, "w") as f:
            f.write("not a database, just text\n" * 50)
        for argv in (
            [HSU_REGISTRY, f"--store=sqlite:{path}"],
            [TWISTD, "-n", "--pidfile=", "hsu-registry", f"--store=sqlite:{path}"],
        ):
            process = await self.run_to_end(argv)
            self.assertExitCode(process, 1)
            self.assertNoTraceback(process)
            lines = _text(process.stderr).splitlines()
            self.assertEqual(len(lines), 1, process.describe())
            self.assertTrue(lines[0].startswith("hsu-registry: error: cannot use "), lines)
            self.assertIn(path, lines[0])
        usage = await self.run_to_end([HSU_REGISTRY, "--store=redis:x"])
        self.assertExitCode(usage, 2)


class TwistdStartupTests(E2ETestCase):
    async def test_twistd_port_taken_one_line(self) -> None:
        """
        C{twistd -n hsu-registry} on a port in use exits 1 and writes one
        line to stderr, the same as the standalone command, and no traceback
        anywhere.
        """
        from twisted.internet.protocol import Factory, Protocol

        port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        number = port.getHost().port
        twistd = await self.run_to_end(
            [
                TWISTD,
                "-n",
                "--pidfile=",
                "hsu-registry",
                f"--endpoint=tcp:{number}:interface=127.0.0.1",
            ]
        )
        standalone = await self.run_to_end(
            [HSU_REGISTRY, f"--endpoint=tcp:{number}:interface=127.0.0.1"]
        )
        for process in (twistd, standalone):
            self.assertExitCode(process, 1)
            self.assertNoTraceback(process)
        lines = _text(twistd.stderr).splitlines()
        self.assertEqual(lines, _text(standalone.stderr).splitlines(), twistd.describe())
        self.assertEqual(len(lines), 1)
        self.assertIn(f"127.0.0.1:{number}", lines[0])

    async def test_twistd_socket_directory_error(self) -> None:
        """A socket directory twistd cannot create: one line naming it, exit 1."""
        directory = _file_in_the_way(self)
        process = await self.run_to_end(
            [TWISTD, "-n", "--pidfile=", "hsu-registry", f"--endpoint=unix:{directory}/r.sock"]
        )
        self.assertExitCode(process, 1)
        self.assertNoTraceback(process)
        self.assertEqual(
            _text(process.stderr),
            f"hsu-registry: error: Couldn't listen on unix:{directory}/r.sock: cannot create "
            f"the socket's directory {directory}: Not a directory.\n",
        )


class FirstLogLineTests(SynchronousTestCase):
    def test_version_first(self) -> None:
        """The daemon's first log line names its version, its store and its endpoints."""
        from twisted.internet.testing import MemoryReactorClock
        from twisted.logger import capturedLogs

        from hsu_registry import __version__
        from hsu_registry.config import RegistryConfig
        from hsu_registry.service import makeService

        service = makeService(
            RegistryConfig(endpoints=("tcp:0:interface=127.0.0.1",)), MemoryReactorClock()
        )
        with capturedLogs() as events:
            service.privilegedStartService()
            service.startService()
        self.addCleanup(service.stopService)
        first = events[0]
        text = first["log_format"].format(**first)
        self.assertEqual(
            text,
            f"hsu-registry {__version__} starting: store memory, endpoints "
            "tcp:0:interface=127.0.0.1",
        )
