"""A thrift server built for governance and for hostile peers: idle or slow
connections cost no thread, every message is checked against size and nesting
limits before it is decoded, calls in flight are counted, and it drains gracefully.

Threads. One selector thread owns the listening socket and every connection that
is not being served: they wait in an epoll set (registered one-shot, so exactly
one worker is woken per readable connection, and a worker re-arms its connection
itself without waking the selector). A bounded pool of worker threads reads
messages, runs the handler and writes replies. A worker keeps a connection while
it stays busy: after a reply it waits up to HOT_LINGER for the next request on
the same socket, so a client calling back to back never pays a selector round
trip; a connection with nothing to read goes back to the epoll set. A message that
has only partly arrived is parked the same way with its deadline: a slow sender
(slowloris) holds no worker while it dribbles, and is cut off `read_timeout`
seconds after its message began.

Limits (see `ThriftServer`): `max_connections`, `idle_timeout`, `read_timeout`,
`max_message_bytes`, nesting depth (64, as thriftpy2 and Apache Thrift), and
`worker_threads`. A peer that breaks them is logged at most once a minute
(`PeerWarnings`) and its connection closed.

TLS (`ssl_context`): every accepted connection is wrapped, non-blocking, and its
handshake runs in steps on workers, between which it waits in the epoll set like
any connection: a peer that stalls its handshake holds no thread, and is cut off
`read_timeout` seconds after it connected. The selector thread never does TLS
work (a handshake costs a few hundred microseconds of CPU). The same holds for a
TLS record that only partly arrived: it starts the message's read_timeout. A
worker checks `pending()` (bytes OpenSSL has decrypted but not yet handed out)
before it polls the socket or parks the connection, because epoll only sees the
raw socket.

Replies. A worker sends a reply without waiting (MSG_DONTWAIT, or a non-blocking
TLS socket). What a peer does not take parks the connection for EPOLLOUT with a
write deadline (`read_timeout` from the reply) and is sent as the peer reads, by
whichever worker the selector hands it to; while a reply is pending nothing more
is read from that connection. The unsent replies of all connections are bounded
(PARKED_REPLY_FACTOR × max_message_bytes); past that, or past the deadline, the
connection is closed. So a caller that never reads pins no worker (Netty and
Thrift's selector servers do the same).

An undeclared handler exception becomes a TApplicationException INTERNAL_ERROR
reply that names the service and method only (its text may hold secrets); the
traceback is logged here with the method and the peer.
"""

import errno
import logging
import operator
import os
import select
import socket
import ssl
import struct
import threading
import time
from queue import SimpleQueue
from typing import Any, Callable, Dict, List, Optional, Tuple, Union, cast

from thriftpy2.protocol import TBinaryProtocolFactory
from thriftpy2.thrift import TApplicationException, TMessageType
from thriftpy2.transport import TCyMemoryBuffer

from .compact import FastCompactProtocol
from .messagelimits import NEED_MORE, MessageRejected, Scanner, scanner_for
from ..methodspec import MethodSpec, method_specs
# The provider limits' defaults are defined, with their reasons, in probe.options.
from ..options import (DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_MESSAGE_BYTES,
                      DEFAULT_READ_TIMEOUT, DEFAULT_WORKER_THREADS)
from .peerwarnings import PeerWarnings
from .outcomes import APPLICATION_ERROR, DECLARED_EXCEPTION, OK, OVERLOADED
from .overload import InflightLimiter, overload_reply, unforgeable

log = logging.getLogger("probe.server")


MAX_DEPTH = 64

# How long a worker waits for a client's next request on the socket it just
# answered before handing the connection back to the selector.
HOT_LINGER = 0.05
FIRST_RECV = 8192    # most calls fit; a bigger buffer costs a bigger allocation per read
RECV_SIZE = 65536    # for the rest of a message that did not fit
ACCEPT_BATCH = 64
ACCEPT_PAUSE = 0.1  # after EMFILE/ENFILE: let fds free up before accepting again

perf_counter = time.perf_counter
REPLY = TMessageType.REPLY
_new_thread = threading.Thread  # a seam for the test of thread exhaustion
_READ = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLONESHOT
_FRAME_LENGTH = struct.Struct("!i")
# A reply the peer has not taken waits for writability (not RDHUP: a half-closed
# peer may still read, and RDHUP would wake us again at once).
_WRITE = select.EPOLLOUT | select.EPOLLONESHOT
SEND_CHUNK = 256 * 1024  # one TLS write: a retry after "want write" repeats at most this
# The unsent reply bytes all parked connections may hold together, as a multiple of
# max_message_bytes (a connection holds at most one reply: it is not read meanwhile).
PARKED_REPLY_FACTOR = 16


class _Connection(object):
    """One accepted socket. `parked` is True while it waits in the epoll set (only
    the selector thread may then hand it out or expire it). `scanner` is None until
    the first bytes say the connection's dialect; `framed`: replies get a length."""

    __slots__ = ("sock", "fd", "peer", "host", "buf", "scanner", "message_deadline",
                 "deadline", "parked", "calling", "closed", "tls", "poller", "handshaking",
                 "record_deadline", "framed", "out")

    def __init__(self, sock: Any, address: Any, tls: bool = False) -> None:
        self.sock = sock  # a socket.socket, or an ssl.SSLSocket for TLS
        self.fd = sock.fileno()
        self.host = str(address[0]) if address else "?"
        self.peer = "%s:%s" % (self.host, address[1]) if address else "?"
        self.buf: Union[bytes, bytearray] = b""
        self.scanner: Optional[Scanner] = None
        self.message_deadline = 0.0
        self.deadline = 0.0
        self.parked = False
        self.calling = False
        self.closed = False
        # TLS only: a poll object for the socket (a worker waits on it), whether the
        # handshake is still running, and the deadline of a handshake or of a record
        # that began to arrive before any of its bytes could be decrypted (0: none).
        self.tls = tls
        self.poller: Any = None  # TLS only: a select.poll
        self.handshaking = False
        self.record_deadline = 0.0
        self.framed = False
        # The part of a reply the peer has not taken yet (None: nothing pending); the
        # connection then waits for writability, not for requests.
        self.out: Optional[bytes] = None
        if tls:
            self.poller = select.poll()
            self.poller.register(self.fd, select.POLLIN)


class ThriftServer(object):
    """Serve `handler` for thriftpy2 `service` on a bound socket.

    Lifecycle: `bind()` (so the port is known before anything is registered),
    `start()` (selector and workers; after a fork, in the child), `stop_accepting()`,
    `drain(timeout)`, `close()`. `observe(method, status, seconds)` is called after
    every call.

    :param service: the thriftpy2 service class.
    :param handler: the object whose methods serve the calls.
    :param host: the address to bind.
    :param port: the port to bind (0 picks a free one).
    :param observe: optional ``observe(method, status, seconds)`` hook.
    :param max_connections: open connections beyond this are accepted and closed at
        once (counted in ``rejected``).
    :param idle_timeout: seconds a connection may stay open between messages.
    :param read_timeout: seconds one message may take to arrive in full (also the
        longest a reply may wait for the peer to read it).
    :param max_message_bytes: the largest message, string, binary or container a
        call may declare; anything bigger closes the connection before it is read.
    :param worker_threads: the most threads running calls at once.
    :param backlog: the listen backlog.
    :param ssl_context: an ``ssl.SSLContext`` (server side) to serve TLS only, or
        None for plain TCP (see `probe.rpc.tls.server_context`).
    :param limiter: a `probe.rpc.overload.InflightLimiter`: a call beyond its caps
        gets the "overloaded, not executed" reply at once and is not run.
    """

    def __init__(self, service: Any, handler: Any, host: str = "0.0.0.0", port: int = 8081,
                 observe: Optional[Callable[[str, str, float], None]] = None, *,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 read_timeout: float = DEFAULT_READ_TIMEOUT,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 worker_threads: int = DEFAULT_WORKER_THREADS, backlog: int = 1024,
                 ssl_context: Optional[ssl.SSLContext] = None,
                 limiter: Optional[InflightLimiter] = None) -> None:
        self.service_name = service.__name__
        self.methods = handler_methods(service, handler, log)
        self.host = host
        self.port = port
        self.observe = observe
        self.max_connections = max_connections
        self.idle_timeout = float(idle_timeout)
        self.read_timeout = float(read_timeout)
        self.max_message_bytes = max_message_bytes
        self.worker_threads = worker_threads
        self.backlog = backlog
        self.ssl_context = ssl_context
        self.limiter = limiter  # probe.rpc.overload.InflightLimiter, or None: no cap
        self.listener: Optional[socket.socket] = None
        # One item per call in flight: list append/pop are atomic.
        self._active: List[None] = []
        # One [count] per worker thread, each written by its owner only.
        self._call_counts: List[List[int]] = []
        self.rejected = 0          # connections closed at once: over max_connections
        self.protocol_errors = 0   # connections closed for a bad or oversized message
        self.timed_out = 0         # connections closed by idle_timeout or read_timeout
        self.peer_warnings = PeerWarnings(log)
        self._lock = threading.Lock()
        self._connections: Dict[int, _Connection] = {}  # fd -> _Connection
        self._draining = False
        self._running = False
        # Set by start() (None before it: nothing runs that reads them).
        self._epoll: select.epoll = None  # type: ignore[assignment]
        self._wake_r: int = None  # type: ignore[assignment]
        self._wake_w: int = None  # type: ignore[assignment]
        self._selector: Optional[threading.Thread] = None
        self._workers: List[threading.Thread] = []
        # One item per worker waiting for work (append/pop are atomic).
        self._idle_workers: List[None] = []
        self._queue: "SimpleQueue[Optional[_Connection]]" = SimpleQueue()
        self._accept_paused_until = 0.0
        self._parked_reply_bytes = 0  # sum of len(conn.out) over connections
        self.max_parked_reply_bytes = PARKED_REPLY_FACTOR * max_message_bytes
        self._sweep_every = max(0.02, min(1.0, self.read_timeout / 4, self.idle_timeout / 4))

    # -- lifecycle -----------------------------------------------------------
    def bind(self, sock: Optional[socket.socket] = None) -> int:
        if sock is None:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.host, self.port))
            except OSError:
                sock.close()
                raise
            sock.listen(self.backlog)
        self.listener = sock
        self.port = sock.getsockname()[1]
        return self.port

    def start(self) -> None:
        """Start the selector thread (workers start on demand). Call in the process
        that serves: after a fork, epoll sets and threads belong to the child."""
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        listener = cast(socket.socket, self.listener)  # bind() comes first
        listener.setblocking(False)
        self._epoll.register(listener.fileno(), select.EPOLLIN)
        self._running = True
        self._selector = threading.Thread(target=self._selector_loop, daemon=True,
                                          name="probe-selector-%d" % self.port)
        self._selector.start()

    def stop_accepting(self, shutdown: bool = True) -> None:
        """Close the listening socket. `shutdown=False` for a socket shared with other
        processes: shutdown() would stop their accepts too."""
        listener, self.listener = self.listener, None
        if listener is None:
            return
        if self._epoll is not None:
            try:
                self._epoll.unregister(listener.fileno())
            except (OSError, ValueError):
                pass
        if shutdown:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        listener.close()

    def drain(self, timeout: float = 10.0) -> int:
        """Close idle connections now and busy ones after their reply; wait up to
        `timeout` s for calls in flight. Returns the number still running."""
        self._draining = True
        deadline = time.monotonic() + timeout
        while True:
            # Count first: a call that ends between the count and the pass below is
            # then still shut down by this pass, not left open after we return.
            # A reply still being taken by its peer counts as a call in flight.
            inflight = self.inflight
            for conn in list(self._connections.values()):
                if conn.out is not None:
                    inflight += 1
                elif not conn.calling:
                    _shutdown(conn.sock)
            if inflight == 0 or time.monotonic() >= deadline:
                return inflight
            time.sleep(0.01)

    def close(self, shutdown: bool = True) -> None:
        self.stop_accepting(shutdown)
        self._draining = True
        self._running = False
        for conn in list(self._connections.values()):
            _shutdown(conn.sock)
        self._wake()
        for _ in self._workers:
            self._queue.put(None)
        if self._selector is not None and self._selector is not threading.current_thread():
            self._selector.join(2.0)
        for conn in list(self._connections.values()):
            if not conn.calling:
                self._close(conn)

    @property
    def inflight(self) -> int:
        """Calls running now."""
        return len(self._active)

    @property
    def calls(self) -> int:
        """Calls served since start."""
        return sum(count[0] for count in self._call_counts)

    def stats(self) -> Dict[str, int]:
        """Counters for tests and operators."""
        return {"connections": len(self._connections), "workers": len(self._workers),
                "inflight": self.inflight, "calls": self.calls, "rejected": self.rejected,
                "protocol_errors": self.protocol_errors, "timed_out": self.timed_out,
                "overloaded": self.limiter.refused if self.limiter is not None else 0}

    # -- the selector thread ------------------------------------------------------
    def _selector_loop(self) -> None:
        next_sweep = time.monotonic() + self._sweep_every
        while self._running:
            try:
                wake_at = next_sweep
                if self._accept_paused_until:
                    wake_at = min(wake_at, self._accept_paused_until)
                events = self._epoll.poll(max(0.0, wake_at - time.monotonic()))
                for fd, mask in events:
                    if self.listener is not None and fd == self.listener.fileno():
                        self._accept_some()
                    elif fd == self._wake_r:
                        _drain_pipe(fd)
                    else:
                        conn = self._connections.get(fd)
                        if conn is not None and conn.parked:
                            conn.parked = False
                            self._hand_out(conn)
                now = time.monotonic()
                if self._accept_paused_until and now >= self._accept_paused_until:
                    self._resume_accepting()
                if now >= next_sweep:
                    next_sweep = now + self._sweep_every
                    self._sweep(now)
            except Exception as exc:  # the loop must outlive anything a peer or the OS does
                self.peer_warnings.warn("selector", "provider selector loop error (%s: %s); "
                                        "continuing", type(exc).__name__, exc)
                time.sleep(0.01)
        try:
            self._epoll.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
        except OSError:
            pass

    def _accept_some(self) -> None:
        listener = cast(socket.socket, self.listener)  # the selector polls it: bound
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.peer_warnings.warn("accept", "cannot accept connections on port %d: %s; "
                                            "pausing accepts for %.1f s", self.port, exc, ACCEPT_PAUSE)
                    self._pause_accepting()
                return  # ECONNABORTED and friends: that peer is gone already
            if self._draining or len(self._connections) >= self.max_connections:
                self.rejected += 1
                if not self._draining:
                    self.peer_warnings.warn("max_connections", "%d connections open on port %d "
                                            "(max_connections): closing new ones at once",
                                            len(self._connections), self.port)
                _shutdown(sock)
                sock.close()
                continue
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                if self.ssl_context is None:
                    # Blocking sockets with kernel timeouts: one syscall per read or write,
                    # where a Python socket timeout adds a poll() before each.
                    sock.setblocking(True)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(HOT_LINGER))
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(self.read_timeout))
                    conn = _Connection(sock, address)
                    conn.deadline = time.monotonic() + self.idle_timeout
                else:
                    # Non-blocking: OpenSSL then says "want read" instead of waiting, and
                    # the handshake happens later, on a worker.
                    sock.setblocking(False)
                    sock = self.ssl_context.wrap_socket(sock, server_side=True,
                                                        do_handshake_on_connect=False)
                    conn = _Connection(sock, address, tls=True)
                    conn.handshaking = True
                    conn.deadline = conn.record_deadline = time.monotonic() + self.read_timeout
                conn.parked = True
                self._connections[conn.fd] = conn
                self._epoll.register(conn.fd, _READ)
            except OSError:
                self._connections.pop(sock.fileno(), None)
                sock.close()

    def _pause_accepting(self) -> None:
        try:
            self._epoll.unregister(cast(socket.socket, self.listener).fileno())
        except (OSError, ValueError):
            pass
        self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE

    def _resume_accepting(self) -> None:
        self._accept_paused_until = 0.0
        if self.listener is not None:
            try:
                self._epoll.register(self.listener.fileno(), select.EPOLLIN)
            except (OSError, ValueError):
                pass

    def _sweep(self, now: float) -> None:
        """Close parked connections past their deadline."""
        expired = []
        with self._lock:
            for conn in self._connections.values():
                if conn.parked and conn.deadline <= now:
                    conn.parked = False
                    expired.append(conn)
        for conn in expired:
            self.timed_out += 1
            if conn.out is not None:
                self._warn(conn, "reply not taken within read_timeout=%gs (%d bytes left)"
                           % (self.read_timeout, len(conn.out)))
            elif conn.handshaking:
                self.protocol_errors += 1
                self._warn(conn, "TLS handshake not complete within read_timeout=%gs"
                           % self.read_timeout)
            elif conn.buf or conn.record_deadline:
                self.protocol_errors += 1
                self._warn(conn, "message not complete within read_timeout=%gs (%d bytes in)"
                           % (self.read_timeout, len(conn.buf)))
            self._close(conn)
        if self._unserved() > 0 and len(self._workers) < self.worker_threads:
            self._add_worker()  # work may be waiting on a worker that failed to start

    def _hand_out(self, conn: _Connection) -> None:
        self._queue.put(conn)
        if self._unserved() > 0 and len(self._workers) < self.worker_threads:
            self._add_worker()

    def _unserved(self) -> int:
        """Connections queued beyond the workers waiting to take them. (A waiting
        worker takes one connection and keeps it while it is busy.)"""
        return self._queue.qsize() - len(self._idle_workers)

    def _add_worker(self) -> None:
        thread = _new_thread(target=self._worker_loop, daemon=True, name="probe-worker-%d" % self.port)
        try:
            thread.start()
        except RuntimeError as exc:  # can't start new thread: the others keep serving
            self.peer_warnings.warn("threads", "cannot start a worker thread (%s): serving with %d",
                                    exc, len(self._workers))
            return
        self._workers.append(thread)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (OSError, TypeError):
            pass

    # -- worker threads ------------------------------------------------------------
    def _worker_loop(self) -> None:
        membuf = TCyMemoryBuffer()
        protocol = TBinaryProtocolFactory().get_protocol(membuf)
        compact = FastCompactProtocol(membuf)  # (reset before each message: see _serve)
        counter = [0]
        self._call_counts.append(counter)
        queue = self._queue
        idle = self._idle_workers
        while True:
            idle.append(None)
            conn = queue.get()
            idle.pop()
            if conn is None:
                return
            try:
                self._serve(conn, protocol, compact, membuf, counter)
            except BaseException as exc:  # the worker outlives anything one connection does
                log.error("unexpected error serving %s; closing it: %s: %s", conn.peer,
                          type(exc).__name__, exc, exc_info=True)
                self._close(conn)

    def _serve(self, conn: _Connection, protocol: Any, compact: FastCompactProtocol, membuf: Any,
               counter: List[int]) -> None:
        """Serve `conn` while it has requests; park or close it when it goes quiet.
        (`protocol`: the worker's binary protocol, `compact` its compact one, both
        over `membuf`.)"""
        sock = conn.sock
        tls = conn.tls
        if tls and conn.handshaking and not self._handshake(conn):
            return
        if conn.out is not None:  # woken because the peer can take more of its reply
            sent = self._flush(conn, conn.out, conn.deadline)
            if not sent:
                if sent is False:
                    self._close(conn)
                return
        buf = conn.buf
        scanner = conn.scanner
        monotonic = time.monotonic
        while True:
            if buf:
                try:
                    if scanner is None:
                        # The first bytes say the dialect: 0x80 binary, 0x82 compact,
                        # else a frame length (framed). Fixed for the connection.
                        scanner = conn.scanner = scanner_for(buf[0], self.max_message_bytes,
                                                             MAX_DEPTH)
                        conn.framed = scanner.header > 0
                    end = scanner.scan(buf)
                except MessageRejected as exc:
                    self.protocol_errors += 1
                    self._warn(conn, str(exc))
                    self._close(conn)
                    return
                if end != NEED_MORE:
                    scanner.reset()
                    skip = scanner.header
                    if end == len(buf) and not skip:
                        message, buf = buf, b""
                    else:
                        message, buf = bytes(buf[skip:end]), buf[end:]
                    conn.buf = buf  # before the reply: once parked, another worker may take it
                    if scanner.compact:
                        # The compact protocol keeps decode/encode state, which a
                        # message that failed midway may have left: reset it (cheaper
                        # than a new protocol object per message).
                        proto = compact
                        compact._bool_value = compact._bool_fid = None
                        compact._last_fid = 0
                        del compact._structs[:]
                    else:
                        proto = protocol
                    answered = self._call(conn, proto, membuf, message, counter)
                    if answered is None:  # parked until the peer reads its reply
                        return
                    if not answered or self._draining:
                        self._close(conn)
                        return
                    continue
                if monotonic() >= conn.message_deadline:
                    self.protocol_errors += 1
                    self.timed_out += 1
                    self._warn(conn, "message not complete within read_timeout=%gs (%d bytes in)"
                               % (self.read_timeout, len(buf)))
                    self._close(conn)
                    return
            if self._unserved() <= 0 or len(self._workers) < self.worker_threads:
                flags = 0  # wait up to HOT_LINGER (SO_RCVTIMEO) for more
            else:
                flags = socket.MSG_DONTWAIT  # others wait for a worker: do not hold one for a quiet socket
            try:
                if tls:
                    data = self._tls_recv(conn, RECV_SIZE if buf else FIRST_RECV, flags, not buf)
                else:
                    data = sock.recv(RECV_SIZE if buf else FIRST_RECV, flags)
            except (BlockingIOError, socket.timeout):
                conn.buf = buf
                self._park(conn)
                return
            except OSError:
                self._close(conn)
                return
            if not data:
                self._close(conn)
                return
            if buf:
                if type(buf) is bytes:
                    buf = bytearray(buf)
                buf += data
            else:
                buf = data
                if not tls:  # (_tls_recv set it: the message may have begun earlier)
                    conn.message_deadline = monotonic() + self.read_timeout

    # -- TLS steps (workers) ---------------------------------------------------------
    def _handshake(self, conn: _Connection) -> bool:
        """Advance a TLS handshake as far as the peer's bytes allow. True when it is
        done; False when the connection was parked (waiting for the peer) or closed."""
        sock = conn.sock
        while True:
            try:
                sock.do_handshake()
            except ssl.SSLWantReadError:
                if time.monotonic() >= conn.record_deadline:
                    self.timed_out += 1
                    self.protocol_errors += 1
                    self._warn(conn, "TLS handshake not complete within read_timeout=%gs"
                               % self.read_timeout)
                    self._close(conn)
                else:
                    self._park(conn)
                return False
            except ssl.SSLWantWriteError:
                # Our own flight does not fit the socket buffer (a peer with a tiny
                # window): wait in the epoll set, by the handshake's deadline.
                self._park(conn, _WRITE, conn.record_deadline)
                return False
            except (ssl.SSLError, OSError, ValueError, AttributeError) as exc:
                # A plaintext client, no certificate, one from another CA, garbage.
                if not conn.closed:
                    self.protocol_errors += 1
                    self._warn(conn, "TLS handshake refused (%s)" % _tls_reason(exc))
                self._close(conn)
                return False
            conn.handshaking = False
            conn.record_deadline = 0.0
            return True

    def _tls_recv(self, conn: _Connection, size: int, flags: int, starting: bool) -> bytes:
        """`sock.recv` for a TLS connection: decrypted bytes, b"" at EOF, or
        BlockingIOError when the connection should be parked. Waits up to HOT_LINGER
        for the peer unless `flags` (MSG_DONTWAIT) says not to; `starting`: no byte
        of the current message has arrived yet."""
        sock = conn.sock
        wait_ms = 0 if flags else HOT_LINGER * 1000
        try:
            while True:
                # Decrypted bytes may wait inside OpenSSL while the socket is not
                # readable: look there before waiting on the socket.
                if not sock.pending() and not conn.poller.poll(wait_ms):
                    raise BlockingIOError
                try:
                    data = sock.recv(size)
                except ssl.SSLWantReadError:
                    # Raw bytes came but not a whole record: the message has begun.
                    if starting and not conn.record_deadline:
                        conn.record_deadline = time.monotonic() + self.read_timeout
                    deadline = conn.record_deadline if starting else conn.message_deadline
                    if not wait_ms or time.monotonic() >= deadline:
                        raise BlockingIOError  # parked; past its deadline, the sweep cuts it
                    continue
                if starting:
                    conn.message_deadline = conn.record_deadline or time.monotonic() + self.read_timeout
                conn.record_deadline = 0.0
                return data
        except (ssl.SSLWantWriteError, ssl.SSLError, ValueError, AttributeError) as exc:
            # A bad record, an alert, or a socket closed under us (server close).
            if isinstance(exc, ssl.SSLError) and not conn.closed and not isinstance(
                    exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):  # not a mere close
                self.protocol_errors += 1
                self._warn(conn, "TLS error (%s)" % _tls_reason(exc))
            raise OSError("TLS connection failed") from exc

    def _flush(self, conn: _Connection, data: bytes,
               deadline: Optional[float] = None) -> Optional[bool]:
        """Send what the peer takes of `data` without waiting. True: all sent; None:
        the rest is parked until the socket is writable, by `deadline` (None: a new
        reply, read_timeout from now); False: the connection failed, or the unsent
        replies of all connections would pass max_parked_reply_bytes: close it.
        (A connection holds at most one unsent reply: it is not read meanwhile.)"""
        sock = conn.sock
        sent = 0
        try:
            if not conn.tls:  # the common case: one syscall, as sendall would
                sent = sock.send(data, socket.MSG_DONTWAIT)
                if sent == len(data) and conn.out is None:
                    return True
            view = memoryview(data)
            try:
                while sent < len(view):
                    if conn.tls:  # an SSL retry must repeat the same bytes: one chunk at a time
                        sent += sock.send(view[sent:sent + SEND_CHUNK])
                    else:
                        sent += sock.send(view[sent:], socket.MSG_DONTWAIT)
            finally:
                view.release()
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError):
            pass
        except (OSError, ValueError, AttributeError):  # ssl.SSLError is an OSError
            return False
        if conn.out is not None:
            self._set_out(conn, None)
        if sent == len(data):
            return True
        rest = data[sent:] if sent else data
        if self._parked_reply_bytes + len(rest) > self.max_parked_reply_bytes:
            self._warn(conn, "peer does not read its reply (%d bytes left; the unsent replies "
                             "of all connections are at their bound)" % len(rest))
            return False
        self._set_out(conn, rest)
        self._park(conn, _WRITE, deadline or time.monotonic() + self.read_timeout)
        return None

    def _set_out(self, conn: _Connection, data: Optional[bytes]) -> None:
        with self._lock:
            if conn.out is not None:
                self._parked_reply_bytes -= len(conn.out)
            conn.out = data
            if data is not None:
                self._parked_reply_bytes += len(data)

    def _park(self, conn: _Connection, events: int = _READ,
              deadline: Optional[float] = None) -> None:
        """Give the connection back to the selector until it is readable again (or,
        with `events=_WRITE`, writable) or `deadline` passes."""
        if self._draining and events == _READ:
            self._close(conn)
            return
        if deadline is None:
            deadline = (conn.message_deadline if conn.buf else
                        conn.record_deadline or time.monotonic() + self.idle_timeout)
        conn.deadline = deadline
        with self._lock:
            if conn.closed:
                return
            conn.parked = True
            try:
                self._epoll.modify(conn.fd, events)
            except (OSError, ValueError):
                conn.parked = False
                conn.closed = True
        if conn.closed:
            self._close(conn, force=True)

    def _close(self, conn: _Connection, force: bool = False) -> None:
        with self._lock:
            if conn.closed and not force:
                return
            conn.closed = True
            conn.parked = False
            if self._connections.get(conn.fd) is conn:
                del self._connections[conn.fd]
                try:
                    self._epoll.unregister(conn.fd)
                except (OSError, ValueError, AttributeError):
                    pass
        _shutdown(conn.sock)
        conn.sock.close()
        conn.buf = b""
        if conn.out is not None:
            self._set_out(conn, None)

    def _warn(self, conn: _Connection, reason: str) -> None:
        self.peer_warnings.warn(conn.host, "protocol error from %s: %s; closing the connection "
                                "(no more such warnings about %s for 60 s)",
                                conn.peer, reason, conn.host)

    # -- one call -------------------------------------------------------------------
    def _call(self, conn: _Connection, protocol: Any, membuf: Any, message: Union[bytes, bytearray],
              counter: List[int]) -> Optional[bool]:
        """Decode, run and answer one checked message. False: close the connection.
        (One frame for the common path: this runs for every call.)"""
        membuf.setvalue(message)
        try:
            name, message_type, seqid = protocol.read_message_begin()
            entry = self.methods.get(name)
            if entry is None:
                membuf.clean()
                return self._reply_exception(conn, protocol, membuf, name, seqid, TApplicationException(
                    TApplicationException.UNKNOWN_METHOD, "unknown method %r" % name))
            spec, func = entry
            args = spec.args_cls()
            protocol.read_struct(args)
        except Exception as exc:
            membuf.clean()
            self.protocol_errors += 1
            self._warn(conn, "undecodable message (%s: %.200s)" % (type(exc).__name__, exc))
            return False
        limiter = self.limiter
        if limiter is not None:
            refused = limiter.enter(name)
            if refused is not None:  # over a cap: answer at once, run nothing
                self._observe(name, OVERLOADED, perf_counter())
                return spec.oneway or self._reply_exception(
                    conn, protocol, membuf, name, seqid,
                    overload_reply(self.service_name, name, *refused))
        conn.calling = True
        active = self._active
        active.append(None)
        status = OK
        started = perf_counter()
        try:
            result = spec.result_cls()
            try:
                value = func(args)
                if spec.has_success:
                    result.success = value
            except TApplicationException as exc:  # raised on purpose: the handler chose its text
                self._observe(spec.name, APPLICATION_ERROR, started)
                return spec.oneway or self._reply_exception(conn, protocol, membuf, name, seqid,
                                                            unforgeable(exc))
            except BaseException as exc:  # SystemExit too: a handler must not end a worker
                for field, exc_class in spec.exceptions:
                    if isinstance(exc, exc_class):
                        setattr(result, field, exc)
                        status = DECLARED_EXCEPTION
                        break
                else:
                    return self._internal_error(conn, protocol, membuf, spec, seqid, started)
            observe = self.observe
            if observe is not None:
                observe(spec.name, status, perf_counter() - started)
            if spec.oneway:
                return True
            try:
                protocol.write_message_begin(name, REPLY, seqid)
                protocol.write_struct(result)
            except Exception:
                membuf.clean()
                log.error("%s.%s returned a value that cannot be encoded (peer %s)",
                          self.service_name, name, conn.peer, exc_info=True)
                return self._reply_exception(conn, protocol, membuf, name, seqid, self._internal(name))
            return self._send(conn, membuf)
        finally:
            conn.calling = False
            active.pop()
            counter[0] += 1
            if limiter is not None:
                limiter.exit(name)

    def _internal_error(self, conn: _Connection, protocol: Any, membuf: Any, spec: MethodSpec,
                        seqid: int, started: float) -> Optional[bool]:
        log.error("%s.%s raised an undeclared exception (peer %s)", self.service_name, spec.name,
                  conn.peer, exc_info=True)
        self._observe(spec.name, APPLICATION_ERROR, started)
        if spec.oneway:
            return True
        return self._reply_exception(conn, protocol, membuf, spec.name, seqid, self._internal(spec.name))

    def _internal(self, name: str) -> TApplicationException:
        # Service and method only: the exception's text may hold secrets.
        return TApplicationException(TApplicationException.INTERNAL_ERROR,
                                     "internal error in %s.%s" % (self.service_name, name))

    def _observe(self, method: str, status: str, started: float) -> None:
        if self.observe is not None:
            self.observe(method, status, time.perf_counter() - started)

    def _reply_exception(self, conn: _Connection, protocol: Any, membuf: Any, name: str,
                         seqid: int, exc: TApplicationException) -> Optional[bool]:
        protocol.write_message_begin(name, TMessageType.EXCEPTION, seqid)
        exc.write(protocol)
        protocol.write_message_end()
        return self._send(conn, membuf)

    def _send(self, conn: _Connection, membuf: Any) -> Optional[bool]:
        """Send a reply without waiting for the peer: True sent, None parked for
        writability (the connection now belongs to the selector), False close."""
        data = membuf.getvalue()
        membuf.clean()
        if conn.framed:  # the caller's dialect: a framed call gets a framed reply
            data = _FRAME_LENGTH.pack(len(data)) + data
        return self._flush(conn, data)


def handler_methods(service: Any, handler: Any,
                    logger: logging.Logger) -> Dict[str, Tuple[MethodSpec, Callable[[Any], Any]]]:
    """Each method of `service` → (its spec, the function calling `handler`'s
    method), for this server and probe.aio.server's; a method the handler lacks is
    warned about once here and fails each call."""
    missing = [name for name in service.thrift_services
               if not callable(getattr(handler, name, None))]
    if missing:
        logger.warning("handler %r does not implement %s: calls to them will fail",
                       handler, ", ".join(missing))
    return {name: (spec, _invoker(spec, getattr(handler, name, None)))
            for name, spec in method_specs(service).items()}


def _invoker(spec: MethodSpec, func: Optional[Callable[..., Any]]) -> Callable[[Any], Any]:
    """A function calling the handler's method with the fields of an args struct."""
    if func is None:
        def missing(args: Any) -> Any:
            raise TApplicationException(TApplicationException.UNKNOWN_METHOD,
                                        "handler does not implement %r" % spec.name)
        return missing
    names = spec.arg_names
    if not names:
        return lambda args: func()
    if len(names) == 1:
        return lambda args, name=names[0]: func(getattr(args, name))  # type: ignore[misc]
    fields = operator.attrgetter(*names)
    return lambda args: func(*fields(args))


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1e6))


# The plain socket's shutdown, also for an SSLSocket: its own shutdown() drops the
# TLS state, and a worker still reading it would then read raw ciphertext.
_raw_shutdown = socket.socket.shutdown


def _shutdown(sock: socket.socket) -> None:
    try:
        _raw_shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


def _tls_reason(exc: BaseException) -> str:
    """A short, log-safe description of a TLS failure."""
    if isinstance(exc, ssl.SSLError) and getattr(exc, "reason", None):
        return exc.reason
    return type(exc).__name__


def _drain_pipe(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except OSError:
        pass
