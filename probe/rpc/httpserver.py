"""A bounded HTTP/1.1 server for WSGI apps: the console and /metrics both run on it.

One selector thread owns every socket. It accepts, runs TLS handshakes without
blocking, and parks a connection until its whole request (headers and a capped
body) has arrived; only then does a worker of a small pool run the app, on the
request in memory. The reply goes back to the selector, which writes it as the
peer reads, under a write deadline. So a connection that trickles, stalls, never
starts TLS or never reads costs a socket and a few KiB, never a thread, and is
closed when its deadline runs out. Parsing is h11's (python-hyper's HTTP/1.1 state
machine, which bounds the header block it buffers).

Threading: `start()` spawns the selector thread ("probe-http"); the app runs on up
to `HttpLimits.workers` threads. `stop()` closes everything and joins.
"""

import io
import logging
import selectors
import socket
import ssl
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Deque, Dict, List, NamedTuple, Optional, Set, Tuple
from urllib.parse import unquote_to_bytes

import h11

from ..errors import ProbeError

log = logging.getLogger("probe.http")

_RECV = 64 * 1024
_SEND = 256 * 1024
_HANDSHAKE, _READ, _WORK, _WRITE = "handshake", "read", "work", "write"
_ACCEPT_PAUSE = 0.1  # seconds without accepting after EMFILE/ENFILE


class HttpLimits(NamedTuple):
    """What one listener lets a peer cost. Times in seconds, sizes in bytes.

    :param handshake_timeout: a TLS handshake must finish within this after accept
    :param request_timeout: a request's headers and body must arrive within this of
        its first byte (or of the accept: a connection that says nothing is closed)
    :param idle_timeout: a kept-alive connection waits this long for its next request
    :param write_timeout: a reply must be taken by the peer within this
    :param max_header_bytes: request line plus headers (431 beyond)
    :param max_body_bytes: request body (413 beyond)
    :param max_response_bytes: what the app may answer (500 beyond)
    :param max_connections: open connections in all
    :param max_per_address: open connections from one peer address; past either cap a
        new connection replaces the oldest one still waiting for its request (or is
        closed at accept when every one is busy)
    :param workers: threads running the app
    """

    handshake_timeout: float = 5.0
    request_timeout: float = 10.0
    idle_timeout: float = 15.0
    write_timeout: float = 10.0
    max_header_bytes: int = 32 * 1024
    max_body_bytes: int = 64 * 1024
    max_response_bytes: int = 32 * 1024 * 1024
    max_connections: int = 512
    max_per_address: int = 128
    workers: int = 8

    def check(self) -> "HttpLimits":
        for name, value in self._asdict().items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ProbeError("bad HTTP limit %s=%r: give a number > 0" % (name, value))
        return self


class _Conn(object):
    __slots__ = ("sock", "host", "port", "tls", "h11", "state", "deadline", "started", "accepted",
                 "request", "body", "body_size", "out", "sent", "close_after", "registered",
                 "closed")

    def __init__(self, sock: socket.socket, host: str, port: int, tls: bool,
                 max_header_bytes: int) -> None:
        self.sock: Any = sock  # an ssl.SSLSocket once wrapped
        self.host = host
        self.port = port
        self.tls = tls
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self.state = _HANDSHAKE if tls else _READ
        self.deadline = 0.0
        self.accepted = time.monotonic()
        self.started = False
        self.request: Optional[h11.Request] = None
        self.body: List[bytes] = []
        self.body_size = 0
        self.out = b""
        self.sent = 0
        self.close_after = False
        self.registered = 0
        self.closed = False


class BoundedHttpServer(object):
    """Serve a WSGI `app` on `host:port` (0: a free port) within `limits`.

    :param ssl_context: a server-side SSLContext to serve HTTPS only
    :param server_name: the WSGI SERVER_NAME and log prefix
    """

    def __init__(self, app: Callable[..., Any], host: str = "127.0.0.1", port: int = 0,
                 ssl_context: Optional[ssl.SSLContext] = None,
                 limits: Optional[HttpLimits] = None, server_name: str = "probe") -> None:
        self.app = app
        self.limits = (limits or HttpLimits()).check()
        self.ssl_context = ssl_context
        self.server_name = server_name
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((host, int(port)))
            self._listener.listen(128)
        except OSError:
            self._listener.close()
            raise
        self._listener.setblocking(False)
        self.host = host
        self.port = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._ready: Deque[Tuple[_Conn, bytes, bool]] = deque()
        self._conns: Set[_Conn] = set()
        self._per_address: Dict[str, int] = {}
        self._pool = ThreadPoolExecutor(self.limits.workers, thread_name_prefix="probe-http-worker")
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self.refused = 0  # new connections closed at accept by a cap (all others busy)
        self.evicted = 0  # waiting connections closed to make room for a new one
        self._accept_paused_until = 0.0

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> "BoundedHttpServer":
        self._thread = threading.Thread(target=self.serve_forever, name="probe-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        last_sweep = time.monotonic()
        try:
            while not self._stopping:
                for key, mask in self._selector.select(0.25):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        self._drain_wake()
                    else:
                        self._guarded(self._on_event, key.data)
                self._take_replies()
                now = time.monotonic()
                if self._accept_paused_until and now >= self._accept_paused_until:
                    self._accept_paused_until = 0.0
                    self._selector.register(self._listener, selectors.EVENT_READ, "accept")
                if now - last_sweep >= 0.2:
                    last_sweep = now
                    for conn in [c for c in self._conns if c.state != _WORK and c.deadline <= now]:
                        log.debug("%s: closing %s:%s (%s deadline passed)", self.server_name,
                                  conn.host, conn.port, conn.state)
                        self._close(conn)
        finally:
            for conn in list(self._conns):
                self._close(conn)
            self._selector.close()
            self._listener.close()
            self._wake_r.close()
            self._wake_w.close()

    def stop(self) -> None:
        """Stop serving: close every connection and the listener; running app calls finish."""
        self._stopping = True
        self._wake()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        self._pool.shutdown(wait=False)

    # alias for the socketserver-style callers (MetricsEndpoint)
    shutdown = stop

    def server_close(self) -> None:
        pass

    @property
    def server_port(self) -> int:
        return self.port

    @property
    def server_address(self) -> Tuple[str, int]:
        return (self.host, self.port)

    def connection_count(self) -> int:
        return len(self._conns)

    # -- selector side --------------------------------------------------------------
    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:  # full (a wake is pending anyway) or closed
            pass

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _accept(self) -> None:
        limits = self.limits
        for _ in range(64):
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:  # out of descriptors: let some free up, then accept again
                log.warning("%s: cannot accept on port %d (%s); pausing accepts for %.1f s",
                            self.server_name, self.port, exc, _ACCEPT_PAUSE)
                self._selector.unregister(self._listener)
                self._accept_paused_until = time.monotonic() + _ACCEPT_PAUSE
                return
            host = addr[0]
            over_address = self._per_address.get(host, 0) >= limits.max_per_address
            if over_address or len(self._conns) >= limits.max_connections:
                # Make room by closing the oldest connection still waiting for its
                # request (of that address, or of all): a flood of idle or trickling
                # connections then cannot lock a newcomer out.
                victim = self._oldest_waiting(host if over_address else None)
                if victim is None:
                    self.refused += 1
                    log.debug("%s: refusing %s (connection cap)", self.server_name, host)
                    sock.close()
                    continue
                self.evicted += 1
                self._close(victim)
            sock.setblocking(False)
            context = self.ssl_context
            tls = context is not None
            if context is not None:
                try:
                    sock = context.wrap_socket(sock, server_side=True,
                                               do_handshake_on_connect=False)
                except (OSError, ValueError):
                    sock.close()
                    continue
            conn = _Conn(sock, host, addr[1], tls, limits.max_header_bytes)
            now = time.monotonic()
            conn.deadline = now + (limits.handshake_timeout if tls else limits.request_timeout)
            self._conns.add(conn)
            self._per_address[host] = self._per_address.get(host, 0) + 1
            self._watch(conn, selectors.EVENT_READ)

    def _oldest_waiting(self, host: Optional[str]) -> Optional[_Conn]:
        """The connection (of `host`, or of any) that has waited longest for its
        request: in a TLS handshake, or reading with no request complete."""
        oldest = None
        for conn in self._conns:
            if conn.state in (_HANDSHAKE, _READ) and (host is None or conn.host == host) and \
                    (oldest is None or conn.accepted < oldest.accepted):
                oldest = conn
        return oldest

    def _watch(self, conn: _Conn, events: int) -> None:
        if conn.registered == events:
            return
        if conn.registered:
            self._selector.modify(conn.sock, events, conn)
        else:
            self._selector.register(conn.sock, events, conn)
        conn.registered = events

    def _unwatch(self, conn: _Conn) -> None:
        if conn.registered:
            self._selector.unregister(conn.sock)
            conn.registered = 0

    def _close(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        try:
            self._unwatch(conn)
        except (KeyError, ValueError, OSError):
            pass
        try:
            conn.sock.close()
        except OSError:
            pass
        self._conns.discard(conn)
        left = self._per_address.get(conn.host, 1) - 1
        if left > 0:
            self._per_address[conn.host] = left
        else:
            self._per_address.pop(conn.host, None)

    def _on_event(self, conn: _Conn) -> None:
        if conn.closed:
            return
        if conn.state == _HANDSHAKE:
            self._handshake(conn)
        elif conn.state == _READ:
            self._read(conn)
        elif conn.state == _WRITE:
            self._write(conn)

    def _handshake(self, conn: _Conn) -> None:
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._watch(conn, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._watch(conn, selectors.EVENT_WRITE)
            return
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            log.debug("%s: TLS handshake with %s failed: %s", self.server_name, conn.host, exc)
            self._close(conn)
            return
        conn.state = _READ
        conn.deadline = time.monotonic() + self.limits.request_timeout
        self._watch(conn, selectors.EVENT_READ)
        self._read(conn)  # the request may already sit in the TLS buffer

    def _read(self, conn: _Conn) -> None:
        for _ in range(4):
            try:
                data = conn.sock.recv(_RECV)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except OSError:
                self._close(conn)
                return
            if not data:
                self._close(conn)  # nothing is answered to a peer that has gone
                return
            if not conn.started:
                conn.started = True
                conn.deadline = time.monotonic() + self.limits.request_timeout
            conn.h11.receive_data(data)
            if not self._advance(conn):
                return
            if not (conn.tls and conn.sock.pending()):
                return

    def _advance(self, conn: _Conn) -> bool:
        """Turn the buffered bytes into events; False once the request left reading."""
        limits = self.limits
        while True:
            try:
                event = conn.h11.next_event()
            except h11.RemoteProtocolError as exc:
                self._refuse(conn, exc.error_status_hint)
                return False
            if event is h11.NEED_DATA:
                return True
            if isinstance(event, h11.Request):
                conn.request, conn.body, conn.body_size = event, [], 0
                conn.started = True
                length = _header(event.headers, b"content-length")
                if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
                    self._refuse(conn, 413)
                    return False
                if conn.h11.they_are_waiting_for_100_continue:
                    self._continue(conn)
            elif isinstance(event, h11.Data):
                conn.body_size += len(event.data)
                if conn.body_size > limits.max_body_bytes:
                    self._refuse(conn, 413)
                    return False
                conn.body.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                conn.state = _WORK
                self._unwatch(conn)
                request = conn.request
                assert request is not None  # h11 sends Request before EndOfMessage
                self._pool.submit(self._respond, conn, request, b"".join(conn.body))
                conn.request, conn.body = None, []
                return False
            else:  # ConnectionClosed or PAUSED: nothing more to read here
                self._close(conn)
                return False

    def _continue(self, conn: _Conn) -> None:
        """Tell a client that waits (`Expect: 100-continue`) to send its body; best
        effort: if the socket cannot take 25 bytes now, the client sends anyway."""
        try:
            conn.sock.send(conn.h11.send(h11.InformationalResponse(status_code=100, headers=[])))
        except (OSError, ValueError, h11.LocalProtocolError):
            pass

    def _refuse(self, conn: _Conn, status: int) -> None:
        reason = {400: b"Bad Request", 408: b"Request Timeout", 413: b"Payload Too Large",
                  431: b"Request Header Fields Too Large"}.get(status, b"Bad Request")
        self._send_reply(conn, b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                         % (status, reason), True)

    def _take_replies(self) -> None:
        while self._ready:
            conn, data, close_after = self._ready.popleft()
            if not conn.closed:
                self._guarded(self._send_reply, conn, data, close_after)

    def _guarded(self, step: Callable[..., None], conn: _Conn, *args: Any) -> None:
        """Run one step for `conn`; whatever it raises closes that connection only:
        the loop serves everyone else."""
        try:
            step(conn, *args)
        except Exception:
            log.exception("%s: unexpected error on the connection from %s; closing it",
                          self.server_name, conn.host)
            self._close(conn)

    def _send_reply(self, conn: _Conn, data: bytes, close_after: bool) -> None:
        conn.state = _WRITE
        conn.out, conn.sent, conn.close_after = data, 0, close_after
        conn.deadline = time.monotonic() + self.limits.write_timeout
        self._watch(conn, selectors.EVENT_WRITE)
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        view = memoryview(conn.out)
        while conn.sent < len(view):
            try:
                conn.sent += conn.sock.send(view[conn.sent:conn.sent + _SEND])
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                return  # the selector says when the peer has read some
            except OSError:
                self._close(conn)
                return
        conn.out = b""
        if conn.close_after or conn.h11.our_state is not h11.DONE or \
                conn.h11.their_state is not h11.DONE:
            self._close(conn)
            return
        try:
            conn.h11.start_next_cycle()
        except h11.LocalProtocolError:
            self._close(conn)
            return
        conn.state, conn.started = _READ, False
        conn.deadline = time.monotonic() + self.limits.idle_timeout
        self._watch(conn, selectors.EVENT_READ)
        self._advance(conn)  # a pipelined request may be buffered already

    # -- worker side ----------------------------------------------------------------
    def _respond(self, conn: _Conn, request: "h11.Request", body: bytes) -> None:
        try:
            data, close_after = self._run_app(conn, request, body)
        except Exception:  # the app's or ours: the peer learns nothing more than 500
            log.exception("%s: %s %r failed", self.server_name, request.method.decode("latin-1"),
                          request.target[:200])
            data, close_after = (b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n", True)
        self._ready.append((conn, data, close_after))
        self._wake()

    def _run_app(self, conn: _Conn, request: "h11.Request", body: bytes) -> Tuple[bytes, bool]:
        environ = self._environ(conn, request, body)
        if environ is None:
            return (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    True)
        reply: Dict[str, Any] = {}
        chunks: List[bytes] = []

        def start_response(status: str, headers: List[Tuple[str, str]],
                           exc_info: Any = None) -> Callable[[bytes], None]:
            if exc_info and reply:
                raise exc_info[1].with_traceback(exc_info[2])
            reply["status"], reply["headers"] = status, headers
            return chunks.append

        result = self.app(environ, start_response)
        size = 0
        try:
            for chunk in result:
                size += len(chunk)
                if size > self.limits.max_response_bytes:
                    raise ProbeError("reply larger than %d bytes" % self.limits.max_response_bytes)
                chunks.append(chunk)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        code, _, reason = reply["status"].partition(" ")
        headers = [(name.encode("latin-1"), value.encode("latin-1"))
                   for name, value in reply["headers"]
                   if name.lower() not in ("content-length", "transfer-encoding", "connection")]
        data = b"".join(chunks)
        head = request.method == b"HEAD"
        headers.append((b"Content-Length", b"%d" % len(data)))
        if self._stopping:
            headers.append((b"Connection", b"close"))
        out = conn.h11.send(h11.Response(status_code=int(code), headers=headers,
                                         reason=reason.encode("latin-1")))
        if data and not head:
            out += conn.h11.send(h11.Data(data=data))
        out += conn.h11.send(h11.EndOfMessage())
        return out, conn.h11.our_state is h11.MUST_CLOSE

    def _environ(self, conn: _Conn, request: "h11.Request", body: bytes) -> Optional[Dict[str, Any]]:
        target = request.target
        if not target.startswith(b"/"):
            return None
        path, _, query = target.partition(b"?")
        environ: Dict[str, Any] = {
            "REQUEST_METHOD": request.method.decode("latin-1"),
            "SCRIPT_NAME": "",
            "PATH_INFO": unquote_to_bytes(path).decode("latin-1"),
            "QUERY_STRING": query.decode("latin-1"),
            "SERVER_NAME": self.host,
            "SERVER_PORT": str(self.port),
            "SERVER_PROTOCOL": "HTTP/%s" % request.http_version.decode("latin-1"),
            "REMOTE_ADDR": conn.host,
            "REMOTE_PORT": str(conn.port),
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "https" if conn.tls else "http",
            "wsgi.input": io.BytesIO(body),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        for name, value in request.headers:
            if b"_" in name:  # HTTP_X_A would be ambiguous between X-A and X_A: dropped
                continue
            key = name.decode("latin-1").upper().replace("-", "_")
            key = key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key
            text = value.decode("latin-1")
            if key in environ:
                text = environ[key] + ("; " if key == "HTTP_COOKIE" else ", ") + text
            environ[key] = text
        environ["CONTENT_LENGTH"] = str(len(body))
        return environ


def _header(headers: Any, name: bytes) -> Optional[str]:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def server_ssl_context(certfile: str, keyfile: str, client_cafile: Optional[str] = None) -> ssl.SSLContext:
    """A TLS 1.2+ server context; with `client_cafile`, a peer must present a certificate
    signed by it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    if client_cafile:
        context.load_verify_locations(cafile=client_cafile)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
