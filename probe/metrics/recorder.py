"""Per-thread recording of calls: the only part of metrics on the call path.

A `Recorder` belongs to one side of one (appkey, service). The call path writes
only into its own thread's aggregates - a dict {(method, node, status): cell}, a
cell being a plain list of latency-bucket counts followed by the sum of seconds -
so it takes no lock and stays exact with any number of threads. prometheus_client's
`labels(...).inc()` would take a lock and build a label key per metric per call;
here a call costs one bisect and two list increments. Readers (a scrape, the Redis
flush, a snapshot file) merge every thread's cells; copying a list is atomic under
the GIL, so a reader sees each cell at most one call behind. Cells of dead threads
are folded into a retired total, so counters never go back.
"""

import logging
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple
from bisect import bisect_left

from ..naming import parse_node_name
from ..stores.stats import BOUNDS, DEFAULT_TTL, SIDES
from .options import DEFAULT_SLOW_CALL_MS

log = logging.getLogger("probe.metrics")

CELL = len(BOUNDS) + 2  # bucket counts (the last one +Inf), then the sum of seconds

# observe(method, status, seconds): a provider's call hook
Observe = Callable[[str, str, float], None]


def add_cell(into: Dict[Any, List[float]], key: Any, cell: Sequence[float]) -> None:
    """Add `cell` to into[key] (a copy of it when the key is new)."""
    mine = into.get(key)
    if mine is None:
        into[key] = list(cell)
    else:
        for index, value in enumerate(cell):
            mine[index] += value


class ThreadState(object):
    """One thread's aggregates in one recorder."""

    __slots__ = ("cells", "current", "thread")

    def __init__(self) -> None:
        self.cells: Dict[Tuple[str, Optional[str], str], List[float]] = {}
        # client: the node this thread is calling now, set by the call path; a thread
        # calls one node at a time, so in flight = threads whose current node it is
        self.current: Optional[str] = None
        self.thread = threading.current_thread()


class Recorder(object):
    """The aggregates of one side of one (appkey, service).

    Server recorders set `node` ("host:port" of the provider) and `inflight` (a
    callable returning the calls in flight) once bound; client recorders get the
    node per call as its znode name and label it "host:port" when read.

    Threading: `thread_state`, `observe`, `observe_in` and `observe_server` run on
    the call path of any thread and touch only that thread's state; `snapshot_into`
    may run on any thread and takes the recorder's lock (never taken on the call
    path, except once per new thread).

    :param side: "server" or "client".
    :param slow_call_ms: calls at least this long are logged on "probe.metrics".
    :param inflight: server side: a callable returning the calls in flight.
    """

    def __init__(self, side: str, appkey: str, service: str, node: Optional[str] = None,
                 slow_call_ms: float = DEFAULT_SLOW_CALL_MS,
                 inflight: Optional[Callable[[], int]] = None) -> None:
        if side not in SIDES:
            raise ValueError("side must be 'server' or 'client', got %r" % (side,))
        self.side = side
        self.appkey = appkey
        self.service = service
        self.node = node
        self.inflight = inflight
        self.slow_seconds = float(slow_call_ms) / 1000.0
        self.stats_ttl = DEFAULT_TTL  # set by attach()
        # Called when a thread records its first call here: the process state uses
        # it to restart its background thread in a forked child.
        self.on_new_thread: Optional[Callable[[], None]] = None
        # Client side: objects with `health_report()` (probe clients) whose node
        # health this recorder's labels expose; not forgotten by a fork.
        self.health_sources: List[Any] = []
        self.start_over()

    def start_over(self) -> None:
        """Forget every count (a forked child starts from zero)."""
        self._local = threading.local()
        self._lock = threading.Lock()
        self._states: List[ThreadState] = []
        self._retired: Dict[Tuple[str, Optional[str], str], List[float]] = {}
        self._adopted = 0
        self._labels: Dict[str, str] = {}

    def add_health_source(self, source: Any) -> None:
        """Expose `source.health_report()` under this recorder's labels."""
        with self._lock:
            self.health_sources = self.health_sources + [source]

    def forget_health_source(self, source: Any) -> None:
        """Stop exposing `source` (a closed client)."""
        with self._lock:
            self.health_sources = [s for s in self.health_sources if s is not source]

    def health_reports(self) -> List[Dict[str, Any]]:
        """The current reports of this recorder's health sources."""
        return [source.health_report() for source in self.health_sources]

    def __repr__(self) -> str:
        return "<Recorder %s %s/%s %s>" % (self.side, self.appkey, self.service, self.node or "")

    def _adopt(self) -> ThreadState:
        state = ThreadState()
        with self._lock:
            self._states.append(state)
            self._adopted += 1
            if self._adopted % 64 == 0:  # thread-per-connection servers: do not pile up states
                self._retire_dead()
        self._local.state = state
        if self.on_new_thread is not None:
            self.on_new_thread()
        return state

    # -- the call path ----------------------------------------------------------
    def thread_state(self) -> ThreadState:
        """This thread's aggregates; a client looks it up once per call."""
        try:
            return self._local.state
        except AttributeError:
            return self._adopt()

    def observe(self, method: str, node: Optional[str], status: str, seconds: float) -> None:
        """One client attempt of `method` on the node with znode name `node`."""
        self.observe_in(self.thread_state(), method, node, status, seconds)

    def observe_in(self, state: ThreadState, method: str, node: Optional[str], status: str,
                   seconds: float) -> None:
        """observe() with the thread's state already in hand (from thread_state())."""
        cells = state.cells
        key = (method, node, status)
        cell = cells.get(key)
        if cell is None:
            cell = cells[key] = [0] * (CELL - 1) + [0.0]
        cell[bisect_left(BOUNDS, seconds)] += 1
        cell[-1] += seconds
        if seconds >= self.slow_seconds:
            self._slow(method, node, status, seconds)

    def observe_server(self, method: str, status: str, seconds: float) -> None:
        """One call of `method` served by this provider (ThriftServer's hook)."""
        self.observe_in(self.thread_state(), method, None, status, seconds)

    def _slow(self, method: str, node: Optional[str], status: str, seconds: float) -> None:
        log.warning("slow call: %s side, appkey %s, %s.%s on node %s took %.1f ms (status %s)",
                    self.side, self.appkey, self.service, method, self._label(node),
                    seconds * 1000.0, status)

    # -- readers ----------------------------------------------------------------
    def node_label(self, node: str) -> str:
        """A client node's label "host:port" from its znode name."""
        return self._label(node)

    def _label(self, node: Optional[str]) -> str:
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

    def _retire_dead(self) -> None:
        """Fold the cells of finished threads into the retired total (lock held)."""
        alive: List[ThreadState] = []
        for state in self._states:
            if state.thread.is_alive():
                alive.append(state)
            else:
                for key, cell in list(state.cells.items()):
                    add_cell(self._retired, key, cell)
        self._states = alive

    def _copies(self) -> Tuple[List[Tuple[Tuple[str, Optional[str], str], List[float]]],
                               List[Optional[str]]]:
        """Copies of every cell, and each live thread's current node."""
        # Under the lock: a concurrent reader folding a dead thread into _retired
        # must not make this one count that thread twice.
        with self._lock:
            self._retire_dead()
            # list(dict.items()) and cell[:] run in C without releasing the GIL, so
            # each copy is consistent while the owning thread keeps writing.
            copies = [(key, cell[:]) for key, cell in self._retired.items()]
            for state in self._states:
                copies.extend((key, cell[:]) for key, cell in list(state.cells.items()))
            return copies, [state.current for state in self._states]

    def snapshot_into(self, calls: Dict[Tuple[Any, ...], Any],
                      inflight: Optional[Dict[Tuple[Any, ...], Any]] = None) -> None:
        """Add this recorder's totals to `calls` and its in-flight counts to `inflight`.

        :param calls: {(side, appkey, service, method, node, status): cell}
        :param inflight: {(side, appkey, service, node): n}, or None
        """
        prefix = (self.side, self.appkey, self.service)
        copies, currents = self._copies()
        nodes: Set[str] = set()
        for (method, node, status), cell in copies:
            label = self._label(node)
            nodes.add(label)
            add_cell(calls, prefix + (method, label, status), cell)
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


def server_hook(recorder: Optional[Recorder],
                observe: Optional[Observe] = None) -> Optional[Observe]:
    """The ThriftServer `observe(method, status, seconds)` hook: the recorder, the
    user's hook, both, or None."""
    if recorder is None:
        return observe
    if observe is None:
        return recorder.observe_server
    record = recorder.observe_server

    def both(method: str, status: str, seconds: float) -> None:
        record(method, status, seconds)
        observe(method, status, seconds)
    return both
