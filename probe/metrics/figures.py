"""Live figures for the web console from the fleet's call stats in Redis: per node
calls/s, error rate and p99 over a short recent window, and per service a time
series of calls/s and p99 for the chart.

The stats are read by `probe.stores.stats.read_entries`, the one reader (one pipeline per
request, hostile data skipped). Server-side stats are used: they count what each node actually served.
"""

from typing import Any, Dict, Tuple

from ..rpc.outcomes import OK
from ..stores.stats import SLOT_SECONDS, WIDTH, StatsEntry, ms, quantile, read_entries, slot_of


class _Cell(object):
    __slots__ = ("calls", "errors", "buckets")

    def __init__(self) -> None:
        self.calls = 0
        self.errors = 0
        self.buckets = [0] * WIDTH

    def add(self, entry: StatsEntry) -> None:
        self.calls += entry.calls
        if entry.status != OK:
            self.errors += entry.calls
        if entry.buckets is not None:
            self.buckets = [a + b for a, b in zip(self.buckets, entry.buckets)]


def node_figures(redis_client: Any, env: str, appkey: str, now: float,
                 window: float = 20.0) -> Dict[Tuple[str, str], Dict[str, Any]]:
    """{(service, "ip:port"): {"rate", "error_rate", "p99_ms", "calls"}} over the last
    `window` seconds (whole 10-s slots back from the current one, which is partial:
    the rate divides by the time actually covered)."""
    first = slot_of(now - window)
    slots = list(range(first, slot_of(now) + 1, SLOT_SECONDS))
    cells: Dict[Tuple[str, str], _Cell] = {}
    for entry in read_entries(redis_client, env, appkey, slots):
        cells.setdefault((entry.service, entry.node), _Cell()).add(entry)
    covered = max(now - first, 1.0)
    return {key: {"calls": cell.calls, "rate": cell.calls / covered,
                  "error_rate": (cell.errors / cell.calls) if cell.calls else None,
                  "p99_ms": ms(quantile(cell.buckets, 0.99))}
            for key, cell in cells.items()}


def service_series(redis_client: Any, env: str, appkey: str, service: str, now: float,
                   minutes: float = 60, step: int = 60) -> Dict[str, Any]:
    """Per `step` s over the last `minutes`: labels (epoch seconds of each step's
    start), calls/s and p99 in ms (None where there were no calls)."""
    step = max(SLOT_SECONDS, int(step) // SLOT_SECONDS * SLOT_SECONDS)
    end = slot_of(now) // step * step
    starts = list(range(end - (int(minutes * 60) // step - 1) * step, end + 1, step))
    slots = list(range(starts[0], slot_of(now) + 1, SLOT_SECONDS))
    cells = {start: _Cell() for start in starts}
    for entry in read_entries(redis_client, env, appkey, slots):
        if entry.service == service:
            cells[entry.slot // step * step].add(entry)
    rates, p99 = [], []
    for start in starts:
        covered = min(step, max(now - start, 1.0))  # the last step is still running
        rates.append(round(cells[start].calls / covered, 3))
        p99.append(ms(quantile(cells[start].buckets, 0.99)))
    return {"labels": starts, "rate": rates, "p99_ms": p99}
