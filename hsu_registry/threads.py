# -*- test-case-name: tests.test_threads -*-
"""
A thread-safe way into a registry running on a reactor.

The registry, like everything on a reactor, must only be touched from the
reactor thread.  L{BlockingRegistry} lets code in other threads (a WSGI app, a
worker pool) publish, discover and unpublish: each call runs on the reactor
thread and blocks the caller until it is done.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import maybeDeferred
from twisted.internet.threads import blockingCallFromThread
from twisted.python.threadable import isInIOThread

from hsu_registry.interfaces import IRegistry
from hsu_registry.model import PublishRequest, Registration
from hsu_registry.registry import Change, HealthStatus

__all__ = ["BlockingRegistry"]

T = TypeVar("T")


class BlockingRegistry:
    """
    Blocking calls into C{registry} from threads other than the reactor's.

    Errors are raised as the registry raises them (L{ModuleNotFound},
    L{NotOwner}, ...).  Calling from the reactor thread would deadlock, so it
    raises L{RuntimeError} instead.
    """

    def __init__(self, reactor: Any, registry: IRegistry) -> None:
        self._reactor = reactor
        self._registry = registry

    def _call(self, function: Callable[..., Any], *args: Any) -> Any:
        if isInIOThread():
            raise RuntimeError(
                "BlockingRegistry is for other threads; on the reactor thread, "
                "call the registry directly"
            )
        return blockingCallFromThread(self._reactor, maybeDeferred, function, *args)

    def publish(self, request: PublishRequest) -> Change:
        return self._call(self._registry.publish, request)

    def discover(self, module_id: str) -> Registration:
        return self._call(self._registry.discover, module_id)

    def unpublish(self, module_id: str, process_id: int | None = None) -> Change | None:
        return self._call(self._registry.unpublish, module_id, process_id)

    def health(self) -> HealthStatus:
        return self._call(self._registry.health)
