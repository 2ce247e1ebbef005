"""
Tests for L{hsu_registry.security.policy}: the policy file, the default, the
open mode, and reloading it on SIGHUP.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from hsu_registry.config import RegistryConfig
from hsu_registry.security.identity import ANONYMOUS, Identity
from hsu_registry.security.policy import (
    PolicyError,
    default_policy,
    describe_change,
    load_policy,
    open_policy,
)
from hsu_registry.service import makeService

ALICE = Identity("uid", "1000", uid=1000, gid=1000)
BOB = Identity("uid", "1001", uid=1001, gid=1001)
ROOT = Identity("uid", "0", uid=0, gid=0)
ECHO_CERT = Identity("x509", "spiffe://example.org/echo")

EXAMPLE = """
[[grant]]
who = ["uid:1000", "x509:spiffe://example.org/*"]
publish = ["echo", "echo-*"]
services = ["echo.*"]

[[grant]]
who = ["any"]
read = true

[[grant]]
who = ["token:deployer"]
publish = ["deploy-*"]
check_networks = ["10.0.0.0/8"]

[tokens]
deployer = "sha256:{}"
""".format(hashlib.sha256(b"s3cret").hexdigest())


class DefaultPolicyTests(SynchronousTestCase):
    def test_anyone_reads_and_publishes(self) -> None:
        """Without a file, anyone (anonymous too) may read and publish anything."""
        policy = default_policy(registry_uid=999)
        for identity in (ALICE, BOB, ANONYMOUS, ECHO_CERT):
            self.assertTrue(policy.may_read(identity))
            self.assertIsNone(policy.publish_refusal(identity, "anything", ["svc"]))
        self.assertTrue(policy.everyone_reads)
        self.assertFalse(policy.open)

    def test_admins(self) -> None:
        """The registry's own uid and root are admins; nobody else is."""
        policy = default_policy(registry_uid=1001)
        self.assertTrue(policy.is_admin(ROOT))
        self.assertTrue(policy.is_admin(BOB))
        self.assertFalse(policy.is_admin(ALICE))
        self.assertFalse(policy.is_admin(ANONYMOUS))
        self.assertFalse(policy.is_admin(Identity("x509", "0")))

    def test_open(self) -> None:
        """The open policy says so: ownership is not enforced."""
        self.assertTrue(open_policy().open)


class FileTests(SynchronousTestCase):
    def write(self, text: str, suffix: str = ".toml") -> str:
        path = os.path.abspath(self.mktemp()) + suffix
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_grants(self) -> None:
        """Patterns of module and service IDs, per identity, as the file says."""
        policy = load_policy(self.write(EXAMPLE), registry_uid=999)
        self.assertIsNone(policy.publish_refusal(ALICE, "echo-2", ["echo.v1"]))
        self.assertIsNone(policy.publish_refusal(ECHO_CERT, "echo", ["echo.v1"]))
        refusal = policy.publish_refusal(ALICE, "billing", ["echo.v1"])
        self.assertEqual(refusal, "uid:1000 may not publish module 'billing'")
        refusal = policy.publish_refusal(ALICE, "echo", ["billing.v1"])
        self.assertIn("may not publish these service IDs", str(refusal))
        self.assertIsNotNone(policy.publish_refusal(BOB, "echo", ["echo.v1"]))
        self.assertIsNotNone(policy.publish_refusal(ANONYMOUS, "echo", []))
        self.assertTrue(policy.may_read(ANONYMOUS))
        self.assertFalse(policy.is_admin(ALICE))
        self.assertTrue(policy.is_admin(ROOT))  # root stays admin whatever the file says

    def test_tokens(self) -> None:
        """A token is known by its SHA-256 digest only; the right one names its identity."""
        path = self.write(EXAMPLE)
        with open(path) as f:
            self.assertNotIn("s3cret", f.read())
        policy = load_policy(path)
        self.assertEqual(policy.token_identity("s3cret"), Identity("token", "deployer"))
        self.assertIsNone(policy.token_identity("guess"))
        deployer = Identity("token", "deployer")
        self.assertIsNone(policy.publish_refusal(deployer, "deploy-1", ["x"]))
        self.assertEqual([str(n) for n in policy.check_networks(deployer)], ["10.0.0.0/8"])
        self.assertEqual(policy.check_networks(ALICE), ())

    def test_reads_need_a_grant(self) -> None:
        """With a file, reading is granted like anything else; publishing implies it."""
        path = self.write('[[grant]]\nwho = ["uid:1000"]\npublish = ["*"]\n')
        policy = load_policy(path)
        self.assertFalse(policy.everyone_reads)
        self.assertTrue(policy.may_read(ALICE))
        self.assertFalse(policy.may_read(BOB))
        self.assertFalse(policy.may_read(ANONYMOUS))

    def test_users_and_groups(self) -> None:
        """user:NAME and group:NAME are resolved when the file is loaded."""
        root = pwd.getpwuid(0)
        path = self.write(
            json.dumps({"grant": [{"who": [f"user:{root.pw_name}"], "publish": ["r"]}]}), ".json"
        )
        self.assertIsNone(load_policy(path).publish_refusal(ROOT, "r", []))
        path = self.write('[[grant]]\nwho = ["gid:1000"]\npublish = ["g"]\n')
        member = Identity("uid", "4242", uid=4242, gid=1000)  # primary group, from SO_PEERCRED
        self.assertIsNone(load_policy(path).publish_refusal(member, "g", []))

    def test_bad_files(self) -> None:
        """A bad file is refused with one line naming it and the first problem."""
        cases = {
            "[[grant]]\nwho = []\n": "names nobody",
            '[[grant]]\nwho = ["uid:x"]\n': "is not a number",
            '[[grant]]\nwho = ["user:no-such-user-here"]\n': "no user",
            '[[grant]]\nwho = ["any"]\nreed = true\n': "unknown keys ['reed']",
            '[[grant]]\nwho = ["any"]\ncheck_networks = ["10.0.0.0/33"]\n': "is not a CIDR",
            '[tokens]\nx = "md5:abc"\n': "sha256",
            "this is not toml": "not valid",
            "[other]\na = 1\n": "unknown keys",
        }
        for text, fragment in cases.items():
            path = self.write(text)
            error = self.assertRaises(PolicyError, load_policy, path)
            self.assertIn(path, str(error))
            self.assertIn(fragment, str(error))
            self.assertNotIn("\n", str(error))
        missing = os.path.abspath(self.mktemp())
        self.assertIn("cannot read", str(self.assertRaises(PolicyError, load_policy, missing)))

    def test_describe_change(self) -> None:
        """A reload's log line says which grants and tokens came and went."""
        before = load_policy(self.write(EXAMPLE))
        after = load_policy(self.write(EXAMPLE.replace('"uid:1000", ', "")))
        self.assertEqual(describe_change(before, before), "no change")
        text = describe_change(before, after)
        self.assertIn("grants added for x509:spiffe://example.org/*", text)
        self.assertIn("grants removed for uid:1000, x509:spiffe://example.org/*", text)


class ReloadTests(SynchronousTestCase):
    """SIGHUP's reload reads the file again; a bad file keeps the policy in force."""

    def setUp(self) -> None:
        self.path = os.path.abspath(self.mktemp()) + ".toml"
        with open(self.path, "w") as f:
            f.write(EXAMPLE)
        config = RegistryConfig(endpoints=(), policy=self.path)
        self.service = makeService(config, MemoryReactorClock())

    def test_reload(self) -> None:
        self.assertIsNotNone(self.service.registry.policy.publish_refusal(BOB, "echo", []))
        with open(self.path, "a") as f:
            f.write('\n[[grant]]\nwho = ["uid:1001"]\npublish = ["*"]\n')
        with capturedLogs() as events:
            self.service.reload()
        self.assertIsNone(self.service.registry.policy.publish_refusal(BOB, "echo", []))
        lines = [e["log_format"].format(**e) for e in events if "policy" in e["log_format"]]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn(f"Reloaded the policy {self.path}: grants added for uid:1001", lines[0])

    def test_bad_file_keeps_policy(self) -> None:
        before = self.service.registry.policy
        with open(self.path, "w") as f:
            f.write("[[grant]]\nwho = nonsense\n")
        with capturedLogs() as events:
            self.service.reload()
        self.assertIs(self.service.registry.policy, before)
        errors = [e for e in events if "Kept the policy" in e["log_format"]]
        self.assertEqual(len(errors), 1)
        self.assertIn("is not valid", errors[0]["error"])


class ShippedExampleTests(SynchronousTestCase):
    def test_etc_policy_loads(self) -> None:
        """etc/policy.toml, the README's example, is a valid policy (given an hsu group)."""
        import grp

        real = grp.getgrnam

        def getgrnam(name: str) -> grp.struct_group:
            if name == "hsu":
                return grp.struct_group(("hsu", "x", 4242, ["root"]))
            return real(name)

        self.patch(grp, "getgrnam", getgrnam)
        path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "etc", "policy.toml")
        policy = load_policy(path, registry_uid=999)
        self.assertEqual(
            policy.token_identity("change-me-example-token"), Identity("token", "deployer")
        )
        member = Identity("uid", "0", uid=0, gid=0)
        self.assertIsNone(policy.publish_refusal(member, "anything", ["x"]))
        self.assertTrue(policy.may_read(ANONYMOUS))
        self.assertIsNotNone(policy.publish_refusal(ECHO_CERT, "billing", ["echo.v1"]))
