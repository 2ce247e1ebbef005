# -*- test-case-name: tests.test_endpoints -*-
"""
Listening on strports endpoint strings, with the care a registry socket needs.

Unix sockets get their parent directory created, a socket left by a crashed
daemon removed (but never one a live server answers on), mode 0600 unless told
otherwise, no window where the socket has the umask's mode, and removal on a
clean shutdown (Twisted's unix port does that).  TCP endpoints that are not on
loopback are logged as a warning: the API has no authentication.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import stat
from collections.abc import Iterable
from typing import Any

from attrs import frozen
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor
from twisted.logger import Logger

__all__ = [
    "DEFAULT_ENDPOINT",
    "GO_CLIENT_DEFAULT_SOCKET",
    "EndpointDescription",
    "ListenerService",
    "check_description",
    "go_client_hint",
    "parse_description",
    "tcp_endpoint",
    "unix_endpoint",
]

DEFAULT_ENDPOINT = "tcp:17951:interface=127.0.0.1"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


@frozen
class EndpointDescription:
    """A strports description split into its kind, positional and keyword arguments."""

    kind: str
    args: tuple[str, ...]
    kwargs: tuple[tuple[str, str], ...]

    def get(self, key: str) -> str | None:
        for name, value in self.kwargs:
            if name == key:
                return value
        return None

    @property
    def unix_path(self) -> str | None:
        """The socket path of a ``unix:`` description, else L{None}."""
        if self.kind != "unix":
            return None
        return self.get("address") or (self.args[0] if self.args else None)


def parse_description(description: str) -> EndpointDescription:
    """
    Split a strports description the way Twisted does (``\\`` escapes the
    next character; ``name=value`` parts are keywords).

    @raise ValueError: for an empty description or one with no arguments.
    """
    raw_parts = _raw_parts(description)
    kind = _unescape(raw_parts[0]).strip().lower()
    if not kind or len(raw_parts) < 2:
        raise ValueError(
            f"invalid endpoint {description!r}: expected e.g. "
            f"{DEFAULT_ENDPOINT!r} or 'unix:/var/run/hsu/registry.sock'"
        )
    args: list[str] = []
    kwargs: list[tuple[str, str]] = []
    for raw in raw_parts[1:]:
        key, sep, value = _split_unescaped(raw, "=")
        if sep:
            kwargs.append((_unescape(key), _unescape(value)))
        else:
            args.append(_unescape(raw))
    return EndpointDescription(kind, tuple(args), tuple(kwargs))


def _raw_parts(description: str) -> list[str]:
    parts, start, i = [], 0, 0
    while i < len(description):
        if description[i] == "\\":
            i += 2
            continue
        if description[i] == ":":
            parts.append(description[start:i])
            start = i + 1
        i += 1
    parts.append(description[start:])
    return parts


def _split_unescaped(text: str, sep: str) -> tuple[str, str, str]:
    i = 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == sep:
            return text[:i], sep, text[i + 1 :]
        i += 1
    return text, "", ""


def _unescape(text: str) -> str:
    out, chars = [], iter(text)
    for char in chars:
        out.append(next(chars, "") if char == "\\" else char)
    return "".join(out)


def check_description(description: str) -> EndpointDescription:
    """
    Check that C{description} names an endpoint this daemon can be built
    with, so that a mistake is one clear line at start-up, not a traceback.

    @raise ValueError: saying what is wrong, e.g. "the port 'abc' is not a
        number from 0 to 65535".
    """
    parsed = parse_description(description)
    if parsed.kind in ("tcp", "tcp6", "ssl"):
        port = parsed.get("port") or (parsed.args[0] if parsed.args else None)
        if port is None:
            raise ValueError("no port given (e.g. tcp:17951:interface=127.0.0.1)")
        _check_number(port, "the port", 0, 65535)
    if parsed.kind == "unix":
        if not parsed.unix_path:
            raise ValueError("no socket path given (e.g. unix:/var/run/hsu/registry.sock)")
        mode = parsed.get("mode")
        if mode is not None and not (
            mode and all(c in "01234567" for c in mode) and int(mode, 8) <= 0o777
        ):
            raise ValueError(f"the mode {mode!r} is not an octal file mode such as 600")
    backlog = parsed.get("backlog")
    if backlog is not None:
        _check_number(backlog, "the backlog", 1, 65535)
    if parsed.kind == "systemd":
        _check_systemd(parsed)
    try:
        serverFromString(MemoryReactor(), description)
    except TypeError as e:
        raise ValueError(_option_problem(parsed.kind, str(e))) from None
    except Exception as e:
        raise ValueError(_one_line(e)) from None
    return parsed


def _check_number(text: str, what: str, low: int, high: int) -> None:
    if not (text.isdigit() and low <= int(text) <= high):
        raise ValueError(f"{what} {text!r} is not a number from {low} to {high}")


def _check_systemd(parsed: EndpointDescription) -> None:
    """A C{systemd:} endpoint names a socket systemd really passed us."""
    domain, name, index = parsed.get("domain"), parsed.get("name"), parsed.get("index")
    if domain not in ("INET", "INET6", "UNIX"):
        raise ValueError(f"domain must be INET, INET6 or UNIX, not {domain!r}")
    if (name is None) == (index is None):
        raise ValueError("give exactly one of name=NAME (preferred) and index=N")
    if index is not None:
        _check_number(index, "the index", 0, 1023)
    # Twisted reads (and removes) LISTEN_FDS and LISTEN_FDNAMES when it is
    # imported; building the endpoint says whether the socket is among them.
    try:
        serverFromString(MemoryReactor(), _systemd_description(parsed))
    except (KeyError, IndexError):
        which = f"named {name!r}" if name is not None else f"number {index}"
        raise ValueError(
            f"systemd passed no socket {which} (LISTEN_FDS/LISTEN_FDNAMES): start the "
            "daemon from its .socket unit or under systemd-socket-activate"
            + (f" --fdname={name}" if name is not None else "")
            + ", or listen with a tcp: or unix: endpoint"
        ) from None


def _systemd_description(parsed: EndpointDescription) -> str:
    return ":".join(["systemd"] + [f"{k}={_escape(v)}" for k, v in parsed.kwargs])


def _option_problem(kind: str, message: str) -> str:
    """Twisted's TypeError about a parser's arguments, said in terms of the description."""
    unknown = re.search(r"unexpected keyword argument '(\w+)'", message)
    if unknown:
        return f"{kind} endpoints have no option {unknown.group(1)!r}"
    repeated = re.search(r"multiple values for argument '(\w+)'", message)
    if repeated:
        return (
            f"{repeated.group(1)!r} is given twice (escape ':' inside a value as '\\:', "
            "e.g. interface=\\:\\:1)"
        )
    return " ".join(message.split())


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def tcp_endpoint(address: str) -> str:
    """
    The endpoint for the seed's ``--tcp-address=HOST:PORT`` (``[::1]:PORT`` for
    IPv6).

    @raise ValueError: when C{address} is not HOST:PORT with a valid port.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"invalid TCP address {address!r}: expected HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    kind = "tcp6" if ":" in host else "tcp"
    return f"{kind}:{int(port)}:interface={_escape(host)}"


def unix_endpoint(path: str) -> str:
    """The endpoint for the seed's ``--socket-path=PATH`` (mode 0600)."""
    if not path:
        raise ValueError("the socket path is empty")
    return f"unix:{_escape(path)}:mode=600"


# Twisted listens with a backlog of 50; when a host's modules start together
# they connect at once, and the 51st would be refused (EAGAIN on a unix socket).
DEFAULT_BACKLOG = 1024


def _with_defaults(description: str, parsed: EndpointDescription) -> str:
    """Mode 0600 for unix sockets, and a backlog fit for many modules starting at once."""
    if parsed.kind == "unix" and parsed.get("mode") is None:
        description += ":mode=600"
    if parsed.kind in ("unix", "tcp", "tcp6") and parsed.get("backlog") is None:
        description += f":backlog={DEFAULT_BACKLOG}"
    return description


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _directory_mode(socket_mode: int) -> int:
    """The mode for a socket directory we create: no wider than the socket's own."""
    mode = 0o700
    if socket_mode & 0o070:
        mode |= 0o050
    if socket_mode & 0o007:
        mode |= 0o005
    return mode


def prepare_unix_socket(path: str, socket_mode: int) -> None:
    """
    Make C{path} ready to bind: create its directory, and remove a socket
    file that nothing answers on (left by a crashed daemon).

    This runs once at start-up, before the reactor serves anything; connecting
    to a unix socket answers at once (refused or accepted), so it cannot stall.

    @raise CannotListenError: when a live server answers on C{path}, or
        C{path} exists and is not a socket.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, mode=_directory_mode(socket_mode), exist_ok=True)
    except OSError as e:
        raise CannotListenError(
            "unix", path, f"cannot create the socket's directory {directory}: {e.strerror or e}"
        ) from None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise CannotListenError("unix", path, "the path exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise CannotListenError("unix", path, e) from e
    else:
        why = "another server (a live registry?) is answering on this socket"
        if st.st_uid != os.geteuid():
            why += (
                f", and the socket belongs to uid {st.st_uid}, not to this daemon's uid "
                f"{os.geteuid()}"
            )
            if _world_writable(directory):
                why += (
                    f": in {directory} any local user can take this path first; "
                    "keep the socket in a protected directory such as /var/run/hsu"
                )
        raise CannotListenError("unix", path, why)
    finally:
        probe.close()
    Logger().info("Removing stale socket {path}", path=path)
    os.remove(path)


def _explain_lock(path: str, error: CannotListenError) -> CannotListenError:
    """
    Twisted's "Cannot acquire lock" for a unix socket, said so that one can
    act on it: which process holds C{PATH.lock}, and whether it is a zombie
    (a killed daemon its parent has not reaped yet).
    """
    if str(error.socketError) != "Cannot acquire lock":
        return error
    lock = path + ".lock"
    try:
        pid = int(os.readlink(lock))
    except (OSError, ValueError):
        return CannotListenError(
            "unix", path, f"another process holds the socket's lock file {lock}"
        )
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        state = b""
    if state == b"Z":
        why = (
            f"process {pid} holds the socket's lock file {lock}: it has exited but its "
            "parent has not reaped it yet (a killed registry?); start again once it is gone"
        )
    else:
        why = (
            f"process {pid} holds the socket's lock file {lock}: a registry is still "
            "running on this socket; stop it first"
        )
    return CannotListenError("unix", path, why)


def _world_writable(directory: str) -> bool:
    try:
        return bool(os.stat(directory).st_mode & stat.S_IWOTH)
    except OSError:
        return False


#: Where the original's Go client looks for the registry with default options.
GO_CLIENT_DEFAULT_SOCKET = "/tmp/hsu-registry.sock"


def go_client_hint(paths: Iterable[str]) -> str | None:
    """
    The one line a Go module with default options needs, when none of the
    unix sockets the daemon listens on is where the Go client looks.
    """
    paths = list(paths)
    if not paths or GO_CLIENT_DEFAULT_SOCKET in paths:
        return None
    return (
        f"Go clients with default options dial unix://{GO_CLIENT_DEFAULT_SOCKET}: give them "
        f'ServiceRegistryClientOptions{{URL: "unix://{paths[0]}"}}'
    )


def describe_port(port: IListeningPort) -> str:
    """A strports-like text for where C{port} listens, e.g. ``tcp:127.0.0.1:17951``."""
    host: Any = port.getHost()
    if hasattr(host, "port"):
        return f"{host.type.lower()}:{host.host}:{host.port}"
    name = host.name.decode() if isinstance(host.name, bytes) else host.name
    return f"unix:{name}"


class ListenerService(StreamServerEndpointService):
    """
    Listens on one endpoint description for the registry's Site; start-up
    fails loudly (raises) when it cannot listen.
    """

    log = Logger()

    def __init__(self, reactor: Any, description: str, factory: Factory) -> None:
        self.parsed = parse_description(description)
        self.description = _with_defaults(description, self.parsed)
        super().__init__(serverFromString(reactor, self.description), factory)
        self._raiseSynchronously = True
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        path = self.parsed.unix_path
        if path is None:
            self._warn_if_exposed()
            super().privilegedStartService()
        else:
            mode = int(self.parsed.get("mode") or "600", 8)
            prepare_unix_socket(path, mode)
            # Bind with no group/other bits, so there is no window in which
            # the socket has the umask's mode before Twisted chmods it.
            old = os.umask(0o177)
            try:
                super().privilegedStartService()
            except CannotListenError as e:
                raise _explain_lock(path, e) from None
            finally:
                os.umask(old)
        waiting = self._waitingForPort
        assert waiting is not None
        waiting.addCallback(self._listening)

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        self.log.info("hsu-registry listening on {address}", address=describe_port(port))
        return port

    def _warn_if_exposed(self) -> None:
        if self.parsed.kind not in ("tcp", "tcp6", "ssl"):
            return
        interface = self.parsed.get("interface")
        if interface is None or not _is_loopback(interface):
            self.log.warn(
                "Endpoint {endpoint} listens beyond loopback: the registry API has "
                "no authentication, so anyone who can reach it can publish and "
                "unpublish modules",
                endpoint=self.description,
            )

    def stopService(self) -> Deferred[None]:
        if getattr(self, "_waitingForPort", None) is None:
            self.running = False
            return succeed(None)
        return super().stopService()
