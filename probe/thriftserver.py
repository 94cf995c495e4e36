"""A threaded thrift server built for governance: it never drops idle connections
(pooled clients keep theirs), it counts calls in flight, and it drains gracefully.

thriftpy2's TThreadedServer closes a connection after `client_timeout` of idleness
and, when a handler raises an undeclared exception, drops the connection instead of
answering. Here an idle connection lives until the client closes it (TCP keepalive
reaps dead peers) and an undeclared exception becomes a TApplicationException
INTERNAL_ERROR reply, so the client gets an answer and keeps its connection.
"""

import logging
import socket
import threading
import time

from thriftpy2.protocol import TBinaryProtocolFactory
from thriftpy2.thrift import TApplicationException, TMessageType, TType
from thriftpy2.transport import TBufferedTransportFactory, TSocket, TTransportException

log = logging.getLogger("probe.server")

# Call outcomes, shared with the client side and the metrics labels.
OK = "ok"
DECLARED_EXCEPTION = "exception"
APPLICATION_ERROR = "error"
TIMEOUT = "timeout"
CONNECTION_ERROR = "connection_error"


class _Method(object):
    """Everything the dispatch of one thrift method needs, looked up once."""

    __slots__ = ("name", "args_cls", "result_cls", "func", "arg_names", "oneway",
                 "has_success", "exceptions")

    def __init__(self, service, handler, name):
        self.name = name
        self.args_cls = getattr(service, name + "_args")
        self.result_cls = getattr(service, name + "_result")
        self.func = getattr(handler, name, None)
        spec = self.args_cls.thrift_spec
        self.arg_names = tuple(spec[key][1] for key in sorted(spec))
        self.oneway = bool(getattr(self.result_cls, "oneway", False))
        result_spec = self.result_cls.thrift_spec
        self.has_success = any(item[1] == "success" for item in result_spec.values())
        self.exceptions = tuple((item[1], item[2]) for key, item in sorted(result_spec.items())
                                if item[1] != "success")


class ThriftServer(object):
    """Serve `handler` for thriftpy2 `service` on a bound socket.

    Lifecycle: `bind()` (so the port is known before anything is registered),
    `start()` (accept loop on a thread), `stop_accepting()`, `drain(timeout)`,
    `close()`. `observe(method, status, seconds)` is called after every call.
    """

    def __init__(self, service, handler, host="0.0.0.0", port=8081, observe=None,
                 proto_factory=None, trans_factory=None, backlog=512):
        missing = [name for name in service.thrift_services if not callable(getattr(handler, name, None))]
        if missing:
            log.warning("handler %r does not implement %s: calls to them will fail",
                        handler, ", ".join(missing))
        self.methods = {name: _Method(service, handler, name) for name in service.thrift_services}
        self.host = host
        self.port = port
        self.observe = observe
        self.proto_factory = proto_factory or TBinaryProtocolFactory()
        self.trans_factory = trans_factory or TBufferedTransportFactory()
        self.backlog = backlog
        self.listener = None
        self.inflight = 0
        self.calls = 0
        self._lock = threading.Lock()
        self._connections = {}  # socket -> busy flag
        self._draining = False
        self._accept_thread = None

    # -- lifecycle -----------------------------------------------------------
    def bind(self, sock=None):
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

    def start(self):
        self._accept_thread = threading.Thread(target=self._accept_loop, name="probe-accept-%d" % self.port,
                                               daemon=True)
        self._accept_thread.start()

    def stop_accepting(self, shutdown=True):
        """Close the listening socket. `shutdown=False` for a socket shared with other
        processes: shutdown() would stop their accepts too."""
        listener, self.listener = self.listener, None
        if listener is not None:
            if shutdown:
                try:
                    listener.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            listener.close()

    def drain(self, timeout=10.0):
        """Close idle connections now and busy ones after their reply; wait up to
        `timeout` s for calls in flight. Returns the number still running."""
        self._draining = True
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                idle = [conn for conn, busy in self._connections.items() if not busy]
                inflight = self.inflight
            for conn in idle:
                _shutdown(conn)
            if inflight == 0 or time.monotonic() >= deadline:
                return inflight
            time.sleep(0.01)

    def close(self, shutdown=True):
        self.stop_accepting(shutdown)
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            _shutdown(conn)

    # -- serving ---------------------------------------------------------------
    def _accept_loop(self):
        listener = self.listener
        while self.listener is not None:
            try:
                conn, _ = listener.accept()
            except OSError:
                if self.listener is None:
                    return
                time.sleep(0.01)  # EMFILE and friends: do not spin
                continue
            if self._draining:
                _shutdown(conn)
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            with self._lock:
                self._connections[conn] = False
            threading.Thread(target=self._serve_connection, args=(conn,), daemon=True,
                             name="probe-conn-%d" % self.port).start()

    def _serve_connection(self, conn):
        transport = TSocket(sock=conn, socket_timeout=None)
        transport = self.trans_factory.get_transport(transport)
        protocol = self.proto_factory.get_protocol(transport)
        try:
            while not self._draining:
                try:
                    name, message_type, seqid = protocol.read_message_begin()
                except (TTransportException, OSError, EOFError):
                    return
                with self._lock:
                    self._connections[conn] = True
                    self.inflight += 1
                try:
                    self._dispatch(protocol, name, seqid)
                finally:
                    with self._lock:
                        self._connections[conn] = False
                        self.inflight -= 1
                        self.calls += 1
        except (TTransportException, OSError, EOFError) as exc:
            log.debug("connection closed: %s", exc)
        except Exception:
            log.exception("thrift protocol error on a connection; closing it")
        finally:
            with self._lock:
                self._connections.pop(conn, None)
            _shutdown(conn)
            conn.close()

    def _dispatch(self, protocol, name, seqid):
        method = self.methods.get(name)
        if method is None:
            protocol.skip(TType.STRUCT)
            protocol.read_message_end()
            self._reply_exception(protocol, name, seqid, TApplicationException(
                TApplicationException.UNKNOWN_METHOD, "unknown method %r" % name))
            return
        args = method.args_cls()
        args.read(protocol)
        protocol.read_message_end()
        result = method.result_cls()
        started = time.perf_counter()
        status = OK
        try:
            if method.func is None:
                raise TApplicationException(TApplicationException.UNKNOWN_METHOD,
                                            "handler does not implement %r" % name)
            value = method.func(*[getattr(args, arg) for arg in method.arg_names])
            if method.has_success:
                result.success = value
        except TApplicationException as exc:
            self._observe(method.name, APPLICATION_ERROR, started)
            self._reply_exception(protocol, name, seqid, exc)
            return
        except Exception as exc:
            for field, exc_class in method.exceptions:
                if isinstance(exc, exc_class):
                    setattr(result, field, exc)
                    status = DECLARED_EXCEPTION
                    break
            else:
                log.exception("%s raised an undeclared exception", name)
                self._observe(method.name, APPLICATION_ERROR, started)
                if not method.oneway:
                    self._reply_exception(protocol, name, seqid, TApplicationException(
                        TApplicationException.INTERNAL_ERROR,
                        "%s failed: %s: %s" % (name, exc.__class__.__name__, exc)))
                return
        self._observe(method.name, status, started)
        if method.oneway:
            return
        protocol.write_message_begin(name, TMessageType.REPLY, seqid)
        result.write(protocol)
        protocol.write_message_end()
        protocol.trans.flush()

    def _observe(self, method, status, started):
        if self.observe is not None:
            self.observe(method, status, time.perf_counter() - started)

    @staticmethod
    def _reply_exception(protocol, name, seqid, exc):
        protocol.write_message_begin(name, TMessageType.EXCEPTION, seqid)
        exc.write(protocol)
        protocol.write_message_end()
        protocol.trans.flush()


def _shutdown(conn):
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
