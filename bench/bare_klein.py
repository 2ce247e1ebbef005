"""
A bare Klein application, the start-up yardstick for the daemon:
C{twistd -n web --class=bench.bare_klein.resource} imports Klein and serves
a health route and a discover route from a dict, with nothing of
hsu_registry.  L{bench.startup} runs it with C{PYTHONPATH} pointing at a
directory holding only this C{bench} package.

Importing this module imports Klein, which installs the default reactor.
"""

from __future__ import annotations

from klein import Klein
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

__all__ = ["resource"]

app = Klein()
BODIES = {
    "echo": b'{"moduleID":"echo","apis":[{"serviceIDs":["service1"],"serverPort":50051,'
    b'"protocol":"grpc"}]}'
}


@app.route("/api/v1/health", methods=["GET"])
def health(request: IRequest) -> bytes:
    """A constant health answer."""
    request.setHeader(b"content-type", b"application/json")
    return b'{"status":"healthy"}'


@app.route("/api/v1/discover/<moduleID>", methods=["GET"])
def discover(request: IRequest, moduleID: str) -> bytes:
    """A discover answer from the dict, or a JSON 404."""
    request.setHeader(b"content-type", b"application/json")
    body = BODIES.get(moduleID)
    if body is None:
        request.setResponseCode(404)
        return b'{"success":false,"error":"module not found"}'
    return body


def resource() -> IResource:
    """The Klein resource (twistd web's C{--class} calls it with no argument)."""
    return app.resource()
