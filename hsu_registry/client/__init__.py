"""
Clients of the registry: L{RegistryClient} for code on a Twisted reactor,
L{BlockingRegistryClient} for everything else, L{PublishingService} to keep a
module registered for its whole life.

Importing this package installs no reactor and imports no Klein.
"""

from typing import TYPE_CHECKING

from hsu_registry.client.blocking import BlockingRegistryClient
from hsu_registry.client.errors import (
    ModuleNotFound,
    RegistryError,
    RegistryRejected,
    RegistryUnavailable,
)
from hsu_registry.client.events import WatchEvent
from hsu_registry.client.model import (
    RegisteredModule,
    RemoteAPI,
    RemoteModuleAPI,
    ServiceProvider,
)
from hsu_registry.client.protocol import Health
from hsu_registry.client.urls import DEFAULT_URL, parse_registry_url

if TYPE_CHECKING:
    from hsu_registry.client.asynchronous import RegistryClient
    from hsu_registry.client.publishing import PublishingService
    from hsu_registry.client.watching import RegistryCache

__all__ = [
    "DEFAULT_URL",
    "BlockingRegistryClient",
    "Health",
    "ModuleNotFound",
    "PublishingService",
    "RegisteredModule",
    "RegistryCache",
    "RegistryClient",
    "RegistryError",
    "RegistryRejected",
    "RegistryUnavailable",
    "RemoteAPI",
    "RemoteModuleAPI",
    "ServiceProvider",
    "WatchEvent",
    "parse_registry_url",
]


def __getattr__(name: str) -> object:
    # The Twisted-based pieces import twisted.web.client only when asked for,
    # so blocking users pay nothing for them.
    if name == "RegistryClient":
        from hsu_registry.client.asynchronous import RegistryClient

        return RegistryClient
    if name == "RegistryCache":
        from hsu_registry.client.watching import RegistryCache

        return RegistryCache
    if name == "PublishingService":
        from hsu_registry.client.publishing import PublishingService

        return PublishingService
    raise AttributeError(name)
