# -*- test-case-name: tests.test_tap -*-
"""
The ``twistd hsu-registry`` plugin's module: its L{Options} and
L{makeService}.  twistd imports it only when it runs the plugin, after it
has installed the reactor.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import TracebackType
from typing import Any

from twisted.application.service import IService
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from hsu_registry.errors import StartupFailure
from hsu_registry.hangup import install_hangup_handler
from hsu_registry.options import Options

__all__ = ["Options", "makeService"]

log = Logger()


def makeService(options: Options) -> IService:
    """
    Build the daemon's service tree on the running reactor, for twistd: a
    failed start is one line on stderr and exit code 1 (as the standalone
    command), and SIGHUP reloads instead of ending the process.
    """
    from twisted.internet import reactor

    from hsu_registry.service import makeService as build

    try:
        service = build(options.config, reactor)
    except StartupFailure as e:
        # twistd would print a traceback: one line and exit code 1, as the
        # standalone command.
        message = " ".join(str(e).split())
        stream = sys.__stderr__ or sys.stderr
        stream.write(f"hsu-registry: error: {message}\n")
        stream.flush()
        raise SystemExit(1) from None
    sys.excepthook = _one_line_startup_errors(sys.excepthook)
    install_hangup_handler(reactor, service.reload)
    return service


_ExceptHook = Callable[[type[BaseException], BaseException, TracebackType | None], Any]


def _one_line_startup_errors(previous: _ExceptHook) -> _ExceptHook:
    """
    twistd lets an error of C{privilegedStartService} propagate (after removing
    its pidfile), and Python prints its traceback; not being able to listen
    (port taken, socket directory not creatable, socket lock held: each says
    which) is printed as one line on the real stderr (twistd redirects
    C{sys.stderr} into its log), as the standalone command does, and logged.
    """

    def hook(
        kind: type[BaseException], value: BaseException, traceback: TracebackType | None
    ) -> None:
        if not isinstance(value, CannotListenError):
            previous(kind, value, traceback)
            return
        message = " ".join(str(value).split())
        log.critical("hsu-registry: error: {error}", error=message)
        stream = sys.__stderr__ or sys.stderr
        stream.write(f"hsu-registry: error: {message}\n")
        stream.flush()

    return hook
