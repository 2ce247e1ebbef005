# -*- test-case-name: tests.test_client -*-
"""
L{BlockingRegistryClient}: a synchronous client on the standard library only,
for code with no reactor.  Each thread keeps its own persistent connection,
so one client may be shared by many threads.  Over C{https://} it verifies
the registry's certificate and name (L{ssl}) and may present a client
certificate; any transport may carry a bearer token.
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from hsu_registry.client.errors import RegistryError
from hsu_registry.client.events import EventParser, WatchEvent
from hsu_registry.client.model import (
    RegisteredModule,
    RemoteAPI,
    RemoteModuleAPI,
    ServiceProvider,
)
from hsu_registry.client.protocol import (
    Call,
    Health,
    check_timeout,
    discover_call,
    health_call,
    heartbeat_call,
    modules_call,
    publish_call,
    services_call,
    unavailable,
    unpublish_call,
)
from hsu_registry.client.urls import (
    ClientCredentials,
    RegistryAddress,
    client_credentials,
    parse_registry_url,
)

__all__ = ["BlockingRegistryClient"]

# Failures of a kept-alive connection that the server closed meanwhile: the
# request is sent again once on a fresh connection (every call is idempotent).
_STALE_CONNECTION = (
    http.client.RemoteDisconnected,
    http.client.BadStatusLine,
    ConnectionResetError,
    BrokenPipeError,
    # A TLS connection closed without close_notify.
    ssl.SSLEOFError,
)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class BlockingRegistryClient:
    """
    The registry client for synchronous code; the same methods as
    L{hsu_registry.client.RegistryClient}, returning results directly and
    raising L{hsu_registry.client.errors.RegistryError}s.

    @param timeout: seconds for connecting and for each answer.
    @param ca: for C{https://}: the PEM file of the CA(s) the registry's
        certificate must be signed by; its name must match the URL's host.
        Default: C{$HSU_REGISTRY_CA}, else the system's trusted CAs.
    @param cert: for C{https://}: the PEM file of the client certificate (and
        its chain) to present.  Default: C{$HSU_REGISTRY_CERT}, else none.
    @param key: its private key's PEM file.  Default: C{$HSU_REGISTRY_KEY},
        else C{cert}'s file.
    @param token: a bearer token sent with every request.  Default:
        C{$HSU_REGISTRY_TOKEN}, else none.
    @param environ: where the C{$HSU_REGISTRY_*} variables are looked up
        (default: L{os.environ}).

    @raise ValueError: for a bad URL, timeout, token, or a TLS file that cannot
        be read or used, saying which.
    """

    def __init__(
        self,
        url: str | None = None,
        timeout: float = 5.0,
        *,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        token: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.address: RegistryAddress = parse_registry_url(url, environ)
        self.timeout = check_timeout(timeout)
        self.credentials: ClientCredentials = client_credentials(
            self.address, ca, cert, key, token, environ
        )
        self._tls: ssl.SSLContext | None = (
            _tls_context(self.credentials) if self.address.tls else None
        )
        # The request headers, made once: the token costs nothing per request.
        self._plain_headers: dict[str, str] = {}
        authorization = self.credentials.authorization
        if authorization is not None:
            self._plain_headers["Authorization"] = authorization.decode("ascii")
        self._json_headers = {**self._plain_headers, "Content-Type": "application/json"}
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"<BlockingRegistryClient {self.address.url}>"

    def _new_connection(self, timeout: float) -> http.client.HTTPConnection:
        """A connection to the registry (not yet made) over its URL's transport."""
        if self.address.path is not None:
            return _UnixHTTPConnection(self.address.path, timeout)
        assert self.address.host is not None
        if self._tls is not None:
            return http.client.HTTPSConnection(
                self.address.host, self.address.port, timeout=timeout, context=self._tls
            )
        return http.client.HTTPConnection(self.address.host, self.address.port, timeout=timeout)

    def _connection(self) -> http.client.HTTPConnection:
        connection: http.client.HTTPConnection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = self._new_connection(self.timeout)
        return connection

    def _drop_connection(self) -> None:
        connection = getattr(self._local, "connection", None)
        self._local.connection = None
        if connection is not None:
            connection.close()

    def _exchange(self, call: Call) -> tuple[int, bytes]:
        connection = self._connection()
        reused = connection.sock is not None
        headers = self._json_headers if call.body is not None else self._plain_headers
        try:
            connection.request(call.method, self.address.target(call.path), call.body, headers)
            response = connection.getresponse()
            data = response.read()
        except _STALE_CONNECTION:
            self._drop_connection()
            if not reused:
                raise
            return self._exchange(call)
        except BaseException:
            self._drop_connection()
            raise
        if response.will_close:
            self._drop_connection()
        return response.status, data

    def _request(self, call: Call) -> Any:
        try:
            status, data = self._exchange(call)
        except TimeoutError:
            raise unavailable(self.address.url, f"no answer within {self.timeout:g}s") from None
        except (OSError, http.client.HTTPException) as e:
            raise unavailable(self.address.url, _describe(e)) from None
        return call.interpret(status, data)

    def publish_apis(self, remote_apis: Iterable[RemoteAPI], process_id: int | None = None) -> None:
        """
        Publish each module's APIs (one request per module) as C{process_id},
        by default this process.  Raises the first error after trying all.
        """
        pid = os.getpid() if process_id is None else process_id
        first: RegistryError | None = None
        for remote in remote_apis:
            try:
                self._request(publish_call(remote, pid))
            except RegistryError as e:
                first = first or e
        if first is not None:
            raise first

    def find_module_apis(self, module_id: str, passing: bool = False) -> list[RemoteModuleAPI]:
        """
        The APIs of C{module_id} (with C{passing}, only those whose health
        check passes, or that have none); raises L{ModuleNotFound} when it is
        not there.
        """
        result: list[RemoteModuleAPI] = self._request(discover_call(module_id, passing))
        return result

    def unpublish(self, module_id: str, process_id: int | None = None) -> None:
        """
        Remove C{module_id}'s registration; with C{process_id}, only if that
        process owns it.
        """
        self._request(unpublish_call(module_id, process_id))

    def heartbeat(self, module_id: str, process_id: int | None = None) -> None:
        """
        Tell the registry C{module_id} is alive; raises L{ModuleNotFound} when it
        is not registered (publish again).
        """
        self._request(heartbeat_call(module_id, process_id))

    def health(self) -> Health:
        result: Health = self._request(health_call())
        return result

    def list_modules(self) -> list[RegisteredModule]:
        """Every registration of the registry's catalog (C{GET /api/v1/modules})."""
        result: list[RegisteredModule] = self._request(modules_call())
        return result

    def find_service_providers(
        self, service_id: str, passing: bool = False
    ) -> list[ServiceProvider]:
        """
        The modules serving C{service_id}, each with its APIs that serve it
        (with C{passing}, only the APIs whose health check passes, or that
        have none, and only the modules left with one); an empty list when
        nobody serves it.
        """
        result: list[ServiceProvider] = self._request(services_call(service_id, passing))
        return result

    def watch_events(
        self, last_index: int | None = None, epoch: str | None = None, idle_timeout: float = 45.0
    ) -> Iterator[WatchEvent]:
        """
        Follow the registry's changes: yield each L{WatchEvent} as it comes
        (C{hello} first, C{resync} when changes were missed).  It runs on its
        own connection until the caller stops iterating; a lost or silent
        stream raises L{RegistryUnavailable}; resume with the last event's
        index and epoch.
        """
        connection = self._new_connection(idle_timeout)
        headers = {**self._plain_headers, "Accept": "text/event-stream"}
        if last_index is not None:
            headers["Last-Event-ID"] = str(last_index)
            if epoch:
                headers["X-HSU-Epoch"] = epoch
        parser = EventParser()
        try:
            try:
                connection.request("GET", self.address.target("/api/v1/watch"), headers=headers)
                response = connection.getresponse()
                if response.status != 200:
                    health_call().interpret(response.status, response.read())
                while True:
                    chunk = response.read1(65536)
                    if not chunk:
                        raise unavailable(self.address.url, "the watch stream ended")
                    yield from parser.feed(chunk)
            except TimeoutError:
                raise unavailable(
                    self.address.url, f"the watch stream was silent for {idle_timeout:g}s"
                ) from None
            except (OSError, http.client.HTTPException) as e:
                raise unavailable(self.address.url, _describe(e)) from None
        finally:
            connection.close()

    def close(self) -> None:
        """Close this thread's connection (others close when their threads end)."""
        self._drop_connection()


def _tls_context(credentials: ClientCredentials) -> ssl.SSLContext:
    """
    The TLS settings of an https registry: its certificate verified against
    C{credentials.ca} (else the system's CAs) and its name against the URL's
    host (C{check_hostname}); C{credentials.cert} presented when given.

    @raise ValueError: when a file cannot be read or used, saying which.
    """
    ca, cert, key = credentials.ca, credentials.cert, credentials.key
    for path, what in ((ca, "CA file"), (cert, "client certificate"), (key, "client key")):
        if path is not None:
            try:
                with open(path, "rb"):
                    pass
            except OSError as e:
                raise ValueError(f"cannot read the {what} {path!r}: {e.strerror or e}") from None
    try:
        context = ssl.create_default_context(cafile=ca)
    except ssl.SSLError as e:
        raise ValueError(
            f"the CA file {ca!r} holds no usable PEM certificate ({_ssl_reason(e)})"
        ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        try:
            # The callable refuses an encrypted key rather than let OpenSSL
            # prompt for its passphrase on the terminal.
            context.load_cert_chain(cert, key, password=_no_passphrase)
        except (ValueError, ssl.SSLError) as e:
            reason = _ssl_reason(e) if isinstance(e, ssl.SSLError) else str(e)
            raise ValueError(
                f"cannot use the client certificate {cert!r} with the key {key or cert!r}: {reason}"
            ) from None
    return context


def _no_passphrase() -> bytes:
    raise ValueError("the key is encrypted (an unencrypted PEM key is needed)")


def _ssl_reason(error: ssl.SSLError) -> str:
    if error.reason == "KEY_VALUES_MISMATCH":
        return "the key is not the certificate's"
    if error.reason is None and "PEM lib" in str(error):
        return "expected a PEM certificate and an unencrypted PEM private key"
    return (error.reason or str(error)).replace("_", " ").lower()


def _describe(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    if isinstance(error, FileNotFoundError):
        text = "the socket does not exist"
    elif isinstance(error, ConnectionRefusedError):
        text = "connection refused"
    return " ".join(text.split())
