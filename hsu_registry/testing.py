# -*- test-case-name: tests.test_registry -*-
"""
Fakes for tests, ours and those of applications embedding the registry.

L{ControllableStore} wraps a real L{MemoryStore} and lets a test hold writes
pending (to see what happens while a store is slow) or fail them (to see
that nothing changes when a store is down).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from twisted.internet.defer import Deferred, fail
from zope.interface import implementer

from hsu_registry.errors import StoreUnavailable
from hsu_registry.interfaces import IStore
from hsu_registry.model import Registration
from hsu_registry.stores import StoredRegistration
from hsu_registry.stores.memory import MemoryStore

__all__ = ["ControllableStore"]


@implementer(IStore)
class ControllableStore:
    """
    An L{IStore} whose writes succeed, fail, or wait for the test.

    @ivar failing: when true, writes fail with L{StoreUnavailable} (or
        C{failure_type}) and change nothing.
    @ivar holding: when true, writes are applied only when L{release} is called.
    """

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.failing = False
        self.failure_type: type[Exception] = StoreUnavailable
        self.holding = False
        self._held: list[tuple[Deferred[None], Deferred[None]]] = []
        self.writes = 0

    def _write(self, apply: Deferred[None]) -> Deferred[None]:
        self.writes += 1
        if not self.holding:
            return apply
        waiter: Deferred[None] = Deferred()
        self._held.append((apply, waiter))
        return waiter

    def release(self) -> None:
        """Complete every held write, in order."""
        held, self._held = self._held, []
        for result, waiter in held:
            result.chainDeferred(waiter)

    @property
    def pending(self) -> int:
        return len(self._held)

    def load(self) -> Deferred[list[StoredRegistration]]:
        return self.inner.load()

    def save(self, registration: Registration, last_seen: float) -> Deferred[None]:
        if self.failing:
            return fail(self.failure_type("store is failing (test)"))
        return self._write(self.inner.save(registration, last_seen))

    def remove(self, module_ids: Iterable[str]) -> Deferred[None]:
        if self.failing:
            return fail(self.failure_type("store is failing (test)"))
        return self._write(self.inner.remove(list(module_ids)))

    def touch(self, last_seen: Mapping[str, float]) -> Deferred[None]:
        return self.inner.touch(last_seen)

    def close(self) -> Deferred[None]:
        return self.inner.close()
