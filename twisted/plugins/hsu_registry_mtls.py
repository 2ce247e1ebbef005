"""
The ``mtls:`` strports endpoint of hsu-registry: TLS that requires a client
certificate signed by a given CA, e.g.
``mtls:8443:certKey=server.pem:privateKey=key.pem:caCerts=ca.pem``.

Like the twistd plugin beside it, this module imports nothing heavy: every
lookup of an endpoint parser imports it (any ``serverFromString``, in any
program), so L{hsu_registry.security.tls} (pyOpenSSL, cryptography) is
imported only when an ``mtls:`` description is built.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IStreamServerEndpoint, IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IPlugin, IStreamServerEndpointStringParser)
class MutualTLSServerParser:
    """Parses ``mtls:`` descriptions (see L{hsu_registry.security.tls.mtls_server_endpoint})."""

    prefix = "mtls"

    def parseStreamServer(self, reactor: Any, *args: Any, **kwargs: Any) -> IStreamServerEndpoint:
        from hsu_registry.security.tls import mtls_server_endpoint

        return mtls_server_endpoint(reactor, *args, **kwargs)


hsuRegistryMutualTLS = MutualTLSServerParser()
