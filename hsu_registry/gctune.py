# -*- test-case-name: tests.test_gctune -*-
"""
Keeping the cyclic garbage collector's full passes short however many modules
are registered.

Four things together (measured by the benchmark):

 - registrations are held as exact tuples of atomic values, which the
   collector stops tracking (L{hsu_registry.model.Registration.plain});
 - the daemon freezes what exists once it has started (L{freeze_long_lived}):
   imported modules, the service tree and the registry's tables move to the
   permanent generation, which later collections do not traverse;
 - the registry's large tables are L{Table}s: a plain dict holding only
   untracked values is untracked by a collection and tracked again by the next
   insert, which would take it out of the permanent generation; a dict
   subclass stays tracked, so it stays frozen;
 - replacing a stored tuple by a new one (a changed registration, a re-queued
   expiry entry) allocates one container and frees one, which leaves the
   collector's allocation count unchanged: the new tuples, tracked until a
   collection looks at them, would pile up in the youngest generation until
   something else triggers a collection, which would then walk all of them
   (64 ms after re-publishing 100 000 changed modules).  L{replaced} runs a
   young collection every thousand replacements instead (well under 1 ms).
"""

from __future__ import annotations

import gc
from typing import TypeVar

__all__ = ["Table", "freeze_long_lived", "replaced"]

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


_YOUNG_EVERY = 1000
_replacements = 0


def replaced() -> None:
    """
    Note that a stored tracked object was replaced by a new one; every
    thousandth call collects the youngest generation (see the module's
    docstring).
    """
    global _replacements
    _replacements += 1
    if _replacements >= _YOUNG_EVERY:
        _replacements = 0
        gc.collect(0)
