"""`build_client`: a thrift client that always reaches a live, enabled node.

The call path: read the current routing table (one attribute read) → pick a node
→ take a pooled connection → send, receive → put the connection back. It does no
I/O besides the RPC: ZooKeeper watches replace the routing table in the
background.

Failover: a failure before the request left (connect refused, dead pooled
connection, send error) is retried on another node for any method; a failure after
it left (timeout, reset while waiting) only for methods declared idempotent.
"""

import logging
import threading
import time

from thriftpy2.thrift import TApplicationException, TClient, TMessageType
from thriftpy2.transport import TTransportException

from . import metrics as call_metrics
from . import naming
from .balancer import make_balancer
from .errors import NoAvailableNode, NodeUnreachable, ProbeError
from .idl import load_service
from .pool import ConnectFailed, NodePool, is_timeout
from .registry import ServiceWatcher, release_zookeeper, shared_zookeeper
from .settings import DEFAULT_CONNECT_TIMEOUT, load_settings
from .thriftserver import APPLICATION_ERROR, CONNECTION_ERROR, DECLARED_EXCEPTION, OK, TIMEOUT

log = logging.getLogger("probe.client")

_TRANSPORT_ERRORS = (TTransportException, OSError, EOFError)


class _Method(object):
    """What one call of a thrift method needs, looked up once per client."""

    __slots__ = ("name", "args_cls", "result_cls", "oneway", "has_success", "void", "idempotent")

    def __init__(self, service, name, idempotent):
        self.name = name
        self.args_cls = getattr(service, name + "_args")
        self.result_cls = getattr(service, name + "_result")
        self.oneway = bool(getattr(self.result_cls, "oneway", False))
        spec = self.result_cls.thrift_spec
        self.has_success = any(item[1] == "success" for item in spec.values())
        self.void = not spec
        self.idempotent = idempotent


class _NodeHealth(object):
    """Consecutive connect failures of one node and its ejection deadline."""

    __slots__ = ("failures", "ejected_until", "backoff")

    def __init__(self):
        self.failures = 0
        self.ejected_until = 0.0
        self.backoff = 0.0


class ProbeClient(TClient):
    """A `thriftpy2.thrift.TClient` whose every call is routed by probe.

    Safe to share between threads. Methods are real attributes prepared once, so a
    call skips TClient's per-call `__getattr__`/`functools.partial` work.
    """

    def __init__(self, service, appkey, service_name, env, watcher, zk, socket_timeout=500,
                 connect_timeout=None, balancer="weighted_random", retries=2, idempotent=False,
                 eject_after=3, eject_backoff=1.0, max_idle=64, observe=None, recorder=None):
        # TClient state, kept for code that inspects it; there is no single transport.
        self._service = service
        self._iprot = self._oprot = None
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
        self.metrics_endpoint = None
        self.stats_target = None  # (redis settings, env) the recorder flushes to
        self._pools = {}  # znode name -> NodePool
        self._pools_lock = threading.Lock()
        self._inflight = {}  # node name -> calls in flight (least_inflight only)
        self._inflight_lock = threading.Lock()
        self._health = {}
        self._closed = False
        self.balancer = make_balancer(balancer, inflight=self._inflight_of)
        self._track_inflight = self.balancer.name == "least_inflight"
        names = service.thrift_services
        idempotent_names = _idempotent_names(idempotent, names)
        self._methods = {}
        for name in names:
            method = _Method(service, name, name in idempotent_names)
            self._methods[name] = method
            # 'close' is TClient's own method; thriftpy2 exposes the RPC as 'tclose'.
            setattr(self, "tclose" if name == "close" else name, self._bind(method))
        watcher.on_change = self._on_table

    def _bind(self, method):
        call = self._call

        def rpc(*args, **kwargs):
            return call(method, args, kwargs)
        rpc.__name__ = method.name
        rpc.__qualname__ = "%s.%s" % (self.service_name, method.name)
        return rpc

    def __dir__(self):
        return list(self._service.thrift_services)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        return "<ProbeClient %s/%s env=%s nodes=%d>" % (self.appkey, self.service_name, self.env,
                                                       len(self.watcher.table))

    # -- the call path -------------------------------------------------------
    def _req(self, _api, *args, **kwargs):
        method = self._methods.get(_api)
        if method is None:
            raise AttributeError("%s has no method %r" % (self.service_name, _api))
        return self._call(method, args, kwargs)

    def _call(self, method, args, kwargs):
        if self._closed:
            raise ProbeError("client for %s/%s is closed" % (self.appkey, self.service_name))
        try:
            payload = method.args_cls(*args, **kwargs)
        except TypeError as exc:
            raise TypeError("%s.%s: %s" % (self.service_name, method.name, exc))
        tried = None
        attempt = 0
        state = self.recorder.thread_state() if self.recorder is not None else None
        while True:
            table = self.watcher.table
            if table.refresh_at is not None and time.time() >= table.refresh_at:
                self.watcher.refresh()
                table = self.watcher.table
            node = self.balancer.pick(table, tried)
            if self._health and node.name in self._health:
                node = self._avoid_ejected(table, node, tried)
            pool = self._pools.get(node.name)
            if pool is None:
                pool = self._pool_for(node)
            started = time.perf_counter()
            if self._track_inflight:
                with self._inflight_lock:  # += on a dict entry is not atomic
                    self._inflight[node.name] = self._inflight.get(node.name, 0) + 1
            if state is not None:
                state.current = node.name  # this thread is now in flight on node
            try:
                return self._exchange(pool, method, payload, node, started, state)
            except _Retryable as failure:
                attempt += 1
                if attempt > self.retries or not (failure.before_send or method.idempotent):
                    raise failure.error
                tried = (tried or set()) | {node.name}
                if len(tried) >= len(table.nodes):
                    tried = None  # every node failed once: any may be picked again
                log.info("%s.%s failed on %s (%s); retrying elsewhere (%d/%d)", self.service_name,
                         method.name, node.name, failure.error, attempt, self.retries)
            finally:
                if self._track_inflight:
                    with self._inflight_lock:
                        self._inflight[node.name] -= 1
                if state is not None:
                    state.current = None

    def _exchange(self, pool, method, payload, node, started, state=None):
        try:
            conn = pool.acquire()
        except ConnectFailed as exc:
            self._connect_failed(node)
            self._observe(method, node, CONNECTION_ERROR, started, state)
            raise _Retryable(True, NodeUnreachable("%s (node %s of %s/%s)" % (
                exc, node.name, self.appkey, self.service_name)))
        if self._health:
            self._connected(node)
        protocol = conn.protocol
        conn.seqid = seqid = (conn.seqid + 1) & 0x7FFFFFFF
        try:
            protocol.write_message_begin(method.name, TMessageType.ONEWAY if method.oneway
                                         else TMessageType.CALL, seqid)
            payload.write(protocol)
            protocol.write_message_end()
            protocol.trans.flush()
        except _TRANSPORT_ERRORS as exc:
            # The peer closed or reset before our bytes were taken: nothing ran.
            conn.close()
            self._observe(method, node, CONNECTION_ERROR, started, state)
            raise _Retryable(True, exc)
        if method.oneway:
            pool.release(conn)
            self._observe(method, node, OK, started, state)
            return None
        try:
            _, message_type, reply_seqid = protocol.read_message_begin()
            if reply_seqid != seqid:
                # A stray late reply: this connection can no longer be trusted.
                conn.close()
                self._observe(method, node, CONNECTION_ERROR, started, state)
                raise _Retryable(False, TApplicationException(
                    TApplicationException.BAD_SEQUENCE_ID, "reply seqid %d does not match call "
                    "%d on %s" % (reply_seqid, seqid, node.name)))
            if message_type == TMessageType.EXCEPTION:
                error = TApplicationException()
                error.read(protocol)
                protocol.read_message_end()
                pool.release(conn)
                self._observe(method, node, APPLICATION_ERROR, started, state)
                raise error
            result = method.result_cls()
            result.read(protocol)
            protocol.read_message_end()
        except (TApplicationException, _Retryable):
            raise
        except _TRANSPORT_ERRORS as exc:
            conn.close()
            status = TIMEOUT if is_timeout(exc) else CONNECTION_ERROR
            self._observe(method, node, status, started, state)
            raise _Retryable(False, exc)
        except BaseException:
            conn.close()
            raise
        pool.release(conn)
        if method.has_success and result.success is not None:
            self._observe(method, node, OK, started, state)
            return result.success
        if method.void:
            self._observe(method, node, OK, started, state)
            return None
        for field, value in result.__dict__.items():
            if field != "success" and value is not None:
                self._observe(method, node, DECLARED_EXCEPTION, started, state)
                raise value
        if not method.has_success:
            self._observe(method, node, OK, started, state)
            return None
        self._observe(method, node, APPLICATION_ERROR, started, state)
        raise TApplicationException(TApplicationException.MISSING_RESULT,
                                    "%s returned no result" % method.name)

    def _observe(self, method, node, status, started, state):
        observe = self.observe
        if state is None and observe is None:
            return
        seconds = time.perf_counter() - started
        if state is not None:
            self.recorder.observe_in(state, method.name, node.name, status, seconds)
        if observe is not None:
            observe(method.name, node.name, status, seconds)

    # -- pools, health, routing-table changes --------------------------------------
    def _pool_for(self, node):
        with self._pools_lock:
            pool = self._pools.get(node.name)
            if pool is None:
                pool = NodePool(node.host, node.port, self.socket_timeout, self.connect_timeout,
                                self.max_idle)
                self._pools[node.name] = pool
            return pool

    def _inflight_of(self, node):
        return self._inflight.get(node.name, 0)

    def _connect_failed(self, node):
        health = self._health.get(node.name)
        if health is None:
            health = self._health.setdefault(node.name, _NodeHealth())
        health.failures += 1
        if health.failures >= self.eject_after:
            health.backoff = min(30.0, health.backoff * 2 if health.backoff else self.eject_backoff)
            health.ejected_until = time.monotonic() + health.backoff
            log.warning("node %s of %s/%s failed to connect %d times in a row: skipping it for "
                        "%.1f s", node.name, self.appkey, self.service_name, health.failures,
                        health.backoff)

    def _connected(self, node):
        if self._health.pop(node.name, None) is not None:
            log.info("node %s of %s/%s answers again", node.name, self.appkey, self.service_name)

    def _avoid_ejected(self, table, node, tried):
        health = self._health.get(node.name)
        if health is None or health.ejected_until <= time.monotonic():
            return node  # not ejected, or its back-off is over: probe it
        now = time.monotonic()
        ejected = {name for name, h in list(self._health.items()) if h.ejected_until > now}
        skip = ejected | (tried or set())
        if len(skip & set(table.index)) >= len(table.nodes):
            return node  # everything is ejected: trying beats failing outright
        return self.balancer.pick(table, skip)

    def _on_table(self, table):
        # Pools are keyed by znode name (cheaper than building an address tuple per
        # call); a node that left, or whose data now names another address, loses them.
        live = {node.name: (node.host, node.port) for node in table.all_nodes}
        with self._pools_lock:
            for name, pool in list(self._pools.items()):
                if live.get(name) != (pool.host, pool.port):
                    self._pools.pop(name).close()
        names = {node.name for node in table.all_nodes}
        for name in [n for n in self._health if n not in names]:
            self._health.pop(name, None)

    def close(self):
        """Release the connections and the watch. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self.watcher.close()
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


class _Retryable(Exception):
    def __init__(self, before_send, error):
        Exception.__init__(self, error)
        self.before_send = before_send
        self.error = error


def _idempotent_names(idempotent, names):
    if idempotent is True:
        return set(names)
    if not idempotent:
        return set()
    if isinstance(idempotent, str):
        idempotent = [idempotent]
    chosen = set(idempotent)
    unknown = chosen - set(names)
    if unknown:
        raise ProbeError("idempotent names unknown methods %s (the service has: %s)"
                         % (", ".join(sorted(unknown)), ", ".join(sorted(names))))
    return chosen


# Options build_client hands to ProbeClient, and those it consumes itself.
_CLIENT_OPTIONS = frozenset(("connect_timeout", "balancer", "retries", "idempotent", "eject_after",
                             "eject_backoff", "max_idle", "observe"))
_BUILD_OPTIONS = frozenset(("config_path", "env", "warmup", "snapshot_dir", "zk_timeout")
                           + tuple(call_metrics.OPTION_NAMES))


def build_client(thrift_path, appkey, service_name, socket_timeout=500, **options):
    """A thread-safe TClient for `service_name` of `appkey`, routed by probe.

    socket_timeout and connect_timeout are in ms. Options: balancer
    ('weighted_random', 'round_robin', 'least_inflight'), warmup (s), retries (2),
    idempotent (True or method names), eject_after (3), eject_backoff (s),
    config_path, env, snapshot_dir (False to disable), zk_timeout (s), observe.
    Call metrics (probe.metrics): metrics (True; False records nothing), metrics_port
    (serve /metrics), metrics_addr, stats_interval (s, <= 10; flushed to the config's
    Redis if it has a redis section), stats_ttl (s), slow_call_ms (1000).
    """
    naming.check_appkey(appkey)
    service = load_service(thrift_path, service_name)
    if isinstance(socket_timeout, bool) or not isinstance(socket_timeout, (int, float)) \
            or socket_timeout <= 0:
        raise ProbeError("socket_timeout is in ms and must be > 0, got %r" % (socket_timeout,))
    config_path = options.pop("config_path", None)
    env = options.pop("env", None)
    warmup = options.pop("warmup", 0.0)
    snapshot_dir = options.pop("snapshot_dir", None)
    zk_timeout = options.pop("zk_timeout", DEFAULT_CONNECT_TIMEOUT)
    balancer = options.get("balancer", "weighted_random")
    make_balancer(balancer, inflight=lambda node: 0)  # refuse a bad name before connecting
    chosen = call_metrics.pop_options(options)
    unknown = sorted(set(options) - _CLIENT_OPTIONS)
    if unknown:
        raise ProbeError("build_client got unknown option(s) %s; it takes %s" % (
            ", ".join(unknown), ", ".join(sorted(_CLIENT_OPTIONS | _BUILD_OPTIONS))))
    settings = load_settings(config_path, env)
    recorder = None
    if chosen.enabled:
        recorder = call_metrics.get_recorder("client", appkey, service_name,
                                             slow_call_ms=chosen.slow_call_ms)
    zk = shared_zookeeper(settings.zookeeper, timeout=zk_timeout, keep_trying=True)
    try:
        watcher = ServiceWatcher(zk, settings.env, appkey, service_name, warmup=warmup,
                                 snapshot_dir=snapshot_dir)
        client = ProbeClient(service, appkey, service_name, settings.env, watcher, zk,
                             socket_timeout=socket_timeout, recorder=recorder, **options)
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
    if recorder is not None:
        client.stats_target = (call_metrics.redis_settings_or_none(settings), settings.env)
        call_metrics.attach(recorder, client.stats_target[0], settings.env,
                            chosen.stats_interval, chosen.stats_ttl)
    return client


__all__ = ["build_client", "ProbeClient", "NoAvailableNode", "NodeUnreachable"]
