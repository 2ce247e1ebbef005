"""
Stores: where the registry persists what it decides.  Each implements
L{hsu_registry.interfaces.IStore}; L{store_from_spec} picks one from the
``--store`` option.
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


def parse_store_spec(spec: str) -> str:
    """
    Validate a ``--store`` value and return its canonical form.

    Only ``memory`` exists today; the durable stores come with their issues.

    @raise ValueError: for anything else.
    """
    if spec == "memory":
        return spec
    raise ValueError(f"unknown store {spec!r} (supported: memory)")
