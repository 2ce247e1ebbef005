# -*- test-case-name: tests.test_cli -*-
"""
The standalone ``hsu-registry`` command: the daemon in the foreground, logging
to stderr, as the seed's Go binary runs.

It stops cleanly with exit code 0 on SIGTERM or SIGINT, and when it cannot
listen it exits with code 1 and one line on stderr, not a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python import usage

from hsu_registry.errors import StartupFailure
from hsu_registry.hangup import install_hangup_handler
from hsu_registry.options import Options

if TYPE_CHECKING:
    from hsu_registry.service import RegistryService

__all__ = ["main", "run"]


def run(
    argv: list[str],
    reactor: Any,
    stderr: TextIO,
    on_started: Callable[[RegistryService], object] = lambda service: None,
    hangup: bool = False,
) -> int:
    """
    Parse C{argv}, start the daemon on C{reactor} and run it until it is
    stopped.  C{on_started} is called with the service once the daemon
    listens; the command begins logging only then, so a failed start says
    one line and no more.

    @param hangup: make SIGHUP reload (see L{hsu_registry.hangup}) from the
        moment the service is built; only for the process's own command.

    @return: the process exit code: 0 after a clean stop, 1 when the daemon
        could not start (cannot listen, a database or directory it cannot
        use), 2 for a usage error.
    """
    options = Options()
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        stderr.write(f"hsu-registry: {e}\nTry 'hsu-registry --help' for usage.\n")
        return 2

    from hsu_registry.service import makeService

    try:
        service = makeService(options.config, reactor)
    except StartupFailure as e:  # the environment: a database, a directory
        stderr.write(f"hsu-registry: error: {_one_line(e)}\n")
        return 1
    except ValueError as e:
        stderr.write(f"hsu-registry: {e}\n")
        return 2

    if hangup:
        install_hangup_handler(reactor, service.reload)
    exit_code = [0]

    def start() -> None:
        try:
            service.startService()
        except Exception as e:
            stderr.write(f"hsu-registry: error: {_one_line(e)}\n")
            exit_code[0] = 1
            d = service.stopService()
            d.addBoth(lambda _: reactor.stop())
            return
        reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
        on_started(service)

    reactor.callWhenRunning(start)
    reactor.run()
    return exit_code[0]


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``hsu-registry`` console script."""
    if argv is None:
        argv = sys.argv[1:]
    if any(a in ("-h", "--help", "--version") for a in argv):
        raise SystemExit(run(argv, None, sys.stderr))
    from twisted.internet import reactor

    def started(service: RegistryService) -> None:
        # Events logged before this (start-up) are buffered and written now.
        observer = textFileLogObserver(sys.stderr)
        globalLogBeginner.beginLoggingTo(
            [FilteringLogObserver(observer, [LogLevelFilterPredicate(LogLevel.info)])],
            redirectStandardIO=False,
        )

    raise SystemExit(run(argv, reactor, sys.stderr, started, hangup=True))


if __name__ == "__main__":
    main()
