# -*- test-case-name: tests.test_tls -*-
"""
Mutual TLS: a listener that admits only clients holding a certificate signed
by a configured CA, the identity such a certificate proves, and the TLS
settings of the Twisted-native client.

The listener is the strports endpoint ``mtls:``, named like Twisted's
``ssl:`` where its options exist::

    mtls:8443:interface=0.0.0.0:certKey=server.pem:privateKey=key.pem:caCerts=ca.pem

Twisted's ``ssl:`` never asks the client for a certificate; ``mtls:`` does,
and OpenSSL fails the handshake when none is sent, when it is not signed by
one of C{caCerts}, or when it has expired (or is not yet valid).  Its parser
is the lazy plugin C{twisted/plugins/hsu_registry_mtls.py}, which imports
this module only when an ``mtls:`` description is built.

Every file is read when the endpoint (or the client's options) is built, so a
missing or bad file is one clear line at start-up, not a failed handshake
later.  A renewed certificate takes a restart (or a new client).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL.crypto import FILETYPE_PEM, load_privatekey
from twisted.internet import ssl
from twisted.internet.endpoints import SSL4ServerEndpoint

if TYPE_CHECKING:
    from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

    from hsu_registry.security.identity import Identity

__all__ = [
    "DEFAULT_BACKLOG",
    "certificate_identity",
    "certificate_name",
    "client_tls_options",
    "mtls_server_endpoint",
]

#: The listen queue of an ``mtls:`` endpoint without ``backlog=``: the same as
#: the daemon gives its tcp: and unix: endpoints (Twisted's 50 refuses the
#: 51st module of a host whose modules start together).
DEFAULT_BACKLOG = 1024

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)

_EXAMPLE = "mtls:8443:certKey=server.pem:privateKey=key.pem:caCerts=ca.pem"


# -- reading PEM files ---------------------------------------------------------


def _read(path: str, what: str) -> bytes:
    """The bytes of file C{path}, or a ValueError that names C{what} it was for."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read {what} {path!r}: {e.strerror or e}") from None


def _load_certificates(path: str, what: str) -> list[ssl.Certificate]:
    """Every PEM certificate of file C{path}, in order; at least one."""
    blocks = _PEM_CERTIFICATE.findall(_read(path, what))
    if not blocks:
        raise ValueError(f"{what} {path!r} holds no PEM certificate")
    try:
        return [ssl.Certificate.loadPEM(block) for block in blocks]
    except Exception as e:
        raise ValueError(f"{what} {path!r} holds a malformed certificate: {_one_line(e)}") from None


def _load_identity(
    cert_path: str, key_path: str, what: str
) -> tuple[ssl.PrivateCertificate, list[ssl.Certificate]]:
    """
    The certificate of C{cert_path} with the private key of C{key_path} (the
    same file may hold both), and the certificates after the first in
    C{cert_path}: the chain up to the CA, sent along with it.

    @raise ValueError: when a file cannot be read or parsed, or the key is not
        the certificate's.
    """
    certificates = _load_certificates(cert_path, f"the {what} certificate file")
    key_pem = _read(key_path, f"the {what} private key file")
    try:
        # The callable refuses an encrypted key rather than let OpenSSL
        # prompt for its passphrase on the terminal.
        key = ssl.KeyPair(load_privatekey(FILETYPE_PEM, key_pem, passphrase=_no_passphrase))
    except _Encrypted:
        raise ValueError(
            f"the {what} private key file {key_path!r} is encrypted "
            "(an unencrypted PEM key is needed)"
        ) from None
    except Exception as e:
        raise ValueError(
            f"the {what} private key file {key_path!r} holds no usable PEM private key: "
            f"{_one_line(e)}"
        ) from None
    try:
        private = ssl.PrivateCertificate.fromCertificateAndKeyPair(certificates[0], key)
    except Exception:
        raise ValueError(
            f"the {what} private key {key_path!r} does not match the certificate {cert_path!r}"
        ) from None
    return private, certificates[1:]


class _Encrypted(Exception):
    """A private key file is encrypted."""


def _no_passphrase(maxlength: int, verify: bool, extra: object = None) -> bytes:
    raise _Encrypted()


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# -- the mtls: server endpoint ---------------------------------------------------


def mtls_server_endpoint(
    reactor: Any,
    *args: str,
    port: str | None = None,
    interface: str = "",
    backlog: str | None = None,
    certKey: str | None = None,
    privateKey: str | None = None,
    caCerts: str | None = None,
    extraCertChain: str | None = None,
) -> SSL4ServerEndpoint:
    """
    The endpoint of an ``mtls:`` description: TLS on TCP that requires a
    client certificate signed by one of C{caCerts}.

    The options are those of Twisted's ``ssl:`` (but C{sslmethod} and
    C{dhParameters}, which modern TLS does without), plus C{caCerts}:

    @param port: the TCP port, also the first positional argument.
    @param interface: the address to listen on; all of them by default, as
        for ``ssl:`` (every client must prove who it is).
    @param backlog: the listen queue (default L{DEFAULT_BACKLOG}).
    @param certKey: the PEM file of the server's certificate; certificates
        after the first are the chain sent with it.  Default: C{privateKey}.
    @param privateKey: the PEM file of its private key.  Default: C{certKey}
        (one file holding both).
    @param caCerts: the PEM file of the CA certificate(s) a client's
        certificate must be signed by (required).
    @param extraCertChain: a PEM file of more chain certificates, as ``ssl:``.

    @raise ValueError: saying which option or file is wrong, in one line.
    """
    if len(args) > 1 or (args and port is not None):
        raise ValueError(f"expected one port, then name=value options (e.g. {_EXAMPLE})")
    port_text = args[0] if args else port
    if port_text is None:
        raise ValueError(f"no port given (e.g. {_EXAMPLE})")
    port_number = _number(port_text, "the port", 0, 65535)
    backlog_number = (
        DEFAULT_BACKLOG if backlog is None else _number(backlog, "the backlog", 1, 65535)
    )
    if certKey is None and privateKey is None:
        raise ValueError(
            "no server certificate given: certKey=CERT.pem and privateKey=KEY.pem "
            f"(e.g. {_EXAMPLE})"
        )
    if caCerts is None:
        raise ValueError(
            "no caCerts=CA.pem given: the CA that client certificates must be signed by "
            f"(e.g. {_EXAMPLE}); use ssl: for TLS without client certificates"
        )
    cert_path = certKey if certKey is not None else privateKey
    key_path = privateKey if privateKey is not None else certKey
    assert cert_path is not None and key_path is not None
    server, chain = _load_identity(cert_path, key_path, "server")
    if extraCertChain is not None:
        chain += _load_certificates(extraCertChain, "the extraCertChain file")
    authorities = _load_certificates(caCerts, "the caCerts file")
    options = ssl.CertificateOptions(
        privateKey=server.privateKey.original,
        certificate=server.original,
        extraCertChain=[c.original for c in chain] or None,
        # A trust root turns on verification and requires a certificate
        # (VERIFY_PEER | VERIFY_FAIL_IF_NO_PEER_CERT).
        trustRoot=ssl.trustRootFromCertificates(authorities),
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )
    # Build the OpenSSL context now: a problem with it is a start-up error.
    options.getContext()
    return SSL4ServerEndpoint(
        reactor, port_number, options, backlog=backlog_number, interface=interface
    )


def _number(text: str, what: str, low: int, high: int) -> int:
    if not (text.isdigit() and low <= int(text) <= high):
        raise ValueError(f"{what} {text!r} is not a number from {low} to {high}")
    return int(text)


# -- the identity a certificate proves -------------------------------------------


def certificate_name(certificate: x509.Certificate) -> str | None:
    """
    The name a certificate speaks for: its first URI subject alternative name
    (a SPIFFE ID such as C{spiffe://example.org/echo}), else its first DNS
    name, else its subject's common name; L{None} when it has none of them.
    """
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = None
    if names is not None:
        for kind in (x509.UniformResourceIdentifier, x509.DNSName):
            values = names.get_values_for_type(kind)
            if values:
                return str(values[0])
    common = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if common:
        value = common[0].value
        return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return None


def certificate_identity(transport: object) -> Identity | None:
    """
    The identity the peer's certificate proves on C{transport}: C{x509} with
    L{certificate_name}, when C{transport} is TLS (a
    L{twisted.protocols.tls.TLSMemoryBIOProtocol}, what a request's
    C{transport} is on an ``mtls:`` or ``ssl:`` listener) and the peer sent a
    certificate; L{None} otherwise (plain TCP, unix sockets, in-memory
    transports, TLS without a client certificate).

    A Twisted TLS server asks for a client certificate only when it verifies
    it (``mtls:``), and the handshake fails when it does not verify: a
    certificate seen here was verified against the listener's CAs.
    """
    get_peer = getattr(transport, "getPeerCertificate", None)
    if get_peer is None:
        return None
    try:
        peer = get_peer()
    except Exception:  # no TLS connection (yet, or any more)
        return None
    if peer is None:
        return None
    name = certificate_name(peer.to_cryptography())
    if name is None:
        return None
    # Imported here: hsu_registry.security.identity imports this module
    # (connection_identity asks certificate_identity first).
    from hsu_registry.security.identity import Identity

    return Identity("x509", name)


# -- the Twisted-native client's TLS -------------------------------------------


def client_tls_options(
    hostname: str, ca: str | None = None, cert: str | None = None, key: str | None = None
) -> IOpenSSLClientConnectionCreator:
    """
    TLS options for connecting to the registry at C{hostname} (a DNS name or
    an IP address): its certificate must be signed by one of the certificates
    of file C{ca} (the system's trusted CAs without one) and be for
    C{hostname} (checked by service_identity); C{cert} (with C{key}, or a
    file holding both) is presented as the client certificate.

    @raise ValueError: saying which file is wrong, in one line.
    """
    trust = (
        ssl.trustRootFromCertificates(_load_certificates(ca, "the CA file"))
        if ca is not None
        else None
    )
    client: ssl.PrivateCertificate | None = None
    extra: dict[str, Any] = {}
    if cert is not None:
        client, chain = _load_identity(cert, key if key is not None else cert, "client")
        if chain:
            extra["extraCertChain"] = [c.original for c in chain]
    elif key is not None:
        raise ValueError("a client key was given without its certificate")
    return ssl.optionsForClientTLS(
        hostname,
        trustRoot=trust,
        clientCertificate=client,
        extraCertificateOptions=extra or None,
    )
