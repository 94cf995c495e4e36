"""Per-interval call stats in Redis: the layout, the writer's pipeline and the reader
behind `probe stats` and the console.

Layout. One hash per (env, appkey, side, 10-second slot):

    thriftprobe_stats_<env>:<appkey>:<server|client>:<slot_start_epoch>

field `<service>|<method>|<node>|<status>|<writer>`, value JSON
`{"count": n, "sum": seconds, "buckets": [...]}` with the per-bucket (not
cumulative) counts over `BOUNDS` plus +Inf. `writer` names one process
(host:pid:random), so processes never overwrite each other; a process rewrites its
own field with the slot's running total, which makes a retried write harmless.
Every write refreshes the key's TTL, so nothing outlives `ttl` once writes stop.

Slots are fixed 10-second windows, whatever the flush interval (<= 10 s): a reader
computes the keys of the last N minutes instead of scanning, which also works on
a Redis cluster.
"""

import json
import time
from typing import Any, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from ..errors import ComponentUnavailable
from .nodestore import REDIS_ERRORS
from ..options import DEFAULT_STATS_TTL
from ..naming import (health_field, health_key, parse_health_field,  # noqa: F401
                     parse_stats_field, stats_field, stats_key, stats_pattern)
from ..rpc.outcomes import (APPLICATION_ERROR, CONNECTION_ERROR, DECLARED_EXCEPTION, OK,
                           OVERLOADED, TIMEOUT)

SLOT_SECONDS = 10
DEFAULT_TTL = DEFAULT_STATS_TTL  # seconds a slot is kept once its last write is done

# Latency bucket upper bounds in seconds, 1-2-5 steps from 50 us to 10 s: a local
# call costs well under 0.1 ms, so the low end is finer than prometheus_client's
# defaults. Changing them makes older slots' percentiles unreadable (counts stay).
BOUNDS = (0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05,
          0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)

WIDTH = len(BOUNDS) + 1  # bucket counts per cell: the bounds, then +Inf

STATUSES = (OK, DECLARED_EXCEPTION, APPLICATION_ERROR, TIMEOUT, CONNECTION_ERROR, OVERLOADED)

# Node health as consumers report it: hash thriftprobe_health_<env>:<appkey>, field
# `<service>|<ip:port>|<writer>`, JSON {"reason": why it is ejected, "at": epoch of
# the report}. A consumer rewrites its own fields at each stats flush and deletes
# those of nodes it re-admitted; a reader ignores reports older than HEALTH_MAX_AGE
# (a consumer that died), and the key expires HEALTH_TTL after the last write.
HEALTH_MAX_AGE = 30.0
HEALTH_TTL = 120
MAX_REASON = 200
SIDES = ("server", "client")


def slot_of(epoch: float) -> int:
    return int(epoch // SLOT_SECONDS) * SLOT_SECONDS


def write_slot(redis_client: Any, env: str, slot: int,
               deltas: Mapping[Tuple[str, str, str, str, str, str], Sequence[float]],
               writer: str, ttl: float = DEFAULT_TTL,
               ttls: Optional[Mapping[Tuple[str, str], float]] = None) -> int:
    """Write one process's running totals for `slot` in one pipeline.

    deltas: {(side, appkey, service, method, node, status): cell}, a cell being the
    bucket counts (len(BOUNDS) + 1) followed by the sum of seconds. Each key expires
    after ttls[(side, appkey)], else `ttl`, seconds. Raises redis errors; the caller
    decides what a failure means.
    """
    by_key: Dict[str, Tuple[float, Dict[str, str]]] = {}
    for (side, appkey, service, method, node, status), cell in deltas.items():
        buckets = cell[:-1]
        value = json.dumps({"count": sum(buckets), "sum": round(cell[-1], 9), "buckets": buckets},
                           separators=(",", ":"))
        key = stats_key(env, appkey, side, slot)
        if key not in by_key:
            by_key[key] = ((ttls or {}).get((side, appkey), ttl), {})
        by_key[key][1][stats_field(service, method, node, status, writer)] = value
    if not by_key:
        return 0
    pipe = redis_client.pipeline(transaction=False)
    for key, (expire, mapping) in by_key.items():
        pipe.hset(key, mapping=mapping)
        pipe.expire(key, int(expire))
    pipe.execute()
    return len(by_key)


def write_health(redis_client: Any, env: str, current: Dict[str, Dict[str, str]],
                 previous: Dict[str, Dict[str, str]]) -> Dict[str, Dict[str, str]]:
    """Write one consumer process's ejected nodes; returns what is now written.

    current/previous: {appkey: {field: JSON}}, `previous` being what the last
    successful call wrote: fields no longer current are deleted. Raises redis errors.
    """
    pipe = redis_client.pipeline(transaction=False)
    used = False
    for appkey in set(current) | set(previous):
        key = health_key(env, appkey)
        now_fields = current.get(appkey, {})
        gone = [field for field in previous.get(appkey, {}) if field not in now_fields]
        if gone:
            pipe.hdel(key, *gone)
            used = True
        if now_fields:
            pipe.hset(key, mapping=now_fields)
            pipe.expire(key, HEALTH_TTL)
            used = True
    if used:
        pipe.execute()
    return current


def health_entry(reason: str, now: float) -> str:
    """The JSON of one consumer's report that a node is ejected (for `write_health`)."""
    return json.dumps({"reason": str(reason)[:MAX_REASON], "at": round(now, 3)},
                      separators=(",", ":"))


def read_node_health(redis_client: Any, env: str, appkey: str, now: Optional[float] = None,
                     max_age: float = HEALTH_MAX_AGE) -> Dict[Tuple[str, str], List[str]]:
    """{(service, "ip:port"): [why, ...]}: one reason per consumer process that
    reports the node ejected now. Malformed entries are skipped (Redis data is
    not trusted)."""
    now = time.time() if now is None else now
    try:
        raw = redis_client.hgetall(health_key(env, appkey))
    except REDIS_ERRORS as exc:
        raise ComponentUnavailable("cannot read node health from Redis: %s" % exc)
    ejected: Dict[Tuple[str, str], List[str]] = {}
    for field, value in list(raw.items())[:10000]:
        parsed = parse_health_field(field)
        if parsed is None:
            continue
        try:
            entry = json.loads(value)
            reason, at = str(entry["reason"])[:MAX_REASON], float(entry["at"])
        except (ValueError, TypeError, KeyError, AttributeError):
            continue
        if now - at > max_age:
            continue
        ejected.setdefault((parsed[0], parsed[1]), []).append(reason)
    return ejected


def quantile(buckets: Sequence[int], q: float) -> Optional[float]:
    """Latency at quantile q (0..1) from per-bucket counts, interpolated linearly in
    the bucket it falls into, as Prometheus' histogram_quantile does. Values in the
    +Inf bucket are reported as the last bound. None without data."""
    total = sum(buckets)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(buckets):
        if count and seen + count >= rank:
            if index >= len(BOUNDS):
                return BOUNDS[-1]
            lower = BOUNDS[index - 1] if index else 0.0
            return lower + (BOUNDS[index] - lower) * (rank - seen) / count
        seen += count
    return BOUNDS[-1]


class StatsEntry(NamedTuple):
    """One writer's running totals for (service, method, node, status) in one slot.
    `buckets` is None when the field was written with other bounds (counts only)."""

    slot: int
    service: str
    method: str
    node: str
    status: str
    calls: int
    seconds: float
    buckets: Optional[List[int]]


def slots_between(start: float, end: float) -> List[int]:
    """The slot starts covering epochs `start` .. `end`."""
    return list(range(slot_of(start), slot_of(end) + 1, SLOT_SECONDS))


def read_entries(redis_client: Any, env: str, appkey: str, slots: Sequence[int],
                 side: str = "server") -> Iterator[StatsEntry]:
    """Every well-formed stats field of `appkey` in `slots` (read in one pipeline: the
    keys are computed, never scanned). The data is untrusted: a malformed field, a
    negative count or a bucket list that is not whole numbers is skipped; negative
    bucket counts and sums count as 0.

    :raises ComponentUnavailable: Redis could not be read.
    """
    if side not in SIDES:
        raise ValueError("side must be 'server' or 'client', got %r" % (side,))
    pipe = redis_client.pipeline(transaction=False)
    for slot in slots:
        pipe.hgetall(stats_key(env, appkey, side, slot))
    try:
        read = pipe.execute()
    except REDIS_ERRORS as exc:
        raise ComponentUnavailable("cannot read call stats of %s from Redis: %s (is Redis up? "
                                   "`probe stack status`)" % (appkey, exc))
    for slot, fields in zip(slots, read):
        for field, raw in (fields or {}).items():
            entry = _entry(slot, field, raw)
            if entry is not None:
                yield entry


def _entry(slot: int, field: Any, raw: Any) -> Optional[StatsEntry]:
    parsed = parse_stats_field(field)
    if parsed is None:
        return None
    try:
        data = json.loads(raw)
        count = int(data["count"])
        seconds = float(data.get("sum", 0.0))
        buckets = data["buckets"]
        if isinstance(buckets, list) and len(buckets) == WIDTH:
            buckets = [max(0, int(b)) for b in buckets]
        else:
            buckets = None
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
        return None
    if count < 0:
        return None
    if not seconds >= 0.0 or seconds == float("inf"):
        seconds = 0.0
    return StatsEntry(slot, parsed[0], parsed[1], parsed[2], parsed[3], count, seconds, buckets)


def ms(seconds: Optional[float]) -> Optional[float]:
    """Seconds as milliseconds rounded to the microsecond (None stays None)."""
    return None if seconds is None else round(seconds * 1000.0, 3)


def read_stats(redis_client: Any, env: str, appkey: str, service: Optional[str] = None,
               minutes: float = 5, side: str = "server",
               now: Optional[float] = None) -> List[Dict[str, Any]]:
    """Merge the last `minutes` of stats of `appkey` (optionally one service) into rows
    per (service, method, node), sorted so that a method's nodes sit together.

    Row keys: service, method, node, calls, errors (every status but ok), p50_ms,
    p99_ms, mean_ms, statuses ("ok=10 exception=2"), by_status ({status: count}).
    """
    if side not in SIDES:
        raise ValueError("side must be 'server' or 'client', got %r" % (side,))
    now = time.time() if now is None else now
    merged: Dict[Tuple[str, str, str], Dict[str, Any]] = {}
    for entry in read_entries(redis_client, env, appkey,
                              slots_between(now - float(minutes) * 60.0, now), side):
        if service and entry.service != service:
            continue
        row = merged.get((entry.service, entry.method, entry.node))
        if row is None:
            row = merged[(entry.service, entry.method, entry.node)] = {
                "count": 0, "sum": 0.0, "buckets": [0] * WIDTH, "statuses": {}}
        row["count"] += entry.calls
        row["sum"] += entry.seconds
        if entry.buckets is not None:
            row["buckets"] = [a + b for a, b in zip(row["buckets"], entry.buckets)]
        row["statuses"][entry.status] = row["statuses"].get(entry.status, 0) + entry.calls
    rows = []
    for (service_name, method, node), row in sorted(merged.items()):
        statuses = row["statuses"]
        order = [s for s in STATUSES if s in statuses] + sorted(set(statuses) - set(STATUSES))
        rows.append({
            "service": service_name, "method": method, "node": node,
            "calls": row["count"],
            "errors": row["count"] - statuses.get(OK, 0),
            "p50_ms": ms(quantile(row["buckets"], 0.50)),
            "p99_ms": ms(quantile(row["buckets"], 0.99)),
            "mean_ms": ms(row["sum"] / row["count"]) if row["count"] else None,
            "statuses": " ".join("%s=%d" % (s, statuses[s]) for s in order),
            "by_status": {s: statuses[s] for s in order},
        })
    return rows
