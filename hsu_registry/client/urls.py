# -*- test-case-name: tests.test_client_urls -*-
"""
Registry URLs: ``tcp://host:port``, ``http://host:port``, ``https://host:port``
(any of them with a base path, for a registry mounted under a host
application's Site, e.g. ``http://127.0.0.1:18080/registry``) and
``unix:///path/to/registry.sock`` (``uds://`` as the Go client also accepts),
defaulting to ``HSU_REGISTRY_URL`` and then to the daemon's own default
address.

What a client presents and trusts comes from the same environment:
``HSU_REGISTRY_CA``, ``HSU_REGISTRY_CERT`` and ``HSU_REGISTRY_KEY`` (PEM files,
for ``https://`` only) and ``HSU_REGISTRY_TOKEN`` (a bearer token, sent on
every request); see L{client_credentials}.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from urllib.parse import urlsplit

from attrs import frozen

__all__ = [
    "CA_VARIABLE",
    "CERT_VARIABLE",
    "DEFAULT_URL",
    "ENVIRONMENT_VARIABLE",
    "KEY_VARIABLE",
    "TOKEN_VARIABLE",
    "ClientCredentials",
    "RegistryAddress",
    "client_credentials",
    "parse_registry_url",
]

DEFAULT_URL = "tcp://127.0.0.1:17951"
ENVIRONMENT_VARIABLE = "HSU_REGISTRY_URL"
#: The PEM file of the CA(s) an https registry's certificate must be signed by.
CA_VARIABLE = "HSU_REGISTRY_CA"
#: The PEM file of the client certificate (and its chain) for an https registry.
CERT_VARIABLE = "HSU_REGISTRY_CERT"
#: The PEM file of the client certificate's private key (default: CERT's file).
KEY_VARIABLE = "HSU_REGISTRY_KEY"
#: A bearer token sent as C{Authorization: Bearer TOKEN} on every request.
TOKEN_VARIABLE = "HSU_REGISTRY_TOKEN"

# RFC 6750's b64token: what a bearer token may be made of (so it cannot
# smuggle another header in).
_BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


@frozen
class RegistryAddress:
    """Where a registry listens: a TCP host and port, or a unix socket path."""

    url: str
    host: str | None = None
    port: int | None = None
    path: str | None = None
    # The path the API is mounted under ("" at the root, else "/registry"...).
    prefix: str = ""
    # https://: TLS, the registry's certificate verified.
    tls: bool = False

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    @property
    def base(self) -> bytes:
        """The HTTP URL prefix requests are made against (base path included)."""
        if self.path is not None:
            return b"http://localhost"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{host}:{self.port}{self.prefix}".encode("ascii")

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
    if scheme in ("tcp", "http", "https"):
        if not parts.hostname or not port:
            raise ValueError(f"invalid registry URL {url!r}: expected {scheme}://HOST:PORT")
        if parts.query or parts.fragment or parts.username or not parts.path.isascii():
            raise ValueError(
                f"invalid registry URL {url!r}: expected {scheme}://HOST:PORT[/BASE/PATH] "
                "(no query, fragment, user or non-ASCII characters)"
            )
        prefix = parts.path.rstrip("/")
        return RegistryAddress(
            url=url, host=parts.hostname, port=port, prefix=prefix, tls=scheme == "https"
        )
    raise ValueError(
        f"unsupported registry URL scheme in {url!r}: use tcp://HOST:PORT, "
        "http://HOST:PORT[/BASE/PATH], https://HOST:PORT[/BASE/PATH] "
        "or unix:///path/to/registry.sock"
    )


@frozen
class ClientCredentials:
    """
    What a client trusts and presents: for an https registry, the PEM files
    of the CA(s) its certificate must be signed by (C{ca}; L{None}: the
    system's trusted CAs) and of a client certificate and its key; on any
    transport, a bearer token.
    """

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    token: str | None = None

    @property
    def authorization(self) -> bytes | None:
        """The C{Authorization} header's value, or L{None} without a token."""
        return None if self.token is None else b"Bearer " + self.token.encode("ascii")


def client_credentials(
    address: RegistryAddress,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    token: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> ClientCredentials:
    """
    The credentials a client of C{address} uses: each one given, else its
    environment variable (C{$HSU_REGISTRY_CA}, C{$HSU_REGISTRY_CERT},
    C{$HSU_REGISTRY_KEY}, C{$HSU_REGISTRY_TOKEN}; empty counts as unset).
    The TLS variables are ignored for a registry that is not C{https://} (one
    environment may serve both); the TLS arguments are refused there, as
    they would silently protect nothing.  The files are not read here.

    @raise ValueError: saying what is wrong (TLS files for a plain registry,
        a key without a certificate, a token that is not an RFC 6750 token).
    """
    env = os.environ if environ is None else environ
    given = [name for name, value in (("ca", ca), ("cert", cert), ("key", key)) if value]
    if not address.tls:
        if given:
            raise ValueError(
                f"{', '.join(given)} given for {address.url}: TLS files need an "
                "https://HOST:PORT registry URL"
            )
        ca = cert = key = None
    else:
        ca = ca or env.get(CA_VARIABLE) or None
        cert = cert or env.get(CERT_VARIABLE) or None
        key = key or env.get(KEY_VARIABLE) or None
        if key is not None and cert is None:
            raise ValueError(f"a client key was given without its certificate (${CERT_VARIABLE})")
    token = token or env.get(TOKEN_VARIABLE) or None
    if token is not None and not _BEARER_TOKEN.fullmatch(token):
        raise ValueError(
            "the registry token is not a bearer token (letters, digits and -._~+/ "
            "with = at the end)"
        )
    return ClientCredentials(ca=ca, cert=cert, key=key, token=token)
