# -*- test-case-name: tests.test_client -*-
"""
What can go wrong with a registry request, as the clients report it.

Every failure is one of three kinds, so a caller decides with one ``except``:
the module is not there (L{ModuleNotFound}), the registry refused the request
(L{RegistryRejected}), or the registry could not be reached or answered in
time (L{RegistryUnavailable}).  No socket error or Twisted failure leaks out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["ModuleNotFound", "RegistryError", "RegistryRejected", "RegistryUnavailable"]


class RegistryError(Exception):
    """
    Base of every client error.

    @ivar message: the server's message, or what went wrong on the way.
    @ivar status: the HTTP status when the registry answered, else L{None}.
    @ivar context: the server's ``context`` details, if any.
    """

    def __init__(
        self,
        message: str,
        status: int | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.context = dict(context) if context else {}

    def __str__(self) -> str:
        if self.status is None:
            return self.message
        return f"{self.message} (HTTP {self.status})"


class ModuleNotFound(RegistryError):
    """Discovery found no (fresh) registration for the module."""

    def __init__(self, module_id: str, status: int | None = 404) -> None:
        super().__init__(f"module not found: {module_id}", status, {"moduleID": module_id})
        self.module_id = module_id


class RegistryRejected(RegistryError):
    """The registry refused the request (a 4xx answer other than discovery's 404)."""


class RegistryUnavailable(RegistryError):
    """The registry could not be reached, did not answer in time, or failed (5xx)."""
