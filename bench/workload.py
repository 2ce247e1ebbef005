"""
What the benchmark sends: the seed's publish body with two APIs, the module
every discover asks for, and the paths of the API.
"""

from __future__ import annotations

import json

__all__ = [
    "CONNECTION_PLACEHOLDER",
    "DISCOVER_MODULE",
    "HEALTH_PATH",
    "ID_PLACEHOLDER",
    "PUBLISH_PATH",
    "discover_path",
    "paced_publish_template",
    "publish_body",
    "publish_template",
]

PUBLISH_PATH = "/api/v1/publish"
HEALTH_PATH = "/api/v1/health"
DISCOVER_MODULE = "echo"
#: Replaced by a module ID in templates (it cannot occur in JSON we write).
ID_PLACEHOLDER = "{ID}"
#: Replaced by the number of the connection sending the request (L{bench.loadgen}).
CONNECTION_PLACEHOLDER = "{CONN}"


def discover_path(module_id: str = DISCOVER_MODULE) -> str:
    """The discover path of C{module_id} (benchmark IDs need no escaping)."""
    return f"/api/v1/discover/{module_id}"


def publish_body(
    module_id: str, process_id: int = 1234, metadata: dict[str, str] | None = None
) -> bytes:
    """The seed's publish body, with two APIs, for C{module_id} (each API with C{metadata})."""
    apis: list[dict[str, object]] = [
        {"serviceIDs": ["service1"], "serverPort": 50051, "protocol": "grpc"},
        {"serviceIDs": ["service2"], "serverPort": 50052, "protocol": "grpc"},
    ]
    if metadata is not None:
        for api in apis:
            api["metadata"] = metadata
    return json.dumps(
        {"moduleID": module_id, "processID": process_id, "apis": apis},
        separators=(",", ":"),
    ).encode("ascii")


def publish_template() -> str:
    """The publish body with L{ID_PLACEHOLDER} where the module ID goes."""
    return publish_body(ID_PLACEHOLDER).decode("ascii")


def paced_publish_template(prefix: str = "publisher-") -> str:
    """
    The publish body of connection number L{CONNECTION_PLACEHOLDER}'s own
    module, C{prefix} and that number, whose APIs carry a metadata value
    L{ID_PLACEHOLDER} that is new on every request: every publish changes the
    module's content, so none is taken for a heartbeat (an identical
    re-publish, which the daemon does not write).
    """
    body = publish_body(prefix + CONNECTION_PLACEHOLDER, metadata={"seq": ID_PLACEHOLDER})
    return body.decode("ascii")
