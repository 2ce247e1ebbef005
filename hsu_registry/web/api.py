# -*- test-case-name: tests.test_api -*-
"""
The registry's HTTP API as Klein routes over an L{IRegistry}: the seed's
publish, discover, unpublish and health endpoints, with every error answered
as JSON from one place.
"""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from hsu_registry.durations import format_duration
from hsu_registry.errors import RegistryError
from hsu_registry.interfaces import IRegistry
from hsu_registry.model import (
    DEFAULT_LIMITS,
    Limits,
    encode_json,
    parse_process_id,
    parse_publish_body,
)
from hsu_registry.web.responses import SUCCESS, error_response, json_response

__all__ = ["RegistryAPI"]


class RegistryAPI:
    """
    The Klein application of the registry API.

    ``resource()`` gives an L{IResource} to serve from any Site, at its root or
    mounted under a path of a host application.
    """

    app = Klein()
    log = Logger()

    def __init__(self, registry: IRegistry, limits: Limits = DEFAULT_LIMITS) -> None:
        self.registry = registry
        self.limits = limits

    def resource(self) -> IResource:
        """The API as a resource that answers every request with JSON."""
        return _UTF8PathGuard(self.app.resource())

    # -- routes ----------------------------------------------------------

    @app.route("/api/v1/publish", methods=["POST"])
    async def publish(self, request: IRequest) -> bytes:
        body = request.content.read() if request.content is not None else b""
        await self.registry.publish(parse_publish_body(body, self.limits))
        return json_response(request, SUCCESS)

    @app.route("/api/v1/discover/<moduleID>", methods=["GET"])
    def discover(self, request: IRequest, moduleID: str) -> bytes:
        registration = self.registry.discover(moduleID)
        return json_response(request, registration.discover_body)

    @app.route("/api/v1/unpublish/<moduleID>", methods=["DELETE"])
    async def unpublish(self, request: IRequest, moduleID: str) -> bytes:
        args = request.args or {}
        process_id = parse_process_id(args.get(b"processID"), self.limits)
        await self.registry.unpublish(moduleID, process_id)
        return json_response(request, SUCCESS)

    @app.route("/api/v1/health", methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        status = self.registry.health()
        return json_response(
            request,
            encode_json(
                {
                    "status": "healthy",
                    "registeredModules": status.registered_modules,
                    "totalAPIs": status.total_apis,
                    "uptime": format_duration(status.uptime),
                }
            ),
        )

    # -- errors, most specific first -------------------------------------

    @app.handle_errors(RegistryError)
    def registry_error(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, RegistryError)
        return error_response(request, error.status, error.message, error.context)

    @app.handle_errors(MethodNotAllowed)
    def method_not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, MethodNotAllowed)
        allowed = sorted(error.valid_methods or ())
        request.setHeader(b"allow", ", ".join(allowed).encode("ascii"))
        return error_response(
            request,
            405,
            f"method {request.method.decode('ascii', 'replace')} is not allowed here",
            {"allowed": allowed},
        )

    @app.handle_errors(NotFound)
    def not_found(self, request: IRequest, failure: Failure) -> bytes:
        return error_response(
            request,
            404,
            "no such endpoint",
            {"path": request.path.decode("utf-8", "replace")},
        )

    @app.handle_errors(HTTPException)
    def http_exception(self, request: IRequest, failure: Failure) -> bytes:
        error: Any = failure.value
        return error_response(request, error.code or 400, error.name)

    @app.handle_errors(Exception)
    def internal_error(self, request: IRequest, failure: Failure) -> bytes:
        self.log.failure(
            "Unhandled error serving {method} {path}",
            failure,
            method=request.method,
            path=request.path,
        )
        return error_response(request, 500, "internal error")


class _UTF8PathGuard(Resource):
    """
    Answers a JSON 400 to a path that is not UTF-8 once percent-decoded
    (Klein would answer plain text), and hands everything else to Klein.
    """

    isLeaf = True

    def __init__(self, wrapped: IResource) -> None:
        super().__init__()
        self._wrapped = wrapped

    def render(self, request: IRequest) -> Any:
        try:
            for segment in request.postpath:
                segment.decode("utf-8")
        except UnicodeDecodeError:
            return error_response(request, 400, "the URL path is not UTF-8 once decoded")
        return self._wrapped.render(request)
