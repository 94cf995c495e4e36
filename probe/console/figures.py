"""Live figures for the console from the fleet's call stats in Redis (probe.stats
layout): per node calls/s, error rate and p99 over a short recent window, and per
service a time series of calls/s and p99 for the chart.

Everything is read in one pipeline per request: the slot keys are computed, never
scanned. Server-side stats are used: they count what each node actually served.
"""

import json

from ..errors import ComponentUnavailable
from ..nodestore import REDIS_ERRORS
from ..stats import BOUNDS, SLOT_SECONDS, quantile, slot_of
from ..naming import parse_stats_field, stats_key
from ..rpc.outcomes import OK

WIDTH = len(BOUNDS) + 1


class _Cell(object):
    __slots__ = ("calls", "errors", "buckets")

    def __init__(self):
        self.calls = 0
        self.errors = 0
        self.buckets = [0] * WIDTH

    def add(self, status, count, buckets):
        self.calls += count
        if status != OK:
            self.errors += count
        if isinstance(buckets, list) and len(buckets) == WIDTH:
            self.buckets = [a + int(b) for a, b in zip(self.buckets, buckets)]


def _read_slots(redis_client, env, appkey, slots, side="server"):
    """{slot: {field: raw}} for the given slots, in one pipeline."""
    pipe = redis_client.pipeline(transaction=False)
    for slot in slots:
        pipe.hgetall(stats_key(env, appkey, side, slot))
    try:
        return dict(zip(slots, pipe.execute()))
    except REDIS_ERRORS as exc:
        raise ComponentUnavailable("cannot read call stats of %s from Redis: %s" % (appkey, exc))


def _entries(fields):
    """(service, node, status, count, buckets) of each well-formed field; hostile or
    malformed data is skipped, never trusted."""
    for field, raw in (fields or {}).items():
        parsed = parse_stats_field(field)
        if parsed is None:
            continue
        try:
            data = json.loads(raw)
            count, buckets = int(data["count"]), data["buckets"]
            if buckets is not None and len(buckets) == WIDTH:
                buckets = [max(0, int(b)) for b in buckets]
        except (ValueError, KeyError, TypeError):
            continue
        if count < 0:
            continue
        yield parsed[0], parsed[2], parsed[3], count, buckets


def _ms(seconds):
    return None if seconds is None else round(seconds * 1000.0, 3)


def node_figures(redis_client, env, appkey, now, window=20.0):
    """{(service, "ip:port"): {"rate", "error_rate", "p99_ms", "calls"}} over the last
    `window` seconds (whole 10-s slots back from the current one, which is partial:
    the rate divides by the time actually covered)."""
    first = slot_of(now - window)
    slots = list(range(first, slot_of(now) + 1, SLOT_SECONDS))
    cells = {}
    for fields in _read_slots(redis_client, env, appkey, slots).values():
        for service, node, status, count, buckets in _entries(fields):
            cells.setdefault((service, node), _Cell()).add(status, count, buckets)
    covered = max(now - first, 1.0)
    return {key: {"calls": cell.calls, "rate": cell.calls / covered,
                  "error_rate": (cell.errors / cell.calls) if cell.calls else None,
                  "p99_ms": _ms(quantile(cell.buckets, 0.99))}
            for key, cell in cells.items()}


def service_series(redis_client, env, appkey, service, now, minutes=60, step=60):
    """Per `step` s over the last `minutes`: labels (epoch seconds of each step's
    start), calls/s and p99 in ms (None where there were no calls)."""
    step = max(SLOT_SECONDS, int(step) // SLOT_SECONDS * SLOT_SECONDS)
    end = slot_of(now) // step * step
    starts = list(range(end - (int(minutes * 60) // step - 1) * step, end + 1, step))
    slots = list(range(starts[0], slot_of(now) + 1, SLOT_SECONDS))
    cells = {start: _Cell() for start in starts}
    for slot, fields in _read_slots(redis_client, env, appkey, slots).items():
        cell = cells[slot // step * step]
        for svc, _node, status, count, buckets in _entries(fields):
            if svc == service:
                cell.add(status, count, buckets)
    rates, p99 = [], []
    for start in starts:
        covered = min(step, max(now - start, 1.0))  # the last step is still running
        rates.append(round(cells[start].calls / covered, 3))
        p99.append(_ms(quantile(cells[start].buckets, 0.99)))
    return {"labels": starts, "rate": rates, "p99_ms": p99}
