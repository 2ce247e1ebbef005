"""
Tests for L{hsu_registry.hangup}: SIGHUP reopens log files and never stops
the daemon, neither C{twistd hsu-registry} nor the standalone command.
"""

from __future__ import annotations

import os
import re
import signal

from twisted.logger import LogPublisher, textFileLogObserver
from twisted.python.logfile import LogFile
from twisted.trial.unittest import SynchronousTestCase

from hsu_registry.hangup import reopen_log_files

from .test_e2e import TCP_LISTENING, TWISTD, E2ETestCase, _text


class ReopenTests(SynchronousTestCase):
    def test_reopens_log_file(self) -> None:
        """
        A log file moved away (as logrotate does) is reopened at its path:
        later events go to a new file there, not to the moved one.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "registry.log")
        log_file = LogFile.fromFullPath(path)
        self.addCleanup(log_file.close)
        publisher = LogPublisher(textFileLogObserver(log_file))
        publisher({"log_format": "before", "log_time": 0.0})
        os.rename(path, path + ".1")
        self.assertEqual(reopen_log_files(publisher), [path])
        publisher({"log_format": "after", "log_time": 0.0})
        with open(path) as f:
            self.assertIn("after", f.read())
        with open(path + ".1") as f:
            self.assertNotIn("after", f.read())

    def test_streams_are_left_alone(self) -> None:
        """Logging to a stream (stderr, the journal) has nothing to reopen."""
        import io

        publisher = LogPublisher(textFileLogObserver(io.StringIO()))
        self.assertEqual(reopen_log_files(publisher), [])


class HangupE2ETests(E2ETestCase):
    async def test_twistd_reopens_and_keeps_serving(self) -> None:
        """
        C{kill -HUP} of C{twistd hsu-registry --logfile=F} after F was moved
        away: the daemon keeps running and serving, logs to a new F that
        says it reloaded, and a later SIGTERM stops it cleanly, removing its
        socket and lock file.
        """
        directory = self.short_temp_dir()
        log_path = os.path.join(directory, "registry.log")
        sock = os.path.join(directory, "registry.sock")
        process = self.spawn(
            [
                TWISTD,
                "-n",
                "--pidfile=",
                f"--logfile={log_path}",
                "hsu-registry",
                f"--endpoint=unix:{sock}",
                "--endpoint=tcp:0:interface=127.0.0.1",
            ]
        )
        port = await self._logged_port(log_path, process)
        os.rename(log_path, log_path + ".1")
        process.signal("HUP")
        text = await self._wait_in_file(log_path, "Reloaded on SIGHUP", process)
        self.assertIn(f"reopened {log_path}", text)
        self.assertFalse(process.ended, process.describe())
        client = self.http_client()
        health = await self.assertJSON(client, "GET", f"http://127.0.0.1:{port}/api/v1/health", 200)
        self.assertEqual(health["status"], "healthy")
        await self.stop(process, "TERM")
        # twistd ends itself with the signal that stopped it (see TwistdTests).
        self.assertEqual((process.exit_code, process.exit_signal), (None, signal.SIGTERM))
        self.assertFalse(os.path.exists(sock))
        self.assertFalse(os.path.lexists(sock + ".lock"))

    async def test_standalone_survives_hangup(self) -> None:
        """The standalone command logs the reload on SIGHUP, keeps serving, stops with 0."""
        process = self.spawn_registry("--endpoint=tcp:0:interface=127.0.0.1")
        port = await self.tcp_port(process)
        process.signal("HUP")
        await process.wait_for(re.compile(rb"Reloaded on SIGHUP: no log file to reopen"))
        client = self.http_client()
        await self.assertJSON(client, "GET", f"http://127.0.0.1:{port}/api/v1/health", 200)
        await self.stop(process, "TERM")
        self.assertExitCode(process, 0)

    async def _logged_port(self, path: str, process: object) -> int:
        text = await self._wait_in_file(path, "hsu-registry listening on tcp:", process)
        match = TCP_LISTENING.search(text.encode())
        assert match is not None
        return int(match.group(2))

    async def _wait_in_file(self, path: str, needle: str, process: object) -> str:
        """Poll C{path} (bounded) until it holds C{needle}; return its text."""
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        for _ in range(1500):  # 15 s at most
            try:
                with open(path) as f:
                    text = f.read()
            except FileNotFoundError:
                text = ""
            if needle in text:
                return text
            await deferLater(reactor, 0.01, lambda: None)
        self.fail(f"{needle!r} never appeared in {path}: {text!r}; {_text(b'')}{process}")
