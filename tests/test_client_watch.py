"""
Tests for watching from the client side: the SSE parser, L{Watch} with its
resume, L{RegistryCache}, the blocking event iterator and C{hsu-registry-ctl
watch}, against a real in-process registry.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hsu_registry import ctl
from hsu_registry.client import BlockingRegistryClient, RegistryClient, WatchEvent
from hsu_registry.client.events import EventParser
from hsu_registry.client.watching import RegistryCache, Watch
from hsu_registry.config import RegistryConfig
from hsu_registry.service import makeService

from .helpers import publish_request
from .test_e2e import BIN_DIR, E2ETestCase

CTL = os.path.join(BIN_DIR, "hsu-registry-ctl")


class ParserTests(SynchronousTestCase):
    def test_events_across_chunks(self) -> None:
        """Events split anywhere, comments and CRLF line ends are handled."""
        stream = (
            b"retry: 1000\n\n"
            b'id: 0\nevent: hello\ndata: {"index":0,"epoch":"e1"}\n\n'
            b": keep-alive\n\n"
            b'id: 1\r\nevent: published\r\ndata: {"moduleID":"a","index":1}\r\n\r\n'
        )
        parser = EventParser()
        events: list[WatchEvent] = []
        for i in range(len(stream)):
            events.extend(parser.feed(stream[i : i + 1]))
        self.assertEqual(
            [(e.kind, e.index, e.module_id) for e in events],
            [("hello", 0, None), ("published", 1, "a")],
        )
        self.assertEqual(events[0].epoch, "e1")

    def test_garbage_skipped(self) -> None:
        """Events with a bad id or data are skipped, not fatal."""
        parser = EventParser()
        events = list(parser.feed(b"id: x\nevent: a\ndata: {}\n\nid: 2\nevent: b\ndata: [\n\n"))
        self.assertEqual(events, [])


class LiveRegistry:
    """A real registry on a unix socket, restartable (a new epoch) on the same path."""

    def __init__(self, case: TestCase) -> None:
        self.directory = tempfile.mkdtemp(prefix="hsu")
        case.addCleanup(shutil.rmtree, self.directory, True)
        self.path = os.path.join(self.directory, "registry.sock")
        self.url = f"unix://{self.path}"
        self.service: Any = None
        self.case = case
        self.start()

    def start(self) -> None:
        self.service = makeService(RegistryConfig(endpoints=(f"unix:{self.path}",)), reactor)
        self.service.startService()
        self.case.addCleanup(self.stop)

    def stop(self) -> Deferred[None] | None:
        if self.service is not None and self.service.running:
            return self.service.stopService()
        return None

    def publish(self, name: str, apis: int = 1) -> Deferred[Any]:
        return self.service.registry.publish(publish_request(name, apis=apis))


async def _until(condition: Any, what: str, limit: float = 10.0) -> None:
    waited = 0.0
    while not condition():
        if waited > limit:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.01, lambda: None)
        waited += 0.01


class WatchTests(TestCase):
    def setUp(self) -> None:
        self.registry = LiveRegistry(self)
        self.client = RegistryClient(self.registry.url, reactor)
        self.addCleanup(self.client.close)
        self.events: list[WatchEvent] = []

    def watch(self, **kwargs: Any) -> Watch:
        watch = Watch(self.client, self.events.append, retry_initial=0.01, **kwargs).start()
        self.addCleanup(watch.stop)
        return watch

    def kinds(self) -> list[tuple[str, int]]:
        return [(e.kind, e.index) for e in self.events]

    async def test_changes_as_they_come(self) -> None:
        """The watch sees hello, then every change in order."""
        self.watch()
        await _until(lambda: self.events, "hello")
        await self.registry.publish("a")
        await self.registry.publish("a", apis=2)
        await _until(lambda: len(self.events) == 3, "two changes")
        self.assertEqual(self.kinds(), [("hello", 0), ("published", 1), ("updated", 2)])

    async def test_resumes_where_it_left(self) -> None:
        """After the stream drops, the watch resumes and is replayed what it missed."""
        watch = self.watch()
        await _until(lambda: watch.connected, "connected")
        await self.registry.publish("a")
        await _until(lambda: len(self.events) == 2, "first change")
        for stream in list(self.registry.service.api.watchers.streams):
            stream.request.transport.loseConnection()
        await self.registry.publish("b")  # while the watch is away
        await _until(lambda: any(e.module_id == "b" for e in self.events), "replay of b")
        kinds = self.kinds()
        self.assertEqual(kinds[:2], [("hello", 0), ("published", 1)])
        self.assertIn(("published", 2), kinds)
        self.assertNotIn("resync", [k for k, _ in kinds])

    async def test_restart_means_resync(self) -> None:
        """A daemon restart (new epoch) is told to the watcher as resync."""
        watch = self.watch()
        await _until(lambda: watch.connected, "connected")
        await self.registry.publish("a")
        await _until(lambda: len(self.events) == 2, "first change")
        await self.registry.stop()
        self.registry.start()
        await _until(lambda: any(e.kind == "resync" for e in self.events), "resync")
        self.assertTrue(watch.connected)

    async def test_stop(self) -> None:
        """A stopped watch gets nothing more and leaves no stream behind."""
        watch = self.watch()
        await _until(lambda: watch.connected, "connected")
        watch.stop()
        await _until(lambda: not self.registry.service.api.watchers.streams, "stream closed")
        await self.registry.publish("a")
        self.assertEqual(self.kinds(), [("hello", 0)])


class CacheTests(TestCase):
    async def test_live_view_and_stale_when_unreachable(self) -> None:
        """The cache follows changes, keeps its view while the registry is down, marked stale."""
        registry = LiveRegistry(self)
        await registry.publish("a")
        client = RegistryClient(registry.url, reactor)
        self.addCleanup(client.close)
        cache = RegistryCache(client)
        await cache.start()
        self.addCleanup(cache.stop)
        assert cache.watch is not None
        cache.watch.retry_initial = 0.01
        self.assertEqual(set(cache.modules), {"a"})
        self.assertFalse(cache.stale)
        await registry.publish("b")
        await _until(lambda: "b" in cache.modules, "b in the view")
        await registry.service.registry.unpublish("a")
        await _until(lambda: "a" not in cache.modules, "a gone from the view")
        await registry.stop()
        await _until(lambda: cache.stale, "stale")
        self.assertEqual(set(cache.modules), {"b"})  # the last known view
        entry = cache.get("b")
        assert entry is not None
        self.assertEqual(entry["moduleID"], "b")
        registry.start()  # empty, new epoch: the cache resyncs to it
        await _until(lambda: not cache.stale and not cache.modules, "resynced")


class BlockingWatchTests(E2ETestCase):
    async def test_events(self) -> None:
        """The blocking iterator yields hello, then the changes."""
        registry = LiveRegistry(self)
        client = BlockingRegistryClient(registry.url)

        def first_two() -> list[tuple[str, int]]:
            seen = []
            for event in client.watch_events():
                seen.append((event.kind, event.index))
                if len(seen) == 3:
                    return seen
            return seen

        events = deferToThread(first_two)
        await _until(lambda: registry.service.api.watchers.streams, "a watcher")
        await registry.publish("a")
        await registry.publish("b")
        self.assertEqual(await events, [("hello", 0), ("published", 1), ("published", 2)])

    async def test_ctl_watch(self) -> None:
        """hsu-registry-ctl watch prints the changes as they come.

        It runs as a process, so a failing test cannot leave it resuming
        forever in a thread."""
        registry = LiveRegistry(self)
        watcher = self.spawn([CTL, "--url", registry.url, "watch", "--count", "1"])
        await watcher.wait_for(re.compile(rb"# watching"), "stdout")
        await registry.publish("c")
        await watcher.wait_for_end()
        self.assertExitCode(watcher, 0)
        lines = watcher.stdout.decode().splitlines()
        self.assertTrue(lines[0].startswith("# watching"), lines)
        self.assertEqual(lines[1].split("\t"), ["1", "published", "c"])
        self.assertEqual(watcher.stderr, b"")

    async def test_ctl_watch_unreachable(self) -> None:
        """With no registry at all, watch exits 3 with one line."""
        out, err = io.StringIO(), io.StringIO()
        missing = f"unix://{tempfile.gettempdir()}/hsu-missing-{os.getpid()}.sock"
        code = await deferToThread(ctl.run, ["--url", missing, "watch"], out, err, {})
        self.assertEqual(code, 3)
        self.assertEqual(len(err.getvalue().splitlines()), 1)
