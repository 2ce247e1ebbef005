# -*- test-case-name: tests.test_client -*-
"""
L{RegistryClient}: the Twisted-native client, on L{twisted.web.client.Agent}
with persistent connections, over TCP, TLS (C{https://}, with an optional
client certificate) or a unix socket, with an optional bearer token.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IConsumer, IStreamClientEndpoint
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from hsu_registry.client.errors import RegistryError, RegistryUnavailable
from hsu_registry.client.events import WatchEvent
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
from hsu_registry.client.watching import Catalog, Watch

if TYPE_CHECKING:
    from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

__all__ = ["RegistryClient"]

_JSON_HEADERS = Headers({b"content-type": [b"application/json"]})


@implementer(IAgentEndpointFactory)
class _FixedEndpoint:
    """Every request goes to the registry, whatever the URL's host says."""

    def __init__(
        self,
        reactor: Any,
        address: RegistryAddress,
        timeout: float,
        tls: IOpenSSLClientConnectionCreator | None = None,
    ) -> None:
        self._reactor = reactor
        self._address = address
        self._timeout = timeout
        self._tls = tls

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        if self._address.path is not None:
            return UNIXClientEndpoint(self._reactor, self._address.path, timeout=self._timeout)
        assert self._address.host is not None and self._address.port is not None
        endpoint = HostnameEndpoint(
            self._reactor, self._address.host, self._address.port, timeout=self._timeout
        )
        return endpoint if self._tls is None else wrapClientTLS(self._tls, endpoint)


class RegistryClient:
    """
    A client of the registry for code on a reactor.  Every method returns a
    Deferred that fires with the result or fails with a
    L{hsu_registry.client.errors.RegistryError}, within C{timeout} seconds.

    @param url: C{tcp://host:port}, C{http://host:port}, C{https://host:port}
        (any with a base path) or C{unix:///path}; default C{$HSU_REGISTRY_URL},
        else the daemon's default.
    @param reactor: default: the global reactor.
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
        reactor: Any = None,
        timeout: float = 5.0,
        *,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        token: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.address = parse_registry_url(url, environ)
        timeout = check_timeout(timeout)
        self.credentials: ClientCredentials = client_credentials(
            self.address, ca, cert, key, token, environ
        )
        tls: IOpenSSLClientConnectionCreator | None = None
        if self.address.tls:
            # Imported here: plain http and unix clients never load pyOpenSSL.
            from hsu_registry.security.tls import client_tls_options

            assert self.address.host is not None
            tls = client_tls_options(
                self.address.host, self.credentials.ca, self.credentials.cert, self.credentials.key
            )
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self._reactor = reactor
        self.timeout = timeout
        # The request headers, made once: the token costs nothing per request.
        self._authorization = self.credentials.authorization
        self._plain_headers: Headers | None = None
        self._json_headers = _JSON_HEADERS
        if self._authorization is not None:
            self._plain_headers = Headers({b"authorization": [self._authorization]})
            self._json_headers = Headers(
                {b"content-type": [b"application/json"], b"authorization": [self._authorization]}
            )
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 4
        self._endpoints = _FixedEndpoint(reactor, self.address, timeout, tls)
        self._agent = Agent.usingEndpointFactory(reactor, self._endpoints, pool=self._pool)

    def __repr__(self) -> str:
        return f"<RegistryClient {self.address.url}>"

    def _request(self, call: Call) -> Deferred[Any]:
        headers = self._json_headers if call.body is not None else self._plain_headers
        body = _BytesProducer(call.body) if call.body is not None else None
        d = self._agent.request(
            call.method.encode("ascii"),
            self.address.base + call.path.encode("ascii"),
            headers,
            body,
        )

        def answered(response: Any) -> Deferred[Any]:
            return readBody(response).addCallback(lambda data: call.interpret(response.code, data))

        d.addCallback(answered)
        d.addTimeout(self.timeout, self._reactor, onTimeoutCancel=self._timed_out)
        return d.addErrback(self._failed)

    def _timed_out(self, result: object, timeout: float) -> Failure:
        return Failure(unavailable(self.address.url, f"no answer within {timeout:g}s"))

    def _failed(self, failure: Failure) -> Failure:
        if failure.check(RegistryError):
            return failure
        return Failure(unavailable(self.address.url, _describe(failure)))

    def publish_apis(
        self, remote_apis: Iterable[RemoteAPI], process_id: int | None = None
    ) -> Deferred[None]:
        """
        Publish each module's APIs (one request per module) as C{process_id},
        by default this process.  Fails with the first error once all are done.
        """
        pid = os.getpid() if process_id is None else process_id
        calls = [self._request(publish_call(remote, pid)) for remote in remote_apis]
        d = DeferredList(calls, consumeErrors=True)

        def check(results: list[tuple[bool, Any]]) -> None:
            for ok, result in results:
                if not ok:
                    result.raiseException()

        return d.addCallback(check)

    def find_module_apis(
        self, module_id: str, passing: bool = False
    ) -> Deferred[list[RemoteModuleAPI]]:
        """
        The APIs of C{module_id} (with C{passing}, only those whose health
        check passes, or that have none); fails with L{ModuleNotFound} when
        it is not there.
        """
        return self._request(discover_call(module_id, passing))

    def unpublish(self, module_id: str, process_id: int | None = None) -> Deferred[None]:
        """
        Remove C{module_id}'s registration; with C{process_id}, only if that
        process owns it.
        """
        return self._request(unpublish_call(module_id, process_id))

    def heartbeat(self, module_id: str, process_id: int | None = None) -> Deferred[None]:
        """
        Tell the registry C{module_id} is alive (C{PUT /api/v1/heartbeat}); fails
        with L{ModuleNotFound} when it is not registered (publish again).
        """
        return self._request(heartbeat_call(module_id, process_id))

    def health(self) -> Deferred[Health]:
        return self._request(health_call())

    def list_modules(self) -> Deferred[list[RegisteredModule]]:
        """Every registration of the registry's catalog (C{GET /api/v1/modules})."""
        return self._request(modules_call())

    def find_service_providers(
        self, service_id: str, passing: bool = False
    ) -> Deferred[list[ServiceProvider]]:
        """
        The modules serving C{service_id}, each with its APIs that serve it
        (with C{passing}, only the APIs whose health check passes, or that
        have none, and only the modules left with one); an empty list when
        nobody serves it.
        """
        return self._request(services_call(service_id, passing))

    def catalog(self) -> Deferred[Catalog]:
        """Every registration (C{GET /api/v1/modules}) with the change index and epoch."""
        d = self._agent.request(b"GET", self.address.base + b"/api/v1/modules", self._plain_headers)

        def answered(response: Any) -> Deferred[Catalog]:
            def parse(body: bytes) -> Catalog:
                if response.code != 200:
                    health_call().interpret(response.code, body)  # raises the typed error
                try:
                    index = int(response.headers.getRawHeaders(b"x-hsu-index")[0])
                    epoch = response.headers.getRawHeaders(b"x-hsu-epoch")[0].decode("ascii")
                    modules = {m["moduleID"]: m for m in json.loads(body)["modules"]}
                except (TypeError, ValueError, KeyError, IndexError) as e:
                    raise RegistryUnavailable(f"the registry's catalog is malformed: {e}") from None
                return Catalog(index, epoch, modules)

            return readBody(response).addCallback(parse)

        d.addCallback(answered)
        d.addTimeout(self.timeout, self._reactor, onTimeoutCancel=self._timed_out)
        return d.addErrback(self._failed)

    def watch(
        self,
        callback: Callable[[WatchEvent], object],
        last_index: int | None = None,
        epoch: str | None = None,
        on_connection: Callable[[bool], object] | None = None,
    ) -> Watch:
        """
        Follow every change (C{GET /api/v1/watch}): C{callback(event)} gets each
        L{WatchEvent}; the watch resumes by itself after a disconnection.  Call
        C{stop()} on the returned L{Watch} to end it.
        """
        return Watch(self, callback, last_index, epoch, on_connection).start()

    def close(self) -> Deferred[None]:
        """Close the persistent connections."""
        return self._pool.closeCachedConnections()


def _describe(failure: Failure) -> str:
    value = failure.value
    reasons = getattr(value, "reasons", None)
    if reasons:
        return "; ".join(_describe(r) for r in reasons)
    text = _tls_problem(value) or str(value).strip() or type(value).__name__
    return " ".join(text.split())


def _tls_problem(error: BaseException | None) -> str | None:
    """
    A TLS failure said plainly: pyOpenSSL's and service_identity's errors
    print as lists and reprs.
    """
    if error is None:
        return None
    module = type(error).__module__
    if module.startswith("service_identity"):
        kinds = ", ".join(type(e).__name__ for e in getattr(error, "errors", ()))
        return f"its certificate is not for the URL's host ({kinds or type(error).__name__})"
    if module.startswith("OpenSSL") and error.args and isinstance(error.args[0], list):
        reasons = [str(r[-1]) for r in error.args[0] if isinstance(r, tuple) and r]
        if reasons:
            return "TLS handshake failed: " + "; ".join(reasons)
    return None


@implementer(IBodyProducer)
class _BytesProducer:
    """A request body already in memory (a publish body is small)."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass
