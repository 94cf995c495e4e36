"""The metrics state of a process, in one object, created on first use.

`MetricsState` holds what the recorders of a process share: the recorders by
labels, the Redis sinks, the background thread, the multi-process snapshot
directory, the Prometheus collector and the /metrics servers. `process_state()`
creates it on first use and only then installs the process hooks (a last flush at
exit; a forked child starts from zero); importing probe installs nothing.
`fresh_state()` replaces it with an empty one (tests).

Several processes. After `enable_multiprocess(dir)` in a pre-fork parent (or
PROBE_METRICS_DIR), every process writes its snapshot to <dir>/<pid>.json on each
tick and at exit, and the collector adds the other processes' files to its own: a
parent serving /metrics reports its workers (counters of dead workers stay, their
gauges go). A forked child starts from zero, so nothing is counted twice.
"""

import atexit
import logging
import os
import threading
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, cast

from prometheus_client import REGISTRY

from ..stores.stats import DEFAULT_TTL
from .exposition import HttpServers, MetricsEndpoint, ProbeCollector
from .options import DEFAULT_SLOW_CALL_MS, DEFAULT_STATS_INTERVAL, LOCAL_METRICS_ADDR
from .recorder import Recorder
from .sink import Pump, RedisSink
from .snapshots import Snapshot, merge, read_snapshots, wipe_snapshots, write_snapshot

if TYPE_CHECKING:
    from ..settings import RedisSettings

log = logging.getLogger("probe.metrics")

METRICS_DIR_ENV = "PROBE_METRICS_DIR"


class MetricsState(object):
    """Everything the metrics of one process share.

    Threading: every method may be called from any thread; the state's lock guards
    its tables and is never taken on the call path.

    :param multiprocess_dir: share snapshots through this directory (see
        `enable_multiprocess`); None: PROBE_METRICS_DIR if set.
    """

    def __init__(self, multiprocess_dir: Optional[str] = None) -> None:
        self._lock = threading.RLock()
        self._recorders: List[Recorder] = []  # attached: visible to the collector
        # (side, appkey, service, node, slow_call_ms) -> Recorder
        self._shared: Dict[Tuple[Any, ...], Recorder] = {}
        self._sinks: Dict[Tuple["RedisSettings", Optional[str]], RedisSink] = {}
        self.multiprocess_dir = multiprocess_dir or os.environ.get(METRICS_DIR_ENV) or None
        self.collector: Optional[ProbeCollector] = None
        self.http = HttpServers()
        self.pump = Pump(self.flush_now, lambda: bool(self._sinks or self.multiprocess_dir))
        self.exiting = False

    # -- recorders and where they go ---------------------------------------------
    def get_recorder(self, side: str, appkey: str, service: str, node: Optional[str] = None,
                     slow_call_ms: float = DEFAULT_SLOW_CALL_MS) -> Recorder:
        """The recorder for these labels, created on first use. Sharing it means a
        client built per request, or a provider restarted on its port, neither piles
        up recorders nor makes a counter go back."""
        identity = (side, appkey, service, node, float(slow_call_ms))
        with self._lock:
            recorder = self._shared.get(identity)
            if recorder is None:
                recorder = self._shared[identity] = Recorder(side, appkey, service, node,
                                                             slow_call_ms)
            return recorder

    def attach(self, recorder: Recorder, redis_settings: Optional["RedisSettings"] = None,
               env: Optional[str] = None, stats_interval: float = DEFAULT_STATS_INTERVAL,
               stats_ttl: float = DEFAULT_TTL) -> Recorder:
        """Make `recorder` visible to the collector and, with `redis_settings`, flush
        it to that Redis every `stats_interval` s."""
        recorder.stats_ttl = int(stats_ttl)
        recorder.on_new_thread = self.pump.ensure  # a forked child gets its thread back
        with self._lock:
            self.register_collector()
            if recorder not in self._recorders:
                self._recorders.append(recorder)
            if redis_settings is not None:
                sink = self._sinks.get((redis_settings, env))
                if sink is None:
                    # every caller that passes redis_settings passes its settings' env too
                    sink = self._sinks[(redis_settings, env)] = RedisSink(redis_settings,
                                                                         cast(str, env))
                if recorder not in sink.recorders:
                    sink.recorders.append(recorder)
                sink.users[recorder] = sink.users.get(recorder, 0) + 1
        self.pump.want(float(stats_interval))
        return recorder

    def detach(self, recorder: Recorder, redis_settings: Optional["RedisSettings"] = None,
               env: Optional[str] = None) -> None:
        """Undo one `attach`. When a Redis has no user left it gets a last flush and
        is forgotten, so a process does not keep writing to a Redis that only a
        long-gone client used."""
        if redis_settings is None:
            return
        with self._lock:
            sink = self._sinks.get((redis_settings, env))
            if sink is None or recorder not in sink.users:
                return
            sink.users[recorder] -= 1
            if sink.users[recorder] > 0:
                return
        sink.flush()
        with self._lock:
            if sink.users.get(recorder) == 0:
                del sink.users[recorder]
                sink.recorders.remove(recorder)
                if not sink.recorders:
                    self._sinks.pop((redis_settings, env), None)

    # -- writing and reading -------------------------------------------------------
    def flush_now(self) -> bool:
        """Write every sink's pending stats, and this process's snapshot file, now.
        Never raises; True when every write succeeded."""
        with self._lock:
            sinks = list(self._sinks.values())
            directory = self.multiprocess_dir
        ok = True
        for sink in sinks:
            try:
                ok = sink.flush(final=self.exiting) and ok
            except Exception:
                log.exception("flushing call stats failed")
                ok = False
        if directory:
            try:
                write_snapshot(directory, self.snapshot())
            except Exception as exc:
                log.warning("cannot write the metrics snapshot to %s: %s", directory, exc)
                ok = False
        return ok

    def snapshot(self, other_processes: bool = False) -> Snapshot:
        """This process's snapshot (probe.metrics.snapshots); with `other_processes`,
        plus the snapshot files of the multi-process directory."""
        calls: Dict[Tuple[Any, ...], Any] = {}
        inflight: Dict[Tuple[Any, ...], Any] = {}
        with self._lock:
            recorders = list(self._recorders)
            directory = self.multiprocess_dir
        health: Dict[Tuple[str, str], Dict[str, Any]] = {}
        for recorder in recorders:
            recorder.snapshot_into(calls, inflight)
            if recorder.side == "client" and recorder.health_sources:
                health_into(health, recorder)
        own = {"calls": calls, "inflight": inflight}
        if health:  # consumers' node health (probe.routing.health), when there is any
            own["health"] = health
        if other_processes and directory:
            return merge(own, *read_snapshots(directory, exclude_pid=os.getpid()))
        return own

    def enable_multiprocess(self, directory: str, wipe: bool = True) -> None:
        """Call in a pre-fork parent before forking: every process then shares its
        snapshot through `directory` (emptied first with `wipe`, so a restart does
        not count the previous run)."""
        os.makedirs(directory, exist_ok=True)
        if wipe:
            wipe_snapshots(directory)
        with self._lock:
            self.multiprocess_dir = directory
        self.pump.ensure()

    def disable_multiprocess(self) -> None:
        """Stop sharing snapshots (the pre-fork provider that enabled it has stopped)."""
        with self._lock:
            self.multiprocess_dir = None

    # -- exposition ----------------------------------------------------------------
    def register_collector(self) -> ProbeCollector:
        """Put this state's collector in prometheus_client's default REGISTRY (once)."""
        with self._lock:
            if self.collector is None:
                self.collector = ProbeCollector(lambda: self.snapshot(other_processes=True))
                try:
                    REGISTRY.register(self.collector)
                except ValueError as exc:  # names taken by someone else's metrics
                    log.warning("cannot register probe's metrics in the default registry: %s", exc)
            return self.collector

    def serve(self, port: int, addr: str = LOCAL_METRICS_ADDR) -> MetricsEndpoint:
        """Serve the default REGISTRY as /metrics on addr:port (0 picks a free port)."""
        self.register_collector()
        return self.http.serve(port, addr)

    # -- process events --------------------------------------------------------------
    def after_fork_in_child(self) -> None:
        """A forked worker starts from zero: the parent's counts stay the parent's."""
        self._lock = threading.RLock()
        for recorder in self._recorders + list(self._shared.values()):  # attached or not yet
            recorder.start_over()
        for sink in self._sinks.values():
            sink.start_over()
        self.pump.start_over()
        self.http.forget()

    def at_exit(self) -> None:
        """The last flush (Redis and the snapshot file) of an exiting process."""
        self.exiting = True
        self.flush_now()

    def close(self) -> None:
        """Retire this state (a fresh one replaces it): its thread ends, its collector
        leaves the registry. /metrics servers stay with the endpoints that own them."""
        self.pump.stop()
        with self._lock:
            collector, self.collector = self.collector, None
        if collector is not None:
            try:
                REGISTRY.unregister(collector)
            except KeyError:
                pass  # never made it into the registry


_state: Optional[MetricsState] = None
_state_lock = threading.Lock()
_hooks_installed = False


def health_into(health: Dict[Tuple[str, str], Dict[str, Any]], recorder: Any) -> None:
    """Add the node health of `recorder`'s clients to `health`:
    {(appkey, service): {counter: n, "panic": 0|1, "ejected": {"ip:port": reason}}}."""
    key = (recorder.appkey, recorder.service)
    entry = health.setdefault(key, {"ejections": 0, "readmissions": 0, "panics": 0,
                                    "overloads": 0, "budget_exhausted": 0, "panic": 0,
                                    "ejected": {}})
    for report in recorder.health_reports():
        for counter in ("ejections", "readmissions", "panics", "overloads", "budget_exhausted"):
            entry[counter] += report[counter]
        entry["panic"] = max(entry["panic"], int(bool(report["panic"])))
        for node, reason in report["ejected"].items():
            entry["ejected"][recorder.node_label(node)] = reason


def process_state() -> MetricsState:
    """This process's metrics state, created (and the process hooks installed) on
    first use."""
    state = _state
    if state is None:
        state = _replace_state(only_if_missing=True)
    return state


def fresh_state(multiprocess_dir: Optional[str] = None) -> MetricsState:
    """Retire this process's metrics state and start an empty one; returns it.

    For tests: what was recorded, attached, flushed or shared so far is forgotten
    (/metrics servers keep running until their endpoints are closed).

    :param multiprocess_dir: as `MetricsState`.
    """
    return _replace_state(multiprocess_dir=multiprocess_dir)


def _replace_state(only_if_missing: bool = False,
                   multiprocess_dir: Optional[str] = None) -> MetricsState:
    global _state
    with _state_lock:
        if only_if_missing and _state is not None:
            return _state
        old, _state = _state, MetricsState(multiprocess_dir)
        _install_hooks()
        state = _state
    if old is not None:
        old.close()
    return state


def _install_hooks() -> None:
    """Once per process, with the first state: hooks that act on the current one."""
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_at_exit)
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)


def _at_exit() -> None:
    if _state is not None:
        _state.at_exit()


def _after_fork_in_child() -> None:
    if _state is not None:
        _state.after_fork_in_child()
