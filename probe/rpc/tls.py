"""TLS contexts for RPC between consumers and providers (`rpc_tls.<env>`).

Mutual TLS: a provider asks every caller for a certificate and accepts only one
signed by `ca`; a consumer presents its own and accepts only a provider whose
certificate `ca` signed. TLS 1.2 is the oldest version either side speaks.

Hostname checking is off on the consumer side, on purpose: providers register
whatever address they advertise (an outbound IP that changes with every container
or DHCP lease), so a fleet's provider certificates cannot be expected to name
every address. The trust boundary is the CA itself: keep `ca` dedicated to RPC
(the secured stack does), and a certificate it signed is a member of the fleet.
The chain is still verified, and OpenSSL's purpose check applies: a provider must
hold a certificate valid for server authentication, so a consumer-only
certificate (clientAuth) cannot pose as a provider.
"""

import ssl
from typing import NoReturn, Protocol

from ..errors import ConfigError


class RpcTlsError(ConfigError):
    """`rpc_tls.<env>` names files that do not make a usable TLS identity: a
    certificate or key that is not PEM, a key that does not match its
    certificate, or a CA file without a certificate."""


class TlsFiles(Protocol):
    """What the contexts read: PEM paths (`probe.settings.RpcTls` is one)."""

    @property
    def ca(self) -> str: ...

    @property
    def cert(self) -> str: ...

    @property
    def key(self) -> str: ...


def server_context(tls: TlsFiles, where: str = "rpc_tls") -> ssl.SSLContext:
    """An SSLContext for a provider: mutual TLS only.

    :param tls: a `probe.settings.RpcTls`.
    :param where: what to name in an error (the config file and key).
    :raises RpcTlsError: when a file cannot be loaded.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.verify_mode = ssl.CERT_REQUIRED
    _common(context, tls, where)
    # probe's consumers never resume sessions: tickets would cost CPU and bytes
    # for nothing (and arrive as unread bytes on a fresh pooled connection).
    context.num_tickets = 0
    return context


def client_context(tls: TlsFiles, where: str = "rpc_tls") -> ssl.SSLContext:
    """An SSLContext for a consumer: presents `cert`, verifies providers against
    `ca` (chain and serverAuth purpose; hostname not checked, see the module).

    :param tls: a `probe.settings.RpcTls`.
    :param where: what to name in an error (the config file and key).
    :raises RpcTlsError: when a file cannot be loaded.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    _common(context, tls, where)
    return context


def _common(context: ssl.SSLContext, tls: TlsFiles, where: str) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    for name in ("ca", "cert", "key"):
        if not getattr(tls, name, None):
            raise RpcTlsError("%s: '%s' is missing: give the PEM paths ca, cert and key"
                              % (where, name))
    try:
        context.load_verify_locations(cafile=tls.ca)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise RpcTlsError("%s: cannot load the CA file %s (%s): give the PEM certificate of "
                          "the CA that signs the fleet's RPC certificates"
                          % (where, tls.ca, _reason(exc)))
    def encrypted(*_: object) -> NoReturn:
        # Without this, OpenSSL would prompt on the terminal and hang a service's start.
        raise RpcTlsError("%s: the key %s is encrypted: give an unencrypted PEM private key "
                          "(protect it with file permissions)" % (where, tls.key))
    try:
        context.load_cert_chain(tls.cert, tls.key, password=encrypted)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise RpcTlsError("%s: cannot load the certificate %s with the key %s (%s): give a PEM "
                          "certificate and its own unencrypted PEM private key"
                          % (where, tls.cert, tls.key, _reason(exc)))


def _reason(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError) and getattr(exc, "reason", None):
        return exc.reason
    return exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)


def is_refused_handshake(exc: BaseException) -> bool:
    """True if `exc` is a TLS alert from the peer: it aborted the handshake (with
    TLS 1.3 a consumer learns that its certificate was refused only on its first
    read, after its request was written). A provider sends no alert once a
    connection is established, so such a request never reached a handler."""
    return isinstance(exc, ssl.SSLError) and "ALERT" in (getattr(exc, "reason", None) or "")
