"""
Tests for L{hsu_registry.security.identity} and L{hsu_registry.security.sockdiag}:
the kernel's word on who is calling, over real unix and loopback TCP sockets,
and, end to end, the attacks of issue 12 by a second uid (C{setpriv}, as CI
runs as root).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from hsu_registry.security.identity import ANONYMOUS, Identity, connection_identity
from hsu_registry.security.sockdiag import _proc_net_uid, loopback_peer_uid

from .test_e2e import E2ETestCase, _text

SETPRIV = shutil.which("setpriv")
NOBODY = 65534


def _as_nobody(*argv: str) -> list[str]:
    return [SETPRIV or "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]


def _need_second_uid() -> None:
    if os.geteuid() != 0 or SETPRIV is None:
        raise SkipTest("a second uid needs root and setpriv (CI runs as root)")


class _Handle:
    """A transport's getHandle() over a real socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def getHandle(self) -> socket.socket:
        return self.sock


class ConnectionIdentityTests(SynchronousTestCase):
    def pair(self, family: int, address: Any) -> tuple[socket.socket, socket.socket]:
        server = socket.socket(family, socket.SOCK_STREAM)
        self.addCleanup(server.close)
        server.bind(address)
        server.listen(1)
        client = socket.socket(family, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.connect(server.getsockname())
        accepted, _ = server.accept()
        self.addCleanup(accepted.close)
        return client, accepted

    def test_unix_peer(self) -> None:
        """Over a unix socket: the peer's uid, gid and PID from SO_PEERCRED."""
        path = os.path.join(self.mktemp())
        os.makedirs(path)
        _, accepted = self.pair(socket.AF_UNIX, os.path.join(path, "s"))
        identity = connection_identity(_Handle(accepted))
        self.assertEqual(
            identity,
            Identity("uid", str(os.getuid()), uid=os.getuid(), gid=os.getgid(), pid=os.getpid()),
        )
        self.assertEqual(identity.principal, f"uid:{os.getuid()}")

    def test_loopback_tcp_peer(self) -> None:
        """Over loopback TCP: the uid owning the client's end, without a PID."""
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            _, accepted = self.pair(family, (host, 0))
            self.assertEqual(
                connection_identity(_Handle(accepted)),
                Identity("uid", str(os.getuid()), uid=os.getuid()),
            )

    def test_proc_fallback_agrees(self) -> None:
        """/proc/net/tcp, the fallback, says the same as sock_diag."""
        _, accepted = self.pair(socket.AF_INET, ("127.0.0.1", 0))
        peer, local = accepted.getpeername(), accepted.getsockname()
        self.assertEqual(_proc_net_uid(peer, local), loopback_peer_uid(peer, local))
        self.assertEqual(loopback_peer_uid(peer, local), os.getuid())

    def test_not_loopback_is_anonymous(self) -> None:
        """A peer beyond loopback, or a transport with no socket, is anonymous."""
        self.assertIsNone(loopback_peer_uid(("192.0.2.1", 4000), ("127.0.0.1", 17951)))
        self.assertIs(connection_identity(None), ANONYMOUS)
        self.assertIs(connection_identity(object()), ANONYMOUS)

    def test_other_uid_over_tcp(self) -> None:
        """A connection made as another uid (setpriv) is that uid, as ss -e shows."""
        _need_second_uid()
        server = socket.socket()
        self.addCleanup(server.close)
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        script = f"import socket; s = socket.create_connection(('127.0.0.1', {port})); s.recv(1)"
        child = subprocess.Popen(_as_nobody(sys.executable, "-c", script))
        self.addCleanup(child.wait)
        accepted, _ = server.accept()
        try:
            self.assertEqual(
                connection_identity(_Handle(accepted)), Identity("uid", "65534", uid=NOBODY)
            )
        finally:
            accepted.close()


# The attacker: another local uid, over loopback TCP, with the original's
# plain HTTP (what any unmodified client sends).
_ATTACK = textwrap.dedent(
    """
    import http.client, json, sys
    port, victim_pid = int(sys.argv[1]), int(sys.argv[2])
    def call(method, path, body=None):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request(method, path, body, {"Content-Type": "application/json"})
        r = c.getresponse()
        return [r.status, json.loads(r.read())]
    hijack = json.dumps({"moduleID": "A", "processID": victim_pid, "apis": [
        {"serviceIDs": ["svc"], "serverPort": 6666, "protocol": "grpc", "address": "127.0.0.9"}]})
    print(json.dumps({
        "modules": call("GET", "/api/v1/modules/A"),
        "republish": call("POST", "/api/v1/publish", hijack),
        "unpublish": call("DELETE", "/api/v1/unpublish/A"),
        "unpublish_pid": call("DELETE", "/api/v1/unpublish/A?processID=1"),
        "heartbeat": call("PUT", "/api/v1/heartbeat/A"),
    }))
    """
)

# The victim: a module process publishing over the unix socket as itself.
_VICTIM = textwrap.dedent(
    """
    import sys, time
    from hsu_registry.client import BlockingRegistryClient, RemoteAPI, RemoteModuleAPI
    client = BlockingRegistryClient(sys.argv[1])
    client.publish_apis([RemoteAPI("A", [RemoteModuleAPI(["svc"], 50051, "grpc")])])
    print("published", flush=True)
    time.sleep(60)
    """
)


class HijackTests(E2ETestCase):
    async def test_other_uid_cannot_hijack(self) -> None:
        """
        Module A publishes over the unix socket and is bound to its process.
        Another uid, over loopback TCP with A's PID, cannot republish it,
        unpublish it (with or without a processID) or heartbeat it: each is a
        403 that names neither A's owner nor its PID, and A still points at
        its own port, bound to its own process.
        """
        _need_second_uid()
        directory = self.short_temp_dir()
        sock = os.path.join(directory, "registry.sock")
        daemon = self.spawn_registry(
            f"--endpoint=unix:{sock}:mode=666", "--endpoint=tcp:0:interface=127.0.0.1"
        )
        port = await self.tcp_port(daemon)
        victim = self.spawn([sys.executable, "-c", _VICTIM, f"unix://{sock}"])
        await victim.wait_for(re.compile(rb"published"), "stdout")
        assert victim.transport is not None
        victim_pid = victim.transport.pid

        attacker = await self.run_to_end(
            _as_nobody(sys.executable, "-c", _ATTACK, str(port), str(victim_pid))
        )
        self.assertExitCode(attacker, 0)
        answers = json.loads(attacker.stdout)
        self.assertEqual(answers["modules"][1]["owner"], "uid:0")
        for name in ("republish", "unpublish", "unpublish_pid", "heartbeat"):
            code, body = answers[name]
            self.assertEqual(code, 403, (name, body))
            self.assertIn("belongs to another identity", body["error"])
            self.assertNotIn(str(victim_pid), json.dumps(body))
            self.assertNotIn("uid:0", json.dumps(body))
        client = self.http_client()
        entry = await self.assertJSON(
            client, "GET", f"http://127.0.0.1:{port}/api/v1/modules/A", 200
        )
        self.assertEqual(entry["apis"][0]["serverPort"], 50051)
        self.assertEqual((entry["processBound"], entry["boundPID"]), (True, victim_pid))
        self.assertIn(
            b"Refused publish of module A by uid:65534", daemon.stderr, _text(daemon.stderr)
        )
