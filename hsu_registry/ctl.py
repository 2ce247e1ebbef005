# -*- test-case-name: tests.test_ctl -*-
"""
The operator command ``hsu-registry-ctl``: ask a running registry for its
health, list its modules, find a service's providers, publish, discover and
unpublish a module, from a shell.

It is built on L{BlockingRegistryClient} and the standard library only, so it
starts quickly and installs no reactor::

    hsu-registry-ctl health
    hsu-registry-ctl list
    hsu-registry-ctl services echo.v1 --passing
    hsu-registry-ctl publish echo --service echo.v1 --port 50051 --protocol grpc
    hsu-registry-ctl --json discover echo
    hsu-registry-ctl unpublish echo --pid 1234

The registry is found with C{--url}, else C{$HSU_REGISTRY_URL}, else
C{tcp://127.0.0.1:17951}.  C{--json} prints the registry's data as JSON in
the seed's camelCase shape instead of a table.  An C{https://} registry is
verified with C{--ca} (else C{$HSU_REGISTRY_CA}, else the system's CAs), and
C{--cert}/C{--key} (else C{$HSU_REGISTRY_CERT}/C{$HSU_REGISTRY_KEY}) present
a client certificate; C{--token} (better: C{$HSU_REGISTRY_TOKEN}, which
C{ps} does not show) is sent as a bearer token.

Exit codes: 0 success, 1 module not found (or no provider of the service),
2 usage error, 3 registry unreachable (or failing), 4 request refused by the
registry.  Every error is one line on stderr, prefixed C{hsu-registry-ctl: }.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any, NamedTuple, NoReturn

from hsu_registry import __version__
from hsu_registry.client.blocking import BlockingRegistryClient
from hsu_registry.client.errors import (
    ModuleNotFound,
    RegistryError,
    RegistryRejected,
    RegistryUnavailable,
)
from hsu_registry.client.model import (
    RemoteAPI,
    RemoteModuleAPI,
)
from hsu_registry.client.urls import (
    CA_VARIABLE,
    CERT_VARIABLE,
    DEFAULT_URL,
    ENVIRONMENT_VARIABLE,
    KEY_VARIABLE,
    TOKEN_VARIABLE,
    parse_registry_url,
)
from hsu_registry.ctl_render import (
    _answer_json,
    _apis_table,
    _count,
    _module_json,
    _modules_table,
    _none_passing,
    _provider_json,
    _providers_table,
)
from hsu_registry.errors import InvalidRequest
from hsu_registry.model import DEFAULT_LIMITS, validate_id

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

__all__ = [
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_REJECTED",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "PROG",
    "main",
    "run",
]

PROG = "hsu-registry-ctl"

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_REJECTED = 4

DEFAULT_TIMEOUT = 5.0
#: The longest C{--timeout} accepted (a day); sockets refuse absurd values.
MAX_TIMEOUT = 86400.0

# The field names RemoteModuleAPI's messages use, as the options that set them.
_OPTION_NAMES = (
    ("api.serviceIDs", "--service"),
    ("api.serverPort", "--port"),
    ("api.protocol", "--protocol"),
    ("api.address", "--address"),
    ("api.metadata", "--meta"),
    ("api.check.interval", "--check-interval"),
    ("api.check.timeout", "--check-timeout"),
    ("api.check.http", "--check"),
    ("api.check", "--check"),
)


class _UsageError(Exception):
    """The command line is wrong; the message says how."""


class _Exit(Exception):
    """argparse finished early (C{--help}, C{--version}) with this exit status."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _NotFound(Exception):
    """What was asked for is not there (exit 1, as for an unknown module); the message says what."""


class _Version(argparse.Action):
    """C{--version}: print the program and its version on the parser's stdout, then stop."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("help", "print the version and exit")
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        assert isinstance(parser, _Parser)
        print(f"{PROG} {__version__}", file=parser.stdout)
        raise _Exit(EXIT_OK)


class _Parser(argparse.ArgumentParser):
    """
    An argument parser that raises instead of exiting and writes its help to
    the given stream, so L{run} can be called in process.
    """

    def __init__(self, *args: Any, stdout: IO[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stdout = stdout

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see '{self.prog} --help')")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            raise _UsageError(message)
        raise _Exit(status)

    def print_help(self, file: SupportsWrite[str] | None = None) -> None:
        super().print_help(self.stdout if file is None else file)

    def print_usage(self, file: SupportsWrite[str] | None = None) -> None:
        super().print_usage(self.stdout if file is None else file)


class _Outcome(NamedTuple):
    """What a command prints: C{data} with C{--json}, else C{text}."""

    data: Any
    text: str


_Action = Callable[[BlockingRegistryClient], _Outcome]


# -- argument types ----------------------------------------------------------


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0 or value > MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(
            f"timeout must be a number of seconds above 0 and at most {MAX_TIMEOUT:g}, not {text!r}"
        )
    return value


def _process_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid process ID: {text!r}") from None
    if not 0 <= value <= DEFAULT_LIMITS.max_process_id:
        raise argparse.ArgumentTypeError(
            f"process ID must be between 0 and {DEFAULT_LIMITS.max_process_id}, not {text!r}"
        )
    return value


def _metadata_entry(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not {text!r}")
    return key, value


# -- the parser --------------------------------------------------------------


def _add_global_options(parser: argparse.ArgumentParser, *, after_command: bool) -> None:
    # After the subcommand the options default to SUPPRESS, so that leaving
    # them out there keeps whatever was given (or defaulted) before it.
    def default(value: object) -> object:
        return argparse.SUPPRESS if after_command else value

    group = parser.add_argument_group("registry options")
    group.add_argument(
        "--url",
        default=default(None),
        help=f"the registry: tcp://HOST:PORT, http://HOST:PORT, https://HOST:PORT or "
        f"unix:///PATH (default: ${ENVIRONMENT_VARIABLE}, else {DEFAULT_URL})",
    )
    group.add_argument(
        "--ca",
        default=default(None),
        metavar="FILE",
        help=f"https: the PEM file of the CA(s) that signed the registry's certificate "
        f"(default: ${CA_VARIABLE}, else the system's CAs)",
    )
    group.add_argument(
        "--cert",
        default=default(None),
        metavar="FILE",
        help=f"https: the PEM file of a client certificate to present (default: ${CERT_VARIABLE})",
    )
    group.add_argument(
        "--key",
        default=default(None),
        metavar="FILE",
        help=f"https: the PEM file of its private key "
        f"(default: ${KEY_VARIABLE}, else --cert's file)",
    )
    group.add_argument(
        "--token",
        default=default(None),
        help=f"a bearer token sent with every request (default: ${TOKEN_VARIABLE}, "
        "which other users cannot see in ps)",
    )
    group.add_argument(
        "--timeout",
        type=_seconds,
        default=default(DEFAULT_TIMEOUT),
        metavar="SECONDS",
        help=f"seconds to wait for connecting and for the answer (default: {DEFAULT_TIMEOUT:g})",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print the registry's answer as JSON instead of a table",
    )


def _build_parser(stdout: IO[str]) -> _Parser:
    parser = _Parser(
        prog=PROG,
        description="Ask a running hsu-registry for its health, its modules or a "
        "service's providers, or publish, discover and unpublish a module's APIs.",
        epilog="Exit codes: 0 success, 1 module not found (or no provider of the service), "
        "2 usage error, 3 registry unreachable, 4 request refused.",
        allow_abbrev=False,
        stdout=stdout,
    )
    parser.add_argument("--version", action=_Version)
    _add_global_options(parser, after_command=False)
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, title="commands"
    )

    def command(name: str, help: str) -> _Parser:
        sub = commands.add_parser(
            name, help=help, description=help, allow_abbrev=False, stdout=stdout
        )
        _add_global_options(sub, after_command=True)
        return sub

    command("health", "Show the registry's health.")
    command("list", "List every registered module: its process, APIs, age and state.")

    publish = command("publish", "Publish one API of a module.")
    publish.add_argument("module", metavar="MODULE", help="the module ID")
    publish.add_argument(
        "--service",
        dest="services",
        action="append",
        required=True,
        metavar="ID",
        help="a service ID the API serves (repeat for several)",
    )
    publish.add_argument("--port", type=int, required=True, help="the API's server port")
    publish.add_argument("--protocol", required=True, help="the API's protocol, e.g. grpc or http")
    publish.add_argument("--address", help="the API's host (default: the registry's host)")
    publish.add_argument(
        "--meta",
        dest="metadata",
        action="append",
        type=_metadata_entry,
        default=[],
        metavar="KEY=VALUE",
        help="a metadata entry (repeat for several)",
    )
    publish.add_argument(
        "--check",
        metavar="tcp|http:PATH",
        help="have the registry check the API: a TCP connect, or an HTTP GET of PATH",
    )
    publish.add_argument(
        "--check-interval", metavar="DURATION", help="time between checks (default: 10s)"
    )
    publish.add_argument(
        "--check-timeout", metavar="DURATION", help="time a check may take (default: 1s)"
    )
    publish.add_argument(
        "--pid",
        type=_process_id,
        default=0,
        help="the owning process ID (default: 0, no owner process)",
    )

    discover = command("discover", "Show a module's APIs.")
    discover.add_argument("module", metavar="MODULE", help="the module ID")
    discover.add_argument(
        "--passing",
        action="store_true",
        help="only the APIs whose health check passes (or that have none)",
    )

    services = command("services", "Show the modules that serve a service, and their APIs.")
    services.add_argument("service", metavar="SERVICE_ID", help="the service ID")
    services.add_argument(
        "--passing",
        action="store_true",
        help="only the APIs whose health check passes (or that have none)",
    )

    watch = command("watch", "Print the registry's changes as they come (Ctrl-C to stop).")
    watch.add_argument(
        "--count",
        type=_positive_count,
        default=None,
        metavar="N",
        help="exit after N changes (default: run until interrupted)",
    )

    unpublish = command("unpublish", "Remove a module's registration.")
    unpublish.add_argument("module", metavar="MODULE", help="the module ID")
    unpublish.add_argument(
        "--pid",
        type=_process_id,
        default=None,
        help="remove it only if this process owns it (default: unconditionally)",
    )
    return parser


# -- the commands ------------------------------------------------------------


def _module_id(value: str) -> str:
    try:
        return validate_id(value, "MODULE")
    except InvalidRequest as e:
        raise _UsageError(e.message) from None


def _service_id(value: str) -> str:
    try:
        return validate_id(value, "SERVICE_ID")
    except InvalidRequest as e:
        raise _UsageError(e.message) from None


def _option_message(message: str) -> str:
    for field, option in _OPTION_NAMES:
        if message.startswith(field):
            return option + message[len(field) :]
    return message


def _check(args: argparse.Namespace) -> dict[str, object] | None:
    """The publish body's C{check} object from C{--check} and its timings."""
    if args.check is None:
        if args.check_interval is not None or args.check_timeout is not None:
            raise _UsageError("--check-interval and --check-timeout need --check")
        return None
    check: dict[str, object]
    if args.check == "tcp":
        check = {"tcp": True}
    elif args.check.startswith("http:"):
        check = {"http": args.check[len("http:") :]}
    else:
        raise _UsageError("--check must be tcp or http:PATH, e.g. http:/healthz")
    if args.check_interval is not None:
        check["interval"] = args.check_interval
    if args.check_timeout is not None:
        check["timeout"] = args.check_timeout
    return check


def _plan_health(args: argparse.Namespace) -> _Action:
    def health(client: BlockingRegistryClient) -> _Outcome:
        result = client.health()
        rows = [
            ("Registry", client.address.url),
            ("Status", result.status),
            ("Registered modules", str(result.registered_modules)),
            ("Total APIs", str(result.total_apis)),
            ("Uptime", result.uptime),
        ]
        data: dict[str, object] = {
            "status": result.status,
            "registeredModules": result.registered_modules,
            "totalAPIs": result.total_apis,
            "uptime": result.uptime,
        }
        if result.version is not None:
            rows.append(("Version", result.version))
            data["version"] = result.version
        width = max(len(key) for key, _ in rows) + 1
        return _Outcome(data, "\n".join(f"{key + ':':<{width}} {value}" for key, value in rows))

    return health


def _plan_publish(args: argparse.Namespace) -> _Action:
    module_id = _module_id(args.module)
    metadata: dict[str, str] = {}
    for key, value in args.metadata:
        if key in metadata:
            raise _UsageError(f"--meta: key {key!r} is given more than once")
        metadata[key] = value
    check = _check(args)
    try:
        api = RemoteModuleAPI(
            service_ids=tuple(args.services),
            server_port=args.port,
            protocol=args.protocol,
            address=args.address,
            metadata=metadata,
            check=check,
        )
        remote = RemoteAPI(module_id, (api,))
    except ValueError as e:
        raise _UsageError(_option_message(str(e))) from None
    pid: int = args.pid

    def publish(client: BlockingRegistryClient) -> _Outcome:
        client.publish_apis([remote], process_id=pid)
        return _Outcome({"success": True}, f"published {module_id} (1 API)")

    return publish


def _plan_discover(args: argparse.Namespace) -> _Action:
    module_id = _module_id(args.module)

    def discover(client: BlockingRegistryClient) -> _Outcome:
        apis = client.find_module_apis(module_id, passing=args.passing)
        data = {"moduleID": module_id, "apis": [_answer_json(api) for api in apis]}
        if not apis and args.passing and not args.json:
            # None passes: say whether that is because it has none at all.
            return _Outcome(data, _none_passing(module_id, client.find_module_apis(module_id)))
        return _Outcome(data, _apis_table(module_id, apis))

    return discover


def _plan_list(args: argparse.Namespace) -> _Action:
    def list_modules(client: BlockingRegistryClient) -> _Outcome:
        modules = client.list_modules()
        data = {"modules": [_module_json(module) for module in modules]}
        return _Outcome(data, _modules_table(modules, _now()))

    return list_modules


def _plan_services(args: argparse.Namespace) -> _Action:
    service_id = _service_id(args.service)
    passing: bool = args.passing

    def services(client: BlockingRegistryClient) -> _Outcome:
        providers = client.find_service_providers(service_id, passing=passing)
        if not providers:
            everyone = client.find_service_providers(service_id) if passing else []
            if everyone:
                count = _count(len(everyone), "provider")
                raise _NotFound(f"service {service_id} has {count} but none is passing yet")
            raise _NotFound(f"no module provides service {service_id}")
        data = {
            "serviceID": service_id,
            "providers": [_provider_json(provider) for provider in providers],
        }
        return _Outcome(data, _providers_table(providers))

    return services


def _plan_unpublish(args: argparse.Namespace) -> _Action:
    module_id = _module_id(args.module)
    pid: int | None = args.pid

    def unpublish(client: BlockingRegistryClient) -> _Outcome:
        client.unpublish(module_id, pid)
        return _Outcome({"success": True}, f"unpublished {module_id}")

    return unpublish


def _positive_count(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError("must be a whole number of at least 1")
    return int(value)


def _watch(
    client: BlockingRegistryClient, args: argparse.Namespace, out: IO[str], err: IO[str]
) -> int:
    """Print each change as it comes; resume by itself after a lost stream."""
    last: int | None = None
    epoch: str | None = None
    changes = 0
    connected_once = False
    while True:
        try:
            for event in client.watch_events(last, epoch):
                connected_once = True
                if args.json:
                    record = {"index": event.index, "event": event.kind, "data": event.data}
                    print(json.dumps(record), file=out, flush=True)
                elif event.kind in ("hello", "resync"):
                    note = "changes were missed: reload" if event.kind == "resync" else "watching"
                    print(
                        f"# {note} {client.address.url} at index {event.index} "
                        f"(epoch {event.epoch})",
                        file=out,
                        flush=True,
                    )
                else:
                    print(f"{event.index}\t{event.kind}\t{event.module_id}", file=out, flush=True)
                last, epoch = event.index, event.epoch or epoch
                if event.kind not in ("hello", "resync"):
                    changes += 1
                    if args.count is not None and changes >= args.count:
                        return EXIT_OK
        except RegistryUnavailable as e:
            if not connected_once:
                print(f"{PROG}: {_one_line(e)}", file=err)
                return EXIT_UNAVAILABLE
            print(f"{PROG}: {_one_line(e)}; resuming from index {last}", file=err, flush=True)
            threading.Event().wait(1.0)  # a command-line pause, no reactor here


_COMMANDS: Mapping[str, Callable[[argparse.Namespace], _Action]] = {
    "health": _plan_health,
    "list": _plan_list,
    "services": _plan_services,
    "publish": _plan_publish,
    "discover": _plan_discover,
    "unpublish": _plan_unpublish,
}


def _now() -> datetime.datetime:
    """The time ages are measured to (a function, so tests can move it)."""
    return datetime.datetime.now(datetime.timezone.utc)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _refusal(error: RegistryRejected) -> str:
    owner = error.context.get("registeredProcessID")
    if isinstance(owner, int):
        return f"{error}; it is registered by process {owner}"
    return str(error)


def run(
    argv: Sequence[str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """
    Run the command line C{argv} (without the program name) and return its
    exit code; nothing here exits the process.

    @param environ: where C{$HSU_REGISTRY_URL} (and C{_CA}, C{_CERT}, C{_KEY},
        C{_TOKEN}) are looked up (default: L{os.environ}).
    """
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    env = os.environ if environ is None else environ

    def fail(code: int, message: object) -> int:
        print(f"{PROG}: {_one_line(message)}", file=err)
        return code

    try:
        args = _build_parser(out).parse_args(sys.argv[1:] if argv is None else list(argv))
        # watch streams its output as it comes (see _watch); the others plan
        # one request and print its outcome.
        action = None if args.command == "watch" else _COMMANDS[args.command](args)
        try:
            address = parse_registry_url(args.url, env)
        except ValueError as e:
            where = "--url" if args.url is not None else f"${ENVIRONMENT_VARIABLE}"
            raise _UsageError(f"{where}: {e}") from None
        try:
            client = BlockingRegistryClient(
                address.url,
                args.timeout,
                ca=args.ca,
                cert=args.cert,
                key=args.key,
                token=args.token,
                environ=env,
            )
        except ValueError as e:
            raise _UsageError(str(e)) from None
    except _UsageError as e:
        return fail(EXIT_USAGE, e)
    except _Exit as e:
        return e.status

    try:
        if action is None:
            return _watch(client, args, out, err)
        outcome = action(client)
    except (ModuleNotFound, _NotFound) as e:
        return fail(EXIT_NOT_FOUND, e)
    except RegistryRejected as e:
        return fail(EXIT_REJECTED, _refusal(e))
    except RegistryError as e:
        return fail(EXIT_UNAVAILABLE, e)
    finally:
        client.close()

    if args.json:
        print(json.dumps(outcome.data, indent=2), file=out)
    else:
        print(outcome.text, file=out)
    return EXIT_OK


def main() -> None:
    """The console script: L{run} on the process's arguments, then exit."""
    for stream in (sys.stdout, sys.stderr):
        # Odd characters in a registry's data never make a traceback.
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    try:
        code = run()
        sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        code = 130
    except BrokenPipeError:
        # The reader went away (| head): exit quietly, without Python's
        # complaint when it flushes stdout at shutdown.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 1
    raise SystemExit(code)
