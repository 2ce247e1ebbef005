"""
The watch stream (C{GET /api/v1/watch}, C{Accept: text/event-stream}) as a
client sees it: the request, and a parser of the answer fed as it arrives
(head, chunked transfer coding, then C{id:}/C{event:}/C{data:} blocks), each
event stamped with the arrival of its last byte.  Used by L{bench.fanout}
(many watchers, parsed at the end) and L{bench.liveness} (one stream, read
as it comes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["Event", "SSEParser", "Stamp", "parse_head", "watch_request"]


def watch_request(host: str) -> bytes:
    """The C{GET /api/v1/watch} request asking for an event stream, as HTTP/1.1 bytes."""
    return (
        b"GET /api/v1/watch HTTP/1.1\r\nHost: %s\r\n"
        b"Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n" % host.encode("ascii")
    )


class Stamp(NamedTuple):
    """
    When bytes arrived: the kernel's receive time (C{SO_TIMESTAMPNS},
    CLOCK_REALTIME nanoseconds; 0 when the kernel gave none) and when this
    process read them (the reader's clock: C{time.perf_counter()} in
    L{bench.fanout}, C{time.monotonic()} in L{bench.liveness}, which asks no
    kernel stamp).  Over loopback the kernel stamps data as the daemon sends
    it, so the first does not include the time this process took to get to
    the socket.
    """

    ns: int
    read: float


@dataclass
class Event:
    """One server-sent event, stamped with the arrival of its last byte."""

    stamp: Stamp
    id: str | None
    event: str
    data: str


def parse_head(raw: bytes) -> tuple[int, dict[str, str]]:
    """The status and the (lower-cased) headers of an HTTP answer head."""
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


class SSEParser:
    """An HTTP answer carrying an event stream: head, chunked coding, events."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.events: list[Event] = []
        self.ended = False  # the last chunk came: the daemon ended the stream
        self.error: str | None = None
        self._raw = bytearray()
        self._text = bytearray()
        self.head_done = False  # the status and the headers are known
        self.chunked = False
        self._left = 0  # bytes of chunk data still to come
        self._crlf = False  # the CRLF after a chunk's data is still to come

    def feed(self, stamp: Stamp, data: bytes) -> None:
        """Take C{data}, which arrived at C{stamp}."""
        if self.error is not None:
            return
        raw = self._raw
        raw += data
        if not self.head_done:
            end = raw.find(b"\r\n\r\n")
            if end < 0:
                return
            self.status, self.headers = parse_head(bytes(raw[:end]))
            del raw[: end + 4]
            self.head_done = True
            self.chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        if not self.chunked:
            self._body(stamp, bytes(raw))
            raw.clear()
            return
        while not self.ended:
            if self._left:
                if not raw:
                    break
                piece = bytes(raw[: self._left])
                del raw[: len(piece)]
                self._left -= len(piece)
                self._body(stamp, piece)
                continue
            if self._crlf:
                if len(raw) < 2:
                    break
                if raw[:2] != b"\r\n":
                    self.error = "a chunk not followed by CRLF"
                    return
                del raw[:2]
                self._crlf = False
                continue
            end = raw.find(b"\r\n")
            if end < 0:
                break
            try:
                size = int(bytes(raw[:end]).split(b";")[0], 16)
            except ValueError:
                self.error = f"a bad chunk size line {bytes(raw[:end])[:40]!r}"
                return
            del raw[: end + 2]
            if size == 0:
                self.ended = True
                break
            self._left = size
            self._crlf = True

    def _body(self, stamp: Stamp, piece: bytes) -> None:
        text = self._text
        text += piece
        while True:
            end = text.find(b"\n\n")
            if end < 0:
                return
            block = bytes(text[:end]).decode("utf-8", "replace")
            del text[: end + 2]
            fields: dict[str, str] = {}
            data: list[str] = []
            for line in block.split("\n"):
                if not line or line.startswith(":"):
                    continue  # a comment: the keep-alive
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "data":
                    data.append(value)
                else:
                    fields[name] = value
            if "event" in fields or data:
                self.events.append(
                    Event(stamp, fields.get("id"), fields.get("event", "message"), "\n".join(data))
                )
