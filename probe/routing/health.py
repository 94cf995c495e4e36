"""Passive node health: judge each node by how it answers, and route around the sick.

`HealthPolicy` is the value object of knobs (units in their names); `ServiceHealth`
is the engine, one per client, fed with the outcome of every attempt.

What counts. Timeouts, connection failures (connect refused, a reset or close after
the request was sent), protocol failures and undeclared-exception replies are
failures. A declared exception is an answer, as is any normal reply. An
"overloaded, not executed" reply and a request that could not be written to a
pooled connection count neither way.

Ejection (Envoy's outlier detection, Finagle's failure accrual). A node is ejected
after `consecutive_failures` failures in a row, or when at least
`failure_min_calls` attempts in the last `failure_window_s` failed at
`failure_rate_percent` or more. It then gets no calls for `base_ejection_s`,
doubled at each ejection that follows within `max_ejection_s` of its last
re-admission, up to `max_ejection_s`. When that time is over the node is half-open:
exactly one call at a time may go to it as a probe; an answer re-admits it, a
failure ejects it again for twice as long.

Never eject the service away. At most `max_ejected_percent` of the nodes (at least
one of two or more) are ejected at once; a node that fails beyond that cap stays
routable but counts as sick. When the nodes neither ejected nor sick fall below
`panic_threshold_percent`, the engine routes across all of them by their configured
weights (panic mode), logs it once and shows it in `panic`.

Slowness. Each node keeps a time-decayed EWMA of its attempt latency. A node whose
EWMA is above `slow_ratio` × its peers' median plus `slow_margin_ms` gets its weight
scaled by (that bound / its EWMA), down to `min_health_factor`; the factor recovers
as its latency does. `cost(node)` (EWMA × (in flight + 1)) feeds the `p2c_ewma`
balancer.

Threading and asyncio. No I/O and no waiting: `choose` reads a published view
(rebuilt under a short lock when it expires or the state changes), `end` updates a
node's counters without a lock on the success path (a lost increment there only
makes the window a little shorter) and takes the lock for any state change. The
same object serves threads and an event loop.
"""

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import (Callable, Collection, Deque, Dict, FrozenSet, Iterable, Optional,
                    Set, Tuple)

from .balancer import Node, RoutingTable
from ..errors import InvalidHealthPolicy, NoAvailableNode
from ..rpc.outcomes import DECLARED_EXCEPTION, NOT_SENT, OK, OVERLOADED

log = logging.getLogger("probe.health")

#: pick(table, exclude) -> Node, e.g. a balancer's `pick`.
Pick = Callable[[RoutingTable, Optional[Collection[str]]], Node]

_SUCCESS = frozenset((OK, DECLARED_EXCEPTION))
_NEUTRAL = frozenset((OVERLOADED, NOT_SENT))
_BUCKETS = 10  # the failure-rate window is kept as this many time buckets
_FACTOR_EVERY_S = 0.1  # how often latency factors are recomputed
_STUCK_PROBE_S = 60.0  # a probe that never reported back frees its slot after this


def _number(name: str, value: object, low: float, high: float, integer: bool = False,
            low_open: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or math.isnan(value) \
            or value < low or value > high or (low_open and value == low):
        raise InvalidHealthPolicy("HealthPolicy.%s must be %s in %s%g, %g], got %r" % (
            name, "an integer" if integer else "a number", "(" if low_open else "[", low, high,
            value))


@dataclass(frozen=True)
class HealthPolicy:
    """How a client judges nodes (see the module doc). Durations in seconds unless
    the name says ``_ms``; percentages 0..100. Validated on construction
    (`InvalidHealthPolicy`)."""

    consecutive_failures: int = 3
    failure_rate_percent: float = 50.0
    failure_window_s: float = 10.0
    failure_min_calls: int = 20
    base_ejection_s: float = 1.0
    max_ejection_s: float = 30.0
    max_ejected_percent: float = 50.0
    panic_threshold_percent: float = 50.0
    latency_decay_s: float = 1.0
    slow_ratio: float = 3.0
    slow_margin_ms: float = 5.0
    min_health_factor: float = 0.05
    warn_interval_s: float = 10.0

    def __post_init__(self) -> None:
        _number("consecutive_failures", self.consecutive_failures, 1, 1000000, integer=True)
        _number("failure_rate_percent", self.failure_rate_percent, 0, 100, low_open=True)
        _number("failure_window_s", self.failure_window_s, 0, 3600, low_open=True)
        _number("failure_min_calls", self.failure_min_calls, 1, 1000000000, integer=True)
        _number("base_ejection_s", self.base_ejection_s, 0, 86400, low_open=True)
        _number("max_ejection_s", self.max_ejection_s, 0, 86400, low_open=True)
        if self.max_ejection_s < self.base_ejection_s:
            raise InvalidHealthPolicy("HealthPolicy.max_ejection_s (%r) must be at least "
                                      "base_ejection_s (%r)" % (self.max_ejection_s,
                                                                self.base_ejection_s))
        _number("max_ejected_percent", self.max_ejected_percent, 0, 100)
        _number("panic_threshold_percent", self.panic_threshold_percent, 0, 100)
        _number("latency_decay_s", self.latency_decay_s, 0, 3600, low_open=True)
        _number("slow_ratio", self.slow_ratio, 1, 1000000)
        _number("slow_margin_ms", self.slow_margin_ms, 0, 3600000)
        _number("min_health_factor", self.min_health_factor, 0, 1, low_open=True)
        _number("warn_interval_s", self.warn_interval_s, 0, 86400)


class _NodeState(object):
    """What the engine knows about one node. Success-path fields are written without
    the lock; state changes (ejection, probe, sickness) only under it."""

    __slots__ = ("name", "consecutive", "bucket", "oks", "fails", "marks", "lat_sum", "folded",
                 "ewma", "ewma_at", "inflight", "ejected_until", "ejections", "probing",
                 "probe_started", "sick", "reason", "readmitted_at", "last_failure")

    def __init__(self, name: str) -> None:
        self.name = name
        self.consecutive = 0
        # Answers and failures, counted since the start (the call path only adds);
        # the window is the difference with the marks taken as each bucket began.
        self.oks = 0
        self.fails = 0
        self.bucket = -1
        # (bucket, oks, fails) at its start
        self.marks: Deque[Tuple[int, int, int]] = deque(maxlen=_BUCKETS + 1)
        # Latency: the call path adds up seconds; `fold` turns them into the EWMA.
        self.lat_sum = 0.0
        self.folded = 0  # oks + fails at the last fold
        self.ewma = 0.0
        self.ewma_at: Optional[float] = None  # clock of the last fold with samples; None: no sample yet
        self.inflight = 0
        self.ejected_until = 0.0  # 0: not ejected
        self.ejections = 0  # ejections in a row (the backoff exponent)
        self.probing = False
        self.probe_started = 0.0
        self.sick = False  # failing, whether ejected or held back by the cap
        self.reason = ""
        self.readmitted_at: Optional[float] = None
        self.last_failure = ""

    def clear_window(self) -> None:
        self.marks.clear()
        self.marks.append((self.bucket, self.oks, self.fails))

    def roll(self, bucket: int) -> None:
        """Start bucket `bucket` if it is a later one (what was counted before the
        first roll belongs to the first bucket)."""
        if bucket != self.bucket:
            first = self.bucket < 0
            self.bucket = bucket
            self.marks.append((bucket, 0, 0) if first else (bucket, self.oks, self.fails))

    def window(self, bucket: int) -> Tuple[int, int]:
        """(failures, calls) in the window ending with `bucket` (rolled to)."""
        oldest = bucket - _BUCKETS
        for start, oks, fails in self.marks:
            if start > oldest:
                break
        else:
            start, oks, fails = self.marks[-1]
        return self.fails - fails, self.oks + self.fails - oks - fails

    def fold(self, now: float, decay_s: float) -> None:
        """Turn the latency samples since the last fold into the time-decayed EWMA."""
        calls = self.oks + self.fails
        count = calls - self.folded
        if count <= 0:
            return
        mean = self.lat_sum / count
        self.lat_sum, self.folded = 0.0, calls
        if self.ewma_at is None:
            self.ewma = mean
        else:
            keep = math.exp(-max(now - self.ewma_at, 0.0) / decay_s)
            self.ewma = self.ewma * keep + mean * (1.0 - keep)
        self.ewma_at = now


class _View(object):
    """What `choose` reads: the table to pick from, for which base table, until when."""

    __slots__ = ("table", "base", "expires", "due", "panic")

    def __init__(self, table: RoutingTable, base: Optional[RoutingTable],
                 expires: float, due: FrozenSet[str] = frozenset(),
                 panic: bool = False) -> None:
        self.table = table
        self.base = base
        self.expires = expires
        self.due = due  # names of half-open nodes in `table`: a pick must claim the probe
        self.panic = panic


def derived_table(base: RoutingTable, weights: Dict[str, float]) -> RoutingTable:
    """A copy of `base` holding only the nodes in `weights`, with those weights."""
    return base.reweighted(weights)


class ServiceHealth(object):
    """Passive health of one service's nodes as one client sees them.

    :param policy: the knobs (`HealthPolicy()` by default).
    :param describe: how log lines name the service, e.g. ``"appkey/Service"``.
    :param track_inflight: count calls in flight per node (`begin`/`end`), for
        `cost`; off, `begin` does nothing.
    :param clock: monotonic seconds (injectable for tests); `end` may be given
        its reading instead.
    :param logger: where ejections, re-admissions and panic mode are logged.
    """

    def __init__(self, policy: Optional[HealthPolicy] = None, *, describe: str = "service",
                 track_inflight: bool = False, clock: Callable[[], float] = time.perf_counter,
                 logger: logging.Logger = log) -> None:
        self.policy = policy or HealthPolicy()
        self.describe = describe
        self.track_inflight = track_inflight
        self._clock = clock
        self._log = logger
        self._lock = threading.Lock()
        # Node name -> _NodeState; replaced (copy on write) to add/remove
        self._states: Dict[str, _NodeState] = {}
        # What `choose` reads (see its fast path): the published view, and the clock
        # as of the last attempt that ended (`choose` reads it instead of the clock,
        # a syscall on some hosts; a view is at worst one call late).
        self.view = _View(None, None, -1.0)  # type: ignore[arg-type]  # expired: never read
        self._size = 0  # nodes in the last base table
        self._factors: Dict[str, float] = {}  # node name -> latency factor < 1 (absent: 1)
        self._factors_at = -1.0
        self._bucket_s = self.policy.failure_window_s / _BUCKETS
        self.now = clock()
        # Counters for metrics (monotonic).
        self.ejections = 0
        self.readmissions = 0
        self.panics = 0
        self.overloads = 0

    # -- the call path -----------------------------------------------------------
    def choose(self, table: RoutingTable, pick: Pick,
               tried: Optional[Collection[str]] = None) -> Node:
        """Pick a node of `table` with `pick`, skipping ejected nodes, sending at
        most one half-open probe at a time, scaling weights by latency, and routing
        across all nodes in panic mode. Raises NoAvailableNode like `pick`.

        Fast path for a hot caller (the sync client inlines it): while
        ``view.base is table and now < view.expires and not view.due``, a pick
        from ``view.table`` is what this returns (fall back to `choose` when that
        pick raises NoAvailableNode)."""
        view = self.view
        if view.base is not table or self.now >= view.expires:
            view = self._rebuild(table)
        routed = view.table
        try:
            node = pick(routed, tried)
        except NoAvailableNode:
            if routed is table:
                raise
            return pick(table, tried)  # every healthy node was tried: a sick one beats failing
        if view.due and node.name in view.due and not self._claim_probe(node.name):
            exclude = set(tried or ()) | {node.name}
            try:
                node = pick(self.view.table if self.view.base is table else routed, exclude)
            except NoAvailableNode:
                node = pick(table, tried)
        return node

    def begin(self, node: Node) -> None:
        """An attempt on `node` starts (counts it in flight when tracking)."""
        if self.track_inflight:
            state = self._states.get(node.name) or self._state(node.name)
            with self._lock:
                state.inflight += 1

    def end(self, node: Node, outcome: str, seconds: float, now: Optional[float] = None) -> None:
        """An attempt on `node` ended with `outcome` (a probe.rpc.outcomes name)
        after `seconds`; `now` is the engine's clock if the caller has read it."""
        state = self._states.get(node.name) or self._state(node.name)
        if self.track_inflight:
            with self._lock:
                # Never below zero: calls that began before `forget` dropped this
                # node's state (it left, then came back) end on a fresh state.
                if state.inflight > 0:
                    state.inflight -= 1
        self.now = now = self._clock() if now is None else now
        if outcome in _SUCCESS:
            # The common path: a few increments, no lock, no clock (the window and
            # the EWMA are brought up to date when the view is rebuilt).
            state.consecutive = 0
            state.oks += 1
            state.lat_sum += seconds
            if state.sick:
                self._recovered(state, now)
            return
        if outcome in _NEUTRAL:
            if outcome == OVERLOADED:
                self.overloads += 1
            if state.probing:  # the probe learnt nothing: free its slot
                with self._lock:
                    state.probing = False
                    self._invalidate()
            return
        state.lat_sum += seconds
        self._failed(state, outcome, now)

    def cost(self, node: Node) -> float:
        """EWMA latency × (calls in flight + 1): the `p2c_ewma` balancer's load."""
        state = self._states.get(node.name)
        if state is None:
            return 0.0
        return (state.ewma + 1e-7) * (state.inflight + 1)

    # -- read-only views --------------------------------------------------------
    def ejected(self) -> Dict[str, str]:
        """Node name -> why it is ejected (half-open nodes included)."""
        return {name: state.reason for name, state in self._states.items()
                if state.ejected_until}

    def sick(self) -> Dict[str, str]:
        """Node name -> why it counts as failing (ejected, or held back by the cap)."""
        return {name: state.reason for name, state in self._states.items() if state.sick}

    @property
    def panic(self) -> bool:
        """True while too few nodes are healthy and calls go to all of them."""
        return self.view.panic

    def factors(self) -> Dict[str, float]:
        """Node name -> its latency health factor, for nodes scaled below 1."""
        return dict(self._factors)

    def latency(self, node_name: str) -> Optional[float]:
        """A node's EWMA latency in seconds (as of the last fold, at most 0.1 s old),
        None before its first sample."""
        state = self._states.get(node_name)
        return None if state is None or state.ewma_at is None else state.ewma

    def forget(self, is_live: Callable[[str], bool]) -> None:
        """Drop what is known about the tracked nodes for which `is_live(name)` is
        false (they left the registry). Only tracked nodes are looked at, so the
        cost follows what this client knows, not the size of the fleet."""
        with self._lock:
            gone = [name for name in self._states if not is_live(name)]
            if gone:
                self._states = {n: s for n, s in self._states.items() if n not in gone}
                self._invalidate()

    # -- state changes (under the lock) ----------------------------------------
    def _state(self, name: str) -> _NodeState:
        with self._lock:
            state = self._states.get(name)
            if state is None:
                state = _NodeState(name)
                states = dict(self._states)
                states[name] = state
                self._states = states
                self._invalidate()  # the view's expiry may depend on it (latency factors)
            return state

    def _invalidate(self) -> None:
        view = self.view
        self.view = _View(view.table, view.base, -1.0, view.due, view.panic)

    def _claim_probe(self, name: str) -> bool:
        now = self._clock()
        with self._lock:
            state = self._states.get(name)
            if state is None or not state.ejected_until or state.ejected_until > now \
                    or state.probing:
                return False
            state.probing = True
            state.probe_started = now
            self._invalidate()
            return True

    def _failed(self, state: _NodeState, outcome: str, now: float) -> None:
        policy = self.policy
        with self._lock:
            bucket = int(now / self._bucket_s)
            state.roll(bucket)
            state.consecutive += 1
            state.fails += 1
            state.last_failure = outcome
            if state.probing:
                state.probing = False
                self._eject(state, now, "half-open probe failed (%s)" % outcome, again=True)
                return
            if state.ejected_until:
                return  # already ejected (a call in flight, or panic mode)
            reason = None
            if state.consecutive >= policy.consecutive_failures:
                reason = "%d consecutive failures (last: %s)" % (state.consecutive, outcome)
            else:
                fails, total = state.window(bucket)
                if total >= policy.failure_min_calls \
                        and fails * 100.0 >= policy.failure_rate_percent * total:
                    reason = "%d of %d calls failed in %g s (last: %s)" % (
                        fails, total, policy.failure_window_s, outcome)
            if reason is not None:
                self._eject(state, now, reason)

    def _eject(self, state: _NodeState, now: float, reason: str, again: bool = False) -> None:
        policy = self.policy
        if not again:
            ejected = sum(1 for s in self._states.values() if s.ejected_until)
            if ejected >= self._allowed_ejections():
                if not state.sick:
                    state.sick = True
                    state.reason = reason
                    self._log.warning("node %s of %s is failing (%s) but stays routable: "
                                      "max_ejected_percent (%g%%) of %d nodes are ejected "
                                      "already", state.name, self.describe, reason,
                                      policy.max_ejected_percent, self._size)
                    self._invalidate()
                return
            if state.readmitted_at is not None and now - state.readmitted_at > policy.max_ejection_s:
                state.ejections = 0  # it stayed healthy long enough: start the backoff over
        state.ejections += 1
        duration = min(policy.max_ejection_s,
                       policy.base_ejection_s * 2.0 ** min(state.ejections - 1, 40))
        state.ejected_until = now + duration
        state.sick = True
        state.reason = reason
        state.consecutive = 0
        self.ejections += 1
        self._log.warning("node %s of %s ejected for %.1f s: %s", state.name, self.describe,
                          duration, reason)
        self._invalidate()

    def _recovered(self, state: _NodeState, now: float) -> None:
        with self._lock:
            if not state.sick:
                return
            was_ejected = bool(state.ejected_until)
            state.sick = False
            state.probing = False
            state.ejected_until = 0.0
            state.reason = ""
            state.clear_window()
            if was_ejected:
                state.readmitted_at = now
                self.readmissions += 1
                self._log.info("node %s of %s answers again: re-admitted", state.name,
                               self.describe)
            self._invalidate()

    def _allowed_ejections(self) -> int:
        size = self._size
        if size < 2:
            return 0
        return max(1, int(size * self.policy.max_ejected_percent / 100.0))

    # -- the view ----------------------------------------------------------------
    def _rebuild(self, table: RoutingTable) -> _View:
        with self._lock:
            now = self._clock()
            view = self.view
            if view.base is table and now < view.expires:
                return view  # another thread rebuilt it
            self.now = now
            nodes = table.nodes
            self._size = len(nodes)
            states = self._states
            state: Optional[_NodeState]
            if now >= self._factors_at:
                bucket = int(now / self._bucket_s)
                decay_s = self.policy.latency_decay_s
                for state in states.values():
                    state.roll(bucket)
                    state.fold(now, decay_s)
                self._factors = self._latency_factors(nodes, states, now)
                self._factors_at = now + _FACTOR_EVERY_S
            expires = self._factors_at if states else now + 3600.0
            sick = 0
            weights = {}
            due: Set[str] = set()
            for node, weight in zip(nodes, table.weights):
                state = states.get(node.name)
                if state is not None and state.sick:
                    sick += 1
                if state is not None and state.ejected_until:
                    if state.probing and now - state.probe_started > _STUCK_PROBE_S:
                        state.probing = False
                    if state.ejected_until > now:
                        expires = min(expires, state.ejected_until)
                        continue
                    if state.probing:
                        continue
                    due.add(node.name)
                weights[node.name] = weight * self._factors.get(node.name, 1.0)
            panic = bool(nodes) and sick > 0 and \
                (len(nodes) - sick) * 100.0 < self.policy.panic_threshold_percent * len(nodes)
            if panic != view.panic:
                if panic:
                    self.panics += 1
                    self._log.warning("panic mode for %s: %d of %d nodes are failing; routing "
                                      "across all of them", self.describe, sick, len(nodes))
                else:
                    self._log.info("panic mode for %s is over: %d of %d nodes are failing",
                                   self.describe, sick, len(nodes))
            if panic:
                routed, due = table, set()
            elif len(weights) == len(nodes) and not self._factors:
                routed = table
            elif not weights:
                routed = table  # nothing left to route to (cannot happen below the cap)
            else:
                routed = derived_table(table, weights)
            view = _View(routed, table, expires, frozenset(due), panic)
            self.view = view
            return view

    def _latency_factors(self, nodes: Iterable[Node], states: Dict[str, _NodeState],
                         now: float) -> Dict[str, float]:
        policy = self.policy
        latencies = []
        for node in nodes:
            state = states.get(node.name)
            if state is not None and state.ewma_at is not None and not state.ejected_until:
                latencies.append((node.name, state.ewma))
        if len(latencies) < 2:
            return {}
        factors = {}
        ordered = sorted(value for _, value in latencies)
        margin = policy.slow_margin_ms / 1000.0
        for name, value in latencies:
            peers = list(ordered)
            peers.remove(value)
            reference = peers[(len(peers) - 1) // 2]  # the lower median of the others
            bound = policy.slow_ratio * reference + margin
            if value > bound:
                factors[name] = max(policy.min_health_factor, bound / value)
        return factors


__all__ = ["HealthPolicy", "ServiceHealth", "derived_table"]
