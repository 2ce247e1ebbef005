# -*- test-case-name: tests.test_api -*-
"""
JSON answers: success, errors in the seed's ``{"success": false, "error": ...}``
shape, and the raw 413 written before a request body is read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.web.iweb import IRequest

from hsu_registry.model import encode_json

__all__ = ["SUCCESS", "error_body", "error_response", "json_response"]

JSON_CONTENT_TYPE = b"application/json"
SUCCESS = b'{"success":true}'


def json_response(request: IRequest, body: bytes, status: int = 200) -> bytes:
    """Set the status and JSON content type, and return C{body} to be written."""
    if status != 200:
        request.setResponseCode(status)
    request.setHeader(b"content-type", JSON_CONTENT_TYPE)
    return body


def error_body(message: str, context: Mapping[str, Any] | None = None) -> bytes:
    body: dict[str, Any] = {"success": False, "error": message}
    if context:
        body["context"] = dict(context)
    return encode_json(body)


def error_response(
    request: IRequest,
    status: int,
    message: str,
    context: Mapping[str, Any] | None = None,
) -> bytes:
    return json_response(request, error_body(message, context), status)
