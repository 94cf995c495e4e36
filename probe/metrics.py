"""Call metrics: every call counted and timed per (appkey, service, method, node,
status), on the provider ("server") and on the consumer ("client") side.

Recording. A `Recorder` belongs to one provider or one client. The call path writes
only into its own thread's aggregates - a dict {(method, node, status): cell}, a
cell being a plain list of latency-bucket counts followed by the sum of seconds -
so it takes no lock and stays exact with any number of threads. prometheus_client's
`labels(...).inc()` would take a lock and build a label key per metric per call;
here a call costs one bisect and two list increments. Readers (a scrape, the Redis
flush, a snapshot file) merge every thread's cells; copying a list is atomic under
the GIL, so a reader sees each cell at most one call behind. Cells of dead threads
are folded into a retired total, so counters never go back.

Exposition. One collector, registered once in prometheus_client's default REGISTRY,
turns the merged cells into
    probe_{server,client}_requests_total{appkey,service,method,node,status}
    probe_{server,client}_request_seconds{appkey,service,method,node}  (histogram)
    probe_{server,client}_inflight{appkey,service,node}                (gauge)
`serve(port)` exposes the REGISTRY as /metrics over HTTP.

Fleet view. One daemon thread per process ("probe-metrics") writes, every
`stats_interval` s (<= 10), each Redis sink's running totals for the current
10-second slot (layout in probe.stats). If Redis is unreachable the calls do not
notice: the error is logged at most once a minute and the unsent counts are merged
into the next successful write (into the slot current then), not dropped.

Several processes. Snapshots (`snapshot()`) add up (`merge()`). After
`enable_multiprocess(dir)` in a pre-fork parent (or PROBE_METRICS_DIR), every
process writes its snapshot to <dir>/<pid>.json on each tick and at exit, and the
collector adds the other processes' files to its own: a parent serving /metrics
reports its workers (counters of dead workers stay, their gauges go). A forked
child starts from zero, so nothing is counted twice.
"""

import atexit
import json
import logging
import os
import random
import socket
import threading
import time
from bisect import bisect_left
from typing import NamedTuple, Optional

from prometheus_client import REGISTRY, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from .errors import ConfigError, ProbeError
from .naming import parse_node_name
from .nodestore import REDIS_ERRORS
from .stats import BOUNDS, DEFAULT_TTL, SIDES, SLOT_SECONDS, slot_of, write_slot

log = logging.getLogger("probe.metrics")

DEFAULT_STATS_INTERVAL = 5.0
MAX_STATS_INTERVAL = float(SLOT_SECONDS)  # at least one write per slot
DEFAULT_SLOW_CALL_MS = 1000.0
DEFAULT_METRICS_ADDR = "0.0.0.0"
ERROR_LOG_EVERY = 60.0  # seconds between two logged flush errors
REDIS_TIMEOUT = 1.0  # seconds; the flush thread must not hang on a dead Redis
METRICS_PORT_ENV = "PROBE_METRICS_PORT"
METRICS_DIR_ENV = "PROBE_METRICS_DIR"

OPTION_NAMES = ("metrics", "metrics_port", "metrics_addr", "stats_interval", "stats_ttl",
                "slow_call_ms")

_CELL = len(BOUNDS) + 2  # bucket counts (last one +Inf), then the sum of seconds
_LE = [floatToGoString(bound) for bound in BOUNDS] + ["+Inf"]


class MetricsOptions(NamedTuple):
    enabled: bool = True
    port: Optional[int] = None
    addr: str = DEFAULT_METRICS_ADDR
    stats_interval: float = DEFAULT_STATS_INTERVAL
    stats_ttl: int = DEFAULT_TTL
    slow_call_ms: float = DEFAULT_SLOW_CALL_MS


def metrics_options(metrics=True, metrics_port=None, metrics_addr=DEFAULT_METRICS_ADDR,
                    stats_interval=DEFAULT_STATS_INTERVAL, stats_ttl=DEFAULT_TTL,
                    slow_call_ms=DEFAULT_SLOW_CALL_MS, port_from_env=False):
    """Validate the metrics options of a provider or a client. With `port_from_env`,
    PROBE_METRICS_PORT supplies metrics_port when it is not given."""
    if metrics_port is None and port_from_env:
        metrics_port = os.environ.get(METRICS_PORT_ENV) or None
    if metrics_port is not None:
        text = str(metrics_port).strip()
        if isinstance(metrics_port, bool) or not text.isdigit() or not 0 <= int(text) < 65536:
            raise ProbeError("bad metrics_port %r (option or %s): give a port 0-65535"
                             % (metrics_port, METRICS_PORT_ENV))
        metrics_port = int(text)
    for name, value, high in (("stats_interval", stats_interval, MAX_STATS_INTERVAL),
                              ("stats_ttl", stats_ttl, None), ("slow_call_ms", slow_call_ms, None)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 \
                or (high is not None and value > high):
            raise ProbeError("bad %s %r: give a number > 0%s" % (
                name, value, " and <= %g (seconds)" % high if high else ""))
    return MetricsOptions(bool(metrics), metrics_port, str(metrics_addr), float(stats_interval),
                          int(stats_ttl), float(slow_call_ms))


def pop_options(options):
    """Take the metrics options out of a **options dict (build_client)."""
    return metrics_options(**{name: options.pop(name) for name in OPTION_NAMES if name in options})


def redis_settings_or_none(settings):
    """A consumer flushes to Redis only when its config has a redis section."""
    try:
        return settings.redis
    except ConfigError as exc:
        log.debug("no Redis for call stats, not flushing them: %s", exc)
        return None


# -- recording ---------------------------------------------------------------------
class _ThreadState(object):
    __slots__ = ("cells", "current", "thread")

    def __init__(self):
        self.cells = {}
        # client: the node this thread is calling now, set by the call path; a thread
        # calls one node at a time, so in flight = threads whose current node it is
        self.current = None
        self.thread = threading.current_thread()


def _add(into, key, cell):
    mine = into.get(key)
    if mine is None:
        into[key] = list(cell)
    else:
        for index, value in enumerate(cell):
            mine[index] += value


class Recorder(object):
    """The aggregates of one side of one (appkey, service).

    Server recorders set `node` ("host:port" of the provider) and `inflight` (a
    callable returning the calls in flight) once bound; client recorders get the
    node per call as its znode name and label it "host:port" when read.

    Threading: `thread_state`, `observe`, `observe_in` and `observe_server` run on
    the call path of any thread and touch only that thread's state; `snapshot_into` may run on
    any thread and takes the recorder's lock (never taken on the call path, except
    once per new thread).
    """

    def __init__(self, side, appkey, service, node=None, slow_call_ms=DEFAULT_SLOW_CALL_MS,
                 inflight=None):
        if side not in SIDES:
            raise ValueError("side must be 'server' or 'client', got %r" % (side,))
        self.side = side
        self.appkey = appkey
        self.service = service
        self.node = node
        self.inflight = inflight
        self.slow_seconds = float(slow_call_ms) / 1000.0
        self.stats_ttl = DEFAULT_TTL  # set by attach()
        self._reset()

    def _reset(self):
        self._local = threading.local()
        self._lock = threading.Lock()
        self._states = []
        self._retired = {}
        self._adopted = 0
        self._labels = {}

    def __repr__(self):
        return "<Recorder %s %s/%s %s>" % (self.side, self.appkey, self.service, self.node or "")

    def _adopt(self):
        state = _ThreadState()
        with self._lock:
            self._states.append(state)
            self._adopted += 1
            if self._adopted % 64 == 0:  # thread-per-connection servers: do not pile up states
                self._retire_dead()
        self._local.state = state
        _pump.ensure()  # a forked child gets its thread back here
        return state

    # -- the call path ----------------------------------------------------------
    def thread_state(self):
        """This thread's aggregates; a client looks it up once per call."""
        try:
            return self._local.state
        except AttributeError:
            return self._adopt()

    def observe(self, method, node, status, seconds):
        """One client attempt of `method` on the node with znode name `node`."""
        self.observe_in(self.thread_state(), method, node, status, seconds)

    def observe_in(self, state, method, node, status, seconds):
        """observe() with the thread's state already in hand (from thread_state())."""
        cells = state.cells
        key = (method, node, status)
        cell = cells.get(key)
        if cell is None:
            cell = cells[key] = [0] * (_CELL - 1) + [0.0]
        cell[bisect_left(BOUNDS, seconds)] += 1
        cell[-1] += seconds
        if seconds >= self.slow_seconds:
            self._slow(method, node, status, seconds)

    def observe_server(self, method, status, seconds):
        """One call of `method` served by this provider (ThriftServer's hook)."""
        self.observe_in(self.thread_state(), method, None, status, seconds)

    def _slow(self, method, node, status, seconds):
        log.warning("slow call: %s side, appkey %s, %s.%s on node %s took %.1f ms (status %s)",
                    self.side, self.appkey, self.service, method, self._label(node),
                    seconds * 1000.0, status)

    # -- readers ----------------------------------------------------------------
    def _label(self, node):
        """The node label "host:port": the own address (server) or a znode name's."""
        if node is None:
            return str(self.node)
        label = self._labels.get(node)
        if label is None:
            parsed = parse_node_name(node)
            if parsed is None:
                label = node
            elif ":" in parsed.ip:
                label = "[%s]:%d" % (parsed.ip, parsed.port)
            else:
                label = "%s:%d" % (parsed.ip, parsed.port)
            self._labels[node] = label
        return label

    def _retire_dead(self):
        """Fold the cells of finished threads into the retired total (lock held)."""
        alive = []
        for state in self._states:
            if state.thread.is_alive():
                alive.append(state)
            else:
                for key, cell in list(state.cells.items()):
                    _add(self._retired, key, cell)
        self._states = alive

    def snapshot_into(self, calls, inflight=None):
        """Add this recorder's totals to `calls` {(side, appkey, service, method, node,
        status): cell} and its in-flight counts to `inflight` {(side, appkey, service,
        node): n}."""
        prefix = (self.side, self.appkey, self.service)
        # Under the lock: a concurrent reader folding a dead thread into _retired
        # must not make this one count that thread twice.
        with self._lock:
            self._retire_dead()
            # list(dict.items()) and cell[:] run in C without releasing the GIL, so
            # each copy is consistent while the owning thread keeps writing.
            copies = [(key, cell[:]) for key, cell in self._retired.items()]
            for state in self._states:
                copies.extend((key, cell[:]) for key, cell in list(state.cells.items()))
            currents = [state.current for state in self._states]
        nodes = set()
        for (method, node, status), cell in copies:
            label = self._label(node)
            nodes.add(label)
            _add(calls, prefix + (method, label, status), cell)
        if inflight is None:
            return
        if self.side == "server":
            if self.node is not None:
                key = prefix + (str(self.node),)
                inflight[key] = inflight.get(key, 0) + (self.inflight() if self.inflight else 0)
            return
        for label in nodes:
            inflight.setdefault(prefix + (label,), 0)
        for node in currents:
            if node is not None:
                key = prefix + (self._label(node),)
                inflight[key] = inflight.get(key, 0) + 1


def server_hook(recorder, observe=None):
    """The ThriftServer `observe(method, status, seconds)` hook: the recorder, the
    user's hook, both, or None."""
    if recorder is None:
        return observe
    if observe is None:
        return recorder.observe_server
    record = recorder.observe_server

    def both(method, status, seconds):
        record(method, status, seconds)
        observe(method, status, seconds)
    return both


# -- the process: recorders, sinks, the background thread -------------------------
_lock = threading.RLock()
_recorders = []
_shared = {}  # (side, appkey, service, node, slow_call_ms) -> Recorder
_sinks = {}  # (RedisSettings, env) -> _RedisSink
_multiprocess_dir = os.environ.get(METRICS_DIR_ENV) or None
_collector = None
_endpoints = {}  # (addr, port) -> [MetricsEndpoint, users]


def _writer_id():
    return "%s:%d:%04x" % (socket.gethostname(), os.getpid(), random.getrandbits(16))


class _RedisSink(object):
    """Writes the totals of some recorders to one Redis (one env) per 10 s slot.

    Each write is the running total since the slot began (`_base` = what was
    written by the end of the previous slot); `_written` advances only on success,
    so a failed interval is merged into the next write instead of being lost.
    """

    def __init__(self, redis_settings, env):
        self.settings = redis_settings
        self.env = env
        self.recorders = []
        self.users = {}  # recorder -> attach count
        self._reset()

    def _reset(self):
        self.writer = _writer_id()
        self._client = None
        self._lock = threading.Lock()
        self._slot = None
        self._base = {}
        self._written = {}
        self._failing = False
        self._logged_at = None

    def _redis(self):
        if self._client is None:
            from .nodestore import connect_redis
            self._client = connect_redis(self.settings, timeout=REDIS_TIMEOUT)
        return self._client

    def flush(self, now=None):
        """Write pending stats; False (and nothing raised) when Redis fails."""
        with self._lock:
            calls, ttls = {}, {}
            for recorder in list(self.recorders):
                recorder.snapshot_into(calls)
                key = (recorder.side, recorder.appkey)
                ttls[key] = max(ttls.get(key, 0), recorder.stats_ttl)
            now = time.time() if now is None else now
            slot = slot_of(now)
            if slot != self._slot:
                self._slot, self._base = slot, self._written
            deltas = {}
            for key, cell in calls.items():
                base = self._base.get(key)
                delta = cell if base is None else [a - b for a, b in zip(cell, base)]
                if sum(delta[:-1]) > 0:
                    deltas[key] = delta
            try:
                write_slot(self._redis(), self.env, slot, deltas, self.writer, ttls=ttls)
            except REDIS_ERRORS + (ProbeError,) as exc:
                self._failed(exc, now)
                return False
            self._written = calls
            if self._failing:
                self._failing = False
                log.info("call stats reach Redis at %s again", self.settings.address)
            return True

    def _failed(self, exc, now):
        self._failing = True
        if _exiting:  # the last flush of a process whose Redis may be gone already
            log.debug("cannot write the last call stats to Redis at %s: %s",
                      self.settings.address, exc)
        elif self._logged_at is None or now - self._logged_at >= ERROR_LOG_EVERY:
            self._logged_at = now
            log.warning("cannot write call stats to Redis at %s: %s. Calls are not affected; "
                        "the counts are kept and written with the next flush that succeeds "
                        "(this message repeats at most once a minute)", self.settings.address, exc)


class _Pump(object):
    """The one background thread of a process: flushes the sinks and writes the
    snapshot file every `interval` s (the smallest interval asked for)."""

    def __init__(self):
        self.interval = DEFAULT_STATS_INTERVAL
        self.thread = None
        self._wake = threading.Event()

    def want(self, interval):
        if interval < self.interval:
            self.interval = interval
            self._wake.set()
        self.ensure()

    def ensure(self):
        if (self.thread is None or not self.thread.is_alive()) and (_sinks or _multiprocess_dir):
            with _lock:
                if self.thread is None or not self.thread.is_alive():
                    self.thread = threading.Thread(target=self._run, name="probe-metrics", daemon=True)
                    self.thread.start()

    def _run(self):
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            flush_now()


_pump = _Pump()


def get_recorder(side, appkey, service, node=None, slow_call_ms=DEFAULT_SLOW_CALL_MS):
    """The process's recorder for these labels, created on first use. Sharing it means
    a client built per request, or a provider restarted on its port, neither piles
    up recorders nor makes a counter go back."""
    identity = (side, appkey, service, node, float(slow_call_ms))
    with _lock:
        recorder = _shared.get(identity)
        if recorder is None:
            recorder = _shared[identity] = Recorder(side, appkey, service, node, slow_call_ms)
        return recorder


def attach(recorder, redis_settings=None, env=None, stats_interval=DEFAULT_STATS_INTERVAL,
           stats_ttl=DEFAULT_TTL):
    """Make `recorder` visible to the collector and, with `redis_settings`, flush it to
    that Redis every `stats_interval` s. Registers the collector on first use."""
    recorder.stats_ttl = int(stats_ttl)
    with _lock:
        _register_collector()
        if recorder not in _recorders:
            _recorders.append(recorder)
        if redis_settings is not None:
            sink = _sinks.get((redis_settings, env))
            if sink is None:
                sink = _sinks[(redis_settings, env)] = _RedisSink(redis_settings, env)
            if recorder not in sink.recorders:
                sink.recorders.append(recorder)
            sink.users[recorder] = sink.users.get(recorder, 0) + 1
    _pump.want(float(stats_interval))
    return recorder


def detach(recorder, redis_settings=None, env=None):
    """Undo one `attach` (a client closed, a provider stopped). When a Redis has no
    user left it gets a last flush and is forgotten, so a process does not keep
    writing to a Redis that only a long-gone client used."""
    if redis_settings is None:
        return
    with _lock:
        sink = _sinks.get((redis_settings, env))
        if sink is None or recorder not in sink.users:
            return
        sink.users[recorder] -= 1
        if sink.users[recorder] > 0:
            return
    sink.flush()
    with _lock:
        if sink.users.get(recorder) == 0:
            del sink.users[recorder]
            sink.recorders.remove(recorder)
            if not sink.recorders:
                _sinks.pop((redis_settings, env), None)


def flush_now():
    """Write every sink's pending stats, and this process's snapshot file, now.
    Never raises; True when every write succeeded."""
    with _lock:
        sinks = list(_sinks.values())
        directory = _multiprocess_dir
    ok = True
    for sink in sinks:
        try:
            ok = sink.flush() and ok
        except Exception:
            log.exception("flushing call stats failed")
            ok = False
    if directory:
        try:
            write_snapshot(directory)
        except Exception as exc:
            log.warning("cannot write the metrics snapshot to %s: %s", directory, exc)
            ok = False
    return ok


_exiting = False


@atexit.register
def _flush_at_exit():
    global _exiting
    _exiting = True
    flush_now()


# -- snapshots: what one process knows, mergeable across processes -------------------
def snapshot(other_processes=False):
    """{"calls": {(side, appkey, service, method, node, status): cell}, "inflight":
    {(side, appkey, service, node): n}} of this process (and, with
    `other_processes`, of the snapshot files of the multi-process dir)."""
    calls, inflight = {}, {}
    with _lock:
        recorders = list(_recorders)
    for recorder in recorders:
        recorder.snapshot_into(calls, inflight)
    own = {"calls": calls, "inflight": inflight}
    if other_processes and _multiprocess_dir:
        return merge(own, *read_snapshots(_multiprocess_dir, exclude_pid=os.getpid()))
    return own


def merge(*snapshots):
    """Add snapshots up: counts, sums and buckets add; so do in-flight gauges."""
    calls, inflight = {}, {}
    for snap in snapshots:
        for key, cell in snap.get("calls", {}).items():
            _add(calls, tuple(key), cell)
        for key, count in snap.get("inflight", {}).items():
            inflight[tuple(key)] = inflight.get(tuple(key), 0) + count
    return {"calls": calls, "inflight": inflight}


def write_snapshot(directory, snap=None, pid=None):
    """Write `snap` (default: this process's) to <directory>/<pid>.json atomically."""
    pid = os.getpid() if pid is None else pid
    snap = snapshot() if snap is None else snap
    data = {"pid": pid, "calls": [list(key) + [cell] for key, cell in snap["calls"].items()],
            "inflight": [list(key) + [count] for key, count in snap["inflight"].items()]}
    path = os.path.join(directory, "%d.json" % pid)
    temporary = "%s.%d.tmp" % (path, threading.get_ident())
    with open(temporary, "w") as handle:
        json.dump(data, handle, separators=(",", ":"))
    os.replace(temporary, path)
    return path


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_snapshots(directory, exclude_pid=None):
    """The snapshots in `directory`; a dead process keeps its counts, not its gauges."""
    snaps = []
    try:
        names = os.listdir(directory)
    except OSError:
        return snaps
    for name in names:
        if not name.endswith(".json") or not name[:-5].isdigit() or int(name[:-5]) == exclude_pid:
            continue
        try:
            with open(os.path.join(directory, name)) as handle:
                data = json.load(handle)
        except (OSError, ValueError):
            continue  # being replaced or half-written by a crash: next scrape
        pid = int(name[:-5])
        snaps.append({
            "calls": {tuple(row[:-1]): row[-1] for row in data.get("calls", ())},
            "inflight": {tuple(row[:-1]): row[-1] for row in data.get("inflight", ())}
            if _pid_alive(pid) else {}})
    return snaps


def enable_multiprocess(directory, wipe=True):
    """Call in a pre-fork parent before forking: every process then shares its
    snapshot through `directory` (emptied first with `wipe`, so a restart does not
    count the previous run)."""
    global _multiprocess_dir
    os.makedirs(directory, exist_ok=True)
    if wipe:
        for name in os.listdir(directory):
            if name.endswith(".json") or name.endswith(".tmp"):
                try:
                    os.remove(os.path.join(directory, name))
                except OSError:
                    pass
    with _lock:
        _multiprocess_dir = directory
    _pump.ensure()


def disable_multiprocess():
    """Stop sharing snapshots (the pre-fork provider that enabled it has stopped)."""
    global _multiprocess_dir
    with _lock:
        _multiprocess_dir = None


def _after_fork_in_child():
    """A forked worker starts from zero: the parent's counts stay the parent's."""
    global _lock
    _lock = threading.RLock()
    for recorder in _recorders:
        recorder._reset()
    for sink in _sinks.values():
        sink._reset()
    _pump.thread = None
    _pump._wake = threading.Event()
    _endpoints.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# -- Prometheus exposition ------------------------------------------------------------
class ProbeCollector(object):
    """Turns the merged snapshot into Prometheus families at scrape time."""

    def describe(self):
        return self.families({"calls": {}, "inflight": {}})

    def collect(self):
        return self.families(snapshot(other_processes=True))

    @staticmethod
    def families(snap):
        result = []
        for side in SIDES:
            requests = CounterMetricFamily(
                "probe_%s_requests" % side, "Calls %s by probe, by outcome" % (
                    "served" if side == "server" else "made"),
                labels=("appkey", "service", "method", "node", "status"))
            seconds = HistogramMetricFamily(
                "probe_%s_request_seconds" % side, "Call latency on the %s side" % side,
                labels=("appkey", "service", "method", "node"))
            inflight = GaugeMetricFamily(
                "probe_%s_inflight" % side, "Calls in flight on the %s side" % side,
                labels=("appkey", "service", "node"))
            histograms = {}
            for key, cell in sorted(snap["calls"].items()):
                if key[0] != side:
                    continue
                requests.add_metric(key[1:], sum(cell[:-1]))
                _add(histograms, key[1:5], cell)
            for labels, cell in sorted(histograms.items()):
                cumulative, points = 0, []
                for le, count in zip(_LE, cell[:-1]):
                    cumulative += count
                    points.append((le, cumulative))
                seconds.add_metric(labels, points, cell[-1])
            for key, count in sorted(snap["inflight"].items()):
                if key[0] == side:
                    inflight.add_metric(key[1:], count)
            result.extend((requests, seconds, inflight))
        return result


def _register_collector():
    global _collector
    if _collector is None:
        collector = ProbeCollector()
        try:
            REGISTRY.register(collector)
        except ValueError as exc:  # names taken by someone else's metrics
            log.warning("cannot register probe's metrics in the default registry: %s", exc)
        _collector = collector
    return _collector


class MetricsEndpoint(object):
    """One user of a /metrics HTTP server; the server stops with its last user."""

    def __init__(self, key, httpd):
        self._key = key
        self.httpd = httpd
        self.port = httpd.server_port
        self.addr = key[0]
        self._closed = False

    def __repr__(self):
        return "<MetricsEndpoint %s:%d>" % (self.addr, self.port)

    def close(self):
        with _lock:
            if self._closed:
                return
            self._closed = True
            entry = _endpoints.get(self._key)
            if entry is not None:
                entry[1] -= 1
                if entry[1] > 0:
                    return
                del _endpoints[self._key]
        self.httpd.shutdown()
        self.httpd.server_close()


def serve(port, addr=DEFAULT_METRICS_ADDR):
    """Serve the default REGISTRY as /metrics on addr:port (0 picks a free port); a
    provider and a client of one process asking for the same port share it."""
    _register_collector()
    with _lock:
        entry = _endpoints.get((addr, port)) if port else None
        if entry is not None:
            entry[1] += 1
            return MetricsEndpoint((addr, port), entry[0].httpd)
        try:
            httpd, _ = start_http_server(port, addr)
        except OSError as exc:
            raise ProbeError("cannot serve /metrics on %s:%s: %s (is another process using the "
                             "port? pick another metrics_port or unset %s)"
                             % (addr, port, exc, METRICS_PORT_ENV))
        key = (addr, httpd.server_port)
        endpoint = MetricsEndpoint(key, httpd)
        _endpoints[key] = [endpoint, 1]
        log.info("serving /metrics on %s:%d", addr, endpoint.port)
        return endpoint
