# -*- test-case-name: tests.test_tap -*-
"""
The ``twistd hsu-registry`` plugin's module: its L{Options} and
L{makeService}.  twistd imports it only when it runs the plugin, after it
has installed the reactor.
"""

from __future__ import annotations

from twisted.application.service import IService

from hsu_registry.options import Options

__all__ = ["Options", "makeService"]


def makeService(options: Options) -> IService:
    """Build the daemon's service tree on the running reactor."""
    from twisted.internet import reactor

    from hsu_registry.service import makeService as build

    return build(options.config, reactor)
