"""
Stores: where the registry persists what it decides.  Each implements
L{hsu_registry.interfaces.IStore}: L{hsu_registry.stores.memory} (the
default; nothing survives a restart) and L{hsu_registry.stores.sqlite}.
"""

from __future__ import annotations

from attrs import frozen

from hsu_registry.model import Registration

__all__ = ["StoredRegistration", "parse_store_spec"]


@frozen
class StoredRegistration:
    """A registration as read back from a store, with its persisted last-seen time."""

    registration: Registration
    last_seen: float


def parse_store_spec(spec: str) -> tuple[str, str | None]:
    """
    Split a ``--store`` value into its kind and argument: ``memory`` or
    ``sqlite:PATH``.

    @raise ValueError: for anything else.
    """
    if spec == "memory":
        return ("memory", None)
    kind, _, argument = spec.partition(":")
    if kind == "sqlite":
        if not argument:
            raise ValueError("sqlite needs a path: --store=sqlite:/var/lib/hsu/registry.db")
        return ("sqlite", argument)
    raise ValueError(f"unknown store {spec!r} (supported: memory, sqlite:PATH)")
