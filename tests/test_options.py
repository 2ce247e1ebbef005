"""
Tests for L{hsu_registry.options}: the daemon's command line, shared by the
twistd plugin and the standalone command.
"""

from __future__ import annotations

from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from hsu_registry.config import RegistryConfig
from hsu_registry.errors import StartupFailure
from hsu_registry.options import Options
from hsu_registry.service import makeService


def parse(*argv: str) -> RegistryConfig:
    options = Options()
    options.parseOptions(list(argv))
    return options.config


class OptionsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """With no options: TCP on 127.0.0.1:17951, in memory, the seed's timings."""
        config = parse()
        self.assertEqual(config, RegistryConfig(freeze_gc=True))
        self.assertEqual(config.endpoints, ("tcp:17951:interface=127.0.0.1",))
        self.assertEqual(
            (config.stale_after, config.expire_after, config.cleanup_interval),
            (300.0, 600.0, 60.0),
        )
        self.assertEqual((config.store, config.max_body_size), ("memory", 1024 * 1024))

    def test_several_endpoints(self) -> None:
        """--endpoint may be repeated; every endpoint is kept in order."""
        config = parse(
            "--endpoint=tcp:0:interface=127.0.0.1", "--endpoint", "unix:/tmp/x.sock:mode=660"
        )
        self.assertEqual(
            config.endpoints, ("tcp:0:interface=127.0.0.1", "unix:/tmp/x.sock:mode=660")
        )

    def test_durations(self) -> None:
        """Durations take Go-style strings."""
        config = parse("--stale-after=1m30s", "--expire-after=0.5h", "--cleanup-interval=0.5s")
        self.assertEqual(
            (config.stale_after, config.expire_after, config.cleanup_interval), (90.0, 1800.0, 0.5)
        )

    def test_bad_durations(self) -> None:
        """Malformed, zero, or inconsistent durations are usage errors naming the flag."""
        for argv, flag in [
            (["--stale-after=bogus"], "--stale-after"),
            (["--cleanup-interval=0s"], "--cleanup-interval"),
            (["--expire-after=-1m"], "--expire-after"),
            (["--stale-after=20m"], "--expire-after"),
        ]:
            error = self.assertRaises(UsageError, parse, *argv)
            self.assertIn(flag, str(error))

    def test_seed_tcp_flags(self) -> None:
        """The seed's --transport=tcp --tcp-address=HOST:PORT becomes a TCP endpoint."""
        config = parse("--transport=tcp", "--tcp-address=127.0.0.1:17951")
        self.assertEqual(config.endpoints, ("tcp:17951:interface=127.0.0.1",))
        self.assertEqual(parse("--tcp-address=[::1]:80").endpoints, ("tcp6:80:interface=\\:\\:1",))

    def test_seed_unix_flags(self) -> None:
        """The seed's --transport=unix --socket-path=PATH becomes a mode-0600 unix endpoint."""
        config = parse("--transport=unix", "--socket-path=/var/run/hsu/registry.sock")
        self.assertEqual(config.endpoints, ("unix:/var/run/hsu/registry.sock:mode=600",))
        self.assertEqual(parse("--socket-path=/a:b.sock").endpoints, ("unix:/a\\:b.sock:mode=600",))

    def test_seed_flags_with_endpoints(self) -> None:
        """Seed flags add to --endpoint rather than replace it."""
        config = parse("--endpoint=tcp:0", "--transport=unix", "--socket-path=/tmp/r.sock")
        self.assertEqual(config.endpoints, ("tcp:0", "unix:/tmp/r.sock:mode=600"))

    def test_bad_seed_flags(self) -> None:
        """An unknown transport or a malformed address is a usage error."""
        self.assertRaises(UsageError, parse, "--transport=pipe")
        self.assertRaises(UsageError, parse, "--tcp-address=nonsense")
        self.assertRaises(UsageError, parse, "--tcp-address=127.0.0.1:99999")
        self.assertRaises(UsageError, parse, "--tcp-address=h:1", "--socket-path=/x")

    def test_bad_endpoint(self) -> None:
        """An endpoint without arguments is a usage error."""
        self.assertRaises(UsageError, parse, "--endpoint=tcp")

    def test_limits(self) -> None:
        """Body size and module limits are positive integers."""
        config = parse("--max-body-size=2048", "--max-modules=5")
        self.assertEqual((config.max_body_size, config.max_modules), (2048, 5))
        self.assertRaises(UsageError, parse, "--max-body-size=0")
        self.assertRaises(UsageError, parse, "--max-modules=lots")

    def test_store(self) -> None:
        """memory and sqlite:PATH are stores; anything else is a usage error."""
        self.assertEqual(parse("--store=memory").store, "memory")
        path = self.mktemp() + ".db"
        self.assertEqual(parse(f"--store=sqlite:{path}").store, f"sqlite:{path}")
        for bad in ("redis:x", "sqlite:", "sqlite"):
            self.assertIn("--store", str(self.assertRaises(UsageError, parse, f"--store={bad}")))

    def test_unusable_database(self) -> None:
        """
        A file that is not a usable database is no usage error (the option
        is well formed): the daemon refuses it when it is built, with one line
        naming it (exit code 1, see tests.test_startup_errors).
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("not a database, just text\n" * 50)
        self.assertEqual(parse(f"--store=sqlite:{path}").store, f"sqlite:{path}")
        error = str(self.assertRaises(StartupFailure, makeService, parse(f"--store=sqlite:{path}")))
        self.assertIn(path, error)
        self.assertNotIn("\n", error)

    def test_flush_interval(self) -> None:
        """Heartbeats are flushed every 5 seconds unless told otherwise."""
        self.assertEqual(parse().flush_interval, 5.0)
        self.assertEqual(parse("--flush-interval=2s").flush_interval, 2.0)

    def test_discover_heartbeat(self) -> None:
        """Discovery is a heartbeat unless --no-discover-heartbeat."""
        self.assertTrue(parse().discover_heartbeat)
        self.assertFalse(parse("--no-discover-heartbeat").discover_heartbeat)
        self.assertTrue(parse("--discover-heartbeat").discover_heartbeat)
        self.assertRaises(UsageError, parse, "--discover-heartbeat", "--no-discover-heartbeat")

    def test_process_binding(self) -> None:
        """Registrations are bound to their processes unless --no-process-binding."""
        self.assertTrue(parse().process_binding)
        self.assertFalse(parse("--no-process-binding").process_binding)

    def test_access_log(self) -> None:
        """--access-log turns on request logging."""
        self.assertTrue(parse("--access-log").access_log)
        self.assertFalse(parse().access_log)
