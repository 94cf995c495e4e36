"""Prometheus exposition: a collector that turns a snapshot into metric families at
scrape time, and /metrics HTTP servers shared by the providers and clients of a
process.

    probe_{server,client}_requests_total{appkey,service,method,node,status}
    probe_{server,client}_request_seconds{appkey,service,method,node}  (histogram)
    probe_{server,client}_inflight{appkey,service,node}                (gauge)
"""

import logging
import threading
from typing import Any, Callable, Dict, List, Sequence, Tuple

from prometheus_client import REGISTRY, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from ..errors import ProbeError
from ..rpc.httpserver import BoundedHttpServer, HttpLimits, server_ssl_context
from ..stores.stats import BOUNDS, SIDES
from .options import METRICS_ADDR_ENV, METRICS_PORT_ENV, tls_options
from .recorder import add_cell
from .snapshots import Snapshot

log = logging.getLogger("probe.metrics")

# A scrape is one small GET; replies may be large (many series).
METRICS_LIMITS = HttpLimits(max_body_bytes=1024, workers=2)

_LE = [floatToGoString(bound) for bound in BOUNDS] + ["+Inf"]


class ProbeCollector(object):
    """A prometheus_client collector over `snapshot()`, called at each scrape.

    :param snapshot: returns the snapshot to expose (probe.metrics.snapshots).
    """

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def describe(self) -> List[Any]:
        return self.families({"calls": {}, "inflight": {}})

    def collect(self) -> List[Any]:
        return self.families(self._snapshot())

    @staticmethod
    def families(snap: Snapshot) -> List[Any]:
        result: List[Any] = []
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
            histograms: Dict[Tuple[Any, ...], List[float]] = {}
            for key, cell in sorted(snap["calls"].items()):
                if key[0] == side:
                    requests.add_metric(key[1:], sum(cell[:-1]))
                    add_cell(histograms, key[1:5], cell)
            for labels, cell in sorted(histograms.items()):
                seconds.add_metric(labels, _cumulative(cell), cell[-1])
            for key, count in sorted(snap["inflight"].items()):
                if key[0] == side:
                    inflight.add_metric(key[1:], count)
            result.extend((requests, seconds, inflight))
        result.extend(ProbeCollector.health_families(snap.get("health", {})))
        return result

    @staticmethod
    def health_families(health: Dict[Tuple[str, str], Dict[str, Any]]) -> List[Any]:
        """The consumers' node-health counters and gauges (probe.routing.health)."""
        labels = ("appkey", "service")
        counters = [("ejections", "probe_client_ejections", "Nodes ejected by passive health"),
                    ("readmissions", "probe_client_readmissions",
                     "Ejected nodes re-admitted after a half-open probe answered"),
                    ("panics", "probe_client_panic_entered",
                     "Times too few healthy nodes were left and calls went to all of them"),
                    ("overloads", "probe_client_overload_replies",
                     "'Overloaded, not executed' replies from providers (retried elsewhere)"),
                    ("budget_exhausted", "probe_client_retry_budget_exhausted",
                     "Retries refused because the retry budget was spent")]
        families: List[Any] = []
        for field, name, text in counters:
            family = CounterMetricFamily(name, text, labels=labels)
            for key, entry in sorted(health.items()):
                family.add_metric(key, entry[field])
            families.append(family)
        panic = GaugeMetricFamily("probe_client_panic", "1 while the client routes across all "
                                  "nodes because too few are healthy (panic mode)", labels=labels)
        ejected = GaugeMetricFamily("probe_client_ejected_nodes", "Nodes ejected now",
                                    labels=labels)
        node = GaugeMetricFamily("probe_client_node_ejected", "1 for each node ejected now",
                                 labels=labels + ("node",))
        for key, entry in sorted(health.items()):
            panic.add_metric(key, entry["panic"])
            ejected.add_metric(key, len(entry["ejected"]))
            for label in sorted(entry["ejected"]):
                node.add_metric(key + (label,), 1)
        return families + [panic, ejected, node]


def _cumulative(cell: Sequence[float]) -> List[Tuple[str, float]]:
    """Prometheus histogram points [(le, count of calls <= le)] from a cell."""
    total: float = 0
    points: List[Tuple[str, float]] = []
    for le, count in zip(_LE, cell[:-1]):
        total += count
        points.append((le, total))
    return points


class MetricsEndpoint(object):
    """One user's share of a /metrics HTTP server; the server stops with its last user."""

    def __init__(self, servers: "HttpServers", key: Tuple[str, int],
                 httpd: BoundedHttpServer) -> None:
        self._servers = servers
        self._key = key
        self.httpd = httpd
        self.port = httpd.server_port
        self.addr = key[0]
        self._closed = False

    def __repr__(self) -> str:
        return "<MetricsEndpoint %s:%d>" % (self.addr, self.port)

    def close(self) -> None:
        if self._servers.release(self):
            self.httpd.shutdown()
            self.httpd.server_close()


class HttpServers(object):
    """The /metrics servers of a process, by (addr, port): a provider and a client
    asking for the same port share one server."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._servers: Dict[Tuple[str, int], List[Any]] = {}  # (addr, port) -> [httpd, users]

    def serve(self, port: int, addr: str) -> MetricsEndpoint:
        """An endpoint serving prometheus_client's default REGISTRY on addr:port (0: a
        free port)."""
        with self._lock:
            entry = self._servers.get((addr, port)) if port else None
            if entry is not None:
                entry[1] += 1
                return MetricsEndpoint(self, (addr, port), entry[0])
            tls = tls_options()
            try:
                # prometheus_client's own server is a thread per connection with no
                # deadline: /metrics runs on the bounded server the console uses.
                context = server_ssl_context(tls["certfile"], tls["keyfile"],
                                             tls.get("client_cafile")) if tls else None
                httpd = BoundedHttpServer(make_wsgi_app(REGISTRY), addr, port, context,
                                          METRICS_LIMITS, server_name="metrics").start()
            except OSError as exc:  # ssl.SSLError (a bad PEM file) too
                raise ProbeError("cannot serve /metrics on %s:%s: %s (is another process using "
                                 "the port, or is the address not this host's? pick another "
                                 "metrics_port / %s or metrics_addr / %s)"
                                 % (addr, port, exc, METRICS_PORT_ENV, METRICS_ADDR_ENV))
            key = (addr, httpd.server_port)
            self._servers[key] = [httpd, 1]
        log.info("serving /metrics on %s:%d%s", addr, httpd.server_port,
                 " over TLS" if tls else "")
        return MetricsEndpoint(self, key, httpd)

    def release(self, endpoint: MetricsEndpoint) -> bool:
        """Count one endpoint closed (once); True when its server has no user left."""
        with self._lock:
            if endpoint._closed:
                return False
            endpoint._closed = True
            entry = self._servers.get(endpoint._key)
            if entry is None or entry[0] is not endpoint.httpd:
                return True  # a server of another state (before a fork or a reset)
            entry[1] -= 1
            if entry[1] > 0:
                return False
            del self._servers[endpoint._key]
            return True

    def forget(self) -> None:
        """Drop every server without stopping it (a forked child does not own them)."""
        self._lock = threading.Lock()
        self._servers = {}
