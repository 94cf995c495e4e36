"""Per-node pools of persistent thrift connections.

A connection is used by one call at a time: taken from the pool, used, and put
back only if the call completed cleanly. Any error or timeout discards it, because
thriftpy2 never checks sequence ids and a late reply would otherwise be read by
the next call (thriftpy2#130). A pooled connection the server has closed in the
meantime (thriftpy2's own server drops idle ones after 3 s; a killed provider's
kernel closes them all) is noticed before use with a zero-timeout poll and
replaced, so the call never sees it. The poll is a syscall, so it is skipped for a
connection put back less than STALE_CHECK_AFTER ago: it answered a call an instant
before, and a server dying inside that instant is no different from one dying
while the call is in flight.

TLS (`rpc_tls.<env>`): a pool given an SSLContext opens TLS connections; the
handshake is part of opening one, so a failed handshake is a ConnectFailed like a
refused connect (nothing was sent; the call may go elsewhere). A pooled TLS
connection is stale also when OpenSSL holds decrypted bytes nobody asked for.
"""

import select
import socket
import ssl
import time

from collections import deque
from typing import Any, Deque, Optional

from thriftpy2.transport import TSocket, TTransportException

from .codec import DEFAULT_CODEC, Codec

STALE_CHECK_AFTER = 0.0002  # seconds idle before a pooled connection is polled

perf_counter = time.perf_counter  # the client's clock: it passes its own readings


class ConnectFailed(Exception):
    """Could not open a connection: nothing was sent, any call may go elsewhere."""


class Connection(object):
    """One open connection: the transport and protocol of its node's dialect
    (`codec`), and `send_call(conn, method, payload, seqid)`, the codec's writer."""

    __slots__ = ("transport", "protocol", "sock", "poller", "seqid", "released_at", "send_call")

    def __init__(self, host: str, port: int, timeout_ms: float, connect_timeout_ms: float,
                 ssl_context: Optional[ssl.SSLContext] = None,
                 codec: Codec = DEFAULT_CODEC) -> None:
        raw = TSocket(host, port, socket_timeout=timeout_ms, connect_timeout=connect_timeout_ms)
        try:
            raw.open()
        except (TTransportException, OSError) as exc:
            raise ConnectFailed("cannot connect to %s:%d: %s" % (host, port, exc))
        if ssl_context is not None:
            _handshake(raw, ssl_context, host, port, connect_timeout_ms)
        self.sock = raw.sock
        self.transport, self.protocol = codec.wrap(raw)
        self.send_call = codec.send_call
        self.poller = select.poll()
        self.poller.register(self.sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        self.seqid = 0
        self.released_at = 0.0

    def is_stale(self) -> bool:
        # An idle connection has nothing to read; readable means EOF, a reset or a
        # stray late reply: either way it cannot carry a new call.
        try:
            return bool(self.poller.poll(0))
        except (OSError, ValueError):
            return True

    def close(self) -> None:
        try:
            self.transport.close()
        except (OSError, TTransportException, AttributeError):
            pass


class TlsConnection(Connection):
    """A Connection over TLS (give it the SSLContext); only its stale check differs."""

    __slots__ = ()

    def is_stale(self) -> bool:
        # Decrypted bytes waiting inside OpenSSL are invisible to poll().
        try:
            return bool(self.sock.pending() or self.poller.poll(0))
        except (OSError, ValueError, AttributeError):
            return True


def _handshake(raw: Any, context: ssl.SSLContext, host: str, port: int,
               connect_timeout_ms: float) -> None:
    """Replace the connected `raw.sock` by a TLS socket (handshake within
    connect_timeout); a failure closes it and raises ConnectFailed."""
    try:
        raw.sock.settimeout(connect_timeout_ms / 1000.0)
        # probe's client contexts do not check hostnames (see probe.rpc.tls): no
        # server_hostname, providers are named by IP.
        secure = context.wrap_socket(raw.sock)
        secure.settimeout(raw.socket_timeout)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raw.close()
        raise ConnectFailed("TLS handshake with %s:%d failed: %s" % (
            host, port, getattr(exc, "reason", None) or exc))
    raw.sock = secure


class NodePool(object):
    """Idle connections to one node. Thread-safe: deque append/pop are atomic."""

    def __init__(self, host: str, port: int, timeout_ms: float = 500,
                 connect_timeout_ms: Optional[float] = None, max_idle: int = 64,
                 ssl_context: Optional[ssl.SSLContext] = None,
                 codec: Codec = DEFAULT_CODEC) -> None:
        self.host = host
        self.codec = codec  # the node's dialect: every connection of this pool speaks it
        self.port = port
        self.timeout_ms = timeout_ms
        self.connect_timeout_ms = connect_timeout_ms or timeout_ms
        self.max_idle = max_idle
        self.idle: Deque[Connection] = deque()
        self.closed = False
        self.created = 0
        self.ssl_context = ssl_context
        self.connection_class = Connection if ssl_context is None else TlsConnection

    def acquire(self, now: Optional[float] = None) -> Connection:
        """An open connection: a pooled one that is still sound, else a new one.
        Raises ConnectFailed when a new one cannot be opened.

        :param now: ``time.perf_counter()`` if the caller has just read it (a clock
            read costs more than the rest of this method)."""
        if now is None:
            now = perf_counter()
        idle = self.idle
        while idle:
            try:
                conn = idle.pop()
            except IndexError:
                break
            if now - conn.released_at > STALE_CHECK_AFTER and conn.is_stale():
                conn.close()
                continue
            return conn
        self.created += 1
        return self.connection_class(self.host, self.port, self.timeout_ms, self.connect_timeout_ms,
                                     self.ssl_context, self.codec)

    def release(self, conn: Connection, now: Optional[float] = None) -> None:
        """Put back a connection whose last exchange completed cleanly.

        :param now: ``time.perf_counter()`` if the caller has just read it."""
        if self.closed or len(self.idle) >= self.max_idle:
            conn.close()
        else:
            conn.released_at = perf_counter() if now is None else now
            self.idle.append(conn)

    def close(self) -> None:
        self.closed = True
        while self.idle:
            try:
                self.idle.pop().close()
            except IndexError:
                break


def is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, socket.timeout) or (
        isinstance(exc, TTransportException) and exc.type == TTransportException.TIMED_OUT)
