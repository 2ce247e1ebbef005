# -*- test-case-name: tests.test_hangup -*-
"""
SIGHUP never stops the daemon: a habitual C{kill -HUP} or C{systemctl reload}
reopens the log files (for logrotate) and reloads what can be reloaded, and
logs that it did.

Only the daemon's commands (C{hsu-registry}, C{twistd hsu-registry}) install
the handler: signal handlers belong to the process, and an application that
embeds the registry keeps its own.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable
from typing import Any

from twisted.logger import ILogObserver, Logger, globalLogPublisher

__all__ = ["install_hangup_handler", "reopen_log_files"]

log = Logger()


def _log_files(observers: Iterable[ILogObserver]) -> list[Any]:
    """
    The files behind file log observers that can be reopened: twistd's
    C{--logfile} is a L{twisted.python.logfile.LogFile} written by a
    C{FileLogObserver}.  twisted.logger offers no public way to reach them,
    so this looks for them and finds none rather than fail where that changes
    (C{tests.test_hangup} pins it on a real twistd).
    """
    found = []
    for observer in observers:
        out = getattr(observer, "_outFile", None)
        if callable(getattr(out, "reopen", None)):
            found.append(out)
    return found


def reopen_log_files(publisher: Any = globalLogPublisher) -> list[str]:
    """
    Reopen every log file the process logs to (after logrotate moved it).

    @return: the paths reopened (empty when logging goes to a stream).
    """
    reopened = []
    for out in _log_files(getattr(publisher, "_observers", ())):
        out.reopen()
        reopened.append(str(getattr(out, "path", out)))
    return reopened


def install_hangup_handler(reactor: Any, reload: Callable[[], object]) -> None:
    """
    Make SIGHUP call C{reload} on the reactor thread instead of ending the
    process (the default action of SIGHUP).
    """

    def hangup(signum: int, frame: object) -> None:
        reactor.callFromThread(reload)

    signal.signal(signal.SIGHUP, hangup)
