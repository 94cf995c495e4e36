"""The asyncio client: `await build_client(...)` gives an object whose service
methods are coroutines, routed and governed as probe.client's threaded client.

The call path: read the routing table (one attribute read: kazoo's threads swap
it, the loop reads it without a lock) → pick a node (the same balancers) → take
a pooled connection of that node (probe.aio.pool: one call per connection, as many
connections as calls in flight) → write the request, await the reply → put the
connection back, or close it after any failure, timeout or cancellation.

Governance is the threaded client's, by the same engines: node health
(probe.routing.health: ejection, panic mode, half-open probes, latency scaling),
the retry budget (probe.routing.budget), per-method timeouts, overload replies
retried elsewhere. Failover: a failure before the request left (connect refused,
a pooled connection found closed, an overload reply) moves to another node for
any method; one after it left (timeout, reset while waiting) only for idempotent
methods.

Threading: everything runs on the loop that built the client; the watcher's
change callback (a kazoo thread) only schedules the pool clean-up on that loop.
"""

import asyncio
import logging
import time
from typing import Any, Dict, Iterable, Literal, Mapping, Optional, Union

from thriftpy2.protocol import TCompactProtocol
# Cython, no stub: mypy cannot see the name.
from thriftpy2.protocol.cybin import TCyBinaryProtocol  # type: ignore[attr-defined]
from thriftpy2.transport import TCyMemoryBuffer, TMemoryBuffer

from .. import metrics as call_metrics
from .. import naming
from ..client import (ClientCore, Observer, ProbeClient, _ClientMethod, _Retryable,
                      attach_stats, client_choices, client_setup, health_engine)
from ..errors import NoAvailableNode, NodeUnreachable, ProbeError
from ..idl import load_service
from ..routing.watcher import ServiceWatcher
from ..zk.session import release_zookeeper, shared_zookeeper
from ..routing.budget import RetryBudget
from ..routing.health import HealthPolicy, ServiceHealth
from ..rpc.codec import codec_for
from ..rpc.outcomes import APPLICATION_ERROR, CANCELLED, CONNECTION_ERROR, NOT_SENT, OK
from ..routing import failover
from ..rpc.tls import is_refused_handshake
from ..options import (DEFAULT_CONNECT_TIMEOUT_S, EjectionPolicy, MetricsOptions, RetryPolicy,
                       check_number)
from .pool import AsyncNodePool, ConnectFailed, ConnectionLost, ReplyTimeout

log = logging.getLogger("probe.aio.client")

DEFAULT_MAX_REPLY_BYTES = 64 * 1024 * 1024
_perf_counter = time.perf_counter


class _Wire(object):
    """One dialect's requests and replies as bytes (probe.rpc.codec writes the
    request; the frame length, when framed, is added here). Used between two awaits
    only: one per client and dialect."""

    __slots__ = ("framed", "compact", "send_call", "transport", "protocol", "_in", "_in_protocol")

    def __init__(self, transport: str, protocol: str) -> None:
        self.framed = transport == "framed"
        self.compact = protocol == "compact"
        self.send_call = codec_for(None, protocol).send_call
        self._in: Any
        self._in_protocol: Any
        if self.compact:
            self._in = self._in_protocol = None
            self._fresh_output()
        else:
            self.transport = TCyMemoryBuffer()
            self.protocol = TCyBinaryProtocol(self.transport)
            self._in = TCyMemoryBuffer()
            self._in_protocol = TCyBinaryProtocol(self._in)

    def _fresh_output(self) -> None:
        self.transport = TMemoryBuffer()
        self.protocol = TCompactProtocol(self.transport)

    def encode(self, method: Any, payload: Any, seqid: int) -> bytes:
        try:
            self.send_call(self, method, payload, seqid)  # writes to self.transport
        except Exception:
            # Arguments that do not encode: drop what was written so far, so the
            # next call does not send it.
            if self.compact:
                self._fresh_output()
            else:
                self.transport.clean()
            raise
        data = self.transport.getvalue()
        if self.compact:
            self._fresh_output()
        else:
            self.transport.clean()
        if self.framed:
            return len(data).to_bytes(4, "big") + data
        return data

    def reader(self, reply: bytes) -> Any:
        """Something with a `protocol` reading `reply` (ProbeClient._recv_reply's
        view of a connection)."""
        body = reply[4:] if self.framed else reply
        if self.compact:
            return _Reader(TCompactProtocol(TMemoryBuffer(body)))
        self._in.setvalue(body)
        return _Reader(self._in_protocol)

    def done(self) -> None:
        if self._in is not None:
            self._in.clean()


class _Reader(object):
    __slots__ = ("protocol",)

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol


class AsyncProbeClient(ClientCore):
    """The asyncio client of one service: one coroutine attribute per thrift method.

    Use it from the loop that built it (:func:`build_client`); any number of
    calls may be in flight at once. ``await client.close()`` releases it.
    """

    # The threaded client's reply reader (same state names).
    _recv_reply = staticmethod(ProbeClient._recv_reply)

    def __init__(self, service: Any, appkey: str, service_name: str, env: str,
                 watcher: ServiceWatcher, zk: Any, loop: asyncio.AbstractEventLoop,
                 socket_timeout: float = 500, connect_timeout: Optional[float] = None,
                 balancer: str = "weighted_random", retries: int = 2,
                 idempotent: Union[bool, str, Iterable[str]] = False, max_idle: int = 64,
                 observe: Optional[Observer] = None, recorder: Any = None,
                 ssl_context: Any = None, health: Optional[ServiceHealth] = None,
                 retry_budget: Optional[RetryBudget] = None,
                 timeouts: Optional[Mapping[str, float]] = None,
                 max_message_bytes: int = DEFAULT_MAX_REPLY_BYTES) -> None:
        self._service = service
        self.appkey = appkey
        self.service_name = service_name
        self.env = env
        self.watcher = watcher
        self._zk = zk
        self._loop = loop
        self.socket_timeout = socket_timeout
        self.connect_timeout = connect_timeout or socket_timeout
        self.retries = int(retries)
        self.max_idle = max_idle
        self.max_message_bytes = max_message_bytes
        self.observe = observe
        self.recorder = recorder
        self.ssl_context = ssl_context
        self.metrics_endpoint: Any = None
        self.stats_target: Any = None
        self._pools: Dict[str, AsyncNodePool] = {}
        self._inflight: Dict[str, int] = {}
        self._closed = False
        self._wires: Dict[tuple, _Wire] = {}
        self._governance(service, balancer, idempotent, health, retry_budget, timeouts, log,
                         socket_timeout)
        watcher.on_change = self._on_table

    def _bind(self, method: _ClientMethod) -> Any:
        call = self._call

        async def rpc(*args: Any, **kwargs: Any) -> Any:
            return await call(method, args, kwargs)
        rpc.__name__ = method.name
        rpc.__qualname__ = "%s.%s" % (self.service_name, method.name)
        return rpc

    def __repr__(self) -> str:
        return "<AsyncProbeClient %s/%s env=%s nodes=%d>" % (
            self.appkey, self.service_name, self.env, len(self.watcher.table))

    async def __aenter__(self) -> "AsyncProbeClient":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    # -- the call path -------------------------------------------------------
    async def _call(self, method: _ClientMethod, args: tuple, kwargs: dict) -> Any:
        if self._closed:
            raise ProbeError("client for %s/%s is closed" % (self.appkey, self.service_name))
        if args or kwargs or not method.takes_nothing:
            try:
                payload = method.args_cls(*args, **kwargs)
            except TypeError as exc:
                raise failover.bad_arguments(self.service_name, method.name, exc)
        else:
            payload = None
        state = self.recorder.thread_state() if self.recorder is not None else None
        watcher = self.watcher
        health = self.health
        budget = self.retry_budget
        if budget is not None:
            budget.deposit()
        tried = None
        attempt = 0
        while True:
            table = watcher.table
            if table.refresh_at is not None and time.time() >= table.refresh_at:
                watcher.refresh()
                table = watcher.table
            if health is None:
                node = self._pick(table, tried)
            else:
                node = health.choose(table, self._pick, tried)
            status, value, error = await self._attempt(node, method, payload, state)
            if error is None:
                return value
            if error.__class__ is not _Retryable:
                raise error
            attempt += 1
            tried = failover.fail_over(self, log, node, method, status, error, attempt, tried,
                                       table)

    async def _attempt(self, node: Any, method: _ClientMethod, payload: Any, state: Any) -> tuple:
        """One try on one node: (status, value, error) as in the threaded client. The
        one place an attempt is observed (metrics, node health, `observe`) and its
        connection released or closed (closed after anything but a clean exchange,
        cancellation included)."""
        pool = self._pools.get(node.name)
        if pool is None:
            pool = self._pool_for(node)
        health = self.health
        if health is not None and health.track_inflight:
            health.begin(node)
        if self._track_inflight:
            self._inflight[node.name] = self._inflight.get(node.name, 0) + 1
        loop = self._loop
        conn = None
        reusable = False
        status = CONNECTION_ERROR
        verdict = None  # what node health hears, when it is not `status`
        started = _perf_counter()
        try:
            try:
                conn = await pool.acquire(loop)
            except ConnectFailed as exc:
                return failover.connect_failed(self, node, exc)
            seqid = conn.seqid = (conn.seqid + 1) & 0x7FFFFFFF
            wire = pool.wire  # set by _pool_for
            try:
                request = wire.encode(method, payload, seqid)
            except Exception as exc:
                # The arguments did not encode (a wrong type): the caller's fault,
                # not the node's. Nothing was written: the connection stays clean.
                reusable = True
                verdict = NOT_SENT
                status = APPLICATION_ERROR
                return APPLICATION_ERROR, None, exc
            try:
                conn.send(request, loop)
            except ConnectionLost as exc:
                verdict = NOT_SENT  # found closed before our bytes went: nothing ran
                return CONNECTION_ERROR, None, _Retryable(True, exc)
            if method.oneway:
                reusable = True
                status = OK
                return OK, None, None
            try:
                # Never None here: an asyncio client's methods default to socket_timeout.
                reply = await conn.reply(method.timeout, loop)  # type: ignore[arg-type]
            except (ReplyTimeout, ConnectionLost) as exc:
                if exc.__class__ is ConnectionLost and exc.cause is not None \
                        and is_refused_handshake(exc.cause):
                    return failover.refused_handshake(self, node)
                failed = failover.call_failed(self, log, node, method, exc,
                                              exc.__class__ is ReplyTimeout)
                status = failed[0]
                return failed
            try:
                outcome = self._recv_reply(wire.reader(reply), method, seqid, node)
            finally:
                wire.done()
            status = outcome[0]
            reusable = status != CONNECTION_ERROR
            if status == APPLICATION_ERROR:
                status, verdict, outcome = failover.application_error(outcome)
            return outcome
        except asyncio.CancelledError:
            # The caller gave up (its own timeout, a closing request): the node is not
            # at fault, so health hears a neutral outcome; the connection is closed below.
            status = CANCELLED
            verdict = NOT_SENT
            raise
        finally:
            ended = _perf_counter()
            if conn is not None:
                if reusable:
                    pool.release(conn)
                else:
                    pool.discard(conn)
            seconds = ended - started
            if health is not None:
                health.end(node, verdict or status, seconds, ended)  # its clock is perf_counter
            if state is not None:
                self.recorder.observe_in(state, method.name, node.name, status, seconds)
            if self.observe is not None:
                self.observe(method.name, node.name, status, seconds)
            if self._track_inflight:
                self._inflight[node.name] -= 1

    # -- pools, routing-table changes ------------------------------------------
    def _pool_for(self, node: Any) -> AsyncNodePool:
        pool = AsyncNodePool(node.host, node.port, self.connect_timeout / 1000.0, self.max_idle,
                             self.ssl_context, getattr(node, "transport", "buffered"),
                             getattr(node, "protocol", "binary"), self.max_message_bytes)
        dialect = (pool.transport, pool.protocol)
        wire = self._wires.get(dialect)
        if wire is None:
            wire = self._wires[dialect] = _Wire(*dialect)
        pool.wire = wire
        self._pools[node.name] = pool
        return pool

    def _on_table(self, table: Any) -> None:
        # A kazoo thread: the pools belong to the loop, so prune them there.
        try:
            self._loop.call_soon_threadsafe(self._prune, table)
        except RuntimeError:
            pass  # the loop is closed: nothing left to prune

    def _prune(self, table: Any) -> None:
        # As the threaded client: only pooled and tracked nodes are looked up.
        named = table.node_named
        for name, pool in list(self._pools.items()):
            node = named(name)
            if node is None or (node.host, node.port, node.transport, node.protocol) \
                    != (pool.host, pool.port, pool.transport, pool.protocol):
                self._pools.pop(name).close()
        if self.health is not None:
            self.health.forget(lambda name: named(name) is not None)

    async def close(self) -> None:
        """Release the connections and the watch. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self.watcher.close()
        if self.recorder is not None:
            self.recorder.forget_health_source(self)
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
        loop = asyncio.get_running_loop()
        if self.recorder is not None and self.stats_target is not None:
            await loop.run_in_executor(None, call_metrics.detach, self.recorder,
                                       *self.stats_target)
        if self._zk is not None:
            zk, self._zk = self._zk, None
            await loop.run_in_executor(None, release_zookeeper, zk)


async def build_client(thrift_path: str, appkey: str, service_name: str,
                       socket_timeout: float = 500, *,
                       connect_timeout: Optional[float] = None,
                       balancer: str = "weighted_random",
                       retries: int = 2,
                       idempotent: Union[bool, str, Iterable[str]] = False,
                       eject_after: Optional[int] = None,
                       eject_backoff: Optional[float] = None,
                       health: Union[bool, HealthPolicy] = True,
                       retry_budget: Union[bool, RetryBudget] = True,
                       timeouts: Optional[Mapping[str, float]] = None,
                       max_idle: int = 64,
                       max_message_bytes: int = DEFAULT_MAX_REPLY_BYTES,
                       warmup: float = 0.0,
                       config_path: Optional[str] = None,
                       env: Optional[str] = None,
                       snapshot_dir: Union[str, Literal[False], None] = None,
                       zk_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
                       observe: Optional[Observer] = None,
                       metrics: Union[bool, MetricsOptions] = True,
                       metrics_port: Optional[int] = None,
                       metrics_addr: Optional[str] = None,
                       stats_interval: Optional[float] = None,
                       stats_ttl: Optional[int] = None,
                       slow_call_ms: Optional[float] = None,
                       retry: Optional[RetryPolicy] = None,
                       ejection: Optional[EjectionPolicy] = None) -> AsyncProbeClient:
    """An asyncio client for `service_name` of `appkey`, routed by probe: its methods
    are coroutines; ``await client.close()`` when done. Use it on the loop that
    awaited this.

    The options are those of :func:`probe.client.build_client` (same names, units
    and defaults; ``socket_timeout``, ``connect_timeout`` and ``timeouts`` in ms;
    node ``health``, ``retry_budget``, ``balancer`` including ``"p2c_ewma"``; the value
    objects ``retry=RetryPolicy(...)``, ``ejection=EjectionPolicy(...)`` and
    ``metrics=MetricsOptions(...)``, resolved by the same
    :func:`probe.client.client_choices`), plus:

    :param max_message_bytes: the largest reply accepted (64 MiB); a bigger one
        closes its connection and fails the call.
    :raises probe.errors.ProbeError: (a subclass of it) for a bad argument, an
        unreadable IDL or config, before anything is started.
    """
    naming.check_appkey(appkey)
    service = load_service(thrift_path, service_name)
    choice = client_choices(
        service, socket_timeout=socket_timeout, connect_timeout=connect_timeout,
        balancer=balancer, retries=retries, idempotent=idempotent, eject_after=eject_after,
        eject_backoff=eject_backoff, health=health, retry_budget=retry_budget,
        timeouts=timeouts, max_idle=max_idle, warmup=warmup, zk_timeout=zk_timeout,
        observe=observe, metrics=metrics, metrics_port=metrics_port, metrics_addr=metrics_addr,
        stats_interval=stats_interval, stats_ttl=stats_ttl, slow_call_ms=slow_call_ms,
        retry=retry, ejection=ejection)
    client_options, policy, budget, chosen = (choice.options, choice.policy, choice.budget,
                                              choice.metrics)
    check_number("max_message_bytes", max_message_bytes, 64, "bytes", integer=True)
    settings, ssl_context, recorder = client_setup(appkey, service_name, config_path, env, chosen)
    loop = asyncio.get_running_loop()
    # Connecting and the first listing block: they run in the loop's executor.
    zk = await loop.run_in_executor(None, lambda: shared_zookeeper(
        settings.zookeeper, timeout=zk_timeout, keep_trying=True))
    try:
        watcher = ServiceWatcher(zk, settings.env, appkey, service_name, warmup=warmup,
                                 snapshot_dir=snapshot_dir)
        engine = health_engine(policy, appkey, service_name)
        client = AsyncProbeClient(service, appkey, service_name, settings.env, watcher, zk, loop,
                                  recorder=recorder, ssl_context=ssl_context, health=engine,
                                  retry_budget=budget, max_message_bytes=max_message_bytes,
                                  **client_options)
        if recorder is not None:
            recorder.add_health_source(client)
        await loop.run_in_executor(None, watcher.start)
    except BaseException:
        await loop.run_in_executor(None, release_zookeeper, zk)
        raise
    if chosen.port is not None:
        try:
            client.metrics_endpoint = call_metrics.serve(chosen.port, chosen.addr)
        except BaseException:
            await client.close()
            raise
    attach_stats(client, recorder, settings, chosen)
    return client


__all__ = ["build_client", "AsyncProbeClient", "NoAvailableNode", "NodeUnreachable"]
