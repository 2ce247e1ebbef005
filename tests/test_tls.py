"""
Tests for L{hsu_registry.security.tls} and TLS in the clients and
C{hsu-registry-ctl}: the ``mtls:`` endpoint (its plugin, its options, its
errors), a real ``mtls:`` listener serving the registry that admits only
clients with a certificate of its CA (no certificate, another CA's and an
expired one fail the handshake: both clients say RegistryUnavailable at
once), the clients' verification of the server's certificate and name, the
identity a client certificate proves, and bearer tokens.

Every certificate is made in the test (trustme, and cryptography for the
names trustme cannot put in one, such as a SPIFFE URI).
"""

from __future__ import annotations

import ast
import datetime
import http.client
import io
import json
import os
import ssl
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from hsu_registry.client import (
    BlockingRegistryClient,
    RegistryClient,
    RegistryRejected,
    RegistryUnavailable,
    RemoteAPI,
    RemoteModuleAPI,
    WatchEvent,
)
from hsu_registry.config import RegistryConfig
from hsu_registry.ctl import EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, run
from hsu_registry.endpoints import check_description
from hsu_registry.security.identity import Identity
from hsu_registry.security.policy import load_policy
from hsu_registry.security.tls import DEFAULT_BACKLOG, certificate_identity, certificate_name
from hsu_registry.service import makeService

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.path.join(ROOT, "twisted", "plugins", "hsu_registry_mtls.py")

ECHO = RemoteAPI("echo", [RemoteModuleAPI(["echo.v1"], 50051, "grpc")])
SPIFFE_ID = "spiffe://example.org/echo"


# -- certificates ----------------------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _leaf(
    ca: trustme.CA,
    *,
    uris: Sequence[str] = (),
    dns: Sequence[str] = (),
    common_name: str | None = None,
) -> tuple[x509.Certificate, bytes]:
    """
    A client certificate signed by C{ca} with exactly the names given (trustme
    puts no URI in a certificate, and always some name), and its key's PEM.
    """
    ca_key: Any = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(hours=1))
        .not_valid_after(_now() + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    certificate = builder.sign(ca_key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return certificate, key_pem


class Certificates:
    """A CA and certificates it issued, written as PEM files under C{directory}."""

    def __init__(self, directory: str, ca: trustme.CA | None = None) -> None:
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.ca = trustme.CA() if ca is None else ca
        self.ca_file = self.write("ca.pem", self.ca.cert_pem.bytes())

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.directory, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def issue(self, name: str, *identities: str, **options: Any) -> tuple[str, str]:
        """A certificate (trustme's) for C{identities}: its file (with its chain) and its key's."""
        leaf = self.ca.issue_cert(*identities, **options)
        chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        return self.write(f"{name}.pem", chain), self.write(
            f"{name}.key", leaf.private_key_pem.bytes()
        )

    def issue_named(self, name: str, **names: Any) -> tuple[str, str]:
        """A client certificate with exactly the names of L{_leaf}: its file and its key's."""
        certificate, key = _leaf(self.ca, **names)
        pem = certificate.public_bytes(serialization.Encoding.PEM)
        return self.write(f"{name}.pem", pem), self.write(f"{name}.key", key)


def mtls_description(port: int | str, cert: str, key: str, ca: str) -> str:
    return f"mtls:{port}:interface=127.0.0.1:certKey={cert}:privateKey={key}:caCerts={ca}"


# -- the endpoint ------------------------------------------------------------------


class EndpointTests(SynchronousTestCase):
    """The ``mtls:`` endpoint string: its plugin, options and errors."""

    def setUp(self) -> None:
        self.pki = Certificates(self.mktemp())
        self.cert, self.key = self.pki.issue("server", "127.0.0.1", "localhost")

    def test_plugin(self) -> None:
        """An endpoint parser plugin answers to the prefix ``mtls``."""
        prefixes = [p.prefix for p in getPlugins(IStreamServerEndpointStringParser)]
        self.assertIn("mtls", prefixes)

    def test_plugin_is_lazy(self) -> None:
        """
        The plugin module imports only Twisted's interfaces and zope at its
        top level, and importing it (as every endpoint-parser lookup does)
        loads nothing of hsu_registry, no Klein and no reactor.
        """
        with open(PLUGIN, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        top = {
            alias.name if isinstance(node, ast.Import) else node.module
            for node in tree.body
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names
        }
        self.assertEqual(
            top,
            {
                "__future__",
                "typing",
                "twisted.internet.interfaces",
                "twisted.plugin",
                "zope.interface",
            },
        )
        probe = (
            "import sys; from twisted.plugins import hsu_registry_mtls; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('hsu_registry', 'klein')"
            " or m == 'twisted.internet.reactor'))"
        )
        result = subprocess.run(
            [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        self.assertEqual((result.returncode, result.stdout.strip()), (0, "[]"), result.stderr)

    def test_requires_client_certificates(self) -> None:
        """
        ``mtls:`` listens with TLS on the given port and interface, and asks
        for a client certificate, failing the handshake without one.
        """
        memory = MemoryReactor()
        description = mtls_description(8443, self.cert, self.key, self.pki.ca_file)
        serverFromString(memory, description).listen(Site(Resource()))
        ((port, _factory, options, backlog, interface),) = memory.sslServers
        self.assertEqual((port, backlog, interface), (8443, DEFAULT_BACKLOG, "127.0.0.1"))
        required = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        self.assertEqual(options.getContext().get_verify_mode() & required, required)

    def test_options(self) -> None:
        """
        ``port=`` may be named, ``backlog=`` is taken, and one file may hold
        the certificate and its key (C{privateKey} alone, as for ssl:).
        """
        both = self.pki.write("both.pem", _content(self.cert) + _content(self.key))
        memory = MemoryReactor()
        serverFromString(
            memory, f"mtls:port=1234:backlog=7:privateKey={both}:caCerts={self.pki.ca_file}"
        ).listen(Site(Resource()))
        ((port, _factory, _options, backlog, interface),) = memory.sslServers
        self.assertEqual((port, backlog, interface), (1234, 7, ""))

    def test_check_description(self) -> None:
        """The daemon's --endpoint check accepts an ``mtls:`` description."""
        description = mtls_description(8443, self.cert, self.key, self.pki.ca_file)
        parsed = check_description(description)
        self.assertEqual((parsed.kind, parsed.args), ("mtls", ("8443",)))

    def assertRefused(self, description: str, *expected: str) -> str:
        """C{check_description} refuses C{description} in one line holding C{expected}."""
        with self.assertRaises(ValueError) as caught:
            check_description(description)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        for text in expected:
            self.assertIn(text, message)
        return message

    def test_missing_files(self) -> None:
        """A file that does not exist is named, with the option it was given for."""
        missing = os.path.join(self.pki.directory, "missing.pem")
        ca = self.pki.ca_file
        self.assertRefused(
            mtls_description(8443, self.cert, self.key, missing),
            "caCerts",
            missing,
            "No such file",
        )
        self.assertRefused(
            mtls_description(8443, missing, self.key, ca), "certificate file", missing
        )
        self.assertRefused(
            mtls_description(8443, self.cert, missing, ca), "private key file", missing
        )

    def test_bad_files(self) -> None:
        """A file that holds no certificate, or a key that is not the certificate's, is refused."""
        empty = self.pki.write("empty.pem", b"nothing here\n")
        self.assertRefused(
            mtls_description(8443, self.cert, self.key, empty), "holds no PEM certificate"
        )
        self.assertRefused(
            mtls_description(8443, self.cert, empty, self.pki.ca_file), "no usable PEM private key"
        )
        _other_cert, other_key = self.pki.issue("other", "other.example")
        self.assertRefused(
            mtls_description(8443, self.cert, other_key, self.pki.ca_file), "does not match"
        )

    def test_bad_options(self) -> None:
        """Missing, malformed and unknown options are each said plainly."""
        ca = self.pki.ca_file
        self.assertRefused(f"mtls:8443:certKey={self.cert}:privateKey={self.key}", "caCerts")
        self.assertRefused(f"mtls:8443:caCerts={ca}", "certKey", "privateKey")
        self.assertRefused(mtls_description("http", self.cert, self.key, ca), "the port 'http'")
        self.assertRefused(
            mtls_description(8443, self.cert, self.key, ca) + ":sslmethod=TLSv1_2_METHOD",
            "mtls endpoints have no option 'sslmethod'",
        )
        self.assertRefused(f"mtls:8443:9443:certKey={self.cert}:caCerts={ca}", "one port")
        self.assertRefused(
            mtls_description(8443, self.cert, self.key, ca) + ":backlog=0", "the backlog '0'"
        )


def _content(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# -- identities --------------------------------------------------------------------


class _PeerTransport(StringTransport):
    """A transport whose peer presented C{certificate} (None: no certificate)."""

    def __init__(self, certificate: x509.Certificate | None) -> None:
        super().__init__()
        self.certificate = certificate

    def getPeerCertificate(self) -> crypto.X509 | None:
        if self.certificate is None:
            return None
        return crypto.X509.from_cryptography(self.certificate)


class _NotConnected(StringTransport):
    def getPeerCertificate(self) -> None:
        raise SSL.Error("no TLS connection")


class IdentityTests(SynchronousTestCase):
    """certificate_identity: the first URI name, else DNS name, else common name."""

    def setUp(self) -> None:
        self.ca = trustme.CA()

    def identity(self, **names: Any) -> Identity | None:
        certificate, _key = _leaf(self.ca, **names)
        return certificate_identity(_PeerTransport(certificate))

    def test_uri(self) -> None:
        """The first URI name wins over DNS names and the common name (a SPIFFE ID)."""
        identity = self.identity(
            uris=[SPIFFE_ID, "spiffe://example.org/other"],
            dns=["echo.example.org"],
            common_name="echo",
        )
        self.assertEqual(identity, Identity("x509", SPIFFE_ID))
        assert identity is not None
        self.assertEqual(identity.principal, f"x509:{SPIFFE_ID}")

    def test_dns(self) -> None:
        """Without a URI name, the first DNS name."""
        identity = self.identity(dns=["echo.example.org", "b.example.org"], common_name="echo")
        self.assertEqual(identity, Identity("x509", "echo.example.org"))

    def test_common_name(self) -> None:
        """Without alternative names, the subject's common name."""
        self.assertEqual(self.identity(common_name="echo"), Identity("x509", "echo"))

    def test_nameless(self) -> None:
        """A certificate with none of these names proves no identity."""
        self.assertIsNone(self.identity())
        certificate, _key = _leaf(self.ca)
        self.assertIsNone(certificate_name(certificate))

    def test_not_tls(self) -> None:
        """Plain transports, TLS without a peer certificate, and a failed lookup give None."""
        self.assertIsNone(certificate_identity(StringTransport()))
        self.assertIsNone(certificate_identity(object()))
        self.assertIsNone(certificate_identity(_PeerTransport(None)))
        self.assertIsNone(certificate_identity(_NotConnected()))


# -- a real mtls: registry -----------------------------------------------------------


class _WhoAmI(Resource):
    """Answers with the identity the request's transport proves (for the tests)."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        identity = certificate_identity(request.transport)
        return str(identity.principal if identity is not None else None).encode()


class _Recorder(Resource):
    """Records each request's Authorization header and answers a health document."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, bytes, bytes | None]] = []
        self.watched: Deferred[None] = Deferred()

    def render(self, request: Request) -> bytes:
        assert request.method is not None and request.path is not None
        self.seen.append((request.method, request.path, request.getHeader(b"authorization")))
        request.setHeader(b"content-type", b"application/json")
        if request.path.endswith(b"/watch"):
            request.setResponseCode(503)
            watched, self.watched = self.watched, Deferred()
            watched.callback(None)
        if request.path.endswith(b"/modules"):
            request.setHeader(b"x-hsu-index", b"1")
            request.setHeader(b"x-hsu-epoch", b"e")
            return b'{"modules":[]}'
        return b'{"status":"healthy","registeredModules":0,"totalAPIs":0,"uptime":"1s"}'


def _in_thread(client: BlockingRegistryClient, function: Any, *args: Any) -> Deferred[Any]:
    """
    Call C{function} in a worker thread, then close C{client}'s connection
    there: each thread has its own, and one left open dirties the reactor.
    """

    def call() -> Any:
        try:
            return function(*args)
        finally:
            client.close()

    return deferToThread(call)


def _error_of(function: Any, *args: Any) -> Exception | None:
    try:
        function(*args)
    except Exception as e:
        return e
    return None


class TLSRegistryTests(TestCase):
    """
    The daemon on a real ``mtls:`` listener (127.0.0.1): both clients and the
    command work with a certificate of its CA and are refused, at the
    handshake, without one.
    """

    def setUp(self) -> None:
        self.pki = Certificates(self.mktemp())
        self.server_cert, self.server_key = self.pki.issue("server", "127.0.0.1", "localhost")
        self.client_cert, self.client_key = self.pki.issue(
            "client", "client.example.org", common_name="client"
        )
        self.service = makeService(
            RegistryConfig(
                endpoints=(
                    mtls_description(0, self.server_cert, self.server_key, self.pki.ca_file),
                )
            ),
            reactor,
        )
        self.service.checks.clock = Clock()  # no health checks of the published ports
        self.service.startService()
        self.addCleanup(self.service.stopService)
        port = self.service.listeners[0].port
        assert port is not None
        self.url = f"https://127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]

    def credentials(self, cert: str | None = None, key: str | None = None) -> dict[str, Any]:
        """The keyword arguments of a client with the CA and C{cert} (default: the good one)."""
        if cert is None:
            cert, key = self.client_cert, self.client_key
        return {"ca": self.pki.ca_file, "cert": cert, "key": key, "environ": {}}

    def async_client(self, url: str | None = None, **credentials: Any) -> RegistryClient:
        client = RegistryClient(url or self.url, reactor, **(credentials or self.credentials()))
        self.addCleanup(client.close)
        return client

    def listen(self, description: str, site: Site) -> Deferred[str]:
        """Listen on another C{mtls:} port with C{site}; fire with its https URL."""

        def listening(port: Any) -> str:
            self.addCleanup(port.stopListening)
            return f"https://127.0.0.1:{port.getHost().port}"

        return serverFromString(reactor, description).listen(site).addCallback(listening)

    async def test_async_client(self) -> None:
        """RegistryClient publishes, discovers and lists over mutual TLS."""
        client = self.async_client()
        await client.publish_apis([ECHO], process_id=7)
        self.assertEqual(await client.find_module_apis("echo"), list(ECHO.apis))
        self.assertEqual([m.module_id for m in await client.list_modules()], ["echo"])
        catalog = await client.catalog()
        self.assertIn("echo", catalog.modules)
        registration = self.service.registry.get("echo")
        assert registration is not None
        self.assertEqual(registration.process_id, 7)

    async def test_async_watch(self) -> None:
        """The async client's watch stream runs over TLS: hello, then the change."""
        client = self.async_client()
        events: list[WatchEvent] = []
        published: Deferred[None] = Deferred()

        def seen(event: WatchEvent) -> None:
            events.append(event)
            if event.kind == "hello":
                client.publish_apis([ECHO], process_id=0)
            elif event.kind == "published" and not published.called:
                published.callback(None)

        watch = client.watch(seen)
        self.addCleanup(watch.stop)
        await published
        self.assertEqual([e.kind for e in events], ["hello", "published"])
        self.assertEqual(events[1].module_id, "echo")

    def blocking_round_trip(self) -> list[Any]:
        client = BlockingRegistryClient(self.url, **self.credentials())
        try:
            client.publish_apis([ECHO], process_id=7)
            found = client.find_module_apis("echo")
            health = client.health()
            first = next(iter(client.watch_events()))
            return [found, health.registered_modules, first.kind]
        finally:
            client.close()

    async def test_blocking_client(self) -> None:
        """BlockingRegistryClient publishes, discovers and watches over mutual TLS."""
        result = await deferToThread(self.blocking_round_trip)
        self.assertEqual(result, [list(ECHO.apis), 1, "hello"])

    async def assertBothRefused(self, url: str, why: str, **credentials: Any) -> list[str]:
        """
        Both clients with C{credentials} fail with RegistryUnavailable (not a
        timeout: the handshake failed), saying C{why}; return their messages.
        """
        client = self.async_client(url, **credentials)
        with self.assertRaises(RegistryUnavailable) as caught:
            await client.health()
        blocking = BlockingRegistryClient(url, **credentials)
        error = await _in_thread(blocking, _error_of, blocking.health)
        self.assertIsInstance(error, RegistryUnavailable)
        messages = [str(caught.exception), str(error)]
        for message in messages:
            self.assertNotIn("no answer within", message)
            self.assertIn(why, message.lower())
        self.assertIsNone(self.service.registry.get("echo"))
        return messages

    async def test_no_client_certificate(self) -> None:
        """A client without a certificate is refused at the handshake."""
        await self.assertBothRefused(
            self.url, "certificate required", ca=self.pki.ca_file, environ={}
        )

    async def test_other_ca(self) -> None:
        """A certificate signed by another CA is refused at the handshake."""
        other = Certificates(os.path.join(self.pki.directory, "other"))
        cert, key = other.issue("client", "client.example.org")
        await self.assertBothRefused(self.url, "unknown ca", **self.credentials(cert, key))

    async def test_expired_certificate(self) -> None:
        """An expired certificate of the right CA is refused at the handshake."""
        cert, key = self.pki.issue(
            "expired",
            "client.example.org",
            not_before=_now() - datetime.timedelta(days=2),
            not_after=_now() - datetime.timedelta(days=1),
        )
        await self.assertBothRefused(self.url, "expired", **self.credentials(cert, key))

    async def test_server_for_another_name(self) -> None:
        """The clients refuse a server whose certificate (of their CA) is for another name."""
        cert, key = self.pki.issue("elsewhere", "registry.example.org")
        url = await self.listen(mtls_description(0, cert, key, self.pki.ca_file), self.service.site)
        messages = await self.assertBothRefused(url, "mismatch", **self.credentials())
        self.assertIn("not for the url's host", messages[0].lower())

    async def test_server_of_unknown_ca(self) -> None:
        """The clients refuse a server whose certificate is not signed by their CA."""
        other = Certificates(os.path.join(self.pki.directory, "other"))
        cert, key = other.issue("server", "127.0.0.1")
        url = await self.listen(mtls_description(0, cert, key, self.pki.ca_file), self.service.site)
        await self.assertBothRefused(url, "verify failed", **self.credentials())

    async def test_chains(self) -> None:
        """
        A server and a client certificate issued by an intermediate CA work
        when their files hold the chain: both sides trust only the root.
        """
        intermediate = Certificates(
            os.path.join(self.pki.directory, "intermediate"), self.pki.ca.create_child_ca()
        )
        server_cert, server_key = intermediate.issue("server", "127.0.0.1")
        client_cert, client_key = intermediate.issue("client", "client.example.org")
        url = await self.listen(
            mtls_description(0, server_cert, server_key, self.pki.ca_file), self.service.site
        )
        credentials = self.credentials(client_cert, client_key)
        health = await self.async_client(url, **credentials).health()
        self.assertEqual(health.status, "healthy")
        blocking = BlockingRegistryClient(url, **credentials)
        health = await _in_thread(blocking, blocking.health)
        self.assertEqual(health.status, "healthy")

    async def test_identity(self) -> None:
        """
        A request's transport on an ``mtls:`` listener proves the client
        certificate's identity: its URI name, else its DNS name; a plain TCP
        request proves none.
        """
        site = Site(_WhoAmI())
        url = await self.listen(
            mtls_description(0, self.server_cert, self.server_key, self.pki.ca_file), site
        )
        port = int(url.rpartition(":")[2])
        spiffe = self.pki.issue_named("spiffe", uris=[SPIFFE_ID], dns=["echo.example.org"])
        dns = self.pki.issue_named("dns", dns=["echo.example.org"], common_name="echo")

        def who(cert: str, key: str) -> str:
            context = ssl.create_default_context(cafile=self.pki.ca_file)
            context.load_cert_chain(cert, key)
            connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=5)
            try:
                connection.request("GET", "/")
                return connection.getresponse().read().decode()
            finally:
                connection.close()

        self.assertEqual(await deferToThread(who, *spiffe), f"x509:{SPIFFE_ID}")
        self.assertEqual(await deferToThread(who, *dns), "x509:echo.example.org")
        plain = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(plain.stopListening)

        def plain_who() -> str:
            connection = http.client.HTTPConnection("127.0.0.1", plain.getHost().port, timeout=5)
            try:
                connection.request("GET", "/")
                return connection.getresponse().read().decode()
            finally:
                connection.close()

        self.assertEqual(await deferToThread(plain_who), "None")

    async def test_certificate_owns_and_policy_applies(self) -> None:
        """
        A module published over mTLS belongs to the client certificate's
        identity; with a policy granting each certificate its own module, a
        certificate for module B cannot publish A (403) and nothing changes.
        """
        policy = os.path.abspath(self.mktemp()) + ".toml"
        with open(policy, "w") as f:
            f.write(
                '[[grant]]\nwho = ["x509:spiffe://example.org/b"]\npublish = ["b"]\n'
                '[[grant]]\nwho = ["x509:spiffe://example.org/a"]\npublish = ["a"]\n'
            )
        self.service.registry.policy = load_policy(policy)
        b_cert, b_key = self.pki.issue_named("b", uris=["spiffe://example.org/b"])
        client = self.async_client(**self.credentials(b_cert, b_key))
        await client.publish_apis([RemoteAPI("b", list(ECHO.apis))], process_id=0)
        registration = self.service.registry.get("b")
        assert registration is not None
        self.assertEqual(registration.owner, "x509:spiffe://example.org/b")
        refused: Deferred[Any] = client.publish_apis(
            [RemoteAPI("a", list(ECHO.apis))], process_id=0
        )  # type: ignore[assignment]
        error = await self.assertFailure(refused, RegistryRejected)
        self.assertEqual(error.status, 403)
        self.assertIn("may not publish module 'a'", error.message)
        self.assertIsNone(self.service.registry.get("a"))

    async def test_token(self) -> None:
        """
        A token is sent as C{Authorization: Bearer} with every request of
        both clients, their watch streams included, over TLS and plain HTTP.
        """
        recorder = _Recorder()
        site = Site(recorder)
        tls_url = await self.listen(
            mtls_description(0, self.server_cert, self.server_key, self.pki.ca_file), site
        )
        plain = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(plain.stopListening)
        plain_url = f"http://127.0.0.1:{plain.getHost().port}"
        for url, credentials in ((tls_url, self.credentials()), (plain_url, {"environ": {}})):
            del recorder.seen[:]
            client = self.async_client(url, token="s3cret.t0ken", **credentials)
            await client.health()
            await client.publish_apis([ECHO], process_id=0)
            await client.catalog()
            watched = recorder.watched
            watch = client.watch(lambda event: None)
            self.addCleanup(watch.stop)
            await watched  # answered 503: the watch would retry later
            watch.stop()
            blocking = BlockingRegistryClient(url, token="s3cret.t0ken", **credentials)

            def calls(blocking: BlockingRegistryClient = blocking) -> None:
                blocking.health()
                blocking.publish_apis([ECHO], 0)
                _error_of(next, iter(blocking.watch_events()))

            await _in_thread(blocking, calls)
            self.assertEqual(
                [(method, path) for method, path, _ in recorder.seen],
                [
                    (b"GET", b"/api/v1/health"),
                    (b"POST", b"/api/v1/publish"),
                    (b"GET", b"/api/v1/modules"),
                    (b"GET", b"/api/v1/watch"),
                    (b"GET", b"/api/v1/health"),
                    (b"POST", b"/api/v1/publish"),
                    (b"GET", b"/api/v1/watch"),
                ],
                url,
            )
            self.assertEqual(
                {header for _, _, header in recorder.seen}, {b"Bearer s3cret.t0ken"}, url
            )

    async def ctl(
        self, *argv: str, environ: Mapping[str, str] | None = None
    ) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = await deferToThread(run, list(argv), out, err, {} if environ is None else environ)
        return code, out.getvalue(), err.getvalue()

    async def test_ctl(self) -> None:
        """hsu-registry-ctl publishes and discovers with --ca/--cert/--key."""
        tls = ["--url", self.url, "--ca", self.pki.ca_file]
        tls += ["--cert", self.client_cert, "--key", self.client_key]
        code, out, err = await self.ctl(
            *tls, "publish", "echo", "--service", "echo.v1", "--port", "50051", "--protocol", "grpc"
        )
        self.assertEqual((code, err), (EXIT_OK, ""), out)
        code, out, err = await self.ctl(*tls, "--json", "discover", "echo")
        self.assertEqual((code, err), (EXIT_OK, ""))
        self.assertEqual(json.loads(out)["apis"][0]["serverPort"], 50051)

    async def test_ctl_environment(self) -> None:
        """hsu-registry-ctl reads the URL, CA, certificate and key from the environment."""
        environ = {
            "HSU_REGISTRY_URL": self.url,
            "HSU_REGISTRY_CA": self.pki.ca_file,
            "HSU_REGISTRY_CERT": self.client_cert,
            "HSU_REGISTRY_KEY": self.client_key,
        }
        code, out, err = await self.ctl("health", environ=environ)
        self.assertEqual((code, err), (EXIT_OK, ""))
        self.assertIn("healthy", out)

    async def test_ctl_refused(self) -> None:
        """
        Without a client certificate the registry is unavailable (exit 3); a
        missing CA file, or TLS options for a plain URL, are usage errors
        (exit 2); each in one line.
        """
        code, out, err = await self.ctl("--url", self.url, "--ca", self.pki.ca_file, "health")
        self.assertEqual((code, out, len(err.splitlines())), (EXIT_UNAVAILABLE, "", 1))
        missing = os.path.join(self.pki.directory, "missing.pem")
        code, out, err = await self.ctl("--url", self.url, "--ca", missing, "health")
        self.assertEqual((code, out, len(err.splitlines())), (EXIT_USAGE, "", 1))
        self.assertIn(missing, err)
        code, out, err = await self.ctl(
            "health", "--url", "http://127.0.0.1:1", "--ca", self.pki.ca_file
        )
        self.assertEqual((code, out, len(err.splitlines())), (EXIT_USAGE, "", 1))
        self.assertIn("https://", err)


# -- client configuration ------------------------------------------------------------


class ClientConfigurationTests(SynchronousTestCase):
    """How the clients take their URL, CA, certificate, key and token."""

    def setUp(self) -> None:
        self.pki = Certificates(self.mktemp())
        self.cert, self.key = self.pki.issue("client", "client.example.org")

    def clients(self, url: str, **options: Any) -> list[Any]:
        return [
            BlockingRegistryClient(url, **options),
            RegistryClient(url, MemoryReactorClock(), **options),
        ]

    def test_https_url(self) -> None:
        """An https:// URL (with a base path) is TLS; http:// and tcp:// are not."""
        for client in self.clients("https://registry.example.org:8443/reg", environ={}):
            self.assertTrue(client.address.tls)
            self.assertEqual(client.address.base, b"https://registry.example.org:8443/reg")
        for client in self.clients("tcp://127.0.0.1:1", environ={}):
            self.assertFalse(client.address.tls)

    def test_environment(self) -> None:
        """
        The URL, CA, certificate, key and token come from $HSU_REGISTRY_*
        when not given; what is given wins.
        """
        other = self.pki.write("other-ca.pem", _content(self.pki.ca_file))
        environ = {
            "HSU_REGISTRY_URL": "https://127.0.0.1:8443",
            "HSU_REGISTRY_CA": self.pki.ca_file,
            "HSU_REGISTRY_CERT": self.cert,
            "HSU_REGISTRY_KEY": self.key,
            "HSU_REGISTRY_TOKEN": "from-env",
        }
        for client in self.clients(None, environ=environ):  # type: ignore[arg-type]
            self.assertEqual(client.address.url, "https://127.0.0.1:8443")
            credentials = client.credentials
            self.assertEqual(
                (credentials.ca, credentials.cert, credentials.key, credentials.token),
                (self.pki.ca_file, self.cert, self.key, "from-env"),
            )
        for client in self.clients(None, ca=other, token="given", environ=environ):  # type: ignore[arg-type]
            self.assertEqual((client.credentials.ca, client.credentials.token), (other, "given"))

    def test_plain_url_ignores_tls_environment(self) -> None:
        """For a plain URL the TLS variables are ignored (the token is not)."""
        environ = {"HSU_REGISTRY_CA": "/nonexistent/ca.pem", "HSU_REGISTRY_TOKEN": "t"}
        for client in self.clients("tcp://127.0.0.1:1", environ=environ):
            self.assertEqual(client.credentials.ca, None)
            self.assertEqual(client.credentials.token, "t")

    def test_refused(self) -> None:
        """
        TLS files for a plain URL, a key without its certificate, a token
        that is no bearer token, and unreadable files raise ValueError, in
        one line naming what is wrong.
        """
        missing = os.path.join(self.pki.directory, "missing.pem")
        key = serialization.load_pem_private_key(_content(self.key), None)
        encrypted = self.pki.write(
            "encrypted.key",
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"passphrase"),
            ),
        )
        cases: list[tuple[str, dict[str, Any], str]] = [
            ("http://127.0.0.1:1", {"ca": self.pki.ca_file}, "https://"),
            ("https://127.0.0.1:1", {"key": self.key}, "without its certificate"),
            ("tcp://127.0.0.1:1", {"token": "a b"}, "bearer token"),
            ("tcp://127.0.0.1:1", {"token": "a\r\nX-Evil: 1"}, "bearer token"),
            ("https://127.0.0.1:1", {"ca": missing}, missing),
            ("https://127.0.0.1:1", {"cert": missing}, missing),
            ("https://127.0.0.1:1", {"cert": self.cert, "key": self.pki.ca_file}, "key"),
            ("https://127.0.0.1:1", {"cert": self.cert, "key": encrypted}, "encrypted"),
        ]
        for url, options, expected in cases:
            for make in (BlockingRegistryClient, _async_client):
                with self.assertRaises(ValueError) as caught:
                    make(url, environ={}, **options)
                message = str(caught.exception)
                self.assertIn(expected, message, (make, url, options))
                self.assertNotIn("\n", message)


def _async_client(url: str, **options: Any) -> RegistryClient:
    return RegistryClient(url, MemoryReactorClock(), **options)
