"""Routing tables and the balancers that pick a node from them. Pure: no I/O.

A `RoutingTable` is immutable. The registry watcher builds a new one whenever the
live nodes change and swaps it in with one attribute assignment, so a call reads a
consistent table without a lock.
"""

import random
import threading
import time
from bisect import bisect_left, bisect_right
from heapq import heapify, heappop, heappush
from itertools import accumulate
from operator import attrgetter
from typing import (Callable, Collection, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple,
                    Union)

from ..errors import NoAvailableNode, ProbeError

BALANCERS = ("weighted_random", "round_robin", "least_inflight", "p2c_ewma")


class Node(NamedTuple):
    name: str          # znode name, e.g. DemoService_10.0.0.5_8081
    host: str
    port: int
    weight: int        # the configured weight
    valid: int         # 1 = enabled
    registered_at: float = 0.0  # epoch seconds the znode was created (for warm-up)
    transport: str = "buffered"  # what the node speaks: "buffered" | "framed"
    protocol: str = "binary"     # "binary" | "compact"

    @property
    def address(self) -> Tuple[str, int]:
        return (self.host, self.port)


def warmed_weight(weight: int, age: float, warmup: float) -> int:
    """Dubbo-style warm-up: ramp from 1 to `weight` over `warmup` seconds of age."""
    if warmup <= 0 or age >= warmup or weight <= 1:
        return weight
    return max(1, min(weight, int(weight * max(age, 0.0) / warmup)))


class RoutingTable(object):
    """The nodes of one service and the weights a pick uses. Never mutated.

    `updated()` derives the next table from this one for a few changed nodes
    without sorting or re-reading the rest: every step left is a C-speed copy or
    scan, so one node's edit costs about the same at 20 nodes as at 2,000.
    A weighted pick bisects `cumulative` (O(log n), in C)."""

    __slots__ = ("all_nodes", "names", "nodes", "weights", "total", "index", "cumulative",
                 "refresh_at", "describe")

    def __init__(self, nodes: Iterable[Node] = (), now: Optional[float] = None,
                 warmup: float = 0.0, describe: str = "service") -> None:
        ordered = sorted(nodes, key=_by_name)
        self._fill(ordered, [n.name for n in ordered], now, warmup, describe)

    def updated(self, changed: Iterable[Node] = (), removed: Iterable[str] = (),
                now: Optional[float] = None, warmup: float = 0.0) -> "RoutingTable":
        """A new table: this one with `changed` nodes added or replaced (by name) and
        the nodes named in `removed` left out."""
        names, nodes = list(self.names), list(self.all_nodes)
        for name in removed:
            i = bisect_left(names, name)
            if i < len(names) and names[i] == name:
                del names[i]
                del nodes[i]
        for node in changed:
            i = bisect_left(names, node.name)
            if i < len(names) and names[i] == node.name:
                nodes[i] = node
            else:
                names.insert(i, node.name)
                nodes.insert(i, node)
        table = RoutingTable.__new__(RoutingTable)
        table._fill(nodes, names, now, warmup, self.describe)
        return table

    def _fill(self, ordered: List[Node], names: List[str], now: Optional[float],
              warmup: float, describe: str) -> None:
        self.describe = describe
        self.all_nodes = tuple(ordered)
        self.names = tuple(names)
        eligible = [n for n in ordered if n.valid == 1 and n.weight > 0]
        now = time.time() if now is None else now
        if warmup > 0:
            weights = [warmed_weight(n.weight, now - n.registered_at, warmup) for n in eligible]
            # While a node is warming up the effective weights change with time, so
            # the owner rebuilds the table once `refresh_at` has passed.
            warming = any(w < n.weight for n, w in zip(eligible, weights))
        else:
            weights, warming = [n.weight for n in eligible], False
        self.nodes = tuple(eligible)
        self.weights: Tuple[float, ...] = tuple(weights)  # reweighted() stores floats
        # Floats: bisecting floats with a float key is the fastest compare in C.
        self.cumulative = tuple(map(float, accumulate(weights)))
        self.total: float = sum(weights)
        self.index = dict(zip(map(_by_name, eligible), range(len(eligible))))
        self.refresh_at = now + min(1.0, warmup / 20.0) if warming else None

    def reweighted(self, weights: Dict[str, float]) -> "RoutingTable":
        """A copy holding only the routable nodes named in `weights`, with those
        weights (node health scales weights this way); every node stays known."""
        table = RoutingTable.__new__(RoutingTable)
        nodes = tuple(node for node in self.nodes if node.name in weights)
        table.describe = self.describe
        table.all_nodes = self.all_nodes
        table.names = self.names
        table.nodes = nodes
        table.weights = tuple(weights[node.name] for node in nodes)
        table.cumulative = tuple(map(float, accumulate(table.weights)))
        table.total = sum(table.weights)
        table.index = dict(zip(map(_by_name, nodes), range(len(nodes))))
        table.refresh_at = None
        return table

    def node_named(self, name: str) -> Optional[Node]:
        """The node called `name` (enabled or not), or None: O(log n)."""
        i = bisect_left(self.names, name)
        if i < len(self.names) and self.names[i] == name:
            return self.all_nodes[i]
        return None

    def __len__(self) -> int:
        return len(self.nodes)

    def __repr__(self) -> str:
        return "RoutingTable(%s)" % ", ".join("%s:%d" % (n.name, w) for n, w in zip(self.nodes, self.weights))

    def no_node_error(self) -> NoAvailableNode:
        if self.all_nodes:
            return NoAvailableNode(
                "no available node for %s: %d registered, none enabled with weight > 0 "
                "(enable one with `probe node enable` or raise a weight)"
                % (self.describe, len(self.all_nodes)))
        return NoAvailableNode("no available node for %s: none registered in ZooKeeper "
                               "(is a provider running and registered?)" % self.describe)


_by_name = attrgetter("name")


def alias_table(weights: Sequence[int]) -> Tuple[Tuple[float, int], ...]:
    """Vose's alias method: ((threshold, alias), ...) such that drawing a slot i
    uniformly, then keeping i with probability threshold[i] or else taking alias[i],
    picks each index with probability weight / total. Built in O(n), drawn in O(1)."""
    count = len(weights)
    total = float(sum(weights))
    if not count or total <= 0:
        return ()
    scaled = [w * count / total for w in weights]
    threshold, alias = [1.0] * count, list(range(count))
    small = [i for i, p in enumerate(scaled) if p < 1.0]
    large = [i for i, p in enumerate(scaled) if p >= 1.0]
    while small and large:
        lesser, greater = small.pop(), large.pop()
        threshold[lesser], alias[lesser] = scaled[lesser], greater
        scaled[greater] -= 1.0 - scaled[lesser]
        (small if scaled[greater] < 1.0 else large).append(greater)
    return tuple(zip(threshold, alias))


class WeightedRandom(object):
    """Pick with probability weight / total: one bisect of the table's cumulative
    weights (O(log n) in C: about 1.6x the cost at 1,000 nodes of 10; unlike an
    alias table it needs no O(n) Python rebuild when one weight changes)."""

    name = "weighted_random"

    def __init__(self, rng: Optional[random.Random] = None) -> None:
        self._random = (rng or random.Random()).random

    def pick(self, table: RoutingTable, exclude: Optional[Collection[str]] = ()) -> Node:
        cumulative = table.cumulative
        if not cumulative:
            raise table.no_node_error()
        node = table.nodes[bisect_right(cumulative, self._random() * table.total)]
        if not exclude or node.name not in exclude:
            return node
        remaining = [(n, w) for n, w in zip(table.nodes, table.weights) if n.name not in exclude]
        if not remaining:
            raise table.no_node_error()
        point = self._random() * sum(w for _, w in remaining)
        for candidate, weight in remaining:
            point -= weight
            if point < 0:
                return candidate
        return remaining[-1][0]


class SmoothRoundRobin(object):
    """Smooth weighted round robin: over every `total` picks each node gets exactly
    its weight, spread out rather than in runs.

    Up to SMALL_TABLE nodes this is nginx's algorithm (weights 5,1,1 give
    a a b a c a a), which costs O(n) a pick. Larger tables use earliest deadline
    first (Envoy's scheduler: node i's k-th turn is due at (k + 1/2) / weight), an
    O(log n) heap with the same exact per-cycle shares, so the pick stays flat.
    """

    name = "round_robin"
    SMALL_TABLE = 32

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._table: Optional[RoutingTable] = None
        self._current: List[float] = []
        self._heap: List[Tuple[float, int]] = []
        self._turns: List[int] = []
        self._picked = 0

    def pick(self, table: RoutingTable, exclude: Optional[Collection[str]] = ()) -> Node:
        if not table.total:
            raise table.no_node_error()
        with self._lock:
            if self._table is not table:
                self._carry_over(table)
            if len(table.nodes) <= self.SMALL_TABLE:
                return self._pick_nginx(table, exclude)
            return self._pick_deadline(table, exclude)

    def _pick_nginx(self, table: RoutingTable, exclude: Optional[Collection[str]]) -> Node:
        current = self._current
        best = -1
        best_value: Optional[float] = None
        total: float = 0
        for i, weight in enumerate(table.weights):
            if exclude and table.nodes[i].name in exclude:
                continue
            current[i] += weight
            total += weight
            if best_value is None or current[i] > best_value:
                best, best_value = i, current[i]
        if best < 0:
            raise table.no_node_error()
        current[best] -= total
        return table.nodes[best]

    def _pick_deadline(self, table: RoutingTable, exclude: Optional[Collection[str]]) -> Node:
        heap, turns, weights = self._heap, self._turns, table.weights
        held: List[Tuple[float, int]] = []
        try:
            while heap:
                due, i = heappop(heap)
                if exclude and table.nodes[i].name in exclude:
                    held.append((due, i))
                    continue
                turns[i] += 1
                heappush(heap, ((turns[i] + 0.5) / weights[i], i))
                self._picked += 1
                if self._picked >= table.total:
                    self._start_cycle(table)  # every share is exact again: restart the clock
                    held = []
                return table.nodes[i]
            raise table.no_node_error()
        finally:
            for item in held:
                heappush(heap, item)

    def _start_cycle(self, table: RoutingTable) -> None:
        self._turns = [0] * len(table.nodes)
        self._heap = [(0.5 / w, i) for i, w in enumerate(table.weights)]
        heapify(self._heap)
        self._picked = 0

    def _carry_over(self, table: RoutingTable) -> None:
        # Keep each surviving node's position in the nginx cycle when the table changes.
        old: Dict[str, float] = {}
        if self._table is not None:
            old = {n.name: c for n, c in zip(self._table.nodes, self._current)}
        self._current = [old.get(n.name, 0) for n in table.nodes]
        self._table = table
        self._start_cycle(table)


class LeastInFlight(object):
    """Power of two choices: draw two distinct nodes by weight and take the one with
    fewer calls in flight per unit of weight; on a tie keep the first draw. The
    first draw is itself weighted random, so among equally loaded nodes (at zero
    load: all of them) calls split by weight, as Dubbo's LeastActive does.
    `inflight(node)` reports a node's count. O(1) a pick."""

    name = "least_inflight"

    def __init__(self, inflight: Callable[[Node], int], rng: Optional[random.Random] = None) -> None:
        self._inflight = inflight
        self._weighted = WeightedRandom(rng)

    def pick(self, table: RoutingTable, exclude: Optional[Collection[str]] = ()) -> Node:
        first = self._weighted.pick(table, exclude)
        if len(table.nodes) < 2:
            return first
        second = self._weighted.pick(table, exclude)
        for _ in range(3):  # redraw a collision: cheaper than building an exclusion
            if second.name != first.name:
                break
            second = self._weighted.pick(table, exclude)
        if second.name == first.name:
            try:
                second = self._weighted.pick(table, set(exclude or ()) | {first.name})
            except NoAvailableNode:
                return first  # every other node is excluded
        weights, index = table.weights, table.index
        # load / weight compared as cross products: no division, exact ties.
        if self._inflight(second) * weights[index[first.name]] \
                < self._inflight(first) * weights[index[second.name]]:
            return second
        return first


class P2CEwma(object):
    """Finagle's P2C with peak-EWMA load: draw two distinct nodes by weight and take
    the one with the lower `cost(node)` (the client's health engine gives EWMA
    latency × (calls in flight + 1)); on a tie keep the first draw. O(1) a pick."""

    name = "p2c_ewma"

    def __init__(self, cost: Callable[[Node], float], rng: Optional[random.Random] = None) -> None:
        self._cost = cost
        self._weighted = WeightedRandom(rng)

    def pick(self, table: RoutingTable, exclude: Optional[Collection[str]] = ()) -> Node:
        weighted = self._weighted
        first = weighted.pick(table, exclude)
        if len(table.nodes) < 2:
            return first
        second = weighted.pick(table, exclude)
        for _ in range(3):  # redraw a collision: cheaper than building an exclusion
            if second.name != first.name:
                break
            second = weighted.pick(table, exclude)
        if second.name == first.name:
            try:
                second = weighted.pick(table, set(exclude or ()) | {first.name})
            except NoAvailableNode:
                return first  # every other node is excluded
        return second if self._cost(second) < self._cost(first) else first


Balancer = Union["WeightedRandom", "SmoothRoundRobin", "LeastInFlight", "P2CEwma"]


def make_balancer(name: Optional[str], inflight: Optional[Callable[[Node], int]] = None,
                  rng: Optional[random.Random] = None,
                  cost: Optional[Callable[[Node], float]] = None) -> Balancer:
    """The balancer called `name` (one of BALANCERS). `least_inflight` needs
    `inflight(node)`, `p2c_ewma` needs `cost(node)` (ServiceHealth.cost)."""
    if name in (None, "weighted_random", "random"):
        return WeightedRandom(rng)
    if name in ("round_robin", "smooth_round_robin"):
        return SmoothRoundRobin()
    if name in ("least_inflight", "p2c"):
        if inflight is None:
            raise ProbeError("least_inflight needs an in-flight counter")
        return LeastInFlight(inflight, rng)
    if name == "p2c_ewma":
        if cost is None:
            raise ProbeError("p2c_ewma needs a cost function (a client's node health)")
        return P2CEwma(cost, rng)
    raise ProbeError("unknown balancer %r: choose one of %s" % (name, ", ".join(BALANCERS)))
