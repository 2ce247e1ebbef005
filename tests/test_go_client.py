"""
The original's Go client (``moduleapi``'s registry client) against our Site:
its exact request bytes, as Go's net/http and encoding/json write them, get
the answers the Go client expects from the original server.
"""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from hsu_registry.client.urls import parse_registry_url
from hsu_registry.registry import Registry
from hsu_registry.stores.memory import MemoryStore
from hsu_registry.web.api import RegistryAPI
from hsu_registry.web.site import RegistrySite

# What Go's http.Client writes for c.httpClient.Post(baseURL+path, "application/json", body)
# and c.httpClient.Get(url) with baseURL "http://localhost" (the transport dials the socket).
_GO_HEADERS = b"Host: localhost\r\nUser-Agent: Go-http-client/1.1\r\n"


def go_post(path: bytes, body: bytes) -> bytes:
    return (
        b"POST " + path + b" HTTP/1.1\r\n" + _GO_HEADERS + b"Content-Length: %d\r\n"
        b"Content-Type: application/json\r\nAccept-Encoding: gzip\r\n\r\n" % len(body)
    ) + body


def go_request(method: bytes, path: bytes) -> bytes:
    return method + b" " + path + b" HTTP/1.1\r\n" + _GO_HEADERS + b"Accept-Encoding: gzip\r\n\r\n"


# json.Marshal of the client's request struct for a module with no APIs: a nil
# []RemoteModuleAPI is encoded as null.
GO_PUBLISH_NO_APIS = b'{"moduleID":"quiet","processID":4242,"apis":null}'


def _parse(raw: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(b" ")[1]), headers, body


class GoClientRequestTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = Registry(MemoryStore(), self.clock)
        self.site = RegistrySite(RegistryAPI(self.registry).resource(), reactor=self.clock)

    def exchange(self, raw: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(raw)
        return _parse(transport.value())

    def assertJSONError(
        self, answer: tuple[int, dict[bytes, bytes], bytes], status: int, message: str
    ) -> dict[str, object]:
        code, headers, body = answer
        self.assertEqual(code, status, body)
        self.assertEqual(headers[b"content-type"], b"application/json")
        parsed = json.loads(body)
        self.assertIs(parsed["success"], False)
        self.assertIn(message, parsed["error"])
        return parsed  # type: ignore[no-any-return]

    def test_publish_with_null_apis(self) -> None:
        """
        A Go module that publishes no APIs sends C{"apis": null} (a nil
        slice): it is registered with no APIs, and discover answers
        C{"apis": []}, as the original does.
        """
        code, _, body = self.exchange(go_post(b"/api/v1/publish", GO_PUBLISH_NO_APIS))
        self.assertEqual((code, json.loads(body)), (200, {"success": True}))
        code, _, body = self.exchange(go_request(b"GET", b"/api/v1/discover/quiet"))
        self.assertEqual((code, json.loads(body)), (200, {"moduleID": "quiet", "apis": []}))
        registration = self.registry.get("quiet")
        assert registration is not None
        self.assertEqual(registration.process_id, 4242)

    def test_discover_empty_module_id(self) -> None:
        """
        C{GET /api/v1/discover/} (FindModuleAPIs("")) is a 400 "module ID is
        required", which the Go client reports as a failed request, not as
        "module not found" (its reading of any 404).
        """
        answer = self.exchange(go_request(b"GET", b"/api/v1/discover/"))
        self.assertJSONError(answer, 400, "module ID is required")

    def test_unpublish_empty_module_id(self) -> None:
        """C{DELETE /api/v1/unpublish/} is a 400 "module ID is required" and changes nothing."""
        self.exchange(go_post(b"/api/v1/publish", GO_PUBLISH_NO_APIS))
        answer = self.exchange(go_request(b"DELETE", b"/api/v1/unpublish/"))
        self.assertJSONError(answer, 400, "module ID is required")
        self.assertIsNotNone(self.registry.get("quiet"))

    def test_heartbeat_and_services_empty_ids(self) -> None:
        """The other routes that take an ID say which ID is missing, with a 400."""
        answer = self.exchange(go_request(b"PUT", b"/api/v1/heartbeat/"))
        self.assertJSONError(answer, 400, "module ID is required")
        answer = self.exchange(go_request(b"GET", b"/api/v1/services/"))
        self.assertJSONError(answer, 400, "service ID is required")

    def test_empty_id_wrong_method(self) -> None:
        """A wrong method on an empty-ID path is still a JSON 405 with Allow."""
        code, headers, _ = self.exchange(go_post(b"/api/v1/discover/", b"{}"))
        self.assertEqual(code, 405)
        self.assertIn(b"GET", headers[b"allow"])

    def test_raw_non_ascii_path(self) -> None:
        """
        A path with raw (not percent-encoded) non-ASCII bytes, which Twisted
        refuses before any resource sees it, is answered as a JSON 400 that
        says what is wrong, and the connection is closed.
        """
        raw = b"GET /api/v1/discover/caf\xc3\xa9 HTTP/1.1\r\nHost: localhost\r\n\r\n"
        code, headers, body = self.exchange(raw)
        parsed = self.assertJSONError((code, headers, body), 400, "malformed HTTP request")
        self.assertIn("percent-encode", str(parsed["error"]))
        self.assertEqual(headers[b"connection"], b"close")
        self.assertEqual(int(headers[b"content-length"]), len(body))

    def test_malformed_header_is_json(self) -> None:
        """A malformed header line gets the same JSON 400."""
        answer = self.exchange(b"GET /api/v1/health HTTP/1.1\r\nno colon here\r\n\r\n")
        self.assertJSONError(answer, 400, "malformed HTTP request")


class GoClientURLTests(SynchronousTestCase):
    def test_go_url_schemes(self) -> None:
        """The URL schemes the Go client takes are taken by ours too (uds:// included)."""
        self.assertEqual(
            parse_registry_url("uds:///tmp/hsu-registry.sock").path, "/tmp/hsu-registry.sock"
        )
        self.assertEqual(
            parse_registry_url("unix:///tmp/hsu-registry.sock").path, "/tmp/hsu-registry.sock"
        )
        address = parse_registry_url("tcp://127.0.0.1:17951")
        self.assertEqual((address.host, address.port), ("127.0.0.1", 17951))
