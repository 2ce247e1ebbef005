# -*- test-case-name: tests.test_client_watch -*-
"""
Server-Sent Events as the registry's watch stream sends them, parsed without
I/O so both clients share it: feed bytes in, get L{WatchEvent}s out.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from attrs import frozen

__all__ = ["EventParser", "WatchEvent"]


@frozen
class WatchEvent:
    """
    One event of the watch stream.

    @ivar kind: C{hello}, C{published}, C{updated}, C{status} (a health
        check changed an API's status), C{unpublished}, C{expired}, or
        C{resync} (changes were missed: reload the catalog).
    @ivar index: the change index (the event id).
    @ivar data: the decoded JSON data: the registration for changes, the
        current index and epoch for C{hello} and C{resync}.
    """

    kind: str
    index: int
    data: dict[str, Any]

    @property
    def module_id(self) -> str | None:
        module_id = self.data.get("moduleID")
        return module_id if isinstance(module_id, str) else None

    @property
    def epoch(self) -> str | None:
        epoch = self.data.get("epoch")
        return epoch if isinstance(epoch, str) else None


class EventParser:
    """Incremental SSE parsing (comments, such as keep-alives, are skipped)."""

    def __init__(self) -> None:
        self._buffer = b""
        self._fields: dict[str, str] = {}

    def feed(self, data: bytes) -> Iterator[WatchEvent]:
        self._buffer += data
        while True:
            line, found, rest = self._buffer.partition(b"\n")
            if not found:
                return
            self._buffer = rest
            text = line.rstrip(b"\r").decode("utf-8", "replace")
            if not text:
                event = self._dispatch()
                if event is not None:
                    yield event
            elif not text.startswith(":"):
                name, _, value = text.partition(":")
                self._fields[name] = value[1:] if value.startswith(" ") else value

    def _dispatch(self) -> WatchEvent | None:
        fields, self._fields = self._fields, {}
        if "event" not in fields or "id" not in fields:
            return None
        try:
            data = json.loads(fields.get("data", "{}"))
            index = int(fields["id"])
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        return WatchEvent(fields["event"], index, data)
