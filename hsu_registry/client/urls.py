# -*- test-case-name: tests.test_client_urls -*-
"""
Registry URLs: ``tcp://host:port``, ``http://host:port`` (either with a base
path, for a registry mounted under a host application's Site, e.g.
``http://127.0.0.1:18080/registry``) and ``unix:///path/to/registry.sock``
(``uds://`` as the Go client also accepts), defaulting to ``HSU_REGISTRY_URL``
and then to the daemon's own default address.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from urllib.parse import urlsplit

from attrs import frozen

__all__ = ["DEFAULT_URL", "ENVIRONMENT_VARIABLE", "RegistryAddress", "parse_registry_url"]

DEFAULT_URL = "tcp://127.0.0.1:17951"
ENVIRONMENT_VARIABLE = "HSU_REGISTRY_URL"


@frozen
class RegistryAddress:
    """Where a registry listens: a TCP host and port, or a unix socket path."""

    url: str
    host: str | None = None
    port: int | None = None
    path: str | None = None
    # The path the API is mounted under ("" at the root, else "/registry"...).
    prefix: str = ""

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    @property
    def base(self) -> bytes:
        """The HTTP URL prefix requests are made against (base path included)."""
        if self.path is not None:
            return b"http://localhost"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.prefix}".encode("ascii")

    def target(self, path: str) -> str:
        """The request target for an API path such as ``/api/v1/health``."""
        return self.prefix + path


def parse_registry_url(
    url: str | None = None, environ: Mapping[str, str] | None = None
) -> RegistryAddress:
    """
    Parse a registry URL; with none, use ``$HSU_REGISTRY_URL`` or the default.

    @raise ValueError: for a malformed URL or an unknown scheme, saying which.
    """
    if url is None:
        env = os.environ if environ is None else environ
        url = env.get(ENVIRONMENT_VARIABLE) or DEFAULT_URL
    if not isinstance(url, str) or not url.strip():
        raise ValueError("registry URL is empty")
    url = url.strip()
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"invalid registry URL {url!r}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme in ("unix", "uds"):
        path = parts.path
        if parts.netloc not in ("", "localhost") or not path.startswith("/"):
            raise ValueError(
                f"invalid registry URL {url!r}: expected unix:///absolute/path/to/registry.sock"
            )
        return RegistryAddress(url=url, path=path)
    if scheme in ("tcp", "http"):
        if not parts.hostname or not port:
            raise ValueError(f"invalid registry URL {url!r}: expected {scheme}://HOST:PORT")
        if parts.query or parts.fragment or parts.username or not parts.path.isascii():
            raise ValueError(
                f"invalid registry URL {url!r}: expected {scheme}://HOST:PORT[/BASE/PATH] "
                "(no query, fragment, user or non-ASCII characters)"
            )
        prefix = parts.path.rstrip("/")
        return RegistryAddress(url=url, host=parts.hostname, port=port, prefix=prefix)
    raise ValueError(
        f"unsupported registry URL scheme in {url!r}: use tcp://HOST:PORT, "
        "http://HOST:PORT[/BASE/PATH] or unix:///path/to/registry.sock"
    )
