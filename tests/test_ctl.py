"""
Tests for L{hsu_registry.ctl}, the ``hsu-registry-ctl`` operator command,
against a real registry served in process on TCP and on a unix socket.

The command is blocking and the registry runs on this test's reactor, so
every call of L{run} happens in a thread (L{deferToThread}), never on the
reactor thread.
"""

from __future__ import annotations

import datetime
import http.client
import io
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from hsu_registry import __version__, ctl
from hsu_registry.client.model import RegisteredModule
from hsu_registry.config import RegistryConfig
from hsu_registry.ctl import (
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_REJECTED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    run,
)
from hsu_registry.model import parse_publish_body
from hsu_registry.service import makeService

from .helpers import refusing_port

CTL_SCRIPT = os.path.join(os.path.dirname(sys.executable), "hsu-registry-ctl")

PUBLISH_ECHO = [
    "publish",
    "echo",
    "--service",
    "echo.v1",
    "--service",
    "echo.v2",
    "--port",
    "50051",
    "--protocol",
    "grpc",
    "--address",
    "10.0.0.5",
    "--meta",
    "region=eu",
    "--meta",
    "tier=gold=1",
]
ECHO_DISCOVERED = {
    "moduleID": "echo",
    "apis": [
        {
            "serviceIDs": ["echo.v1", "echo.v2"],
            "serverPort": 50051,
            "protocol": "grpc",
            "address": "10.0.0.5",
            "metadata": {"region": "eu", "tier": "gold=1"},
        }
    ],
}


class _Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code = code
        self.out = out
        self.err = err

    def __repr__(self) -> str:
        return f"<exit {self.code} stdout={self.out!r} stderr={self.err!r}>"


class CtlTests(TestCase):
    """The command against a registry listening on TCP and a unix socket."""

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="hsu")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.socket_path = os.path.join(self.directory, "registry.sock")
        service = makeService(
            RegistryConfig(endpoints=("tcp:0:interface=127.0.0.1", f"unix:{self.socket_path}")),
            reactor,
        )
        # The tests set statuses themselves: the daemon's own checks of the
        # (closed) ports they publish would race them, so they never fire.
        service.checks.clock = Clock()
        service.startService()
        self.addCleanup(service.stopService)
        self.service = service
        port = service.listeners[0].port
        assert port is not None
        self.tcp_url = f"tcp://127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]
        self.unix_url = f"unix://{self.socket_path}"

    async def ctl(self, *argv: str, environ: Mapping[str, str] | None = None) -> _Result:
        """Run the command in a thread with captured output."""
        out, err = io.StringIO(), io.StringIO()
        code = await deferToThread(run, list(argv), out, err, {} if environ is None else environ)
        return _Result(code, out.getvalue(), err.getvalue())

    async def ok(self, *argv: str, environ: Mapping[str, str] | None = None) -> str:
        """Run the command, expect success and no stderr, and return stdout."""
        result = await self.ctl(*argv, environ=environ)
        self.assertEqual((result.code, result.err), (EXIT_OK, ""), result)
        return result.out

    async def fails(self, code: int, *argv: str) -> str:
        """Run the command, expect C{code}, no stdout and one error line; return it."""
        result = await self.ctl(*argv)
        self.assertEqual((result.code, result.out), (code, ""), result)
        self.assertNotIn("Traceback", result.err)
        self.assertTrue(result.err.endswith("\n"), result)
        lines = result.err.splitlines()
        self.assertEqual(len(lines), 1, result)
        self.assertTrue(lines[0].startswith("hsu-registry-ctl: "), result)
        return lines[0]

    async def json_of(self, *argv: str) -> Any:
        return json.loads(await self.ok(*argv, "--json"))

    async def raw(self, path: str) -> Any:
        """The registry's own JSON answer to C{GET path}, for comparison with --json."""
        port = int(self.tcp_url.rpartition(":")[2])

        def get() -> Any:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                connection.request("GET", path)
                return json.loads(connection.getresponse().read())
            finally:
                connection.close()

        return await deferToThread(get)

    async def publish_checked(self, module_id: str, *ports: int) -> None:
        """Publish C{module_id} with one TCP-checked API of service C{s} on each port."""
        apis = [
            {"serviceIDs": ["s"], "serverPort": port, "protocol": "http", "check": {"tcp": True}}
            for port in ports
        ]
        body = json.dumps({"moduleID": module_id, "apis": apis}).encode()
        await self.service.registry.publish(parse_publish_body(body))

    async def set_status(self, module_id: str, index: int, status: str) -> None:
        registration = self.service.registry.get(module_id)
        assert registration is not None
        target = registration.apis[index].check_target()
        assert target is not None
        await self.service.registry.set_status(module_id, index, target, status)

    # -- each subcommand, on both transports --------------------------------

    async def check_lifecycle(self, url: str) -> None:
        """Publish, discover, health and unpublish, as JSON, through C{url}."""
        self.assertEqual(await self.json_of("--url", url, *PUBLISH_ECHO), {"success": True})
        self.assertEqual(await self.json_of("--url", url, "discover", "echo"), ECHO_DISCOVERED)
        health = await self.json_of("--url", url, "health")
        self.assertEqual(
            sorted(health), ["registeredModules", "status", "totalAPIs", "uptime", "version"]
        )
        self.assertEqual(health["version"], __version__)
        self.assertEqual(
            (health["status"], health["registeredModules"], health["totalAPIs"]),
            ("healthy", 1, 1),
        )
        self.assertRegex(health["uptime"], r"^(\d+h)?(\d+m)?\d+s$")
        self.assertEqual(await self.json_of("--url", url, "unpublish", "echo"), {"success": True})
        await self.fails(EXIT_NOT_FOUND, "--url", url, "discover", "echo")

    async def test_lifecycle_tcp(self) -> None:
        """Every subcommand works over TCP, with --json output in the seed's shape."""
        await self.check_lifecycle(self.tcp_url)

    async def test_lifecycle_unix(self) -> None:
        """Every subcommand works over the unix socket."""
        await self.check_lifecycle(self.unix_url)

    async def test_tcp_and_unix_are_one_registry(self) -> None:
        """A module published over TCP is discovered over the unix socket."""
        await self.ok("--url", self.tcp_url, *PUBLISH_ECHO)
        self.assertEqual(
            await self.json_of("--url", self.unix_url, "discover", "echo"), ECHO_DISCOVERED
        )

    async def test_minimal_publish_json(self) -> None:
        """Without --address and --meta those fields are absent, as the seed shows."""
        await self.ok(
            "--url", self.tcp_url, "publish", "test", "--service", "service1",
            "--port", "50051", "--protocol", "grpc",
        )  # fmt: skip
        self.assertEqual(
            await self.json_of("--url", self.tcp_url, "discover", "test"),
            {
                "moduleID": "test",
                "apis": [{"serviceIDs": ["service1"], "serverPort": 50051, "protocol": "grpc"}],
            },
        )

    async def test_global_options_after_the_command(self) -> None:
        """--url, --timeout and --json are accepted after the subcommand too."""
        out = await self.ok("health", "--url", self.unix_url, "--timeout", "2.5", "--json")
        self.assertEqual(json.loads(out)["status"], "healthy")

    async def test_option_after_command_wins(self) -> None:
        """An option given after the subcommand overrides the same option before it."""
        dead = f"tcp://127.0.0.1:{refusing_port(self)}"
        out = await self.ok("--url", dead, "health", "--url", self.tcp_url)
        self.assertIn("Status:", out)

    async def test_version(self) -> None:
        """--version prints the program's name and version and exits 0, needing no registry."""
        dead = f"tcp://127.0.0.1:{refusing_port(self)}"
        self.assertEqual(await self.ok("--version"), f"hsu-registry-ctl {__version__}\n")
        self.assertEqual(
            await self.ok("--url", dead, "--version"), f"hsu-registry-ctl {__version__}\n"
        )

    async def test_help(self) -> None:
        """--help prints usage on stdout and exits 0."""
        out = await self.ok("publish", "--help")
        self.assertIn("--service ID", out)
        self.assertIn("usage: hsu-registry-ctl publish", out)

    # -- human output -------------------------------------------------------

    async def test_publish_and_unpublish_confirmations(self) -> None:
        """publish and unpublish print one short confirmation line."""
        self.assertEqual(
            await self.ok("--url", self.tcp_url, *PUBLISH_ECHO), "published echo (1 API)\n"
        )
        self.assertEqual(
            await self.ok("--url", self.tcp_url, "unpublish", "echo"), "unpublished echo\n"
        )

    async def test_discover_table(self) -> None:
        """discover prints a table with a header and one row per API."""
        await self.ok("--url", self.tcp_url, *PUBLISH_ECHO)
        out = await self.ok("--url", self.tcp_url, "discover", "echo")
        header, row = out.splitlines()
        self.assertEqual(header.split(), ["PROTOCOL", "PORT", "ADDRESS", "SERVICES", "METADATA"])
        self.assertEqual(
            row.split(), ["grpc", "50051", "10.0.0.5", "echo.v1,echo.v2", "region=eu,tier=gold=1"]
        )
        # The columns line up under their headings.
        self.assertEqual(header.index("SERVICES"), row.index("echo.v1"))

    async def test_discover_statuses_and_passing(self) -> None:
        """
        APIs with health checks get a STATUS column (and a status in --json);
        --passing shows only the passing or unchecked ones.
        """
        body = (
            b'{"moduleID": "web", "apis": ['
            b'{"serviceIDs": ["s"], "serverPort": 81, "protocol": "http", "check": {"tcp": true}},'
            b'{"serviceIDs": ["s"], "serverPort": 82, "protocol": "http"}]}'
        )
        registry = self.service.registry
        await registry.publish(parse_publish_body(body))
        out = await self.ok("--url", self.tcp_url, "discover", "web")
        header, first, second = out.splitlines()
        self.assertEqual(header.split()[-1], "STATUS")
        self.assertEqual((first.split()[-1], second.split()[-1]), ("unknown", "-"))
        registration = registry.get("web")
        assert registration is not None
        target = registration.apis[0].check_target()
        assert target is not None
        await registry.set_status("web", 0, target, "critical")
        out = await self.ok("--url", self.tcp_url, "discover", "--passing", "web")
        self.assertEqual([line.split()[1] for line in out.splitlines()], ["PORT", "82"])
        answer = json.loads(await self.ok("--url", self.tcp_url, "--json", "discover", "web"))
        self.assertEqual([api.get("status") for api in answer["apis"]], ["critical", None])

    async def test_discover_passing_none_yet(self) -> None:
        """
        discover --passing on a module whose checked APIs do not pass (yet)
        says so, with their statuses, instead of claiming it publishes no APIs.
        """
        await self.publish_checked("web", 81)
        out = await self.ok("--url", self.tcp_url, "discover", "--passing", "web")
        self.assertEqual(out, "module web has 1 API but none is passing yet (status: unknown)\n")
        await self.publish_checked("pair", 81, 82)
        await self.set_status("pair", 1, "critical")
        out = await self.ok("--url", self.tcp_url, "discover", "--passing", "pair")
        self.assertEqual(
            out,
            "module pair has 2 APIs but none is passing yet (statuses: 1 unknown, 1 critical)\n",
        )
        self.assertEqual(
            await self.json_of("--url", self.tcp_url, "discover", "--passing", "pair"),
            {"moduleID": "pair", "apis": []},
        )
        # A module with no APIs at all still publishes none, with --passing or not.
        await self.service.registry.publish(parse_publish_body(b'{"moduleID": "e", "apis": []}'))
        for extra in ((), ("--passing",)):
            out = await self.ok("--url", self.tcp_url, "discover", "e", *extra)
            self.assertEqual(out, "module e publishes no APIs\n")

    async def test_publish_with_check(self) -> None:
        """publish --check asks the registry to check the API; bad check options exit 2."""
        base = ["--url", self.tcp_url, "publish", "web", "--service", "s", "--port", "81"]
        await self.ok(
            *base, "--protocol", "http", "--check", "http:/healthz", "--check-interval", "30s"
        )
        registration = self.service.registry.get("web")
        assert registration is not None
        (api,) = registration.apis
        assert api.check is not None
        self.assertEqual(
            (api.check.path, api.check.interval, api.status), ("/healthz", 30.0, "unknown")
        )
        for extra, fragment in (
            (["--check", "udp"], "--check must be tcp or http:PATH"),
            (["--check", "http:healthz"], "--check must start with '/'"),
            (["--check", "tcp", "--check-interval", "10ms"], "--check-interval must be between"),
            (["--check-timeout", "1s"], "need --check"),
        ):
            line = await self.fails(EXIT_USAGE, *base, "--protocol", "http", *extra)
            self.assertIn(fragment, line)

    async def test_discover_table_without_optional_fields(self) -> None:
        """An absent address and empty metadata are shown as '-'."""
        await self.ok(
            "--url", self.tcp_url, "publish", "m", "--service", "s",
            "--port", "80", "--protocol", "http",
        )  # fmt: skip
        out = await self.ok("--url", self.tcp_url, "discover", "m")
        self.assertEqual(out.splitlines()[1].split(), ["http", "80", "-", "s", "-"])

    async def test_health_lines(self) -> None:
        """health prints 'Key: value' lines."""
        await self.ok("--url", self.tcp_url, *PUBLISH_ECHO)
        out = await self.ok("--url", self.tcp_url, "health")
        lines = {
            key: value.strip()
            for key, _, value in (line.partition(":") for line in out.splitlines())
        }
        self.assertEqual(lines["Status"], "healthy")
        self.assertEqual(lines["Registered modules"], "1")
        self.assertEqual(lines["Total APIs"], "1")
        self.assertEqual(lines["Registry"], self.tcp_url)

    async def test_list_table(self) -> None:
        """
        list prints one row per module: its process ('-' for none), its APIs
        as service@port/protocol, its age since registration and its state.
        """
        await self.ok("--url", self.tcp_url, *PUBLISH_ECHO, "--pid", "7")
        await self.service.registry.publish(parse_publish_body(b'{"moduleID": "e", "apis": []}'))
        later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=90)
        self.patch(ctl, "_now", lambda: later)
        out = await self.ok("--url", self.tcp_url, "list")
        header, echo, empty = out.splitlines()
        self.assertEqual(header.split(), ["MODULE", "PROCESS", "OWNER", "APIS", "AGE", "STATE"])
        me = f"uid:{os.geteuid()}"  # the kernel's word on who published over loopback TCP
        self.assertEqual(
            echo.split(),
            ["echo", "7", me, "echo.v1@50051/grpc,echo.v2@50051/grpc", "1m30s", "ready"],
        )
        self.assertEqual(empty.split(), ["e", "-", "anonymous", "-", "1m30s", "ready"])
        self.assertEqual(header.index("AGE"), echo.index("1m30s"))

    async def test_list_stale_with_reason(self) -> None:
        """A stale module's state says so, with the registry's reason."""
        await self.ok("--url", self.tcp_url, *PUBLISH_ECHO)
        self.service.registry.stale_after = 0.0
        out = await self.ok("--url", self.tcp_url, "list")
        state = out.splitlines()[1].split(None, 5)[5]
        self.assertRegex(state, r"^stale: not seen since \S+Z \(stale after 0s\)$")

    async def test_list_json(self) -> None:
        """list --json prints the registry's catalog as it answered it."""
        await self.ok("--url", self.tcp_url, *PUBLISH_ECHO, "--pid", "7")
        await self.publish_checked("web", 81)
        await self.set_status("web", 0, "critical")
        listed = await self.json_of("--url", self.unix_url, "list")
        self.assertEqual(listed, await self.raw("/api/v1/modules"))
        self.assertEqual([m["moduleID"] for m in listed["modules"]], ["echo", "web"])

    async def test_list_empty(self) -> None:
        """An empty registry is one clear line, or an empty list in --json."""
        self.assertEqual(await self.ok("--url", self.tcp_url, "list"), "no modules registered\n")
        self.assertEqual(await self.json_of("--url", self.tcp_url, "list"), {"modules": []})

    def test_list_process_column(self) -> None:
        """A registration bound to its process says so in the PROCESS column."""
        moment = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
        bound = RegisteredModule("m", (), 12, moment, moment, "ready", None, True, 12)
        other = RegisteredModule("n", (), 12, moment, moment, "ready", None, True, 34)
        table = ctl._modules_table([bound, other], moment + datetime.timedelta(hours=2))
        self.assertEqual(
            table.splitlines()[1:],
            [
                "m       12 (bound)        -      -     2h0m0s  ready",
                "n       12 (bound to 34)  -      -     2h0m0s  ready",
            ],
        )

    async def test_services_table(self) -> None:
        """services prints one row per API serving the service, with its module and state."""
        await self.ok("--url", self.tcp_url, *PUBLISH_ECHO, "--pid", "7")
        await self.ok(
            "--url", self.tcp_url, "publish", "other", "--service", "echo.v1",
            "--port", "80", "--protocol", "http",
        )  # fmt: skip
        out = await self.ok("--url", self.tcp_url, "services", "echo.v1")
        header, echo, other = out.splitlines()
        self.assertEqual(
            header.split(),
            ["MODULE", "PROCESS", "STATE", "PROTOCOL", "PORT", "ADDRESS", "METADATA"],
        )
        self.assertEqual(
            echo.split(),
            ["echo", "7", "ready", "grpc", "50051", "10.0.0.5", "region=eu,tier=gold=1"],
        )
        self.assertEqual(other.split(), ["other", "-", "ready", "http", "80", "-", "-"])

    async def test_services_passing_and_statuses(self) -> None:
        """
        Checked APIs get a STATUS column; --passing keeps the passing or
        unchecked ones; --json is the registry's answer.
        """
        await self.publish_checked("web", 81, 82)
        await self.set_status("web", 0, "passing")
        await self.ok(
            "--url", self.tcp_url, "publish", "plain", "--service", "s",
            "--port", "80", "--protocol", "http",
        )  # fmt: skip
        out = await self.ok("--url", self.tcp_url, "services", "s")
        self.assertEqual(
            [(line.split()[0], line.split()[4], line.split()[-1]) for line in out.splitlines()],
            [
                ("MODULE", "PORT", "STATUS"),
                ("web", "81", "passing"),
                ("web", "82", "unknown"),
                ("plain", "80", "-"),
            ],
        )
        out = await self.ok("--url", self.tcp_url, "services", "s", "--passing")
        self.assertEqual([line.split()[4] for line in out.splitlines()], ["PORT", "81", "80"])
        for extra, query in (((), ""), (("--passing",), "?passing=true")):
            self.assertEqual(
                await self.json_of("--url", self.tcp_url, "services", "s", *extra),
                await self.raw("/api/v1/services/s" + query),
            )

    async def test_services_stale(self) -> None:
        """A stale provider is shown as stale."""
        await self.ok("--url", self.tcp_url, *PUBLISH_ECHO)
        self.service.registry.stale_after = 0.0
        out = await self.ok("--url", self.tcp_url, "services", "echo.v2")
        self.assertEqual(out.splitlines()[1].split()[:3], ["echo", "-", "stale"])

    async def test_services_without_provider(self) -> None:
        """
        A service nobody provides exits 1 with one line (also with --json);
        with --passing, providers whose APIs do not pass yet are counted.
        """
        line = await self.fails(EXIT_NOT_FOUND, "--url", self.tcp_url, "services", "nobody")
        self.assertIn("no module provides service nobody", line)
        await self.fails(EXIT_NOT_FOUND, "--url", self.tcp_url, "--json", "services", "nobody")
        await self.publish_checked("web", 81)
        line = await self.fails(EXIT_NOT_FOUND, "--url", self.tcp_url, "services", "s", "--passing")
        self.assertIn("service s has 1 provider but none is passing yet", line)

    async def test_invalid_service_id(self) -> None:
        """A service ID the registry would refuse is a usage error, found before sending."""
        line = await self.fails(EXIT_USAGE, "--url", self.tcp_url, "services", "a/b")
        self.assertIn("SERVICE_ID", line)

    # -- where the registry is ----------------------------------------------

    async def test_url_from_environment(self) -> None:
        """Without --url, $HSU_REGISTRY_URL from the given environment is used."""
        out = await self.ok("--json", "health", environ={"HSU_REGISTRY_URL": self.unix_url})
        self.assertEqual(json.loads(out)["status"], "healthy")

    async def test_url_option_beats_environment(self) -> None:
        """--url wins over $HSU_REGISTRY_URL."""
        dead = f"tcp://127.0.0.1:{refusing_port(self)}"
        out = await self.ok(
            "--url", self.tcp_url, "--json", "health", environ={"HSU_REGISTRY_URL": dead}
        )
        self.assertEqual(json.loads(out)["status"], "healthy")

    async def test_malformed_environment_url(self) -> None:
        """A malformed $HSU_REGISTRY_URL is a usage error naming the variable."""
        result = await self.ctl("health", environ={"HSU_REGISTRY_URL": "ftp://x"})
        self.assertEqual(result.code, EXIT_USAGE)
        self.assertIn("$HSU_REGISTRY_URL", result.err)

    # -- failures -----------------------------------------------------------

    async def test_unknown_module(self) -> None:
        """Discovering an unknown module exits 1."""
        line = await self.fails(EXIT_NOT_FOUND, "--url", self.tcp_url, "discover", "nope")
        self.assertIn("module not found: nope", line)

    async def test_unknown_module_json(self) -> None:
        """--json does not change the exit code or put anything on stdout for an error."""
        await self.fails(EXIT_NOT_FOUND, "--url", self.unix_url, "--json", "discover", "nope")

    async def test_unpublish_wrong_owner(self) -> None:
        """Unpublishing with another --pid than the owner's exits 4 with the server's message."""
        await self.ok("--url", self.tcp_url, *PUBLISH_ECHO, "--pid", "7")
        line = await self.fails(
            EXIT_REJECTED, "--url", self.tcp_url, "unpublish", "echo", "--pid", "8"
        )
        self.assertIn("module 'echo' is registered by another process", line)
        self.assertIn("process 7", line)
        # Still there; the owner's own --pid removes it.
        await self.ok("--url", self.tcp_url, "discover", "echo")
        await self.ok("--url", self.tcp_url, "unpublish", "echo", "--pid", "7")
        await self.fails(EXIT_NOT_FOUND, "--url", self.tcp_url, "discover", "echo")

    async def test_publish_owner_defaults_to_zero(self) -> None:
        """Without --pid, publish registers process 0, not the command's own PID."""
        await self.ok("--url", self.tcp_url, *PUBLISH_ECHO)
        line = await self.fails(
            EXIT_REJECTED, "--url", self.tcp_url, "unpublish", "echo", "--pid", str(os.getpid())
        )
        self.assertIn("process 0", line)
        await self.ok("--url", self.tcp_url, "unpublish", "echo", "--pid", "0")

    async def test_unpublish_unknown_module(self) -> None:
        """Unpublishing a module that is not there succeeds, as the seed's registry does."""
        self.assertEqual(
            await self.ok("--url", self.unix_url, "unpublish", "ghost"), "unpublished ghost\n"
        )

    async def test_no_answer(self) -> None:
        """A registry that accepts the connection but never answers exits 3 after --timeout."""
        silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(silent.close)
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        line = await self.fails(EXIT_UNAVAILABLE, "--url", url, "--timeout", "0.2", "health")
        self.assertIn("no answer within 0.2s", line)

    async def test_closed_port(self) -> None:
        """A TCP port nobody listens on exits 3."""
        url = f"tcp://127.0.0.1:{refusing_port(self)}"
        line = await self.fails(EXIT_UNAVAILABLE, "--url", url, "health")
        self.assertIn(f"registry at {url} is unavailable", line)

    async def test_missing_socket(self) -> None:
        """A unix socket that does not exist exits 3."""
        url = f"unix://{self.directory}/absent.sock"
        line = await self.fails(EXIT_UNAVAILABLE, "--url", url, "discover", "echo")
        self.assertIn("unavailable", line)

    async def test_no_subcommand(self) -> None:
        """No subcommand is a usage error."""
        await self.fails(EXIT_USAGE, "--url", self.tcp_url)

    async def test_unknown_subcommand(self) -> None:
        """An unknown subcommand is a usage error naming it."""
        line = await self.fails(EXIT_USAGE, "--url", self.tcp_url, "frobnicate")
        self.assertIn("frobnicate", line)

    async def test_publish_without_port(self) -> None:
        """publish without --port is a usage error naming the option."""
        line = await self.fails(
            EXIT_USAGE, "--url", self.tcp_url, "publish", "m", "--service", "s",
            "--protocol", "grpc",
        )  # fmt: skip
        self.assertIn("--port", line)

    async def test_port_out_of_range(self) -> None:
        """A port the registry would refuse is a usage error, in terms of the option."""
        line = await self.fails(
            EXIT_USAGE, "--url", self.tcp_url, "publish", "m", "--service", "s",
            "--protocol", "grpc", "--port", "70000",
        )  # fmt: skip
        self.assertIn("--port must be between 1 and 65535", line)

    async def test_port_not_a_number(self) -> None:
        """A port that is not a number is a usage error."""
        await self.fails(
            EXIT_USAGE, "--url", self.tcp_url, "publish", "m", "--service", "s",
            "--protocol", "grpc", "--port", "http",
        )  # fmt: skip

    async def test_meta_without_equals(self) -> None:
        """--meta without '=' is a usage error."""
        line = await self.fails(
            EXIT_USAGE, "--url", self.tcp_url, "publish", "m", "--service", "s",
            "--protocol", "grpc", "--port", "1", "--meta", "region",
        )  # fmt: skip
        self.assertIn("KEY=VALUE", line)

    async def test_meta_key_twice(self) -> None:
        """The same --meta key twice is a usage error rather than a silent choice."""
        await self.fails(
            EXIT_USAGE, "--url", self.tcp_url, "publish", "m", "--service", "s",
            "--protocol", "grpc", "--port", "1", "--meta", "a=1", "--meta", "a=2",
        )  # fmt: skip

    async def test_invalid_module_id(self) -> None:
        """A module ID the registry would refuse is a usage error, found before sending."""
        line = await self.fails(EXIT_USAGE, "--url", self.tcp_url, "discover", "a/b")
        self.assertIn("MODULE", line)

    async def test_negative_pid(self) -> None:
        """A negative --pid is a usage error."""
        await self.fails(EXIT_USAGE, "--url", self.tcp_url, "unpublish", "m", "--pid", "-1")

    async def test_malformed_url(self) -> None:
        """A malformed --url is a usage error, not an unreachable registry."""
        line = await self.fails(EXIT_USAGE, "--url", "ftp://x", "health")
        self.assertIn("--url", line)

    async def test_bad_timeout(self) -> None:
        """--timeout must be a positive, finite number of seconds."""
        for value in ("0", "-1", "nan", "inf", "soon"):
            await self.fails(EXIT_USAGE, "--url", self.tcp_url, "--timeout", value, "health")

    # -- the installed console script ---------------------------------------

    async def test_no_reactor_imported(self) -> None:
        """Importing the command imports neither a reactor nor the web layer."""
        code = (
            "import sys, hsu_registry.ctl; "
            "print(sorted(m for m in sys.modules if m.startswith(('twisted', 'klein'))))"
        )
        # The package under test, wherever it was imported from.
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(ctl.__file__)))
        out, err, status = await getProcessOutputAndValue(sys.executable, ["-c", code], env=env)
        self.assertEqual(status, 0, err)
        self.assertEqual(out.strip(), b"[]")

    async def test_console_script(self) -> None:
        """The installed hsu-registry-ctl runs health --json against the registry."""
        self.assertTrue(os.path.exists(CTL_SCRIPT), f"{CTL_SCRIPT} is not installed")
        env = {k: v for k, v in os.environ.items() if k != "HSU_REGISTRY_URL"}
        out, err, code = await getProcessOutputAndValue(
            CTL_SCRIPT, ["--url", self.tcp_url, "health", "--json"], env=env
        )
        self.assertEqual(code, 0, err.decode("utf-8", "replace"))
        self.assertEqual(err, b"")
        health = json.loads(out)
        self.assertEqual(health["status"], "healthy")
        self.assertEqual((health["registeredModules"], health["totalAPIs"]), (0, 0))
