"""
Tests for L{hsu_registry.endpoints}: endpoint strings and the seed's flags.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from hsu_registry.endpoints import (
    EndpointDescription,
    _directory_mode,
    _is_loopback,
    parse_description,
    tcp_endpoint,
    unix_endpoint,
)


class ParseDescriptionTests(SynchronousTestCase):
    def test_tcp(self) -> None:
        self.assertEqual(
            parse_description("tcp:17951:interface=127.0.0.1"),
            EndpointDescription("tcp", ("17951",), (("interface", "127.0.0.1"),)),
        )

    def test_unix_with_escapes(self) -> None:
        """Escaped colons belong to the path, as in Twisted's own parser."""
        parsed = parse_description("unix:/run/a\\:b.sock:mode=600")
        self.assertEqual(parsed.unix_path, "/run/a:b.sock")
        self.assertEqual(parsed.get("mode"), "600")
        self.assertEqual(parse_description("unix:address=/x.sock").unix_path, "/x.sock")
        self.assertIsNone(parse_description("tcp:80").unix_path)

    def test_invalid(self) -> None:
        for bad in ("", "tcp", ":80"):
            self.assertRaises(ValueError, parse_description, bad)


class SeedFlagTests(SynchronousTestCase):
    def test_tcp_address(self) -> None:
        self.assertEqual(tcp_endpoint("127.0.0.1:17951"), "tcp:17951:interface=127.0.0.1")
        self.assertEqual(tcp_endpoint(":8080"), "tcp:8080:interface=0.0.0.0")
        self.assertEqual(tcp_endpoint("[::1]:1"), "tcp6:1:interface=\\:\\:1")
        for bad in ("localhost", "h:x", "h:70000", ""):
            self.assertRaises(ValueError, tcp_endpoint, bad)

    def test_socket_path(self) -> None:
        self.assertEqual(
            unix_endpoint("/var/run/hsu/registry.sock"), "unix:/var/run/hsu/registry.sock:mode=600"
        )
        self.assertRaises(ValueError, unix_endpoint, "")


class HelperTests(SynchronousTestCase):
    def test_loopback(self) -> None:
        for host in ("127.0.0.1", "127.1.2.3", "::1", "localhost"):
            self.assertTrue(_is_loopback(host), host)
        for host in ("0.0.0.0", "::", "10.0.0.1", "example.com"):
            self.assertFalse(_is_loopback(host), host)

    def test_directory_mode(self) -> None:
        """A directory we create is no wider than the socket it holds."""
        self.assertEqual(_directory_mode(0o600), 0o700)
        self.assertEqual(_directory_mode(0o660), 0o750)
        self.assertEqual(_directory_mode(0o666), 0o755)
