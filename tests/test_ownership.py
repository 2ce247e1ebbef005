"""
Registrations belong to the identity that created it: only it (or an admin)
may publish it again, heartbeat or unpublish it; everyone else gets a JSON
403 that says why without naming the owner, nothing changes, and the refusal
is logged for the audit trail.  Driven in memory through the HTTP API with
the caller's identity injected.
"""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from hsu_registry.model import Registration
from hsu_registry.registry import Registry
from hsu_registry.security.identity import ANONYMOUS, Identity
from hsu_registry.security.policy import default_policy, open_policy
from hsu_registry.stores.memory import MemoryStore
from hsu_registry.web.api import RegistryAPI

from .helpers import publish_body

VICTIM = Identity("uid", "1000", uid=1000, gid=1000, pid=4242)
ATTACKER = Identity("uid", "65534", uid=65534, gid=65534)
ADMIN = Identity("uid", "0", uid=0, gid=0)
BASE = "http://registry.invalid/api/v1"


class OwnershipTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = Registry(MemoryStore(), self.clock, policy=default_policy(registry_uid=0))
        self.caller = VICTIM
        api = RegistryAPI(self.registry, identify=lambda request: self.caller)
        self.treq: Any = StubTreq(api.resource())
        self.assertEqual(
            self.request("POST", "/publish", publish_body("A", 4242)), (200, {"success": True})
        )

    def request(
        self, method: str, path: str, body: bytes | None = None, caller: Identity | None = None
    ) -> tuple[int, Any]:
        if caller is not None:
            self.caller = caller
        response = self.successResultOf(self.treq.request(method, BASE + path, data=body))
        return response.code, json.loads(self.successResultOf(response.content()))

    def assertRefused(
        self, answer: tuple[int, Any], action: str, hidden: tuple[str, ...] = ("1000", "4242")
    ) -> None:
        code, body = answer
        self.assertEqual(code, 403, body)
        self.assertIs(body["success"], False)
        self.assertIn(
            f"module 'A' belongs to another identity: only its owner or an admin may {action} it",
            body["error"],
        )
        text = json.dumps(body)
        for secret in hidden:  # neither the owner's uid nor its PID
            self.assertNotIn(secret, text)

    def unchanged(self) -> Registration:
        registration = self.registry.get("A")
        assert registration is not None
        self.assertEqual((registration.owner, registration.process_id), ("uid:1000", 4242))
        return registration

    def test_owner_recorded(self) -> None:
        """The catalog shows who owns each registration."""
        code, entry = self.request("GET", "/modules/A")
        self.assertEqual((code, entry["owner"]), (200, "uid:1000"))

    def test_hijack_by_republish_refused(self) -> None:
        """
        Another uid republishing A with the owner's processID and its own
        address is refused; the registration and its index stay as they were.
        """
        index = self.registry.index
        body = publish_body(
            "A",
            4242,
            apis=[
                {"serviceIDs": ["s"], "serverPort": 6666, "protocol": "grpc", "address": "10.6.6.6"}
            ],
        )
        with capturedLogs() as events:
            self.assertRefused(self.request("POST", "/publish", body, ATTACKER), "publish")
        self.unchanged()
        self.assertEqual(self.registry.index, index)
        audit = [e for e in events if e.get("audit")]
        self.assertEqual(len(audit), 1)
        self.assertEqual(
            (audit[0]["identity"], audit[0]["module_id"], audit[0]["action"]),
            ("uid:65534", "A", "publish"),
        )

    def test_unpublish_by_non_owner_refused(self) -> None:
        """Without a processID, with the owner's, or with another: 403, and A stays."""
        for query in ("", "?processID=4242", "?processID=1"):
            self.assertRefused(
                self.request("DELETE", "/unpublish/A" + query, caller=ATTACKER), "unpublish"
            )
        self.unchanged()

    def test_heartbeat_by_non_owner_refused(self) -> None:
        """Nobody but the owner keeps a module alive."""
        self.clock.advance(100)
        for query in ("", "?processID=4242"):
            self.assertRefused(
                self.request("PUT", "/heartbeat/A" + query, caller=ATTACKER), "heartbeat"
            )
        self.assertEqual(self.registry.last_seen("A"), 0.0)

    def test_anonymous_cannot_touch_owned(self) -> None:
        """An anonymous caller (remote TCP) changes nothing an identity owns."""
        self.assertRefused(self.request("DELETE", "/unpublish/A", caller=ANONYMOUS), "unpublish")

    def test_owner_may(self) -> None:
        """The owner republishes, heartbeats and unpublishes as before, from any transport."""
        over_tcp = Identity("uid", "1000", uid=1000)  # the same uid, without a PID
        self.assertEqual(
            self.request("POST", "/publish", publish_body("A", 4242, apis=[]), over_tcp)[0], 200
        )
        self.assertEqual(self.request("PUT", "/heartbeat/A")[0], 200)
        self.assertEqual(self.request("DELETE", "/unpublish/A")[0], 200)
        self.assertIsNone(self.registry.get("A"))

    def test_admin_may_and_keeps_owner(self) -> None:
        """An admin may change any registration; a republish keeps its owner."""
        self.assertEqual(self.request("POST", "/publish", publish_body("A", 7), ADMIN)[0], 200)
        registration = self.registry.get("A")
        assert registration is not None
        self.assertEqual((registration.owner, registration.process_id), ("uid:1000", 7))
        self.assertEqual(self.request("DELETE", "/unpublish/A")[0], 200)

    def test_open_policy(self) -> None:
        """--policy=open: the original's behaviour, anyone changes anything."""
        self.registry.policy = open_policy()
        self.assertEqual(self.request("DELETE", "/unpublish/A", caller=ATTACKER)[0], 200)

    def test_process_conflict_for_owner_only(self) -> None:
        """The owner with a wrong processID gets the 409 it always got (its PID is no secret)."""
        code, body = self.request("DELETE", "/unpublish/A?processID=1")
        self.assertEqual(code, 409)
        self.assertEqual(body["context"]["registeredProcessID"], 4242)

    def test_unknown_owner_claimed(self) -> None:
        """
        A registration stored before owners were recorded is claimed by the
        first identity allowed to publish it, and the claim is logged.
        """
        registration = self.unchanged()
        self.registry._modules["A"] = (*registration.plain()[:5], "")  # as loaded from schema 1
        with capturedLogs() as events:
            self.assertEqual(
                self.request("POST", "/publish", publish_body("A", 4242), ATTACKER)[0], 200
            )
        claimed = self.registry.get("A")
        assert claimed is not None
        self.assertEqual(claimed.owner, "uid:65534")
        self.assertTrue(any("now belongs to" in e["log_format"] for e in events))
        self.assertRefused(
            self.request("DELETE", "/unpublish/A", caller=VICTIM), "unpublish", ("65534",)
        )
