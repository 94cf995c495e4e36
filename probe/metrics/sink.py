"""The fleet view: recorders' totals written to Redis per 10-second slot (layout in
probe.stores.stats), by one background thread per process.

If Redis is unreachable the calls do not notice: the error is logged at most once
a minute and the unsent counts are merged into the next successful write (into the
slot current then), not dropped.
"""

import logging
import os
import random
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from ..errors import ConfigError, ProbeError
from ..stores.nodestore import REDIS_ERRORS
from ..naming import health_field
from ..stores.stats import health_entry, slot_of, write_health, write_slot
from .options import DEFAULT_STATS_INTERVAL

if TYPE_CHECKING:
    from ..settings import RedisSettings, Settings
    from .recorder import Recorder

# {(side, appkey, service, node, method, status): [counts..., seconds]} (probe.metrics.recorder)
Cells = Dict[Tuple[Any, ...], List[float]]

log = logging.getLogger("probe.metrics")

ERROR_LOG_EVERY = 60.0  # seconds between two logged flush errors
REDIS_TIMEOUT = 1.0  # seconds; the flush thread must not hang on a dead Redis


def redis_settings_or_none(settings: "Settings") -> Optional["RedisSettings"]:
    """A consumer flushes to Redis only when its config has a redis section."""
    try:
        return settings.redis
    except ConfigError as exc:
        log.debug("no Redis for call stats, not flushing them: %s", exc)
        return None


def _writer_id() -> str:
    return "%s:%d:%04x" % (socket.gethostname(), os.getpid(), random.getrandbits(16))


class RedisSink(object):
    """Writes the totals of some recorders to one Redis (one env) per 10 s slot.

    Each write is the running total since the slot began (`_base` = what was
    written by the end of the previous slot); `_written` advances only on success,
    so a failed interval is merged into the next write instead of being lost.

    Threading: `flush` may run on any thread; it takes the sink's lock. `recorders`
    and `users` are changed by the owner (the process state) under its own lock.
    """

    def __init__(self, redis_settings: "RedisSettings", env: str) -> None:
        self.settings = redis_settings
        self.env = env
        self.recorders: List["Recorder"] = []
        self.users: Dict["Recorder", int] = {}  # recorder -> attach count
        self.start_over()

    def start_over(self) -> None:
        """A new writer with nothing written (a forked child)."""
        self.writer = _writer_id()
        self._client: Any = None
        self._lock = threading.Lock()
        self._slot: Optional[int] = None
        self._base: Cells = {}
        self._written: Cells = {}
        self._failing = False
        self._logged_at: Optional[float] = None
        self._health_written: Dict[str, Dict[str, str]] = {}  # appkey -> {field: JSON} last written

    def _redis(self) -> Any:
        if self._client is None:
            from ..stores.nodestore import connect_redis
            self._client = connect_redis(self.settings, timeout=REDIS_TIMEOUT)
        return self._client

    def _deltas(self, calls: Cells, now: float) -> Tuple[int, Cells]:
        """What `calls` adds to the slot of `now` beyond what earlier slots got."""
        slot = slot_of(now)
        if slot != self._slot:
            self._slot, self._base = slot, self._written
        deltas: Cells = {}
        for key, cell in calls.items():
            base = self._base.get(key)
            delta = cell if base is None else [a - b for a, b in zip(cell, base)]
            if sum(delta[:-1]) > 0:
                deltas[key] = delta
        return slot, deltas

    def flush(self, now: Optional[float] = None, final: bool = False) -> bool:
        """Write pending stats; False (and nothing raised) when Redis fails.

        :param final: the last flush of an exiting process: a failure is only
            logged at debug level (its Redis may be gone already).
        """
        with self._lock:
            calls: Cells = {}
            ttls: Dict[Tuple[str, str], int] = {}
            for recorder in list(self.recorders):
                recorder.snapshot_into(calls)
                key = (recorder.side, recorder.appkey)
                ttls[key] = max(ttls.get(key, 0), recorder.stats_ttl)
            now = time.time() if now is None else now
            slot, deltas = self._deltas(calls, now)
            health = self._health_fields(now)
            try:
                write_slot(self._redis(), self.env, slot, deltas, self.writer, ttls=ttls)
                if health or self._health_written:
                    self._health_written = write_health(self._redis(), self.env, health,
                                                        self._health_written)
            except REDIS_ERRORS + (ProbeError,) as exc:
                self._failed(exc, now, final)
                return False
            self._written = calls
            if self._failing:
                self._failing = False
                log.info("call stats reach Redis at %s again", self.settings.address)
            return True

    def _health_fields(self, now: float) -> Dict[str, Dict[str, str]]:
        """{appkey: {field: JSON}}: the nodes this process's clients have ejected."""
        fields: Dict[str, Dict[str, str]] = {}
        for recorder in list(self.recorders):
            if recorder.side != "client" or not recorder.health_sources:
                continue
            for report in recorder.health_reports():
                for node, reason in report["ejected"].items():
                    field = health_field(recorder.service, recorder.node_label(node), self.writer)
                    fields.setdefault(recorder.appkey, {})[field] = health_entry(reason, now)
        return fields

    def _failed(self, exc: BaseException, now: float, final: bool) -> None:
        self._failing = True
        if final:
            log.debug("cannot write the last call stats to Redis at %s: %s",
                      self.settings.address, exc)
        elif self._logged_at is None or now - self._logged_at >= ERROR_LOG_EVERY:
            self._logged_at = now
            log.warning("cannot write call stats to Redis at %s: %s. Calls are not affected; "
                        "the counts are kept and written with the next flush that succeeds "
                        "(this message repeats at most once a minute)", self.settings.address, exc)


class Pump(object):
    """The one background thread ("probe-metrics") of a process: calls `flush`
    every `interval` s (the smallest interval asked for) while `wanted()` says
    there is something to write.

    :param flush: called on the thread; must not raise.
    :param wanted: True while the process has a sink or a snapshot directory.
    """

    def __init__(self, flush: Callable[[], object], wanted: Callable[[], bool]) -> None:
        self.interval = DEFAULT_STATS_INTERVAL
        self._flush = flush
        self._wanted = wanted
        self._stopped = False
        self.start_over()

    def start_over(self) -> None:
        """No thread yet (a forked child: the parent's thread did not come along)."""
        self.thread: Optional[threading.Thread] = None
        self._wake = threading.Event()
        self._lock = threading.Lock()

    def want(self, interval: float) -> None:
        """Flush at least every `interval` s from now on; start the thread if needed."""
        if interval < self.interval:
            self.interval = interval
            self._wake.set()
        self.ensure()

    def ensure(self) -> None:
        """Start the thread if there is work and it is not running."""
        if self._stopped or (self.thread is not None and self.thread.is_alive()) \
                or not self._wanted():
            return
        with self._lock:
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="probe-metrics", daemon=True)
                self.thread.start()

    def stop(self) -> None:
        """End the thread after its current flush (the state is being replaced)."""
        self._stopped = True
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stopped:
                return
            self._flush()
