"""
Tests for L{hsu_registry.cli} that need no process (the process-level ones
are in L{tests.test_e2e}).
"""

from __future__ import annotations

import io
import sys

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from hsu_registry import __version__
from hsu_registry.cli import main, run


class _Reactor(MemoryReactorClock):
    """A memory reactor whose run() starts what was scheduled, then returns."""

    def run(self) -> None:
        for f, args, kwargs in self.whenRunningHooks:
            f(*args, **kwargs)
        self.stopped = True

    def stop(self) -> None:
        self.stopped = True


class RunTests(SynchronousTestCase):
    def test_usage_error(self) -> None:
        """A bad option exits 2 with one message naming it."""
        stderr = io.StringIO()
        self.assertEqual(run(["--stale-after=soon"], None, stderr), 2)
        self.assertIn("--stale-after", stderr.getvalue())
        self.assertNotIn("Traceback", stderr.getvalue())

    def test_starts_and_stops(self) -> None:
        """run() starts the daemon on the given reactor and exits 0 when the reactor stops."""
        reactor = _Reactor()
        stderr = io.StringIO()
        self.assertEqual(run(["--endpoint=tcp:17990:interface=127.0.0.1"], reactor, stderr), 0)
        self.assertEqual([s[0] for s in reactor.tcpServers], [17990])
        self.assertEqual(stderr.getvalue(), "")

    def test_listen_failure(self) -> None:
        """When listening fails, run() writes one line and exits 1."""
        reactor = _Reactor()

        def refuse(*args: object, **kwargs: object) -> None:
            from twisted.internet.error import CannotListenError

            raise CannotListenError("127.0.0.1", 17990, OSError(98, "Address already in use"))

        reactor.listenTCP = refuse  # type: ignore[method-assign]
        stderr = io.StringIO()
        self.assertEqual(run(["--endpoint=tcp:17990:interface=127.0.0.1"], reactor, stderr), 1)
        lines = stderr.getvalue().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith("hsu-registry: error: "), lines)
        self.assertIn("Address already in use", lines[0])

    def test_version(self) -> None:
        """--version prints the version and exits 0."""
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        error = self.assertRaises(SystemExit, main, ["--version"])
        self.assertEqual(error.code, 0)
        self.assertEqual(out.getvalue(), f"hsu-registry {__version__}\n")
