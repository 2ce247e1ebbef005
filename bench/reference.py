"""
The reference ceiling: a bare C{twisted.web} L{Resource} answering
C{GET /api/v1/discover/<id>} from a dict of pre-encoded bodies, with the same
bytes, status and headers as the daemon (C{Content-Type: application/json},
C{Content-Length}), on the same kind of L{Site} without an access log.  What
the daemon does beyond this (routing, validation, the registry) is what its
ratio to this server measures.

    python -m bench.reference --endpoint=tcp:0:interface=127.0.0.1 \\
        --endpoint=unix:/tmp/x/ref.sock --bodies=bodies.json

C{bodies.json} maps module IDs to discover bodies (JSON strings, encoded as
UTF-8 to be served).  It logs C{reference listening on ...} lines to stderr
and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

__all__ = ["DiscoverResource", "main"]

PREFIX = b"/api/v1/discover/"
JSON = b"application/json"
NOT_FOUND = b'{"success":false,"error":"module not found"}'


class DiscoverResource(Resource):
    """Serves pre-encoded discover bodies, and a JSON 404 for anything else."""

    isLeaf = True

    def __init__(self, bodies: dict[bytes, bytes]) -> None:
        super().__init__()
        self.bodies = bodies

    def render_GET(self, request: IRequest) -> bytes:
        path = request.path
        body = self.bodies.get(path[len(PREFIX) :]) if path.startswith(PREFIX) else None
        if body is None:
            request.setResponseCode(404)
            body = NOT_FOUND
        request.setHeader(b"content-type", JSON)
        request.setHeader(b"content-length", b"%d" % len(body))
        return body


def main(argv: list[str] | None = None) -> None:
    """Serve until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--endpoint", action="append", required=True, help="strports description")
    parser.add_argument("--bodies", required=True, help="JSON file: module ID -> discover body")
    args = parser.parse_args(argv)
    with open(args.bodies, encoding="utf-8") as f:
        bodies = {k.encode("utf-8"): v.encode("utf-8") for k, v in json.load(f).items()}

    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    from twisted.web.server import Site

    class QuietSite(Site):
        """A Site without an access log (the daemon's default)."""

        displayTracebacks = False

        def log(self, request: Any) -> None:
            pass

    site = QuietSite(DiscoverResource(bodies))
    r: Any = reactor

    def listening(port: Any) -> None:
        host = port.getHost()
        if hasattr(host, "port"):
            where = f"tcp:{host.host}:{host.port}"
        else:
            name = host.name.decode() if isinstance(host.name, bytes) else host.name
            where = f"unix:{name}"
        sys.stderr.write(f"reference listening on {where}\n")
        sys.stderr.flush()

    def failed(failure: Any) -> None:
        sys.stderr.write(f"reference: cannot listen: {failure.getErrorMessage()}\n")
        r.stop()

    def start() -> None:
        for description in args.endpoint:
            d = serverFromString(r, description).listen(site)
            d.addCallbacks(listening, failed)

    r.callWhenRunning(start)
    r.run()


if __name__ == "__main__":
    main()
