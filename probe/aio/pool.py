"""Per-node pools of asyncio connections for the asyncio client.

One connection carries one call at a time (thrift has no multiplexing on one
connection, and thriftpy2's aio client never checks seqids: thriftpy2#245, #130),
so calls in flight at once each hold their own connection: a pool opens as many
as are needed and keeps up to `max_idle` idle ones. A connection goes back to the
pool only after a clean exchange; any error, timeout or cancellation closes it, so
a late reply is never read by the next call. A pooled connection that the server
closed in the meantime is seen closed (its protocol got connection_lost or EOF)
and skipped.

Each connection is an `asyncio.Protocol`: the reply's bytes are collected in
`data_received` and its end is found by the reply scanner (probe.aio.framing)
without a task switch per read; a reply above `max_message_bytes` closes it.
"""

import asyncio
import ssl
import time
from collections import deque
from typing import Any, Deque, Optional, Union, cast

from thriftpy2.transport import TTransportException

from ..errors import ProbeError
from ..rpc.messagelimits import NEED_MORE, MessageRejected
from .framing import reply_scanner

_monotonic = time.monotonic


class ConnectFailed(Exception):
    """Could not open a connection: nothing was sent, any call may go elsewhere."""


class ConnectionLost(ProbeError, ConnectionError):
    """The connection closed or reset while a call used it (`cause`: the error
    asyncio reported, if any)."""

    def __init__(self, message: str, cause: Optional[BaseException] = None) -> None:
        super().__init__(message)
        self.cause = cause


class ReplyTimeout(ProbeError, TimeoutError):
    """No complete reply within the call's timeout (callers get it as the cause of
    a probe.errors.NodeCallFailed, whose `type` is then TIMED_OUT)."""

    type = TTransportException.TIMED_OUT


class AsyncConnection(asyncio.Protocol):
    """One open connection to a node, for one call at a time."""

    def __init__(self, scanner: Any) -> None:
        self.transport: Any = None  # the asyncio transport, from connection_made
        self.scanner = scanner
        self.buf: Union[bytes, bytearray] = b""
        self.waiter: Optional[asyncio.Future] = None
        self.end = NEED_MORE
        self.error: Optional[BaseException] = None
        self.closed = False
        self.seqid = 0

    # -- asyncio callbacks --------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        if not buf:
            self.buf = buf = data
        else:
            if buf.__class__ is bytes:
                buf = bytearray(buf)  # grows in place: a big reply is copied once
            buf += data
            self.buf = buf
        if self.waiter is None:
            # Bytes nobody asked for (a stray reply): the connection is out of step.
            self._fail(ConnectionLost("unexpected bytes from the server"))
            return
        try:
            end = self.scanner.scan(buf)
        except MessageRejected as exc:
            self._fail(ConnectionLost("bad reply: %s" % exc))
            return
        if end != NEED_MORE:
            self.end = end
            waiter = self.waiter
            if not waiter.done():
                waiter.set_result(None)

    def eof_received(self) -> Optional[bool]:
        self._fail(ConnectionLost("the server closed the connection"))
        return False

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self._fail(ConnectionLost("connection lost: %s" % (exc or "closed by the server"), exc))

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self.closed = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(self.error)
        if self.transport is not None:
            self.transport.abort()

    # -- the call path ------------------------------------------------------------------
    def send(self, data: bytes, loop: asyncio.AbstractEventLoop) -> None:
        """Write one request and get ready for its reply. Raises ConnectionLost if the
        connection is already known to be closed (then nothing was sent)."""
        if self.closed or self.transport.is_closing():
            raise ConnectionLost("connection closed before the request was sent")
        self.buf = b""
        self.end = NEED_MORE
        self.scanner.reset()
        self.waiter = loop.create_future()
        self.transport.write(data)

    async def reply(self, timeout: float, loop: asyncio.AbstractEventLoop) -> bytes:
        """The complete reply to the request just sent; ReplyTimeout after `timeout`
        seconds, ConnectionLost if the connection fails."""
        waiter = cast(asyncio.Future, self.waiter)  # set by send(), which comes first
        if not waiter.done():
            timer = loop.call_later(timeout, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
        else:
            waiter.result()  # raises the connection's error, if any
        self.waiter = None
        end, buf = self.end, self.buf
        self.buf = b""
        if end != len(buf):
            raise ConnectionLost("the server sent more than one reply")
        return buf if buf.__class__ is bytes else bytes(buf)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(ReplyTimeout("no reply in time"))


class AsyncNodePool(object):
    """Idle connections to one node (loop thread only)."""

    def __init__(self, host: str, port: int, connect_timeout: float, max_idle: int = 64,
                 ssl_context: Optional[ssl.SSLContext] = None, transport: str = "buffered",
                 protocol: str = "binary", max_message_bytes: int = 64 * 1024 * 1024) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout  # seconds
        self.max_idle = max_idle
        self.ssl_context = ssl_context
        self.transport = transport
        self.protocol = protocol
        self.max_message_bytes = max_message_bytes
        self.idle: Deque[AsyncConnection] = deque()
        self.closed = False
        self.created = 0
        self.open_now = 0  # connections of this pool open now, idle or in use
        self.wire: Any = None  # the client's encoder/decoder of this dialect (probe.aio.client)

    async def acquire(self, loop: asyncio.AbstractEventLoop) -> AsyncConnection:
        """A sound pooled connection, else a new one (ConnectFailed if it cannot be
        opened within connect_timeout)."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
            self.open_now -= 1
        return await self._open(loop)

    async def _open(self, loop: asyncio.AbstractEventLoop) -> AsyncConnection:
        scanner = reply_scanner(self.transport, self.protocol, self.max_message_bytes)
        connect = loop.create_connection(
            lambda: AsyncConnection(scanner), self.host, self.port, ssl=self.ssl_context,
            # probe's client contexts do not check hostnames (see probe.rpc.tls).
            server_hostname="" if self.ssl_context is not None else None)
        try:
            _, conn = await asyncio.wait_for(connect, self.connect_timeout)
        except asyncio.TimeoutError:
            raise ConnectFailed("cannot connect to %s:%d within %g ms" % (
                self.host, self.port, self.connect_timeout * 1000))
        except (OSError, ssl.SSLError) as exc:
            raise ConnectFailed("cannot connect to %s:%d: %s" % (
                self.host, self.port, getattr(exc, "reason", None) or exc))
        self.created += 1
        self.open_now += 1
        return conn

    def release(self, conn: AsyncConnection) -> None:
        """Put back a connection whose last exchange completed cleanly."""
        if self.closed or conn.closed or len(self.idle) >= self.max_idle:
            self.discard(conn)
        else:
            self.idle.append(conn)

    def discard(self, conn: AsyncConnection) -> None:
        conn.close()
        self.open_now -= 1

    def close(self) -> None:
        self.closed = True
        while self.idle:
            self.discard(self.idle.pop())
