"""
Health-check targets vetted on the daemon's real publish path: the service
tree wires L{hsu_registry.checks.targets.CheckTargets} into the API and the
checker, with the policy's C{check_networks} per identity.
"""

from __future__ import annotations

import json
import os
from typing import Any

from treq.testing import StubTreq
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from hsu_registry.config import RegistryConfig
from hsu_registry.security.identity import Identity
from hsu_registry.service import makeService

DEPLOYER = Identity("uid", "3000", uid=3000)
OTHER = Identity("uid", "3001", uid=3001)
BASE = "http://registry.invalid/api/v1"


def _checked(module_id: str, address: str) -> bytes:
    api = {
        "serviceIDs": ["s"],
        "serverPort": 80,
        "protocol": "http",
        "address": address,
        "check": {"http": "/healthz"},
    }
    return json.dumps({"moduleID": module_id, "apis": [api]}).encode()


class PublishPathTests(SynchronousTestCase):
    def setUp(self) -> None:
        policy = os.path.abspath(self.mktemp()) + ".toml"
        with open(policy, "w") as f:
            f.write(
                '[[grant]]\nwho = ["any"]\npublish = ["*"]\n'
                '[[grant]]\nwho = ["uid:3000"]\ncheck_networks = ["10.0.0.0/8"]\n'
            )
        service = makeService(RegistryConfig(endpoints=(), policy=policy), MemoryReactorClock())
        self.registry = service.registry
        self.caller = DEPLOYER
        service.api.identify_connection = lambda request: self.caller
        self.treq: Any = StubTreq(service.resource())

    def publish(self, body: bytes, caller: Identity) -> tuple[int, Any]:
        self.caller = caller
        response = self.successResultOf(self.treq.post(BASE + "/publish", data=body))
        return response.code, json.loads(self.successResultOf(response.content()))

    def test_metadata_address_refused(self) -> None:
        """A check of the cloud metadata address is a 400 naming the field; nothing registered."""
        code, body = self.publish(_checked("m", "169.254.169.254"), DEPLOYER)
        self.assertEqual(code, 400)
        self.assertIn("apis[0].address '169.254.169.254' is link-local", body["error"])
        self.assertIsNone(self.registry.get("m"))

    def test_private_network_per_identity(self) -> None:
        """10.0.0.5 is refused to an identity without a grant and allowed to one with it."""
        code, body = self.publish(_checked("other", "10.0.0.5"), OTHER)
        self.assertEqual(code, 400, body)
        self.assertIsNone(self.registry.get("other"))
        code, body = self.publish(_checked("deployer", "10.0.0.5"), DEPLOYER)
        self.assertEqual(code, 200, body)

    def test_numeric_forms_refused(self) -> None:
        """2130706433 and 0.0.0.0 are not accepted as check addresses."""
        for address in ("2130706433", "0.0.0.0"):
            code, _ = self.publish(_checked("n", address), DEPLOYER)
            self.assertEqual(code, 400, address)
