# -*- test-case-name: tests.test_store -*-
"""
The in-memory store: the default, nothing survives a restart.

It still keeps what it was given, so it honours the full L{IStore} contract
(a later L{load} returns what was saved) and serves as the reference
implementation in the store contract tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from hsu_registry import gctune
from hsu_registry.gctune import Table
from hsu_registry.interfaces import IStore
from hsu_registry.model import PlainRegistration, Registration
from hsu_registry.stores import StoredRegistration

__all__ = ["MemoryStore"]


@implementer(IStore)
class MemoryStore:
    """An L{IStore} in a dict; every operation succeeds at once."""

    def __init__(self) -> None:
        # Plain registrations (flat tuples of atomic values, untracked by the
        # cyclic GC: see model.PlainRegistration) and, apart, their last-seen
        # times, so a heartbeat replaces a float and never a tuple.
        self._records: Table[str, PlainRegistration] = Table()
        self._seen: dict[str, float] = {}

    def load(self) -> Deferred[list[StoredRegistration]]:
        return succeed(
            [
                StoredRegistration(Registration.from_plain(plain), self._seen[module_id])
                for module_id, plain in self._records.items()
            ]
        )

    def save(self, registration: Registration, last_seen: float) -> Deferred[None]:
        module_id = registration.module_id
        plain = registration.plain()
        previous = self._records.get(module_id)
        if previous != plain:  # the same content again keeps the stored tuple
            self._records[module_id] = plain
            if previous is not None:
                gctune.replaced()
        self._seen[module_id] = last_seen
        return succeed(None)

    def remove(self, module_ids: Iterable[str]) -> Deferred[None]:
        for module_id in module_ids:
            self._records.pop(module_id, None)
            self._seen.pop(module_id, None)
        return succeed(None)

    def touch(self, last_seen: Mapping[str, float]) -> Deferred[None]:
        seen = self._seen
        for module_id, when in last_seen.items():
            if module_id in seen:
                seen[module_id] = when
        return succeed(None)

    def close(self) -> Deferred[None]:
        return succeed(None)
