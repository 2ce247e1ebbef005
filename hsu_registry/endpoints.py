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
import socket
import stat
from typing import Any

from attrs import frozen
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.logger import Logger

__all__ = [
    "DEFAULT_ENDPOINT",
    "EndpointDescription",
    "ListenerService",
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
    os.makedirs(directory, mode=_directory_mode(socket_mode), exist_ok=True)
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
        raise CannotListenError(
            "unix", path, "another server (a live registry?) is answering on this socket"
        )
    finally:
        probe.close()
    Logger().info("Removing stale socket {path}", path=path)
    os.remove(path)


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
