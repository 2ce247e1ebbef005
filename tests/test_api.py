"""
Tests for L{hsu_registry.web.api}: the seed's HTTP API, driven in memory
through L{StubTreq}, with time from a L{task.Clock}.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from hypothesis import given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hsu_registry import __version__
from hsu_registry.errors import InvalidRequest
from hsu_registry.model import validate_id
from hsu_registry.registry import Registry
from hsu_registry.security.limits import RateLimiter
from hsu_registry.testing import ControllableStore
from hsu_registry.web.api import RegistryAPI

from .helpers import SEED_PUBLISH, publish_body

BASE = "http://registry.invalid/api/v1"


class APITestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = ControllableStore()
        self.registry = Registry(self.store, self.clock, max_modules=10)
        self.api = RegistryAPI(self.registry)
        self.treq: Any = StubTreq(self.api.resource())

    def request(
        self, method: str, path: str, body: bytes | None = None, **kwargs: Any
    ) -> tuple[int, Any, Any]:
        """Make a request; return (status, parsed JSON body, response)."""
        url = path if path.startswith("http") else BASE + path
        response = self.successResultOf(self.treq.request(method, url, data=body, **kwargs))
        content = self.successResultOf(response.content())
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        return response.code, json.loads(content), response

    def publish(self, body: bytes | dict[str, Any]) -> tuple[int, Any]:
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        code, parsed, _ = self.request("POST", "/publish", body)
        return code, parsed

    def assertError(self, result: tuple[Any, ...], status: int, *fragments: str) -> None:
        code, body = result[0], result[1]
        self.assertEqual(code, status, body)
        self.assertEqual(body["success"], False)
        for fragment in fragments:
            self.assertIn(fragment, body["error"])


class SeedContractTests(APITestCase):
    """The seed's endpoints, bodies and status codes, byte for byte."""

    def test_publish_seed_body(self) -> None:
        """POST /api/v1/publish with the seed's body answers 200 {"success": true}."""
        response = self.successResultOf(
            self.treq.post(BASE + "/publish", data=json.dumps(SEED_PUBLISH).encode())
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(self.successResultOf(response.content()), b'{"success":true}')

    def test_discover_seed_shape(self) -> None:
        """GET /api/v1/discover/test answers the seed's JSON exactly."""
        self.publish(SEED_PUBLISH)
        response = self.successResultOf(self.treq.get(BASE + "/discover/test"))
        self.assertEqual(response.code, 200)
        self.assertEqual(
            self.successResultOf(response.content()),
            b'{"moduleID":"test","apis":[{"serviceIDs":["service1"],'
            b'"serverPort":50051,"protocol":"grpc"}]}',
        )

    def test_discover_unknown_is_404(self) -> None:
        """GET discover of an unknown module answers 404 with the seed's message."""
        self.assertEqual(
            self.request("GET", "/discover/nope")[:2],
            (404, {"success": False, "error": "module not found"}),
        )

    def test_unpublish(self) -> None:
        """DELETE /api/v1/unpublish/test removes the module and answers success."""
        self.publish(SEED_PUBLISH)
        code, body, _ = self.request("DELETE", "/unpublish/test")
        self.assertEqual((code, body), (200, {"success": True}))
        self.assertEqual(self.request("GET", "/discover/test")[0], 404)

    def test_unpublish_unknown_is_200(self) -> None:
        """Unpublishing an unknown module is not an error."""
        self.assertEqual(self.request("DELETE", "/unpublish/ghost")[:2], (200, {"success": True}))

    def test_unpublish_with_owner_process_id(self) -> None:
        """DELETE with the owner's processID removes the module."""
        self.publish(SEED_PUBLISH)
        self.assertEqual(self.request("DELETE", "/unpublish/test?processID=1234")[0], 200)
        self.assertIsNone(self.registry.get("test"))

    def test_unpublish_with_other_process_id(self) -> None:
        """DELETE with another processID answers 409 and keeps the registration."""
        self.publish(SEED_PUBLISH)
        result = self.request("DELETE", "/unpublish/test?processID=99")
        self.assertError(result, 409, "another process")
        self.assertEqual(result[1]["context"]["registeredProcessID"], 1234)
        self.assertIsNotNone(self.registry.get("test"))

    def test_unpublish_bad_process_id(self) -> None:
        """A non-integer, negative, empty or repeated processID answers 400 and changes nothing."""
        self.publish(SEED_PUBLISH)
        for query in ("abc", "-1", "1.5", "", "1234&processID=1234", "99999999999"):
            self.assertError(
                self.request("DELETE", "/unpublish/test?processID=" + query), 400, "processID"
            )
        self.assertIsNotNone(self.registry.get("test"))

    def test_health(self) -> None:
        """
        GET /api/v1/health answers status, counts and a Go-style uptime (the
        seed's four fields, in its order), then the daemon's version.
        """
        self.publish(publish_body("a"))
        self.publish(
            {
                "moduleID": "b",
                "apis": [
                    {"serviceIDs": ["x"], "serverPort": 1, "protocol": "http"},
                    {"serviceIDs": ["y"], "serverPort": 2, "protocol": "grpc"},
                ],
            }
        )
        self.clock.advance(2 * 3600 + 30 * 60 + 15)
        response = self.successResultOf(self.treq.get(BASE + "/health"))
        self.assertEqual(
            self.successResultOf(response.content()),
            b'{"status":"healthy","registeredModules":2,"totalAPIs":3,"uptime":"2h30m15s",'
            b'"version":"' + __version__.encode() + b'"}',
        )

    def test_go_client_pascal_case(self) -> None:
        """The Go client's PascalCase keys inside apis are accepted; answers use camelCase."""
        code, _ = self.publish(
            {
                "ModuleID": "echo",
                "ProcessID": 1,
                "APIs": [{"ServiceIDs": ["s1"], "ServerPort": 50051, "Protocol": "grpc"}],
            }
        )
        self.assertEqual(code, 200)
        body = self.request("GET", "/discover/echo")[1]
        self.assertEqual(
            body,
            {
                "moduleID": "echo",
                "apis": [{"serviceIDs": ["s1"], "serverPort": 50051, "protocol": "grpc"}],
            },
        )

    def test_optional_fields_round_trip(self) -> None:
        """address and metadata are answered when given, omitted when empty."""
        self.publish(
            {
                "moduleID": "echo",
                "apis": [
                    {
                        "serviceIDs": ["s"],
                        "serverPort": 80,
                        "protocol": "http",
                        "address": "10.0.0.5",
                        "metadata": {"Version": "1.2", "zone": "a"},
                        "unknownKey": [1, 2, 3],
                    },
                    {"serviceIDs": ["t"], "serverPort": 81, "protocol": "http", "metadata": {}},
                ],
            }
        )
        apis = self.request("GET", "/discover/echo")[1]["apis"]
        self.assertEqual(apis[0]["address"], "10.0.0.5")
        self.assertEqual(apis[0]["metadata"], {"Version": "1.2", "zone": "a"})
        self.assertNotIn("unknownKey", apis[0])
        self.assertEqual(set(apis[1]), {"serviceIDs", "serverPort", "protocol"})

    def test_empty_apis_list(self) -> None:
        """A module may publish an empty list of APIs."""
        self.assertEqual(self.publish({"moduleID": "idle", "apis": []})[0], 200)
        self.assertEqual(self.request("GET", "/discover/idle")[1], {"moduleID": "idle", "apis": []})

    def test_stale_module_is_404(self) -> None:
        """A module not seen for stale-after answers 404 though it is still registered."""
        self.publish(SEED_PUBLISH)
        self.clock.advance(301)
        self.assertEqual(self.request("GET", "/discover/test")[0], 404)
        self.assertEqual(self.request("GET", "/health")[1]["registeredModules"], 1)

    def test_discover_refreshes(self) -> None:
        """Discovery is a heartbeat: a module discovered regularly never goes stale."""
        self.publish(SEED_PUBLISH)
        for _ in range(5):
            self.clock.advance(200)
            self.assertEqual(self.request("GET", "/discover/test")[0], 200)


class BadInputTests(APITestCase):
    """Bad input is answered 400 with a message naming the field, and changes nothing."""

    def setUp(self) -> None:
        super().setUp()
        self.publish(SEED_PUBLISH)

    def tearDown(self) -> None:
        found = self.registry.get("test")
        assert found is not None
        self.assertEqual(found.process_id, 1234)
        self.assertEqual(len(self.registry), 1)

    def test_not_json(self) -> None:
        self.assertError(self.publish(b"{not json"), 400, "not valid JSON")

    def test_not_utf8(self) -> None:
        self.assertError(self.publish(b'{"moduleID": "\xff"}'), 400, "UTF-8")

    def test_empty_body(self) -> None:
        self.assertError(self.publish(b""), 400, "empty")

    def test_not_an_object(self) -> None:
        for body in (b"[]", b'"test"', b"12", b"null"):
            self.assertError(self.publish(body), 400, "JSON object")

    def test_deep_nesting(self) -> None:
        self.assertError(self.publish(b"[" * 100_000), 400, "nested")

    def test_missing_module_id(self) -> None:
        self.assertError(self.publish({"apis": []}), 400, "moduleID")

    def test_mistyped_fields(self) -> None:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"moduleID": 5, "apis": []}, "moduleID"),
            ({"moduleID": "test", "processID": "1", "apis": []}, "processID"),
            ({"moduleID": "test", "processID": -1, "apis": []}, "processID"),
            ({"moduleID": "test", "apis": {}}, "apis"),
            (
                {
                    "moduleID": "test",
                    "apis": [{"serviceIDs": [], "serverPort": 1, "protocol": "x"}],
                },
                "apis[0].serviceIDs",
            ),
            (
                {
                    "moduleID": "test",
                    "apis": [{"serviceIDs": ["a"], "serverPort": 0, "protocol": "x"}],
                },
                "apis[0].serverPort",
            ),
            (
                {
                    "moduleID": "test",
                    "apis": [{"serviceIDs": ["a"], "serverPort": 65536, "protocol": "x"}],
                },
                "apis[0].serverPort",
            ),
            (
                {
                    "moduleID": "test",
                    "apis": [{"serviceIDs": ["a"], "serverPort": True, "protocol": "x"}],
                },
                "apis[0].serverPort",
            ),
            (
                {
                    "moduleID": "test",
                    "apis": [{"serviceIDs": ["a"], "serverPort": 80.0, "protocol": "x"}],
                },
                "apis[0].serverPort",
            ),
            (
                {"moduleID": "test", "apis": [{"serviceIDs": ["a"], "serverPort": 80}]},
                "apis[0].protocol",
            ),
            (
                {
                    "moduleID": "test",
                    "apis": [
                        {"serviceIDs": ["a"], "serverPort": 80, "protocol": "x", "metadata": []}
                    ],
                },
                "apis[0].metadata",
            ),
        ]
        for body, field in cases:
            self.assertError(self.publish(body), 400, field)

    def test_unaddressable_ids(self) -> None:
        """IDs the URL API could not address are refused at publish."""
        for module_id in ("a/b", "a b", ".", "..", "tab\there", "x" * 257):
            self.assertError(self.publish({"moduleID": module_id, "apis": []}), 400, "moduleID")

    def test_too_many_apis(self) -> None:
        apis = [{"serviceIDs": ["a"], "serverPort": 1, "protocol": "x"}] * 129
        self.assertError(self.publish({"moduleID": "test", "apis": apis}), 400, "apis")


class ErrorShapeTests(APITestCase):
    """Every error is JSON: unknown paths, wrong methods, bad URLs, full registry, store down."""

    def test_unknown_path(self) -> None:
        """An unknown path answers a JSON 404."""
        self.assertError(
            self.request("GET", "http://registry.invalid/nope"), 404, "no such endpoint"
        )
        # An empty module ID is not an unknown path: the original's 400.
        self.assertError(self.request("GET", "/discover/"), 400, "module ID is required")

    def test_wrong_method(self) -> None:
        """A wrong method answers a JSON 405 with an Allow header."""
        result = self.request("GET", "/publish")
        self.assertError(result, 405, "GET")
        self.assertEqual(result[2].headers.getRawHeaders(b"allow"), [b"POST"])
        self.assertError(self.request("POST", "/health"), 405)
        self.assertError(self.request("PUT", "/discover/x"), 405)

    def test_options_changes_nothing(self) -> None:
        """OPTIONS on the unpublish route answers 405 and does not unpublish."""
        self.publish(SEED_PUBLISH)
        self.assertError(self.request("OPTIONS", "/unpublish/test"), 405)
        self.assertIsNotNone(self.registry.get("test"))

    def test_non_utf8_path(self) -> None:
        """A percent-encoded path that is not UTF-8 answers a JSON 400."""
        self.assertError(self.request("GET", "/discover/%FF%FE"), 400, "UTF-8")

    def test_slash_in_id_not_routable(self) -> None:
        """An encoded slash does not reach a module (no such IDs can be published)."""
        self.assertEqual(self.request("GET", "/discover/a%2Fb")[0], 404)

    def test_registry_full(self) -> None:
        """Publishing past max-modules answers 507 and keeps existing modules."""
        for i in range(10):
            self.assertEqual(self.publish(publish_body(f"m{i}"))[0], 200)
        result = self.publish(publish_body("one-too-many"))
        self.assertError(result, 507, "maximum")
        self.assertEqual(len(self.registry), 10)

    def test_store_unavailable(self) -> None:
        """When the store fails, publish answers 503 and memory is unchanged."""
        self.publish(SEED_PUBLISH)
        self.store.failing = True
        self.assertError(self.publish(publish_body("other")), 503, "store")
        self.assertError(self.request("DELETE", "/unpublish/test"), 503)
        self.assertIsNotNone(self.registry.get("test"))
        self.assertIsNone(self.registry.get("other"))

    def test_unexpected_error_is_generic_500(self) -> None:
        """An unexpected exception answers a generic JSON 500 with no traceback, and is logged."""

        def broken(module_id: str) -> None:
            raise RuntimeError("secret internals")

        self.registry.discover = broken  # type: ignore[method-assign,assignment]
        code, body, _ = self.request("GET", "/discover/x")
        self.assertEqual((code, body), (500, {"success": False, "error": "internal error"}))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class AddressabilityTests(APITestCase):
    """Every module ID that publish accepts is discoverable and unpublishable by URL."""

    def setUp(self) -> None:
        super().setUp()
        # Hundreds of writes on a clock that never moves: no rate to spend
        # (rates are tests.test_quotas's subject).
        self.registry.write_limiter = RateLimiter(1e9, 10**9, "writes")

    @settings(max_examples=150, deadline=None)
    @given(st.text(min_size=1, max_size=40))
    def test_percent_encoding_round_trips(self, module_id: str) -> None:
        try:
            validate_id(module_id, "moduleID")
        except InvalidRequest:
            code, _ = self.publish({"moduleID": module_id, "apis": []})
            self.assertEqual(code, 400)
            return
        self.assertEqual(self.publish({"moduleID": module_id, "apis": []})[0], 200)
        path = quote(module_id, safe="")
        code, body, _ = self.request("GET", "/discover/" + path)
        self.assertEqual((code, body["moduleID"]), (200, module_id))
        self.assertEqual(self.request("DELETE", "/unpublish/" + path)[0], 200)
        self.assertIsNone(self.registry.get(module_id))


class RouteMemoTests(APITestCase):
    """The memo of routing decisions stays bounded, whatever paths clients send."""

    def test_bounded(self) -> None:
        from hsu_registry.web import api

        resource = self.api.resource()
        self.treq = StubTreq(resource)
        for i in range(api._ROUTE_MEMO_SIZE + 10):
            self.request("GET", f"/discover/m{i}")
        self.assertLessEqual(len(resource._routes), api._ROUTE_MEMO_SIZE)
        resource._routes.clear()
        self.request("GET", "/discover/" + "x" * 600)
        self.assertEqual(resource._routes, {})

    def test_memo_gives_same_answers(self) -> None:
        """A memoised route answers exactly as a fresh one."""
        self.publish(SEED_PUBLISH)
        first = self.request("GET", "/discover/test")[:2]
        second = self.request("GET", "/discover/test")[:2]
        self.assertEqual(first, second)
        self.assertEqual(self.request("POST", "/discover/test")[0], 405)
        self.assertEqual(self.request("POST", "/discover/test")[0], 405)


class MountingTests(SynchronousTestCase):
    """The API resource can be mounted under a host application's path."""

    def test_mounted_under_prefix(self) -> None:
        from twisted.web.resource import Resource

        registry = Registry(ControllableStore(), Clock())
        root = Resource()
        root.putChild(b"registry", RegistryAPI(registry).resource())
        treq: Any = StubTreq(root)
        response = self.successResultOf(
            treq.post(
                "http://host.invalid/registry/api/v1/publish",
                data=json.dumps(SEED_PUBLISH).encode(),
            )
        )
        self.assertEqual(response.code, 200)
        response = self.successResultOf(
            treq.get("http://host.invalid/registry/api/v1/discover/test")
        )
        self.assertEqual(json.loads(self.successResultOf(response.content()))["moduleID"], "test")


class HeartbeatAPITests(APITestCase):
    def test_heartbeat(self) -> None:
        """PUT /api/v1/heartbeat/{id}?processID=N refreshes; 404 unknown, 409 not the owner."""
        self.publish(SEED_PUBLISH)
        self.clock.advance(200)
        self.assertEqual(
            self.request("PUT", "/heartbeat/test?processID=1234")[:2], (200, {"success": True})
        )
        self.assertEqual(self.registry.last_seen("test"), self.clock.seconds())
        self.assertEqual(self.request("PUT", "/heartbeat/test")[0], 200)
        self.assertError(self.request("PUT", "/heartbeat/ghost"), 404)
        self.assertError(self.request("PUT", "/heartbeat/test?processID=1"), 409)
        self.assertError(self.request("PUT", "/heartbeat/test?processID=x"), 400, "processID")
        self.assertError(self.request("GET", "/heartbeat/test"), 405)
