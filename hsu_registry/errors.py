# -*- test-case-name: tests.test_api -*-
"""
The registry's domain errors, each carrying the HTTP status and the message
that the API answers with.

They live apart from the web layer so the registry logic, the stores and the
clients can raise and catch them without importing Klein.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "Forbidden",
    "InvalidRequest",
    "ModuleNotFound",
    "NotOwner",
    "QuotaExceeded",
    "RegistryError",
    "RegistryFull",
    "StartupFailure",
    "StoreUnavailable",
    "TooManyRequests",
    "Unauthorized",
]


class RegistryError(Exception):
    """
    A refusal the API reports as ``{"success": false, "error": message}``.

    @ivar status: the HTTP status code of the answer.
    @ivar message: the human-readable message.
    @ivar context: optional details, answered as the ``context`` object.
    """

    status = 400

    def __init__(self, message: str, context: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.context = dict(context) if context else None


class InvalidRequest(RegistryError):
    """The request is malformed; the message names the offending field."""

    status = 400


class ModuleNotFound(RegistryError):
    """No discoverable registration for the module (unknown or stale)."""

    status = 404

    def __init__(self, module_id: str) -> None:
        # Exactly the seed's body: no context (the ID is in the URL anyway).
        super().__init__("module not found")
        self.module_id = module_id


class Forbidden(RegistryError):
    """
    The caller's identity may not do this: the module belongs to another
    identity, or the policy grants no such right.  The message says why
    without naming the owner.
    """

    status = 403


class TooManyRequests(RegistryError):
    """
    The caller's identity spent its rate of requests; answered 429 with
    C{Retry-After}.
    """

    status = 429

    def __init__(
        self, message: str, context: Mapping[str, Any] | None = None, retry_after: float = 1.0
    ) -> None:
        super().__init__(message, context)
        self.retry_after = retry_after


class QuotaExceeded(RegistryError):
    """The change would take the caller's identity past one of its quotas (which it names)."""

    status = 403


class Unauthorized(RegistryError):
    """The request's credentials (a bearer token) are malformed or unknown."""

    status = 401


class NotOwner(RegistryError):
    """A processID-qualified request names a process that does not own the module."""

    status = 409


class RegistryFull(RegistryError):
    """Publishing a new module would exceed the configured module limit."""

    status = 507


class StoreUnavailable(RegistryError):
    """The store could not persist a change; nothing was changed."""

    status = 503


class StartupFailure(Exception):
    """
    What the daemon needs from its environment is not there (a database it
    cannot use, a directory it cannot create): one line an operator can act
    on, and exit code 1, unlike a usage error (2).
    """
