# -*- test-case-name: tests.test_store -*-
"""
The in-memory store: the default, nothing survives a restart.

It still keeps what it was given, so it honours the full L{IStore} contract
(a later L{load} returns what was saved) and serves as the reference
implementation in the store contract tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from hsu_registry.gctune import Table
from hsu_registry.interfaces import IStore
from hsu_registry.model import Registration
from hsu_registry.stores import StoredRegistration

__all__ = ["MemoryStore"]


@implementer(IStore)
class MemoryStore:
    """An L{IStore} in a dict; every operation succeeds at once."""

    def __init__(self) -> None:
        # The plain registration with its last-seen time appended: a flat tuple
        # of atomic values, untracked by the cyclic GC (see model.PlainRegistration).
        self._records: Table[str, tuple[Any, ...]] = Table()

    def load(self) -> Deferred[list[StoredRegistration]]:
        return succeed(
            [
                StoredRegistration(Registration.from_plain(record[:5]), record[5])
                for record in self._records.values()
            ]
        )

    def save(self, registration: Registration, last_seen: float) -> Deferred[None]:
        self._records[registration.module_id] = (*registration.plain(), last_seen)
        return succeed(None)

    def remove(self, module_ids: Iterable[str]) -> Deferred[None]:
        for module_id in module_ids:
            self._records.pop(module_id, None)
        return succeed(None)

    def touch(self, last_seen: Mapping[str, float]) -> Deferred[None]:
        for module_id, seen in last_seen.items():
            record = self._records.get(module_id)
            if record is not None:
                self._records[module_id] = (*record[:5], seen)
        return succeed(None)

    def close(self) -> Deferred[None]:
        return succeed(None)
