"""The asyncio provider: `async def` handlers served on the running loop, with the
governance and limits of the threaded one (probe.server / probe.rpc.server).

One `asyncio.Protocol` per connection, no task while it is idle. Bytes are
checked by the message scanners of probe.rpc.messagelimits as they arrive (so
`max_message_bytes` and the nesting depth are enforced before anything is
decoded), and one complete message starts one task running the handler; the
connection starts no other call until that one has replied, and reads at most
PIPELINE_BYTES ahead meanwhile, so a client that pipelines cannot queue work or
memory without bound. A sweeper task closes connections past their
deadline: `idle_timeout` between messages, `read_timeout` for one message to
arrive in full once it began, and for a reply to be taken by the peer.

With TLS the port serves plain TCP and each connection is upgraded with
`loop.start_tls` once it is counted (asyncio would call connection_made only after
the handshake, leaving handshaking sockets outside `max_connections`); the
handshake is bounded by `read_timeout`. The reply bytes all connections leave
unsent are bounded together, as in the threaded provider, by PARKED_REPLY_FACTOR ×
max_message_bytes: the connection whose reply would pass that is aborted.

Threading: everything here runs on the loop's thread; the blocking start and
stop steps (MySQL, Redis, ZooKeeper) run in the loop's default executor.
"""

import asyncio
import inspect
import logging
import signal
import threading
import time
from typing import Any, Callable, Dict, Optional, Set, Union

from thriftpy2.protocol import TCompactProtocol
# Cython, no stub: mypy cannot see the name.
from thriftpy2.protocol.cybin import TCyBinaryProtocol  # type: ignore[attr-defined]
from thriftpy2.thrift import TApplicationException, TMessageType
from thriftpy2.transport import TCyMemoryBuffer, TMemoryBuffer

from .. import metrics as call_metrics
from .. import naming
from ..errors import ProbeError
from ..rpc.messagelimits import NEED_MORE, MessageRejected, scanner_for
from ..naming import NodeSettings
from ..rpc.peerwarnings import PeerWarnings
from ..zk.session import release_zookeeper
from ..rpc.outcomes import APPLICATION_ERROR, DECLARED_EXCEPTION, OK, OVERLOADED
from ..rpc.overload import overload_reply, unforgeable
from ..options import MetricsOptions, ProviderLimits, ProviderTimeouts
from ..server import (ProviderBase, advertised_host, check_stores, node_zookeeper_settings,
                      provider_options, raise_fd_limit, register_node)
from ..rpc.server import (DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS,
                            DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_READ_TIMEOUT, MAX_DEPTH,
                            PARKED_REPLY_FACTOR, handler_methods)

log = logging.getLogger("probe.aio.server")

REPLY = TMessageType.REPLY
EXCEPTION = TMessageType.EXCEPTION
_monotonic = time.monotonic
_perf_counter = time.perf_counter
# Bytes a peer may send ahead while its connection's call runs, before reading pauses.
PIPELINE_BYTES = 65536


class _Codec(object):
    """A memory buffer and a protocol over it: decodes one checked message, encodes
    one reply. Used between two awaits only, so one per provider and protocol."""

    __slots__ = ("membuf", "protocol")

    def __init__(self, compact: bool) -> None:
        if compact:
            self.membuf = TMemoryBuffer()
            self.protocol = TCompactProtocol(self.membuf)
        else:
            self.membuf = TCyMemoryBuffer()
            self.protocol = TCyBinaryProtocol(self.membuf)

    def load(self, message: bytes) -> None:
        if isinstance(self.membuf, TCyMemoryBuffer):
            self.membuf.setvalue(message)
        else:
            self.membuf = TMemoryBuffer(message)
            self.protocol.trans = self.membuf

    def take(self) -> bytes:
        data = self.membuf.getvalue()
        if isinstance(self.membuf, TCyMemoryBuffer):
            self.membuf.clean()
        else:
            self.membuf = TMemoryBuffer()
            self.protocol.trans = self.membuf
        return data


class _Connection(asyncio.Protocol):
    """One accepted connection. States: idle (waiting for a message, deadline
    idle_timeout), reading (a message began, deadline read_timeout), calling (the
    handler runs: no deadline), writing (a reply waits for the peer: read_timeout)."""

    def __init__(self, server: "AsyncThriftServer") -> None:
        self.server = server
        self.transport: Any = None  # an asyncio transport, once connected
        self.peer = "?"
        self.host = "?"
        self.buf: Union[bytes, bytearray] = b""
        self.scanner: Any = None
        self.framed = False
        self.deadline = 0.0
        self.reading = False
        self.calling = False
        self.closed = False
        self.write_deadline = 0.0  # set while the peer leaves our replies unread
        self.paused = False  # reading paused (see data_received, pause_writing)
        self.task: Optional[asyncio.Task] = None  # the call running, while `calling`
        self.eof = False  # the peer half-closed: close once the call in flight replied
        self.raw: Any = None  # the TCP transport (under the TLS one, with TLS)
        self.handshake: Optional[asyncio.Task] = None  # the TLS upgrade, while it runs
        self.unsent = 0  # reply bytes buffered, counted in server.unsent_reply_bytes

    # -- asyncio callbacks ------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        server = self.server
        self.transport = transport
        address = transport.get_extra_info("peername")
        if address:
            self.host = str(address[0])
            self.peer = "%s:%s" % (address[0], address[1])
        if server.draining or len(server.connections) >= server.max_connections:
            server.rejected += 1
            if not server.draining:
                server.peer_warnings.warn("max_connections", "%d connections open on port %d "
                                          "(max_connections): closing new ones at once",
                                          len(server.connections), server.port)
            self.closed = True
            transport.abort()
            return
        server.connections.add(self)
        self.raw = transport
        if server.ssl_context is not None:
            # Counted (above) while it handshakes; read_timeout to complete it.
            transport.pause_reading()  # nothing reaches data_received before TLS
            self.deadline = _monotonic() + server.read_timeout
            self.handshake = server.loop.create_task(self._upgrade(transport))
            return
        self.deadline = _monotonic() + server.idle_timeout

    async def _upgrade(self, raw: Any) -> None:
        server = self.server
        try:
            transport = await server.loop.start_tls(
                raw, self, server.ssl_context, server_side=True,
                ssl_handshake_timeout=server.read_timeout)
        except Exception as exc:  # handshake failed or timed out: start_tls closed it
            if not self.closed:
                server.handshake_failures += 1
                log.debug("TLS handshake with %s failed: %r", self.peer, exc)
            self._lost()
            raw.abort()
            return
        finally:
            self.handshake = None
        if self.closed or transport is None:  # aborted meanwhile (sweeper, close)
            raw.abort()
            return
        self.transport = transport
        self.deadline = _monotonic() + server.idle_timeout

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self._lost()
        self.buf = b""

    def _lost(self) -> None:
        self.closed = True
        self.server.connections.discard(self)
        self._set_unsent(0)

    def _set_unsent(self, size: int) -> None:
        if size != self.unsent:
            self.server.unsent_reply_bytes += size - self.unsent
            self.unsent = size

    def account(self) -> bool:
        """Count the reply bytes this connection still buffers into the server-wide
        total; False (and the connection aborted) if the total would pass its bound."""
        if self.closed:
            return False
        size = self.transport.get_write_buffer_size()
        if self.raw is not None and self.raw is not self.transport:
            size += self.raw.get_write_buffer_size()  # TLS records under the TLS transport
        server = self.server
        if size > self.unsent and (server.unsent_reply_bytes - self.unsent + size
                                   > server.max_unsent_reply_bytes):
            server.reply_overflows += 1
            server.peer_warnings.warn(
                "unsent_replies", "peer %s does not read its reply (%d bytes left; the unsent "
                "replies of all connections on port %d are at their bound of %d bytes): "
                "closing it", self.peer, size, server.port, server.max_unsent_reply_bytes)
            self.abort()
            return False
        self._set_unsent(size)
        return True

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        buf = self.buf
        if not buf:
            self.buf = data
        else:
            if buf.__class__ is bytes:
                buf = bytearray(buf)  # grows in place: a big message is copied once
            buf += data
            self.buf = buf
        if not self.calling and not self.write_deadline:
            self._advance()
        elif len(buf) > PIPELINE_BYTES and not self.paused:
            # A call runs (or a reply waits): what the peer sends meanwhile is held,
            # up to this much; then it waits in the kernel until the call is done.
            self.paused = True
            self.transport.pause_reading()

    def pause_writing(self) -> None:
        # The peer does not take its replies: read_timeout to do so, and no new call
        # meanwhile (a peer that only writes cannot pile up replies here).
        if not self.account():
            return
        self.write_deadline = _monotonic() + self.server.read_timeout
        if not self.closed and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_deadline = 0.0
        self.account()
        if not self.closed and not self.calling:
            self._resume()
            self._advance()
            if self.eof and not self.calling:
                self.transport.close()

    def _resume(self) -> None:
        if self.paused:
            self.paused = False
            self.transport.resume_reading()

    def eof_received(self) -> Optional[bool]:
        # The peer will send nothing more: answer the call in flight, then close.
        self.eof = True
        return self.calling

    # -- messages --------------------------------------------------------------------
    def _advance(self) -> None:
        """Start the next call if a whole, checked message is in the buffer."""
        server = self.server
        buf = self.buf
        if not buf:
            self.reading = False
            self.deadline = _monotonic() + server.idle_timeout
            return
        try:
            scanner = self.scanner
            if scanner is None:
                scanner = self.scanner = scanner_for(buf[0], server.max_message_bytes, MAX_DEPTH)
                self.framed = scanner.header == 4
            end = scanner.scan(buf)
        except MessageRejected as exc:
            server.protocol_errors += 1
            self.warn(str(exc))
            self.abort()
            return
        if end == NEED_MORE:
            if not self.reading:
                self.reading = True
                self.deadline = _monotonic() + server.read_timeout
            return
        scanner.reset()
        if end == len(buf):
            message, self.buf = bytes(buf), b""
        else:
            message, self.buf = bytes(buf[:end]), buf[end:]
        self.reading = False
        self.calling = True
        self.task = server.loop.create_task(server.call(self, message, scanner.compact,
                                                        self.framed))

    def replied(self, reply: Optional[bytes]) -> None:
        """The call ended: send its reply, then look at the next message."""
        self.calling = False
        if self.closed:
            return
        transport = self.transport
        if reply is not None:
            transport.write(reply)
            if not self.account():
                return  # over the bound of all unsent replies: aborted
        if self.server.draining:
            transport.close()  # after the reply is written
            return
        if self.write_deadline:
            return  # resume_writing() goes on once the peer has read
        self._resume()
        self._advance()
        if self.eof and not self.calling:
            transport.close()  # the half-closed peer's last complete call was answered

    def expired(self, now: float) -> bool:
        if self.closed:
            return False
        if self.write_deadline:
            return self.write_deadline <= now
        return not self.calling and self.deadline <= now

    def abort(self) -> None:
        if not self.closed:
            self._lost()
            self.transport.abort()
            if self.raw is not None and self.raw is not self.transport:
                self.raw.abort()

    def warn(self, reason: str) -> None:
        self.server.peer_warnings.warn(
            self.host, "protocol error from %s: %s; closing the connection (no more such "
            "warnings about %s for 60 s)", self.peer, reason, self.host)


class AsyncThriftServer(object):
    """Serve `handler` (``async def`` methods; plain ones work too) for a thriftpy2
    service on the running loop. Lifecycle: ``await start()``, ``stop_accepting()``,
    ``await drain(timeout)``, ``close()``. The limits are those of
    probe.rpc.server.ThriftServer (see there)."""

    def __init__(self, service: Any, handler: object, host: str = "0.0.0.0", port: int = 8081,
                 observe: Optional[Callable[[str, str, float], None]] = None, *,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 read_timeout: float = DEFAULT_READ_TIMEOUT,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 backlog: int = 1024, ssl_context: Any = None, limiter: Any = None) -> None:
        self.service_name = service.__name__
        self.limiter = limiter  # probe.rpc.overload.InflightLimiter, or None: no cap
        self.methods = handler_methods(service, handler, log)
        self.host = host
        self.port = port
        self.observe = observe
        self.max_connections = max_connections
        self.idle_timeout = float(idle_timeout)
        self.read_timeout = float(read_timeout)
        self.max_message_bytes = max_message_bytes
        self.backlog = backlog
        self.ssl_context = ssl_context
        self.connections: Set[_Connection] = set()
        self.inflight = 0
        self.calls = 0
        self.rejected = 0
        self.protocol_errors = 0
        self.timed_out = 0
        self.handshake_failures = 0
        # The reply bytes all connections leave unsent, and their bound (as in
        # probe.rpc.server): past it, the connection adding to it is aborted.
        self.unsent_reply_bytes = 0
        self.max_unsent_reply_bytes = PARKED_REPLY_FACTOR * max_message_bytes
        self.reply_overflows = 0
        self.draining = False
        self.peer_warnings = PeerWarnings(log)
        self.loop: Any = None  # the running loop, once started
        self._server: Any = None
        self._sweeper: Optional[asyncio.Task] = None
        self._codecs = {False: _Codec(False), True: _Codec(True)}

    async def start(self) -> int:
        """Bind and serve; returns the port."""
        self.loop = asyncio.get_running_loop()
        # Plain TCP even with TLS: each connection is counted, then upgraded (_upgrade).
        self._server = await self.loop.create_server(
            lambda: _Connection(self), self.host, self.port, backlog=self.backlog,
            reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        self._sweeper = self.loop.create_task(self._sweep_loop())
        return self.port

    def stats(self) -> Dict[str, int]:
        """Counters for tests and operators."""
        return {"connections": len(self.connections), "inflight": self.inflight,
                "calls": self.calls, "rejected": self.rejected,
                "protocol_errors": self.protocol_errors, "timed_out": self.timed_out,
                "handshake_failures": self.handshake_failures,
                "unsent_reply_bytes": self.unsent_reply_bytes,
                "reply_overflows": self.reply_overflows,
                "overloaded": self.limiter.refused if self.limiter is not None else 0}

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def drain(self, timeout: float = 10.0) -> int:
        """Close idle connections now and busy ones after their reply; wait up to
        `timeout` s for calls in flight. Returns the number still running."""
        self.draining = True
        deadline = _monotonic() + timeout
        while True:
            inflight = self.inflight
            for conn in list(self.connections):
                if not conn.calling:
                    conn.transport.close()
            if inflight == 0 or _monotonic() >= deadline:
                return inflight
            await asyncio.sleep(0.01)

    def close(self) -> None:
        self.stop_accepting()
        self.draining = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self.connections):
            if conn.calling and conn.task is not None:
                conn.task.cancel()  # still running after the drain: its reply has nowhere to go
            conn.abort()

    async def _sweep_loop(self) -> None:
        every = max(0.02, min(1.0, self.read_timeout / 4, self.idle_timeout / 4))
        while True:
            await asyncio.sleep(every)
            now = _monotonic()
            for conn in [c for c in self.connections if c.unsent]:
                conn.account()  # replies drained without a resume_writing
            for conn in [c for c in self.connections if c.expired(now)]:
                self.timed_out += 1
                if conn.write_deadline:
                    conn.warn("replies not read within read_timeout=%gs" % self.read_timeout)
                elif conn.reading:
                    self.protocol_errors += 1
                    conn.warn("message not complete within read_timeout=%gs (%d bytes in)"
                              % (self.read_timeout, len(conn.buf)))
                conn.abort()

    # -- one call ------------------------------------------------------------------
    async def call(self, conn: _Connection, message: bytes, compact: bool, framed: bool) -> None:
        """Decode, run and answer one checked message; always ends with
        conn.replied() unless the connection is closed."""
        codec = self._codecs[compact]
        protocol = codec.protocol
        codec.load(message[4:] if framed else message)
        try:
            name, _, seqid = protocol.read_message_begin()
            entry = self.methods.get(name)
            if entry is not None:
                spec, func = entry
                args = spec.args_cls()
                protocol.read_struct(args)
        except Exception as exc:
            codec.take()
            self.protocol_errors += 1
            conn.warn("undecodable message (%s: %.200s)" % (type(exc).__name__, exc))
            conn.abort()
            return
        codec.take()
        if entry is None:
            conn.replied(self._exception(codec, name, seqid, framed, TApplicationException(
                TApplicationException.UNKNOWN_METHOD, "unknown method %r" % name)))
            return
        limiter = self.limiter
        if limiter is not None:
            refused = limiter.enter(name)
            if refused is not None:  # over a cap: answer at once, run nothing
                self._observe(name, OVERLOADED, _perf_counter())
                conn.replied(None if spec.oneway else self._exception(
                    codec, name, seqid, framed, overload_reply(self.service_name, name, *refused)))
                return
        self.inflight += 1
        status = OK
        started = _perf_counter()
        try:
            result = spec.result_cls()
            try:
                value = func(args)
                if inspect.isawaitable(value):
                    value = await value
                if spec.has_success:
                    result.success = value
            except TApplicationException as exc:  # raised on purpose: the handler chose its text
                self._observe(spec.name, APPLICATION_ERROR, started)
                conn.replied(None if spec.oneway else
                             self._exception(codec, name, seqid, framed, unforgeable(exc)))
                return
            except (Exception, SystemExit) as exc:  # sys.exit() in a handler ends no loop
                for field, exc_class in spec.exceptions:
                    if isinstance(exc, exc_class):
                        setattr(result, field, exc)
                        status = DECLARED_EXCEPTION
                        break
                else:
                    log.error("%s.%s raised an undeclared exception (peer %s)", self.service_name,
                              spec.name, conn.peer, exc_info=True)
                    self._observe(spec.name, APPLICATION_ERROR, started)
                    conn.replied(None if spec.oneway else
                                 self._exception(codec, name, seqid, framed, self._internal(name)))
                    return
            self._observe(spec.name, status, started)
            if spec.oneway:
                conn.replied(None)
                return
            try:
                protocol.write_message_begin(name, REPLY, seqid)
                protocol.write_struct(result)
                protocol.write_message_end()
                reply = codec.take()
            except Exception:
                codec.take()
                log.error("%s.%s returned a value that cannot be encoded (peer %s)",
                          self.service_name, name, conn.peer, exc_info=True)
                reply = self._exception(codec, name, seqid, False, self._internal(name))
            conn.replied(_frame(reply) if framed else reply)
        except BaseException:
            conn.abort()  # cancelled (the provider is closing): no half-answered connection
            raise
        finally:
            self.inflight -= 1
            self.calls += 1
            if limiter is not None:
                limiter.exit(name)

    def _observe(self, method: str, status: str, started: float) -> None:
        if self.observe is not None:
            self.observe(method, status, _perf_counter() - started)

    def _internal(self, name: str) -> TApplicationException:
        # Service and method only: the exception's text may hold secrets.
        return TApplicationException(TApplicationException.INTERNAL_ERROR,
                                     "internal error in %s.%s" % (self.service_name, name))

    @staticmethod
    def _exception(codec: _Codec, name: str, seqid: int, framed: bool,
                   exc: TApplicationException) -> bytes:
        protocol = codec.protocol
        protocol.write_message_begin(name, EXCEPTION, seqid)
        exc.write(protocol)
        protocol.write_message_end()
        data = codec.take()
        return _frame(data) if framed else data


def _frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


class AsyncProvider(ProviderBase):
    """One governed thrift service served on the running loop. ``await start()``
    returns once the node is registered and serving; ``await stop()`` shuts it down
    gracefully (deregister → wait `shutdown_grace` → stop accepting → drain → close).

    The parameters are those of :func:`start_service`, which documents them. Every
    option is checked here, before anything is touched.
    """

    def __init__(self, thrift_path: str, appkey: str, service_name: str, handler: object,
                 port: int = 8081, *,
                 bind_host: str = "0.0.0.0",
                 advertise_host: Optional[str] = None,
                 config_path: Optional[str] = None,
                 env: Optional[str] = None,
                 observe: Optional[Callable[[str, str, float], None]] = None,
                 transport: str = "buffered",
                 protocol: str = "binary",
                 limits: Optional[ProviderLimits] = None,
                 timeouts: Optional[ProviderTimeouts] = None,
                 metrics: Union[bool, MetricsOptions] = True,
                 **flat: Any) -> None:
        # The same checks and resolution as the sync Provider (value objects or flat
        # keywords); a ProviderLimits' worker_threads does not apply here.
        self._configure(thrift_path, appkey, service_name, handler, port, bind_host,
                        advertise_host, config_path, env, observe, transport, protocol, limits,
                        timeouts, metrics, flat)
        self.server: Any = None  # an AsyncThriftServer once started
        self._stopping: Optional[asyncio.Future] = None

    def _check_more(self, flat: Dict[str, Any]) -> None:
        if "worker_threads" in flat:  # one loop runs every call
            raise TypeError("unexpected keyword argument 'worker_threads' (an asyncio provider "
                            "runs its calls on the loop)")

    async def start(self) -> "AsyncProvider":
        """Check the stores, bind, register; returns once serving."""
        loop = asyncio.get_running_loop()
        settings = self.settings
        zk_settings = node_zookeeper_settings(settings, self.session_timeout)
        store = await loop.run_in_executor(None, check_stores, settings, self.appkey,
                                           self.connect_timeout)
        self.host = advertised_host(settings, zk_settings, self.advertise_host)
        self.server = AsyncThriftServer(self.service, self.handler, self.bind_host,
                                        self.requested_port, self.observe,
                                        ssl_context=self.ssl_context, limiter=self.limiter,
                                        **self.limits)
        raise_fd_limit(self.limits["max_connections"])
        try:
            self.port = await self.server.start()
        except OSError as exc:
            raise ProbeError("cannot bind %s:%s for %s: %s (is another process on that port?)"
                             % (self.bind_host, self.requested_port, self.describe, exc))
        try:
            if self.metrics.enabled:
                self._record_calls()
            if self.metrics.port is not None:
                self.metrics_endpoint = call_metrics.serve(self.metrics.port, self.metrics.addr)
            path = naming.node_path(self.env, self.appkey, self.service_name, self.host, self.port)
            field = naming.settings_field(self.appkey, self.env, self.service_name, self.host,
                                          self.port)
            self.zk, self.node_settings, self.registration = await loop.run_in_executor(
                None, register_node, zk_settings, store, self.connect_timeout, path, field,
                NodeSettings(self.host, self.port, transport=self.transport,
                             protocol=self.protocol))
        except BaseException:
            self.server.close()
            if self.metrics_endpoint is not None:
                self.metrics_endpoint.close()
                self.metrics_endpoint = None
            if self.recorder is not None:
                call_metrics.detach(self.recorder, self.settings.redis, self.env)
                self.recorder = None
            raise
        self._started = True
        log.info("serving %s on %s (asyncio, bound %s:%d%s), settings %s", self.describe,
                 self.address, self.bind_host, self.port,
                 ", mutual TLS" if self.ssl_context else "", self.node_settings.to_json())
        return self

    async def stop(self, grace: Optional[float] = None) -> None:
        """Deregister, let consumers move away, drain, close. Safe to call twice
        (a second call waits for the first)."""
        if self._stopping is not None:
            await asyncio.shield(self._stopping)
            return
        loop = asyncio.get_running_loop()
        self._stopping = loop.create_future()
        try:
            if self._started:
                await self._stop(loop, self.shutdown_grace if grace is None else grace)
        finally:
            self._stopping.set_result(None)

    async def _stop(self, loop: asyncio.AbstractEventLoop, grace: float) -> None:
        log.info("stopping %s on %s: deregistering, then draining", self.describe, self.address)
        if self.registration is not None:
            await loop.run_in_executor(None, self.registration.close)
        if grace > 0:
            await asyncio.sleep(grace)
        server = self.server
        server.stop_accepting()
        left = await server.drain(self.drain_timeout)
        if left:
            log.warning("%d call(s) still running after %.1f s of draining; closing anyway",
                        left, self.drain_timeout)
        server.close()
        if self.zk is not None:
            zk, self.zk = self.zk, None
            await loop.run_in_executor(None, release_zookeeper, zk)
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
        if self.recorder is not None:
            await loop.run_in_executor(None, call_metrics.detach, self.recorder,
                                       self.settings.redis, self.env)
        log.info("stopped %s on %s", self.describe, self.address)

    @property
    def stopped(self) -> bool:
        return self._stopping is not None and self._stopping.done()


async def start_service(thrift_path: str, appkey: str, service_name: str, handler: object,
                        port: int = 8081, *,
                        on_started: Optional[Callable[[AsyncProvider], None]] = None,
                        **options: Any) -> AsyncProvider:
    """Register `handler` as a node of `service_name` under `appkey` and serve its
    ``async def`` methods on the running loop until this coroutine is cancelled or
    the process gets SIGTERM/SIGINT; then stop gracefully (deregister → wait
    ``shutdown_grace`` → stop accepting → drain → close) and return the provider.

    The keyword options are those of :func:`probe.server.start_service` without
    ``block``, ``workers`` and ``worker_threads`` (one loop serves every
    connection; run one process per core): ``bind_host``, ``advertise_host``,
    ``config_path``, ``env``, ``shutdown_grace``, ``drain_timeout``,
    ``connect_timeout`` (ms), ``session_timeout``, ``observe``, the metrics options,
    ``max_connections``, ``idle_timeout``, ``read_timeout``, ``max_message_bytes``,
    ``max_inflight``, ``max_inflight_per_method`` (a call over a cap gets the
    "overloaded, not executed" reply, probe.rpc.overload), and the advertised
    dialect ``transport`` / ``protocol`` (every dialect is accepted on the port,
    told by each connection's first bytes). The value objects of the sync API work
    here too, resolved by the same :func:`probe.server.provider_options`:
    ``limits=ProviderLimits(...)`` (its ``worker_threads`` does not apply),
    ``timeouts=ProviderTimeouts(...)``, ``metrics=MetricsOptions(...)``.
    Plain ``def`` handler methods work too, but block the loop while they run.

    :param on_started: called with the started :class:`AsyncProvider` (its
        ``port``, ``host``) once it is registered and serving.
    :raises probe.errors.ProbeError: a bad option, a missing appkey, an unreachable
        store, before anything is registered.
    """
    provider = AsyncProvider(thrift_path, appkey, service_name, handler, port, **options)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    installed = []
    if threading.current_thread() is threading.main_thread():
        # Before start(): a SIGTERM arriving just after registration must still deregister.
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop_requested.set)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
    try:
        await provider.start()
        if on_started is not None:
            on_started(provider)
        await stop_requested.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        # Cancelled or signalled: stop gracefully either way (shielded from a
        # second cancellation so the node is always deregistered).
        await asyncio.shield(provider.stop())
    return provider


__all__ = ["start_service", "AsyncProvider", "AsyncThriftServer"]
