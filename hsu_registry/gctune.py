# -*- test-case-name: tests.test_gctune -*-
"""
Keeping the cyclic garbage collector's full passes short however many modules
are registered.

Three things together (measured by the benchmark):

 - registrations are held as exact tuples of atomic values, which the
   collector stops tracking (L{hsu_registry.model.Registration.plain});
 - the daemon freezes what exists once it has started (L{freeze_long_lived}):
   imported modules, the service tree and the registry's tables move to the
   permanent generation, which later collections do not traverse;
 - the registry's large tables are L{Table}s: a plain dict holding only
   untracked values is untracked by a collection and tracked again by the next
   insert, which would take it out of the permanent generation; a dict
   subclass stays tracked, so it stays frozen.
"""

from __future__ import annotations

import gc
from typing import TypeVar

__all__ = ["Table", "freeze_long_lived"]

K = TypeVar("K")
V = TypeVar("V")


class Table(dict[K, V]):
    """A dict that stays tracked by the collector, so that it stays frozen."""

    __slots__ = ()


def freeze_long_lived() -> None:
    """
    Move every object the collector tracks to the permanent generation.  Meant
    for the daemon once started: an embedding application decides for itself
    (it is process-wide).

    No collection first: it would add a full pass (about 15 ms) to start-up,
    and what start-up left as cyclic garbage is small and made once.
    """
    gc.freeze()
