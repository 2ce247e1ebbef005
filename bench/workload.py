"""
What the benchmark sends: the seed's publish body with two APIs, the module
every discover asks for, and the paths of the API.
"""

from __future__ import annotations

import json

__all__ = [
    "DISCOVER_MODULE",
    "HEALTH_PATH",
    "ID_PLACEHOLDER",
    "PUBLISH_PATH",
    "discover_path",
    "publish_body",
    "publish_template",
]

PUBLISH_PATH = "/api/v1/publish"
HEALTH_PATH = "/api/v1/health"
DISCOVER_MODULE = "echo"
#: Replaced by a module ID in templates (it cannot occur in JSON we write).
ID_PLACEHOLDER = "{ID}"


def discover_path(module_id: str = DISCOVER_MODULE) -> str:
    """The discover path of C{module_id} (benchmark IDs need no escaping)."""
    return f"/api/v1/discover/{module_id}"


def publish_body(module_id: str, process_id: int = 1234) -> bytes:
    """The seed's publish body, with two APIs, for C{module_id}."""
    return json.dumps(
        {
            "moduleID": module_id,
            "processID": process_id,
            "apis": [
                {"serviceIDs": ["service1"], "serverPort": 50051, "protocol": "grpc"},
                {"serviceIDs": ["service2"], "serverPort": 50052, "protocol": "grpc"},
            ],
        },
        separators=(",", ":"),
    ).encode("ascii")


def publish_template() -> str:
    """The publish body with L{ID_PLACEHOLDER} where the module ID goes."""
    return publish_body(ID_PLACEHOLDER).decode("ascii")
