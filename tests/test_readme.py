"""
The README's examples, run as written: each literal block marked with an
``.. example: NAME`` comment is written to a file called NAME and run against
a real daemon (Python scripts with the venv's Python, ``.tac`` files with
``twistd -ny``), with only ``$HSU_REGISTRY_URL`` pointing the clients at it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import textwrap
import urllib.request

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from hsu_registry.client import BlockingRegistryClient, ModuleNotFound

from .test_e2e import TWISTD, E2ETestCase, _Process, _text

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.rst")
HSU_REGISTRY_CTL = os.path.join(os.path.dirname(sys.executable), "hsu-registry-ctl")

_MARKER = re.compile(r"^\.\. example: (\S+)\s*$")


def readme_examples(path: str = README) -> dict[str, str]:
    """
    The README's marked examples: for each C{.. example: NAME} comment, the
    first literal block after it (the indented lines after a line ending in
    C{::}), dedented.
    """
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    found: dict[str, str] = {}
    for number, line in enumerate(lines):
        marker = _MARKER.match(line)
        if marker is None:
            continue
        i = number + 1
        while not lines[i].rstrip().endswith("::"):
            i += 1
        i += 1
        block: list[str] = []
        while i < len(lines) and (not lines[i].strip() or lines[i].startswith(" ")):
            block.append(lines[i])
            i += 1
        found[marker.group(1)] = textwrap.dedent("\n".join(block)).strip() + "\n"
    return found


class ExtractionTests(SynchronousTestCase):
    def test_examples_found(self) -> None:
        """Every example the README marks is found, as code, not as prose."""
        examples = readme_examples()
        self.assertEqual(
            sorted(examples),
            ["asynchronous.py", "blocking.py", "my-app.tac", "mymodule.tac"],
        )
        for name, text in examples.items():
            compile(text, name, "exec")  # a syntax error fails here


class ValidityTests(SynchronousTestCase):
    def test_valid_restructuredtext(self) -> None:
        """README.rst renders without a warning (tables, literals, sections)."""
        import io

        import docutils.core

        warnings = io.StringIO()
        with open(README, encoding="utf-8") as f:
            docutils.core.publish_string(
                f.read(),
                writer_name="null",
                settings_overrides={"report_level": 2, "warning_stream": warnings},
            )
        self.assertEqual(warnings.getvalue(), "")


class ExamplesTests(E2ETestCase):
    timeout = 180

    async def start_registry(self) -> str:
        process = self.spawn_registry("--endpoint=tcp:0:interface=127.0.0.1")
        return f"tcp://127.0.0.1:{await self.tcp_port(process)}"

    def write_example(self, name: str) -> tuple[str, str]:
        directory = self.short_temp_dir()
        path = os.path.join(directory, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(readme_examples()[name])
        return directory, path

    def spawn_with(self, argv: list[str], url: str, cwd: str) -> _Process:
        process = _Process(argv)
        env = dict(os.environ, HSU_REGISTRY_URL=url)
        reactor.spawnProcess(process, argv[0], argv, env=env, path=cwd)
        self.addCleanup(self._reap, process)
        return process

    async def run_example(self, name: str, url: str) -> _Process:
        directory, path = self.write_example(name)
        process = self.spawn_with([sys.executable, path], url, directory)
        await process.wait_for_end()
        self.assertExitCode(process, 0)
        return process

    async def test_client_scripts(self) -> None:
        """
        The blocking example publishes C{mymodule} and finds it; the
        asynchronous one then finds it too; both print its port and protocol.
        """
        url = await self.start_registry()
        expected = "Module available at port 50051 via grpc\n"
        blocking = await self.run_example("blocking.py", url)
        self.assertEqual(_text(blocking.stdout), expected, blocking.describe())
        asynchronous = await self.run_example("asynchronous.py", url)
        self.assertEqual(_text(asynchronous.stdout), expected, asynchronous.describe())

    async def test_publishing_tac(self) -> None:
        """
        C{twistd -ny mymodule.tac} registers C{mymodule} as twistd's own
        process for as long as it runs, and unpublishes it when stopped.
        """
        url = await self.start_registry()
        directory, path = self.write_example("mymodule.tac")
        process = self.spawn_with([TWISTD, "-ny", path], url, directory)
        client = BlockingRegistryClient(url)
        apis = await self.eventually(lambda: client.find_module_apis("mymodule"), process)
        self.assertEqual([(a.server_port, a.protocol) for a in apis], [(50051, "grpc")])
        with urllib.request.urlopen(f"http://{url[6:]}/api/v1/modules/mymodule") as answer:
            owner = json.load(answer)["processID"]
        assert process.transport is not None
        self.assertEqual(owner, process.transport.pid)
        await self.stop(process, "TERM")
        self.assertRaises(ModuleNotFound, client.find_module_apis, "mymodule")

    async def test_embedding_tac(self) -> None:
        """
        C{twistd -ny my-app.tac} serves the registry under C{/registry} on
        port 18080, where both clients, C{$HSU_REGISTRY_URL} and
        C{hsu-registry-ctl --url} reach it with the base path in the URL.
        """
        _skip_unless_free(18080)
        directory, path = self.write_example("my-app.tac")
        base = "http://127.0.0.1:18080/registry"
        process = self.spawn_with([TWISTD, "-ny", path], "tcp://127.0.0.1:1", directory)
        client = BlockingRegistryClient(base)
        health = await self.eventually(client.health, process)
        self.assertEqual(health.registered_modules, 0)

        published = self.spawn_with(
            [
                HSU_REGISTRY_CTL,
                "publish",
                "mymodule",
                "--service",
                "s",
                "--port",
                "50051",
                "--protocol",
                "grpc",
            ],
            base,
            directory,
        )
        await published.wait_for_end()
        self.assertExitCode(published, 0)
        ctl = self.spawn_with(
            [HSU_REGISTRY_CTL, "--json", "--url", base, "discover", "mymodule"],
            "tcp://127.0.0.1:1",
            directory,
        )
        await ctl.wait_for_end()
        self.assertExitCode(ctl, 0)
        self.assertEqual(json.loads(ctl.stdout)["apis"][0]["serverPort"], 50051)
        self.assertEqual(client.find_module_apis("mymodule")[0].server_port, 50051)
        await self.stop(process, "TERM")

    async def eventually(self, call: object, process: _Process) -> object:
        """Call C{call} until it answers (bounded: 15 s), failing with C{process}'s output."""
        assert callable(call)
        last: Exception | None = None
        for _ in range(300):
            if process.ended:
                break
            try:
                return call()
            except Exception as e:  # not up yet, or not published yet
                last = e
            await deferLater(reactor, 0.05, lambda: None)
        self.fail(f"no answer ({last!r}): {process.describe()}")


def _skip_unless_free(port: int) -> None:
    probe = socket.socket()
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted listens
    try:
        probe.bind(("127.0.0.1", port))
    except OSError:
        raise SkipTest(f"the example's port {port} is taken on this machine") from None
    finally:
        probe.close()
