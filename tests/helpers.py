"""Small builders shared by the tests."""

from __future__ import annotations

import json
import socket
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from hsu_registry.model import ModuleAPI, PublishRequest

SEED_PUBLISH = {
    "moduleID": "test",
    "processID": 1234,
    "apis": [{"serviceIDs": ["service1"], "serverPort": 50051, "protocol": "grpc"}],
}


def held_port(case: SynchronousTestCase, port: int = 0) -> socket.socket:
    """
    A socket bound to a loopback TCP port but not listening, closed when the
    test ends (or earlier, to listen there again): connections to the port
    are refused, and neither another process nor the kernel (as a
    connection's source port) can take it meanwhile, as they could a port
    merely closed.  C{port}: hold this one (a listener just stopped).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    case.addCleanup(sock.close)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


def refusing_port(case: SynchronousTestCase, port: int = 0) -> int:
    """A loopback TCP port that refuses connections until the test ends (see L{held_port})."""
    number: int = held_port(case, port).getsockname()[1]
    return number


def api(*service_ids: str, port: int = 50051, protocol: str = "grpc") -> ModuleAPI:
    return ModuleAPI(service_ids=service_ids or ("service1",), server_port=port, protocol=protocol)


def publish_request(
    module_id: str = "echo", process_id: int = 1234, apis: int = 1
) -> PublishRequest:
    return PublishRequest(
        module_id=module_id,
        process_id=process_id,
        apis=tuple(api(f"service{i}", port=50051 + i) for i in range(apis)),
    )


def publish_body(module_id: str = "echo", process_id: int = 1234, **extra: Any) -> bytes:
    body = dict(SEED_PUBLISH, moduleID=module_id, processID=process_id)
    body.update(extra)
    return json.dumps(body).encode("utf-8")
