# -*- test-case-name: tests.test_client -*-
"""
L{RegistryClient}: the Twisted-native client, on L{twisted.web.client.Agent}
with persistent connections, over TCP or a unix socket.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
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
from hsu_registry.client.urls import RegistryAddress, parse_registry_url
from hsu_registry.client.watching import Catalog, Watch

__all__ = ["RegistryClient"]

_JSON_HEADERS = Headers({b"content-type": [b"application/json"]})


@implementer(IAgentEndpointFactory)
class _FixedEndpoint:
    """Every request goes to the registry, whatever the URL's host says."""

    def __init__(self, reactor: Any, address: RegistryAddress, timeout: float) -> None:
        self._reactor = reactor
        self._address = address
        self._timeout = timeout

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        if self._address.path is not None:
            return UNIXClientEndpoint(self._reactor, self._address.path, timeout=self._timeout)
        assert self._address.host is not None and self._address.port is not None
        return HostnameEndpoint(
            self._reactor, self._address.host, self._address.port, timeout=self._timeout
        )


class RegistryClient:
    """
    A client of the registry for code on a reactor.  Every method returns a
    Deferred that fires with the result or fails with a
    L{hsu_registry.client.errors.RegistryError}, within C{timeout} seconds.

    @param url: C{tcp://host:port}, C{http://host:port} or
        C{unix:///path}; default C{$HSU_REGISTRY_URL}, else the daemon's default.
    @param reactor: default: the global reactor.
    """

    def __init__(self, url: str | None = None, reactor: Any = None, timeout: float = 5.0) -> None:
        self.address = parse_registry_url(url)
        timeout = check_timeout(timeout)
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self._reactor = reactor
        self.timeout = timeout
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 4
        self._endpoints = _FixedEndpoint(reactor, self.address, timeout)
        self._agent = Agent.usingEndpointFactory(reactor, self._endpoints, pool=self._pool)

    def __repr__(self) -> str:
        return f"<RegistryClient {self.address.url}>"

    def _request(self, call: Call) -> Deferred[Any]:
        headers = _JSON_HEADERS if call.body is not None else None
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
        d = self._agent.request(b"GET", self.address.base + b"/api/v1/modules")

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
    text = str(value).strip() or type(value).__name__
    return " ".join(text.split())


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
