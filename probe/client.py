"""`build_client`: a thrift client that always reaches a live, enabled node.

The call path: read the current routing table (one attribute read) → pick a node
→ take a pooled connection → send, receive → put the connection back. It does no
I/O besides the RPC: ZooKeeper watches replace the routing table in the
background.

Failover: a failure before the request left (connect refused, dead pooled
connection, send error) or a provider's "overloaded, not executed" reply is retried
on another node for any method; a failure after it left (timeout, reset while
waiting) only for methods declared idempotent. Retries draw on a retry budget
(probe.routing.budget). A failure after the request left reaches the caller as
NodeCallFailed, naming node, service and method.

Node health (probe.routing.health.ServiceHealth) hears the outcome of every attempt
and steers the pick: ejected nodes are skipped, half-open ones probed, slow ones
down-weighted, all nodes used in panic mode.

Threading: a ProbeClient is shared by any number of calling threads. What the
calling threads change (pools, the in-flight counts, node health) is either a
deque/dict operation that is atomic under the GIL or is done under a lock.
"""

import dataclasses
import logging
import math
import threading
import time
from types import ModuleType
from typing import (Any, Callable, Dict, Iterable, List, Literal, Mapping, NamedTuple, Optional,
                    Set, Union)

from thriftpy2.thrift import TApplicationException, TClient, TMessageType
from thriftpy2.transport import TTransportException

from . import metrics as call_metrics
from . import naming
from .routing.balancer import make_balancer
from .errors import NoAvailableNode, NodeCallFailed, NodeUnreachable, ProbeError
from .idl import load_service, module_of
from .methodspec import method_specs
from .rpc.pool import ConnectFailed, NodePool, is_timeout
from .routing.watcher import ServiceWatcher
from .zk.session import release_zookeeper, shared_zookeeper
from .rpc.codec import binary_header, codec_for
from .rpc.tls import client_context, is_refused_handshake
from .options import (DEFAULT_CONNECT_TIMEOUT_S, EjectionPolicy, MetricsOptions, RetryPolicy,
                      check_number)
from .settings import Settings, load_settings
from .rpc.peerwarnings import PeerWarnings
from .routing.budget import RetryBudget
from .routing.health import HealthPolicy, ServiceHealth
from .rpc.outcomes import APPLICATION_ERROR, CONNECTION_ERROR, DECLARED_EXCEPTION, NOT_SENT, OK
from .routing import failover
from .routing.failover import Retryable as _Retryable

log = logging.getLogger("probe.client")

_TRANSPORT_ERRORS = (TTransportException, OSError, EOFError)
_perf_counter = time.perf_counter

#: A user's per-attempt hook: observe(method, node name, status, seconds).
Observer = Callable[[str, str, str, float], None]


class _ClientMethod(object):
    """One method as this client calls it: its MethodSpec's shape, whether it is
    idempotent, and the start of its binary-protocol request message encoded once
    (probe.rpc.codec writes it for binary nodes; other protocols use the name and
    message type)."""

    __slots__ = ("name", "args_cls", "result_cls", "oneway", "has_success", "void",
                 "exception_fields", "idempotent", "header", "takes_nothing", "message_type",
                 "timeout")

    def __init__(self, spec: Any, idempotent: bool, timeout: Optional[float] = None) -> None:
        self.name = spec.name
        self.args_cls = spec.args_cls
        self.result_cls = spec.result_cls
        self.oneway = spec.oneway
        self.has_success = spec.has_success
        self.void = spec.void
        self.exception_fields = tuple(field for field, _ in spec.exceptions)
        self.idempotent = idempotent
        self.message_type = spec.message_type
        self.header = binary_header(spec.name, spec.message_type)
        # No fields, hence no defaults either: the args struct is the STOP byte alone.
        self.takes_nothing = not spec.arg_names
        self.timeout = timeout  # seconds: this method's own socket timeout, or None


class ClientCore(object):
    """What the threaded ProbeClient and the asyncio client (probe.aio.client) share
    besides the failover engine (probe.routing.failover): the governance set-up
    (node health, retry budget, peer warnings, balancer), the prepared methods, and
    the figures read from it. The I/O (pools, sends, receives) is each client's."""

    _service: Any
    service_name: str
    budget_exhausted: int
    _inflight: Dict[str, int]

    def _governance(self, service: Any, balancer: str, idempotent: Union[bool, str, Iterable[str]],
                    health: Optional[ServiceHealth], retry_budget: Optional[RetryBudget],
                    timeouts: Optional[Mapping[str, float]], logger: logging.Logger,
                    default_timeout_ms: Optional[float]) -> None:
        """Node health (None: off), the retry budget (None: only `retries` bounds
        the retries), the balancer, and one `_ClientMethod` per method bound by
        `self._bind` (a method's reply timeout: `timeouts` or `default_timeout_ms`,
        None leaving it to the connection's own)."""
        self.health = health
        self.retry_budget = retry_budget
        self.budget_exhausted = 0  # retries the budget refused
        self.node_warnings = PeerWarnings(
            logger, interval=health.policy.warn_interval_s if health is not None else 10.0)
        if balancer == "p2c_ewma" and health is None:
            raise ProbeError("balancer='p2c_ewma' needs node health: drop health=False")
        self.balancer = make_balancer(balancer, inflight=self._inflight_of,
                                      cost=health.cost if health is not None else None)
        self._pick = self.balancer.pick
        self._track_inflight = self.balancer.name == "least_inflight"
        if health is not None and self.balancer.name == "p2c_ewma":
            health.track_inflight = True
        specs = method_specs(service)
        idempotent_names = _idempotent_names(idempotent, list(specs))
        timeouts = timeouts or {}
        self._methods: Dict[str, _ClientMethod] = {}
        for name, spec in specs.items():
            timeout = timeouts.get(name, default_timeout_ms)
            method = _ClientMethod(spec, name in idempotent_names,
                                   None if timeout is None else timeout / 1000.0)
            self._methods[name] = method
            # 'close' is the client's own method; the RPC is exposed as 'tclose'
            # (thriftpy2's convention).
            setattr(self, "tclose" if name == "close" else name, self._bind(method))

    def _bind(self, method: _ClientMethod) -> Callable[..., Any]:
        raise NotImplementedError

    @property
    def thrift_module(self) -> Optional[ModuleType]:
        """The thriftpy2 module of the IDL this client was built from, holding the
        very classes (structs, declared exceptions) the client returns and raises:
        the same object :func:`probe.load_thrift` gives for that file. None for a
        service class that probe.idl did not load."""
        return module_of(self._service)

    def __dir__(self) -> List[str]:
        return list(self._service.thrift_services)

    def _inflight_of(self, node: Any) -> int:
        return self._inflight.get(node.name, 0)

    def health_report(self) -> Dict[str, Any]:
        """This client's node-health figures for metrics and the fleet stats:
        counters (ejections, readmissions, panics, overloads, budget_exhausted),
        `panic` (bool) and `ejected` (node name -> why)."""
        health = self.health
        if health is None:
            return {"ejections": 0, "readmissions": 0, "panics": 0, "overloads": 0,
                    "budget_exhausted": self.budget_exhausted, "panic": False, "ejected": {}}
        return {"ejections": health.ejections, "readmissions": health.readmissions,
                "panics": health.panics, "overloads": health.overloads,
                "budget_exhausted": self.budget_exhausted, "panic": health.panic,
                "ejected": health.ejected()}


class ProbeClient(ClientCore, TClient):
    """A `thriftpy2.thrift.TClient` whose every call is routed by probe.

    Safe to share between threads. Methods are real attributes prepared once, so a
    call skips TClient's per-call `__getattr__`/`functools.partial` work. Built by
    :func:`build_client`; construct it directly only with a watcher of your own.
    """

    def __init__(self, service: Any, appkey: str, service_name: str, env: str,
                 watcher: ServiceWatcher, zk: Any, socket_timeout: float = 500,
                 connect_timeout: Optional[float] = None, balancer: str = "weighted_random",
                 retries: int = 2, idempotent: Union[bool, str, Iterable[str]] = False,
                 eject_after: int = 3, eject_backoff: float = 1.0, max_idle: int = 64,
                 observe: Optional[Observer] = None, recorder: Any = None,
                 ssl_context: Any = None, health: Optional[ServiceHealth] = None,
                 retry_budget: Optional[RetryBudget] = None,
                 timeouts: Optional[Mapping[str, float]] = None) -> None:
        # TClient state, kept for code that inspects it; there is no single transport.
        self._service = service
        self._iprot = self._oprot = None  # type: ignore[assignment]  # no single transport
        self._seqid = 0
        self.appkey = appkey
        self.service_name = service_name
        self.env = env
        self.watcher = watcher
        self._zk = zk
        self.socket_timeout = socket_timeout
        self.connect_timeout = connect_timeout or socket_timeout
        self.retries = int(retries)
        self.eject_after = int(eject_after)
        self.eject_backoff = float(eject_backoff)
        self.max_idle = max_idle
        self.observe = observe
        self.recorder = recorder  # probe.metrics.Recorder, None with metrics=False
        self.ssl_context = ssl_context  # rpc_tls.<env>: every connection is mutual TLS
        self.metrics_endpoint: Any = None
        self.stats_target: Any = None  # (redis settings, env) the recorder flushes to
        self._pools: Dict[str, NodePool] = {}  # znode name -> NodePool
        self._pools_lock = threading.Lock()
        self._inflight = {}  # node name -> calls in flight (least_inflight only)
        self._inflight_lock = threading.Lock()
        self._closed = False
        self._governance(service, balancer, idempotent, health, retry_budget, timeouts, log,
                         None)
        watcher.on_change = self._on_table

    def _bind(self, method: _ClientMethod) -> Callable[..., Any]:
        call = self._call

        def rpc(*args: Any, **kwargs: Any) -> Any:
            return call(method, args, kwargs)
        rpc.__name__ = method.name
        rpc.__qualname__ = "%s.%s" % (self.service_name, method.name)
        return rpc

    def __enter__(self) -> "ProbeClient":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return "<ProbeClient %s/%s env=%s nodes=%d>" % (self.appkey, self.service_name, self.env,
                                                       len(self.watcher.table))

    # -- the call path -------------------------------------------------------
    def _req(self, _api: str, *args: Any, **kwargs: Any) -> Any:
        method = self._methods.get(_api)
        if method is None:
            raise AttributeError("%s has no method %r" % (self.service_name, _api))
        return self._call(method, args, kwargs)

    def _call(self, method: _ClientMethod, args: tuple, kwargs: dict) -> Any:
        """Route one call: pick a node, make an attempt, fail over when the failure
        allows it."""
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
                # ServiceHealth.choose's documented fast path, inlined: the call path's
                # cost stays a pick while no node is ejected, due or rescaled.
                view = health.view
                if view.base is table and health.now < view.expires and not view.due:
                    try:
                        node = self._pick(view.table, tried)
                    except NoAvailableNode:
                        node = health.choose(table, self._pick, tried)
                else:
                    node = health.choose(table, self._pick, tried)
            status, value, error = self._attempt(node, method, payload, state)
            if error is None:
                return value
            if error.__class__ is not _Retryable:
                raise error
            attempt += 1
            tried = failover.fail_over(self, log, node, method, status, error, attempt, tried,
                                       table)

    def _attempt(self, node: Any, method: _ClientMethod, payload: Any,
                 state: Any) -> failover.Outcome:
        """One try on one node: (status, value, error), where error is None, an
        exception for the caller, or a _Retryable.

        The one place an attempt is observed (metrics and the `observe` hook) and
        the one place its connection is put back (only after a clean exchange) or
        closed (after anything else, including an unexpected exception)."""
        pool = self._pools.get(node.name)
        if pool is None:
            pool = self._pool_for(node)
        health = self.health
        if health is not None and health.track_inflight:
            health.begin(node)
        if self._track_inflight:
            with self._inflight_lock:  # += on a dict entry is not atomic
                self._inflight[node.name] = self._inflight.get(node.name, 0) + 1
        if state is not None:
            state.current = node.name  # this thread is now in flight on node
        conn = None
        reusable = False
        status = CONNECTION_ERROR  # what an attempt that raised unexpectedly counts as
        verdict = None  # what node health hears, when it is not `status`
        retimed = False
        started = _perf_counter()
        try:
            conn = pool.acquire(started)
            if method.timeout is not None:
                conn.sock.settimeout(method.timeout)
                retimed = True
            seqid = conn.seqid = (conn.seqid + 1) & 0x7FFFFFFF
            try:
                conn.send_call(conn, method, payload, seqid)
            except _TRANSPORT_ERRORS as exc:
                # The peer closed or reset before our bytes were taken: nothing ran.
                verdict = NOT_SENT
                return CONNECTION_ERROR, None, _Retryable(True, exc)
            except Exception as exc:
                # The arguments did not encode (a wrong type): the caller's fault, not
                # the node's. Nothing left; the half-written buffer goes with the
                # connection (closed below), and node health hears nothing.
                verdict = NOT_SENT
                status = APPLICATION_ERROR
                return APPLICATION_ERROR, None, exc
            if method.oneway:
                reusable = True
                status = OK
                return OK, None, None
            try:
                outcome = self._recv_reply(conn, method, seqid, node)
            except _TRANSPORT_ERRORS as exc:
                if is_refused_handshake(exc):
                    return failover.refused_handshake(self, node, getattr(exc, "reason", None))
                failed = failover.call_failed(self, log, node, method, exc, is_timeout(exc))
                status = failed[0]
                return failed
            status = outcome[0]
            # A reply with a wrong seqid leaves the connection out of step: never reuse it.
            reusable = status != CONNECTION_ERROR
            if status == APPLICATION_ERROR:
                status, verdict, outcome = failover.application_error(outcome)
            return outcome
        except ConnectFailed as exc:
            return failover.connect_failed(self, node, exc)
        finally:
            ended = _perf_counter()
            if conn is not None:
                if reusable:
                    if retimed:
                        conn.sock.settimeout(self.socket_timeout / 1000.0)
                    pool.release(conn, ended)
                else:
                    conn.close()
            seconds = ended - started
            if health is not None:
                health.end(node, verdict or status, seconds, ended)
            if state is not None:
                state.current = None
                self.recorder.observe_in(state, method.name, node.name, status, seconds)
            if self.observe is not None:
                self.observe(method.name, node.name, status, seconds)
            if self._track_inflight:
                with self._inflight_lock:
                    self._inflight[node.name] -= 1

    @staticmethod
    def _recv_reply(conn: Any, method: _ClientMethod, seqid: int,
                    node: Any) -> failover.Outcome:
        """Read one reply: (status, value, error). Raises transport errors. (The
        connection's protocol is its node's: probe.rpc.codec made it.)"""
        protocol = conn.protocol
        _, message_type, reply_seqid = protocol.read_message_begin()
        if reply_seqid != seqid:
            # A stray late reply (thriftpy2#130): this connection can no longer be trusted.
            return CONNECTION_ERROR, None, _Retryable(False, TApplicationException(
                TApplicationException.BAD_SEQUENCE_ID, "reply seqid %d does not match call "
                "%d on %s" % (reply_seqid, seqid, node.name)))
        if message_type == TMessageType.EXCEPTION:
            error = TApplicationException()
            protocol.read_struct(error)
            return APPLICATION_ERROR, None, error
        result = method.result_cls()
        protocol.read_struct(result)
        if method.has_success:
            value = result.success
            if value is not None:
                return OK, value, None
        elif method.void:
            return OK, None, None
        for field in method.exception_fields:
            declared = getattr(result, field, None)
            if declared is not None:
                return DECLARED_EXCEPTION, None, declared
        if not method.has_success:
            return OK, None, None
        return APPLICATION_ERROR, None, TApplicationException(
            TApplicationException.MISSING_RESULT, "%s returned no result" % method.name)

    # -- pools, health, routing-table changes --------------------------------------
    def _pool_for(self, node: Any) -> NodePool:
        with self._pools_lock:
            pool = self._pools.get(node.name)
            if pool is None:
                pool = NodePool(node.host, node.port, self.socket_timeout, self.connect_timeout,
                                self.max_idle, self.ssl_context,
                                codec_for(node.transport, node.protocol))
                self._pools[node.name] = pool
            return pool

    def _on_table(self, table: Any) -> None:
        # Pools are keyed by znode name (cheaper than building an address tuple per
        # call); a node that left, or whose data now names another address or
        # dialect, loses them. Only the pooled and tracked nodes are looked up
        # (O(log n) each), never the whole table: an edit of one node in 2,000 costs
        # the same as in 20.
        named = table.node_named
        with self._pools_lock:
            for name, pool in list(self._pools.items()):
                node = named(name)
                if node is None or (node.host, node.port, node.transport, node.protocol) \
                        != (pool.host, pool.port) + pool.codec.dialect:
                    self._pools.pop(name).close()
        if self.health is not None:
            self.health.forget(lambda name: named(name) is not None)

    def close(self) -> None:
        """Release the connections and the watch. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self.watcher.close()
        if self.recorder is not None:
            self.recorder.forget_health_source(self)
        with self._pools_lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
        if self.recorder is not None and self.stats_target is not None:
            call_metrics.detach(self.recorder, *self.stats_target)
        if self._zk is not None:
            release_zookeeper(self._zk)
            self._zk = None


def _idempotent_names(idempotent: Union[bool, str, Iterable[str], None],
                      names: Iterable[str]) -> Set[str]:
    if idempotent is True:
        return set(names)
    if not idempotent:
        return set()
    if isinstance(idempotent, str):
        idempotent = [idempotent]
    try:
        chosen = set(idempotent)
    except TypeError:
        raise ProbeError("idempotent must be True, False, a method name or a list of them, got %r"
                         % (idempotent,))
    unknown = chosen - set(names)
    if unknown:
        raise ProbeError("idempotent names unknown methods %s (the service has: %s)"
                         % (", ".join(sorted(map(str, unknown))), ", ".join(sorted(names))))
    return chosen


def build_client(thrift_path: str, appkey: str, service_name: str, socket_timeout: float = 500,
                 *, connect_timeout: Optional[float] = None,
                 balancer: str = "weighted_random",
                 retries: int = 2,
                 idempotent: Union[bool, str, Iterable[str]] = False,
                 eject_after: Optional[int] = None,
                 eject_backoff: Optional[float] = None,
                 health: Union[bool, HealthPolicy] = True,
                 retry_budget: Union[bool, RetryBudget] = True,
                 timeouts: Optional[Mapping[str, float]] = None,
                 max_idle: int = 64,
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
                 ejection: Optional[EjectionPolicy] = None) -> ProbeClient:
    """A thread-safe thrift client for `service_name` of `appkey`, routed by probe.

    Returns an instance of a :class:`thriftpy2.thrift.TClient` subclass whose methods
    are the service's. ``socket_timeout`` and ``connect_timeout`` are in
    milliseconds (thriftpy2's convention); every other duration is in seconds,
    except options whose names end in ``_ms``. With ``rpc_tls.<env>`` in the config,
    every connection is mutual TLS with that certificate (see :mod:`probe.rpc.tls`).

    :param thrift_path: the service's .thrift IDL file; parsed once per process
        (:func:`probe.load_thrift` gives the same module).
    :param appkey: the application key the service is registered under.
    :param service_name: the service's name in the IDL, e.g. ``"DemoService"``.
    :param socket_timeout: ms a call may wait for its reply (500).
    :param connect_timeout: ms a new connection may take (default: socket_timeout).
    :param balancer: ``"weighted_random"`` (default, over health-scaled weights),
        ``"round_robin"`` (smooth weighted), ``"least_inflight"`` (power of two
        choices by weight: of two nodes drawn, the one with fewer calls in flight
        per unit of weight; equal loads split by weight) or ``"p2c_ewma"`` (two
        drawn by weight, the lower EWMA latency × (in flight + 1)).
    :param retries: how many times a failed call may move to another node (2).
    :param idempotent: True, or the method names (a name or a list) that may be
        retried after the request was sent; default none.
    :param eject_after: consecutive failures that eject a node (the health
        policy's ``consecutive_failures``, 3).
    :param eject_backoff: seconds a node is first ejected; doubles up to the
        policy's ``max_ejection_s`` (its ``base_ejection_s``, 1.0).
    :param health: passive node health (:mod:`probe.routing.health`): True (the
        default policy), a :class:`~probe.routing.health.HealthPolicy`, or False
        to turn it off (plain picks, no ejection).
    :param retry_budget: True (20% of calls + 10/s), a
        :class:`~probe.routing.budget.RetryBudget` (may be shared by clients), or
        False for none (only ``retries`` bounds them).
    :param timeouts: ``{method: ms}``: a method's own reply timeout, overriding
        ``socket_timeout`` for the methods named.
    :param max_idle: idle connections kept per node (64).
    :param warmup: seconds over which a new node's weight ramps up (0: none).
    :param config_path: YAML config file (default: ``PROBE_CONFIG`` or the packaged one).
    :param env: the env to use (default: ``PROBE_ENV`` or the hostname rules).
    :param snapshot_dir: where the last known node list is kept for starts during a
        ZooKeeper outage; False disables it.
    :param zk_timeout: seconds to wait for ZooKeeper at start; the client keeps
        trying in the background after that.
    :param observe: ``observe(method, node_name, status, seconds)`` called after
        every attempt, on the calling thread.
    :param metrics: False records no call metrics at all (True); or a
        :class:`probe.options.MetricsOptions` grouping the metrics options below.
    :param metrics_port: serve Prometheus ``/metrics`` on this port (0: a free one).
    :param metrics_addr: the address ``/metrics`` binds.
    :param stats_interval: seconds between two flushes of call counts to the
        config's Redis (at most 10).
    :param stats_ttl: seconds the flushed counts are kept in Redis.
    :param slow_call_ms: a call taking at least this many ms is logged (1000).
    :param retry: a :class:`probe.options.RetryPolicy` instead of ``retries`` and
        ``idempotent``.
    :param ejection: a :class:`probe.options.EjectionPolicy` instead of
        ``eject_after`` and ``eject_backoff`` (``eject_backoff_s``).
    :raises TypeError: an option given both as a keyword and in its value object.
    :raises probe.errors.ProbeError: (a subclass of it) for a bad argument, an
        unreadable IDL or config (an unusable ``rpc_tls`` file: ``RpcTlsError``),
        before anything is started.
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
    if policy is not None:  # the client's attributes say what its health policy does
        client_options.update(eject_after=policy.consecutive_failures,
                              eject_backoff=policy.base_ejection_s)
    settings, ssl_context, recorder = client_setup(appkey, service_name, config_path, env, chosen)
    zk = shared_zookeeper(settings.zookeeper, timeout=zk_timeout, keep_trying=True)
    try:
        watcher = ServiceWatcher(zk, settings.env, appkey, service_name, warmup=warmup,
                                 snapshot_dir=snapshot_dir)
        engine = health_engine(policy, appkey, service_name)
        client = ProbeClient(service, appkey, service_name, settings.env, watcher, zk,
                             recorder=recorder, ssl_context=ssl_context, health=engine,
                             retry_budget=budget, **client_options)
        if recorder is not None:
            recorder.add_health_source(client)
        watcher.start()
    except BaseException:
        release_zookeeper(zk)
        raise
    if chosen.port is not None:
        try:
            client.metrics_endpoint = call_metrics.serve(chosen.port, chosen.addr)
        except BaseException:
            client.close()
            raise
    attach_stats(client, recorder, settings, chosen)
    return client


class ClientSetup(NamedTuple):
    """What `client_setup` loaded: the settings, the RPC TLS context (None: plain
    TCP) and the call recorder (None: metrics off)."""

    settings: Settings
    ssl_context: Any
    recorder: Any


def client_setup(appkey: str, service_name: str, config_path: Optional[str], env: Optional[str],
                 chosen: Any) -> ClientSetup:
    """The config, the RPC TLS context and the recorder of a client (sync or
    asyncio: both build_client functions call this), after `client_choices`. An
    unusable ``rpc_tls`` file is refused here, before any connection."""
    settings = load_settings(config_path, env)
    tls = settings.rpc_tls
    ssl_context = None if tls is None else client_context(
        tls, "config %s: 'rpc_tls.%s'" % (settings.path, settings.env))
    recorder = None
    if chosen.enabled:
        recorder = call_metrics.get_recorder("client", appkey, service_name,
                                             slow_call_ms=chosen.slow_call_ms)
    return ClientSetup(settings, ssl_context, recorder)


def health_engine(policy: Optional[HealthPolicy], appkey: str,
                  service_name: str) -> Optional[ServiceHealth]:
    """A client's node-health engine for `policy` (None: health off)."""
    return None if policy is None else ServiceHealth(
        policy, describe="%s/%s" % (appkey, service_name))


def attach_stats(client: Any, recorder: Any, settings: Settings, chosen: Any) -> None:
    """Flush a started client's call counts to the config's Redis (metrics on)."""
    if recorder is not None:
        client.stats_target = (call_metrics.redis_settings_or_none(settings), settings.env)
        call_metrics.attach(recorder, client.stats_target[0], settings.env,
                            chosen.stats_interval, chosen.stats_ttl)


class ClientChoices(NamedTuple):
    """What `client_choices` settled: the client's keyword options, the node-health
    policy (None: off), the retry budget (None: none) and the metrics setup."""

    options: Dict[str, Any]
    policy: Optional[HealthPolicy]
    budget: Optional[RetryBudget]
    metrics: Any


def client_choices(service: Any, *, socket_timeout: float, connect_timeout: Optional[float],
                   balancer: str, retries: int, idempotent: Union[bool, str, Iterable[str]],
                   eject_after: Optional[int], eject_backoff: Optional[float],
                   health: Union[bool, HealthPolicy], retry_budget: Union[bool, RetryBudget],
                   timeouts: Optional[Mapping[str, float]], max_idle: int, warmup: float,
                   zk_timeout: float, observe: Optional[Observer],
                   metrics: Union[bool, MetricsOptions], metrics_port: Optional[int],
                   metrics_addr: Optional[str], stats_interval: Optional[float],
                   stats_ttl: Optional[int], slow_call_ms: Optional[float],
                   retry: Optional[RetryPolicy], ejection: Optional[EjectionPolicy]
                   ) -> ClientChoices:
    """The options of a client (sync or asyncio: both build_client functions call
    this), from the flat keywords and the value objects, every one checked before
    anything starts. An option given both ways is a TypeError.

    `ejection` (or the flat `eject_after`/`eject_backoff`) maps onto the node-health
    policy: ``eject_after`` → ``consecutive_failures``, ``eject_backoff_s`` →
    ``base_ejection_s``; a flat keyword left at None keeps the policy's own value."""
    retry = RetryPolicy.resolve(retry, retries=retries, idempotent=idempotent)
    flat_ejection = {name: value for name, value in (("eject_after", eject_after),
                                                     ("eject_backoff", eject_backoff))
                     if value is not None}
    if ejection is not None or flat_ejection:
        resolved = EjectionPolicy.resolve(ejection, **flat_ejection)
        if ejection is not None:  # the object states both
            eject_after, eject_backoff = resolved.eject_after, resolved.eject_backoff_s
        else:  # only the flat keywords given; checked under their own names
            eject_after = resolved.eject_after if "eject_after" in flat_ejection else None
            eject_backoff = resolved.eject_backoff_s if "eject_backoff" in flat_ejection else None
    options: Dict[str, Any] = dict(socket_timeout=socket_timeout, connect_timeout=connect_timeout,
                                   balancer=balancer, retries=retry.retries,
                                   idempotent=retry.idempotent, max_idle=max_idle, observe=observe)
    _check_client_options(service, warmup=warmup, zk_timeout=zk_timeout, **options)
    policy = _health_policy(health, eject_after, eject_backoff)
    if balancer == "p2c_ewma" and policy is None:
        raise ProbeError("balancer='p2c_ewma' needs node health: drop health=False")
    budget = _retry_budget(retry_budget)
    options["timeouts"] = _method_timeouts(timeouts, service.thrift_services)
    given: Dict[str, Any] = {"metrics_port": metrics_port, "metrics_addr": metrics_addr,
                             "stats_interval": stats_interval, "stats_ttl": stats_ttl,
                             "slow_call_ms": slow_call_ms}
    given = {name: value for name, value in given.items() if value is not None}
    if isinstance(metrics, MetricsOptions):
        chosen = call_metrics.setup(MetricsOptions.resolve(metrics, **given))
    else:
        chosen = call_metrics.metrics_options(metrics=metrics, **given)
    return ClientChoices(options, policy, budget, chosen)


def _check_client_options(service: Any, socket_timeout: float, connect_timeout: Optional[float],
                          balancer: str, retries: int,
                          idempotent: Union[bool, str, Iterable[str]], max_idle: int,
                          observe: Optional[Observer], warmup: float, zk_timeout: float) -> None:
    """Refuse a bad build_client value, naming it, before anything is started."""
    check_number("socket_timeout", socket_timeout, 0, "ms", allow_equal=False)
    if connect_timeout is not None:
        check_number("connect_timeout", connect_timeout, 0, "ms", allow_equal=False)
    check_number("max_idle", max_idle, 0, integer=True)
    check_number("warmup", warmup, 0, "seconds")
    check_number("zk_timeout", zk_timeout, 0, "seconds", allow_equal=False)
    if observe is not None and not callable(observe):
        raise ProbeError("observe must be a callable(method, node, status, seconds), got %r"
                         % (observe,))
    make_balancer(balancer, inflight=lambda node: 0, cost=lambda node: 0.0)
    _idempotent_names(idempotent, service.thrift_services)


def _health_policy(health: Union[bool, HealthPolicy, None], eject_after: Optional[int],
                   eject_backoff: Optional[float]) -> Optional[HealthPolicy]:
    """The node-health policy build_client's options ask for (None: off)."""
    if health is False or health is None:
        return None
    if health is True:
        policy = HealthPolicy()
    elif isinstance(health, HealthPolicy):
        policy = health
    else:
        raise ProbeError("health must be True, False or a probe.routing.health.HealthPolicy, "
                         "got %r" % (health,))
    changes: Dict[str, Any] = {}
    if eject_after is not None:
        changes["consecutive_failures"] = eject_after
    if eject_backoff is not None:
        changes["base_ejection_s"] = float(eject_backoff)
        changes["max_ejection_s"] = max(policy.max_ejection_s, float(eject_backoff))
    return dataclasses.replace(policy, **changes) if changes else policy


def _retry_budget(retry_budget: Union[bool, RetryBudget, None]) -> Optional[RetryBudget]:
    if retry_budget is True:
        return RetryBudget()
    if retry_budget is False or retry_budget is None:
        return None
    if isinstance(retry_budget, RetryBudget):
        return retry_budget
    raise ProbeError("retry_budget must be True, False or a probe.routing.budget.RetryBudget, "
                     "got %r" % (retry_budget,))


def _method_timeouts(timeouts: Optional[Mapping[str, float]],
                     names: Iterable[str]) -> Dict[str, float]:
    """Check `timeouts` ({method: ms}) against the service's methods."""
    if timeouts is None:
        return {}
    if not isinstance(timeouts, Mapping):
        raise ProbeError("timeouts must be a dict {method name: milliseconds}, got %r"
                         % (timeouts,))
    unknown = sorted(str(name)[:100] for name in timeouts if name not in names)
    if unknown:
        raise ProbeError("timeouts names unknown methods %s (the service has: %s)"
                         % (", ".join(unknown[:10]), ", ".join(sorted(names))))
    checked = {}
    for name, value in timeouts.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or math.isnan(value) or not 0 < value <= 86400000:
            raise ProbeError("timeouts[%r] must be a number of milliseconds in (0, 86400000], "
                             "got %r" % (name, value))
        checked[name] = float(value)
    return checked


__all__ = ["build_client", "client_choices", "ClientChoices", "ProbeClient", "NoAvailableNode", "NodeUnreachable"]
