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

from .errors import ComponentUnavailable
from .nodestore import REDIS_ERRORS
from .naming import parse_stats_field, stats_field, stats_key, stats_pattern  # noqa: F401
from .rpc.outcomes import APPLICATION_ERROR, CONNECTION_ERROR, DECLARED_EXCEPTION, OK, TIMEOUT

SLOT_SECONDS = 10
DEFAULT_TTL = 3600  # seconds a slot is kept once its last write is done

# Latency bucket upper bounds in seconds, 1-2-5 steps from 50 us to 10 s: a local
# call costs well under 0.1 ms, so the low end is finer than prometheus_client's
# defaults. Changing them makes older slots' percentiles unreadable (counts stay).
BOUNDS = (0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05,
          0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)

STATUSES = (OK, DECLARED_EXCEPTION, APPLICATION_ERROR, TIMEOUT, CONNECTION_ERROR)
SIDES = ("server", "client")


def slot_of(epoch):
    return int(epoch // SLOT_SECONDS) * SLOT_SECONDS


def write_slot(redis_client, env, slot, deltas, writer, ttl=DEFAULT_TTL, ttls=None):
    """Write one process's running totals for `slot` in one pipeline.

    deltas: {(side, appkey, service, method, node, status): cell}, a cell being the
    bucket counts (len(BOUNDS) + 1) followed by the sum of seconds. Each key expires
    after ttls[(side, appkey)], else `ttl`, seconds. Raises redis errors; the caller
    decides what a failure means.
    """
    by_key = {}
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


def quantile(buckets, q):
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


def _ms(seconds):
    return None if seconds is None else round(seconds * 1000.0, 3)


def read_stats(redis_client, env, appkey, service=None, minutes=5, side="server", now=None):
    """Merge the last `minutes` of stats of `appkey` (optionally one service) into rows
    per (service, method, node), sorted so that a method's nodes sit together.

    Row keys: service, method, node, calls, errors (every status but ok), p50_ms,
    p99_ms, mean_ms, statuses ("ok=10 exception=2"), by_status ({status: count}).
    """
    if side not in SIDES:
        raise ValueError("side must be 'server' or 'client', got %r" % (side,))
    now = time.time() if now is None else now
    first, last = slot_of(now - float(minutes) * 60.0), slot_of(now)
    keys = [stats_key(env, appkey, side, slot) for slot in range(first, last + 1, SLOT_SECONDS)]
    pipe = redis_client.pipeline(transaction=False)
    for key in keys:
        pipe.hgetall(key)
    try:
        slots = pipe.execute()
    except REDIS_ERRORS as exc:
        raise ComponentUnavailable("cannot read call stats of %s from Redis: %s (is Redis up? "
                                   "`probe stack status`)" % (appkey, exc))
    merged = {}
    width = len(BOUNDS) + 1
    for fields in slots:
        for field, raw in (fields or {}).items():
            parsed = parse_stats_field(field)
            if parsed is None or (service and parsed[0] != service):
                continue
            try:
                data = json.loads(raw)
                count, total, buckets = int(data["count"]), float(data["sum"]), data["buckets"]
            except (ValueError, KeyError, TypeError):
                continue
            row = merged.get(parsed[:3])
            if row is None:
                row = merged[parsed[:3]] = {"count": 0, "sum": 0.0, "buckets": [0] * width,
                                            "statuses": {}}
            row["count"] += count
            row["sum"] += total
            if len(buckets) == width:  # written with other bounds: counts only
                row["buckets"] = [a + int(b) for a, b in zip(row["buckets"], buckets)]
            row["statuses"][parsed[3]] = row["statuses"].get(parsed[3], 0) + count
    rows = []
    for (service_name, method, node), row in sorted(merged.items()):
        statuses = row["statuses"]
        order = [s for s in STATUSES if s in statuses] + sorted(set(statuses) - set(STATUSES))
        rows.append({
            "service": service_name, "method": method, "node": node,
            "calls": row["count"],
            "errors": row["count"] - statuses.get(OK, 0),
            "p50_ms": _ms(quantile(row["buckets"], 0.50)),
            "p99_ms": _ms(quantile(row["buckets"], 0.99)),
            "mean_ms": _ms(row["sum"] / row["count"]) if row["count"] else None,
            "statuses": " ".join("%s=%d" % (s, statuses[s]) for s in order),
            "by_status": {s: statuses[s] for s in order},
        })
    return rows
