"""`start_service`: turn a thrift handler into a registered, weighted, switchable node.

Order of a start (each step refuses cleanly before the next one touches anything):
validate arguments → load settings → MySQL appkey check → Redis node settings →
bind the port → create the ephemeral znode → serve.

Order of a stop (SIGTERM, SIGINT or `stop()`): deregister → wait `shutdown_grace`
so consumers drop the node → stop accepting → drain calls in flight (bounded by
`drain_timeout`) → close (dubbo#2514, #2952, #10694).
"""

import logging
import os
import resource
import shutil
import signal
import tempfile
import threading
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple, Union, cast

from . import metrics as call_metrics
from . import naming
from .stores.appkeys import AppkeyStore
from .errors import ComponentUnavailable, ProbeError
from .idl import load_service
from .naming import NodeSettings
from .stores.nodestore import NodeStore
from .zk.registration import Registration
from .zk.session import release_zookeeper, shared_zookeeper
from .rpc.overload import make_limiter
from .rpc.tls import server_context
from .settings import Settings, ZooKeeperSettings, load_settings, outbound_ip
from .options import (DEFAULT_CONNECT_TIMEOUT_MS, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS,
                      DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_READ_TIMEOUT, DEFAULT_SLOW_CALL_MS,
                      DEFAULT_STATS_INTERVAL, DEFAULT_STATS_TTL, MetricsOptions, ProviderLimits,
                      DEFAULT_WORKER_THREADS, ProviderTimeouts, check_number)
from .rpc.server import ThriftServer
from .rpc.workers import WorkerPool, wait_for_drain_order

log = logging.getLogger("probe.server")

# The flat keywords each value object groups (start_service and Provider take both).
_LIMITS = ("max_connections", "idle_timeout", "read_timeout", "max_message_bytes", "worker_threads",
           "max_inflight", "max_inflight_per_method")
_TIMEOUTS = ("connect_timeout", "session_timeout", "shutdown_grace", "drain_timeout")
_METRICS = ("metrics_port", "metrics_addr", "stats_interval", "stats_ttl", "slow_call_ms")


def provider_options(limits: Optional[ProviderLimits] = None,
                     timeouts: Optional[ProviderTimeouts] = None,
                     metrics: Union[bool, MetricsOptions] = True,
                     **flat: Any) -> Dict[str, Any]:
    """{"limits", "timeouts", "metrics"}: the value objects in effect, from the objects
    given and the flat keywords (an option given both ways is a TypeError; an
    unknown keyword too)."""
    unknown = sorted(set(flat) - set(_LIMITS + _TIMEOUTS + _METRICS))
    if unknown:
        raise TypeError("unexpected keyword argument(s) %s" % ", ".join(map(repr, unknown)))

    def pick(names: Iterable[str]) -> Dict[str, Any]:
        return {name: flat[name] for name in names if name in flat}
    given_metrics = metrics if isinstance(metrics, MetricsOptions) else None
    flat_metrics = pick(_METRICS)
    if given_metrics is None:
        flat_metrics["metrics"] = bool(metrics)  # as before: any truthy value records
    return {"limits": ProviderLimits.resolve(limits, **pick(_LIMITS)),
            "timeouts": ProviderTimeouts.resolve(timeouts, **pick(_TIMEOUTS)),
            "metrics": MetricsOptions.resolve(given_metrics, **flat_metrics)}


def raise_fd_limit(connections: int) -> None:
    """Raise this process's soft open-file limit (often 1024) towards its hard limit,
    so that `connections` sockets fit; as the Go runtime does for every program.
    The hard limit, set by the administrator, is never exceeded."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = connections + 1024  # stores, logs and the listener need fds too
        if hard != resource.RLIM_INFINITY:
            want = min(want, hard)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            log.info("raised the open-file limit from %d to %d for up to %d connections",
                     soft, want, connections)
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-file limit: %s", exc)


def node_zookeeper_settings(settings: Settings,
                            session_timeout: Optional[float] = None) -> ZooKeeperSettings:
    """The config's ZooKeeper settings, with a provider's own session timeout."""
    if session_timeout:
        return settings.zookeeper._replace(session_timeout=float(session_timeout))
    return settings.zookeeper


def check_stores(settings: Settings, appkey: str, connect_timeout: float) -> NodeStore:
    """The first steps of every provider start (sync or asyncio): refuse an appkey
    missing from MySQL, then reach Redis. Returns the node store. Blocking.

    :param connect_timeout: seconds to reach each store."""
    appkeys = AppkeyStore(settings.mysql, connect_timeout)
    try:
        appkeys.require(appkey)
    finally:
        appkeys.close()
    store = NodeStore(settings.redis, settings.env, connect_timeout)
    store.ping()
    return store


def advertised_host(settings: Settings, zk_settings: ZooKeeperSettings, advertise_host: Optional[str] = None) -> str:
    """The address a provider registers: the option, the config, else the outbound IP."""
    return (advertise_host or settings.advertise_host
            or outbound_ip(zk_settings.hosts.split(",")[0].rsplit(":", 1)[0]))


def register_node(zk_settings: ZooKeeperSettings, store: NodeStore, connect_timeout: float,
                  path: str, field: str,
                  defaults: NodeSettings) -> Tuple[Any, NodeSettings, Registration]:
    """Read (or create) the node's settings in Redis and create its ephemeral znode,
    kept registered across sessions. Returns (zk, node settings, Registration);
    on failure nothing is left registered and the ZooKeeper handle is released.
    Blocking: an asyncio provider runs it in an executor."""
    # ZooKeeper before the Redis default: a refused start writes nothing.
    zk = shared_zookeeper(zk_settings, timeout=connect_timeout)
    try:
        # The dialect is the provider's own, whatever Redis holds.
        node_settings = store.get_or_create(field, defaults)._replace(
            transport=defaults.transport, protocol=defaults.protocol)

        def reload_settings() -> Optional[NodeSettings]:
            try:
                return store.get(field)
            except (ProbeError, ValueError) as exc:
                log.warning("cannot re-read %s from Redis (%s): keeping the last known "
                            "settings", field, exc)
                return None

        registration = Registration(zk, path, node_settings, reload_settings)
        registration.register()
    except BaseException:
        release_zookeeper(zk)
        raise
    return zk, node_settings, registration


class ProviderBase(object):
    """What the threaded Provider and the asyncio provider (probe.aio.server) share:
    the checked options and the node's identity, set up in one order by
    `_configure`; binding, serving and stopping (the I/O model) are each
    subclass's own."""

    server: Any  # the subclass's wire server (ThriftServer, AsyncThriftServer), once started

    def _check_more(self, flat: Dict[str, Any]) -> None:
        """A subclass's own checks, run after the common ones and before the value
        objects are resolved."""

    def _configure(self, thrift_path: str, appkey: str, service_name: str, handler: object,
                   port: int, bind_host: str, advertise_host: Optional[str],
                   config_path: Optional[str], env: Optional[str],
                   observe: Optional[Callable[[str, str, float], None]], transport: str,
                   protocol: str, limits: Optional[ProviderLimits],
                   timeouts: Optional[ProviderTimeouts], metrics: Union[bool, MetricsOptions],
                   flat: Dict[str, Any]) -> ProviderLimits:
        """Check every option (nothing is touched before), resolve the value objects
        (`options`), load the service, the limiter, the settings and the RPC TLS
        context; returns the limits in effect."""
        naming.check_service_name(service_name)
        naming.check_dialect(transport, protocol)
        naming.check_appkey(appkey)
        if handler is None:
            raise ProbeError("handler is None: pass an object implementing %s's methods"
                             % service_name)
        check_number("port", port, 0, "0 picks a free port", maximum=65535, integer=True)
        self._check_more(flat)
        chosen = provider_options(limits, timeouts, metrics, **flat)
        limits, timeouts = chosen["limits"], chosen["timeouts"]
        if observe is not None and not callable(observe):
            raise ProbeError("bad observe %r: give a callable observe(method, status, seconds) "
                             "or None" % (observe,))
        self.options = chosen  # the value objects in effect
        # The wire's keywords (seconds, as everywhere in the wire plane).
        self.limits: Dict[str, Any] = dict(
            max_connections=limits.max_connections, idle_timeout=limits.idle_timeout_s,
            read_timeout=limits.read_timeout_s, max_message_bytes=limits.max_message_bytes)
        self.metrics = call_metrics.setup(chosen["metrics"], port_from_env=True)
        self.service: Any = cast(Any, load_service(thrift_path, service_name))  # a service class
        # Checked here, with the service's method names known, before anything starts.
        self.limiter = make_limiter(limits.max_inflight, limits.max_inflight_per_method,
                                    self.service.thrift_services)
        self.thrift_path = thrift_path
        self.appkey = appkey
        self.service_name = service_name
        self.handler = handler
        self.requested_port = port
        self.bind_host = bind_host
        # What the node advertises; the server itself accepts every dialect. Left
        # out of the data when it is the default, so existing readers see no change.
        self.transport = None if transport == naming.TRANSPORTS[0] else transport
        self.protocol = None if protocol == naming.PROTOCOLS[0] else protocol
        self.settings = load_settings(config_path, env)
        self.env = self.settings.env
        # rpc_tls.<env>: serve mutual TLS only. Loaded now, so a bad file refuses the
        # start before any store is touched.
        tls = self.settings.rpc_tls
        self.ssl_context = None if tls is None else server_context(
            tls, "config %s: 'rpc_tls.%s'" % (self.settings.path, self.env))
        self.advertise_host = advertise_host
        self.shutdown_grace = timeouts.shutdown_grace_s
        self.drain_timeout = timeouts.drain_timeout_s
        self.connect_timeout = timeouts.connect_timeout_ms / 1000.0  # the stores take seconds
        self.session_timeout = timeouts.session_timeout_s
        self.observe = observe
        self.recorder: Any = None
        self.metrics_endpoint: Any = None
        self.host: Any = None  # str once started
        self.port: Any = None  # int once bound
        self.node_settings: Any = None
        self.zk: Any = None
        self.registration: Any = None
        self._started = False
        return limits

    @property
    def describe(self) -> str:
        return "appkey=%s service=%s env=%s" % (self.appkey, self.service_name, self.env)

    @property
    def address(self) -> str:
        return "%s:%s" % (self.host, self.port)

    def _record_calls(self) -> None:
        """Count and time every call this process serves (labelled with host:port),
        once `self.server` (the subclass's wire server) is bound."""
        self.recorder = call_metrics.get_recorder("server", self.appkey, self.service_name,
                                                  self.address, self.metrics.slow_call_ms)
        self.recorder.inflight = lambda server=self.server: server.inflight
        self.server.observe = call_metrics.server_hook(self.recorder, self.observe)
        call_metrics.attach(self.recorder, self.settings.redis, self.env,
                            self.metrics.stats_interval, self.metrics.stats_ttl)


class Provider(ProviderBase):
    """One governed thrift service in this process. `start()` returns once the node is
    registered and serving; `stop()` shuts it down gracefully; `wait()` blocks.

    The parameters are those of `start_service` (which documents them), without
    ``block``: the value objects (`limits`, `timeouts`, `metrics`) or their flat
    keywords. Every option is checked here, before anything is touched; the value
    objects in effect are `options`.
    """

    def __init__(self, thrift_path: str, appkey: str, service_name: str, handler: object,
                 port: int = 8081, *,
                 bind_host: str = "0.0.0.0",
                 advertise_host: Optional[str] = None,
                 config_path: Optional[str] = None,
                 env: Optional[str] = None,
                 observe: Optional[Callable[[str, str, float], None]] = None,
                 workers: int = 1,
                 transport: str = "buffered",
                 protocol: str = "binary",
                 limits: Optional[ProviderLimits] = None,
                 timeouts: Optional[ProviderTimeouts] = None,
                 metrics: Union[bool, MetricsOptions] = True,
                 **flat: Any) -> None:
        self.workers = workers
        limits = self._configure(thrift_path, appkey, service_name, handler, port, bind_host,
                                 advertise_host, config_path, env, observe, transport, protocol,
                                 limits, timeouts, metrics, flat)
        self.limits["worker_threads"] = limits.worker_threads
        self.worker_pool: Optional[WorkerPool] = None
        self._metrics_dir: Optional[str] = None
        self.server: Any = None  # a ThriftServer once started
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    def _check_more(self, flat: Dict[str, Any]) -> None:
        check_number("workers", self.workers, 1, "processes serving the port", maximum=256,
                     integer=True)

    @property
    def field(self) -> str:
        return naming.settings_field(self.appkey, self.env, self.service_name, self.host, self.port)

    @property
    def path(self) -> str:
        return naming.node_path(self.env, self.appkey, self.service_name, self.host, self.port)

    def start(self) -> "Provider":
        settings = self.settings
        zk_settings = node_zookeeper_settings(settings, self.session_timeout)
        store = check_stores(settings, self.appkey, self.connect_timeout)
        self.host = advertised_host(settings, zk_settings, self.advertise_host)
        self.server = ThriftServer(self.service, self.handler, self.bind_host, self.requested_port,
                                   observe=self.observe, ssl_context=self.ssl_context,
                                   limiter=self.limiter, **self.limits)
        raise_fd_limit(self.limits["max_connections"])
        try:
            self.server.bind()
        except OSError as exc:
            raise ProbeError("cannot bind %s:%s for %s: %s (is another process on that port?)"
                             % (self.bind_host, self.requested_port, self.describe, exc))
        self.port = self.server.port
        if self.workers > 1:
            # Fork now, before this process runs any ZooKeeper or metrics thread.
            if self.metrics.enabled:
                self._metrics_dir = tempfile.mkdtemp(prefix="probe-metrics-%d-" % self.port)
                call_metrics.enable_multiprocess(self._metrics_dir)
            self.worker_pool = WorkerPool(self.workers, self._serve_in_worker,
                                          name="%s worker" % self.service_name)
            self.worker_pool.start()
        elif self.metrics.enabled:
            self._record_calls()
        try:
            if self.metrics.port is not None:
                self.metrics_endpoint = call_metrics.serve(self.metrics.port, self.metrics.addr)
            own = NodeSettings(self.host, self.port, transport=self.transport, protocol=self.protocol)
            self.zk, self.node_settings, self.registration = register_node(
                zk_settings, store, self.connect_timeout, self.path, self.field, own)
        except BaseException:
            if self.worker_pool is not None:
                self.worker_pool.stop(timeout=5)
            self.server.close(shutdown=self.worker_pool is None)
            if self.metrics_endpoint is not None:
                self.metrics_endpoint.close()
                self.metrics_endpoint = None
            raise
        if self.worker_pool is not None:
            self.worker_pool.supervise()
        else:
            self.server.start()
        self._started = True
        log.info("serving %s on %s (bound %s:%d%s), settings %s", self.describe, self.address,
                 self.bind_host, self.port, ", mutual TLS" if self.ssl_context else "",
                 self.node_settings.to_json())
        return self

    def _serve_in_worker(self, index: int) -> None:
        """A forked worker's life: serve the shared socket until the parent says drain."""
        if self.metrics.enabled:
            self._record_calls()
        self.server.start()
        wait_for_drain_order()
        self.server.stop_accepting(shutdown=False)
        left = self.server.drain(self.drain_timeout)
        if left:
            log.warning("worker %d: %d call(s) still running after %.1f s; closing anyway",
                        index, left, self.drain_timeout)
        self.server.close(shutdown=False)
        call_metrics.flush_now()

    def stop(self, grace: Optional[float] = None) -> None:
        """Deregister, let consumers move away, drain, close. Safe to call twice."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            if not self._started:
                self._stopped.set()  # a refused start already released what it took
                return
            grace = self.shutdown_grace if grace is None else grace
            log.info("stopping %s on %s: deregistering, then draining", self.describe, self.address)
            if self.registration is not None:
                self.registration.close()
            if grace > 0:
                self._stopped.wait(grace)
            if self.worker_pool is not None:
                self.worker_pool.stop(timeout=self.drain_timeout + 5)
                self.server.close(shutdown=False)
            elif self.server is not None:
                self.server.stop_accepting()
                left = self.server.drain(self.drain_timeout)
                if left:
                    log.warning("%d call(s) still running after %.1f s of draining; closing anyway",
                                left, self.drain_timeout)
                self.server.close()
            if self.zk is not None:
                release_zookeeper(self.zk)
                self.zk = None
            if self.metrics_endpoint is not None:
                self.metrics_endpoint.close()
            if self.recorder is not None:
                call_metrics.detach(self.recorder, self.settings.redis, self.env)
            if self._metrics_dir is not None:
                call_metrics.disable_multiprocess()
                shutil.rmtree(self._metrics_dir, ignore_errors=True)
            self._stopped.set()
            log.info("stopped %s on %s", self.describe, self.address)

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self._stopped.wait(timeout)

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()


def _setup_file_log(settings: Settings, appkey: str, service_name: str) -> None:
    """In envs with a configured log dir (prod by default), also log to a file.
    Attached to the 'probe' logger only: a library never touches the root logger."""
    directory = settings.log_dir
    if not directory:
        return
    try:
        os.makedirs(directory, exist_ok=True)
        handler = logging.FileHandler(os.path.join(directory, "%s_%s_server.log" % (appkey, service_name)))
    except OSError as exc:
        log.warning("cannot open a log file in %s: %s", directory, exc)
        return
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("probe")
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)


def start_service(thrift_path: str, appkey: str, service_name: str, handler: object,
                  port: int = 8081, *,
                  block: bool = True,
                  bind_host: str = "0.0.0.0",
                  advertise_host: Optional[str] = None,
                  config_path: Optional[str] = None,
                  env: Optional[str] = None,
                  shutdown_grace: float = 1.0,
                  drain_timeout: float = 10.0,
                  connect_timeout: int = DEFAULT_CONNECT_TIMEOUT_MS,
                  session_timeout: Optional[float] = None,
                  observe: Optional[Callable[[str, str, float], None]] = None,
                  metrics: Union[bool, MetricsOptions] = True,
                  metrics_port: Optional[int] = None,
                  metrics_addr: Optional[str] = None,
                  stats_interval: float = DEFAULT_STATS_INTERVAL,
                  stats_ttl: float = DEFAULT_STATS_TTL,
                  slow_call_ms: float = DEFAULT_SLOW_CALL_MS,
                  workers: int = 1,
                  max_connections: int = DEFAULT_MAX_CONNECTIONS,
                  idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                  read_timeout: float = DEFAULT_READ_TIMEOUT,
                  max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                  worker_threads: int = DEFAULT_WORKER_THREADS,
                  transport: str = "buffered",
                  protocol: str = "binary",
                  max_inflight: Optional[int] = None,
                  max_inflight_per_method: Union[None, int, Mapping[str, int]] = None,
                  limits: Optional[ProviderLimits] = None,
                  timeouts: Optional[ProviderTimeouts] = None) -> "Provider":
    """Register `handler` as a node of `service_name` under `appkey` and serve it.

    Durations are in seconds, except ``connect_timeout`` (milliseconds, as
    everywhere in probe). Every option is validated (a named ``ProbeError``) before
    anything is touched. With ``rpc_tls.<env>`` in the config the provider serves
    mutual TLS only (see :mod:`probe.rpc.tls`); a handshake must finish within
    ``read_timeout``.

    :param thrift_path: the IDL file.
    :param appkey: a registered appkey (MySQL ``serviceapp``); else the start is refused.
    :param service_name: the service in the IDL to serve.
    :param handler: an object with one method per thrift method.
    :param port: the port to serve (0 picks a free one).
    :param block: True (default) serves until SIGTERM/SIGINT, then stops gracefully;
        False returns the started `Provider` (call its ``stop()``).
    :param bind_host: the address to bind.
    :param advertise_host: the address registered for consumers (default: config,
        ``PROBE_ADVERTISE_HOST``, else the outbound IP).
    :param config_path: a config file instead of ``PROBE_CONFIG`` / the packaged one.
    :param env: the env (default ``PROBE_ENV`` or the hostname rules).
    :param shutdown_grace: seconds between deregistering and closing the port, so
        consumers move away first.
    :param drain_timeout: seconds calls in flight get to finish at stop.
    :param connect_timeout: MILLISECONDS to reach MySQL, Redis and ZooKeeper at start.
    :param session_timeout: ZooKeeper session timeout in seconds (default: config).
    :param observe: ``observe(method, status, seconds)`` called after every call.
    :param metrics: False records no call metrics; or a
        :class:`probe.options.MetricsOptions` grouping the metrics options below.
    :param metrics_port: serve Prometheus ``/metrics`` on this port (default
        ``PROBE_METRICS_PORT``; none if unset).
    :param metrics_addr: the address ``/metrics`` binds (127.0.0.1).
    :param stats_interval: seconds between flushes of per-slot stats to Redis (<= 10).
    :param stats_ttl: seconds those stats live in Redis.
    :param slow_call_ms: calls slower than this (ms, by its name) are logged on
        ``probe.metrics``.
    :param workers: processes serving the port (N > 1 forks N workers).
    :param max_connections: open connections per process; beyond it a new one is
        accepted and closed at once (default 10,000).
    :param idle_timeout: seconds a connection may stay quiet between calls before
        the provider closes it (default 300; pooled probe clients reconnect unseen).
    :param read_timeout: seconds one message may take to arrive in full, and a reply
        to be taken by the peer (default 10); a slower peer is disconnected.
    :param max_message_bytes: the largest message, or declared string, binary or
        container size, a call may have (default 4 MiB); bigger closes the
        connection before anything is allocated.
    :param worker_threads: threads running calls at once per process (default 64);
        idle connections use none.
    :param transport: the transport the node advertises to consumers, ``"buffered"``
        (default) or ``"framed"``. The provider accepts both on its port either way
        (each connection's first bytes say which), so this only says what consumers
        use.
    :param protocol: the protocol the node advertises, ``"binary"`` (default) or
        ``"compact"``; both are accepted either way.
    :param max_inflight: calls running at once per process, all methods together
        (default: no cap). A call beyond it is not run: it gets the "overloaded,
        not executed" reply at once (`probe.rpc.overload`), which probe consumers
        retry on another node even for non-idempotent methods.
    :param max_inflight_per_method: the same cap per method: an int for every
        method, or ``{method: calls}`` for the methods named.
    :param limits: a :class:`probe.options.ProviderLimits` instead of the limit
        keywords above (``ProviderLimits(max_connections=..., idle_timeout_s=...,
        read_timeout_s=..., max_message_bytes=..., worker_threads=..., max_inflight=...,
        max_inflight_per_method=...)``).
    :param timeouts: a :class:`probe.options.ProviderTimeouts` instead of
        ``connect_timeout``, ``session_timeout``, ``shutdown_grace`` and
        ``drain_timeout`` (its fields name their units: ``connect_timeout_ms``,
        ``session_timeout_s``, ``shutdown_grace_s``, ``drain_timeout_s``).
    :raises TypeError: an option given both as a keyword and in its value object.
    """
    # The flat keywords, grouped into the value objects by provider_options.
    flat = {name: value for name, value in locals().items()
            if name in _LIMITS + _TIMEOUTS + _METRICS}
    provider = Provider(thrift_path, appkey, service_name, handler, port,
                        bind_host=bind_host, advertise_host=advertise_host,
                        config_path=config_path, env=env, observe=observe, workers=workers,
                        transport=transport, protocol=protocol,
                        **provider_options(limits, timeouts, metrics, **flat))
    if not block:
        return provider.start()
    _setup_file_log(provider.settings, appkey, service_name)
    stop_requested = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        # Before start(): a SIGTERM arriving just after registration must still
        # deregister, not kill the process with its znode left behind.
        def on_signal(signum: int, frame: Any) -> None:
            log.info("received signal %d", signum)
            stop_requested.set()
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        provider.start()
        while not stop_requested.wait(0.5) and not provider.stopped:
            pass
    finally:
        provider.stop()
        for sig, handler_before in previous.items():
            signal.signal(sig, handler_before)
    return provider


__all__ = ["start_service", "Provider", "ComponentUnavailable"]
