"""Call monitoring against the real stack: the provider's /metrics, the consumer's
registry and `probe stats` agree on exact counts and statuses; Redis outages do not
touch calls; stats keys expire; /metrics stays on loopback unless widened. Tests
that read the process's metrics take `fresh_metrics`, so they see only their own
calls and can compare whole tables."""

import json
import logging
import subprocess
import sys
import threading
import urllib.request

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from conftest import IDL, run_probe, wait_for
from probe import metrics
from probe.stores import stats
from probe.dev.stack import free_port
from probe.errors import ProbeError
from probe.idl import load_module
from probe.settings import load_settings

DemoError = load_module(IDL).DemoError


def probe_samples(families, side):
    """{(sample name, frozen labels): value} of the probe_<side>_* samples."""
    prefix = "probe_%s_" % side
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in families if family.name.startswith(prefix)
            for sample in family.samples}


def fetch(port, host="127.0.0.1"):
    with urllib.request.urlopen("http://%s:%d/metrics" % (host, port), timeout=5) as reply:
        return reply.read().decode("utf-8")


def scrape(port, side="server"):
    """The probe_<side>_* samples a /metrics endpoint serves."""
    return probe_samples(text_string_to_metric_families(fetch(port)), side)


def in_process(side="client"):
    """The probe_<side>_* samples of this process's default registry."""
    return probe_samples(REGISTRY.collect(), side)


def requests(samples, side):
    """{(appkey, service, node, method, status): count} from probe_<side>_requests_total."""
    counts = {}
    for (name, labels), count in samples.items():
        if name == "probe_%s_requests_total" % side:
            labels = dict(labels)
            counts[tuple(labels[k] for k in ("appkey", "service", "node", "method",
                                             "status"))] = count
    return counts


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())))


def stats_rows(appkey, *extra):
    done = run_probe("stats", appkey, "--json", *extra)
    return {row["method"]: row for row in json.loads(done.stdout)}


@pytest.fixture
def redis_client(stack):
    from probe.stores.nodestore import connect_redis
    client = connect_redis(load_settings().redis)
    yield client
    client.close()


def test_every_call_is_counted_per_status_on_both_sides(fresh_metrics, appkey, providers, clients,
                                                         caplog):
    caplog.set_level(logging.WARNING, logger="probe.metrics")
    port = free_port()
    provider = providers(appkey, metrics_port=port, slow_call_ms=500)
    client = clients(appkey, socket_timeout=300, slow_call_ms=250)
    wait_for(lambda: len(client.watcher.table) == 1, message="node in routing table")
    node = provider.address
    for _ in range(7):
        assert client.say() == "hello world"
    for index in range(3):
        with pytest.raises(DemoError):
            client.fail("no %d" % index)
    for _ in range(2):
        with pytest.raises(Exception) as timed_out:
            client.slow(800)
        assert not isinstance(timed_out.value, DemoError)
    base = dict(appkey=appkey, service="DemoService", node=node)

    # The provider finishes the timed-out calls later, and counts them as ok.
    wait_for(lambda: value(scrape(port), "probe_server_requests_total", method="slow",
                           status="ok", **base) == 2, message="the server to finish slow()")
    served = scrape(port)
    labels = (appkey, "DemoService", node)
    assert requests(served, "server") == {labels + ("say", "ok"): 7,
                                          labels + ("fail", "exception"): 3,
                                          labels + ("slow", "ok"): 2}
    assert value(served, "probe_server_request_seconds_count", method="say", **base) == 7
    assert value(served, "probe_server_request_seconds_bucket", method="slow", le="0.5", **base) == 0
    assert value(served, "probe_server_request_seconds_bucket", method="slow", le="1.0", **base) == 2
    assert value(served, "probe_server_request_seconds_sum", method="slow", **base) >= 1.6
    assert value(served, "probe_server_inflight", **base) == 0

    # The consumer's view lives in this process's default registry: these calls, no other.
    made = in_process("client")
    assert requests(made, "client") == {labels + ("say", "ok"): 7,
                                        labels + ("fail", "exception"): 3,
                                        labels + ("slow", "timeout"): 2}
    assert value(made, "probe_client_request_seconds_count", method="fail", **base) == 3
    assert value(made, "probe_client_inflight", **base) == 0

    # The fleet view: both sides flushed to Redis and read back by the CLI.
    assert metrics.flush_now() is True
    server_rows = stats_rows(appkey)
    assert {m: (r["calls"], r["errors"], r["by_status"]) for m, r in server_rows.items()} == {
        "say": (7, 0, {"ok": 7}), "fail": (3, 3, {"exception": 3}), "slow": (2, 0, {"ok": 2})}
    assert all(row["node"] == node and row["service"] == "DemoService"
               for row in server_rows.values())
    assert 700 <= server_rows["slow"]["p50_ms"] <= 1000
    assert server_rows["fail"]["statuses"] == "exception=3"
    client_rows = stats_rows(appkey, "--side", "client")
    assert {m: (r["calls"], r["errors"], r["statuses"]) for m, r in client_rows.items()} == {
        "say": (7, 0, "ok=7"), "fail": (3, 3, "exception=3"), "slow": (2, 2, "timeout=2")}
    table = run_probe("stats", appkey, "DemoService").stdout
    assert "METHOD" in table and "P99_MS" in table and node in table
    assert run_probe("stats", appkey, "OtherService", "--json").stdout.strip() == "[]"

    # Slow calls are logged with side, method, node and duration.
    slow_lines = [r.getMessage() for r in caplog.records
                  if r.name == "probe.metrics" and r.getMessage().startswith("slow call")]
    assert any("server side" in line and "DemoService.slow" in line and node in line
               for line in slow_lines), slow_lines
    assert any("client side" in line and "status timeout" in line for line in slow_lines)
    assert not any(".say " in line for line in slow_lines)


def test_a_redis_outage_does_not_fail_calls(fresh_metrics, stack, appkey, providers, clients,
                                            caplog):
    caplog.set_level(logging.WARNING, logger="probe.metrics")
    provider = providers(appkey)
    client = clients(appkey)
    wait_for(lambda: len(client.watcher.table) == 1, message="node in routing table")
    assert metrics.flush_now() is True
    stack.stop("redis")
    try:
        for _ in range(10):
            assert client.say() == "hello world"
        assert metrics.flush_now() is False  # reported, not raised
        assert metrics.flush_now() is False
        warnings = [r for r in caplog.records if "cannot write call stats" in r.getMessage()]
        assert len(warnings) == 1  # one Redis, one sink: logged once, not once a flush
    finally:
        stack.start("redis")
    # The counts of the outage are kept and written by the next flush that works.
    wait_for(metrics.flush_now, timeout=10, message="a flush to succeed again")
    rows = stats_rows(appkey)
    assert rows["say"]["calls"] == 10 and rows["say"]["node"] == provider.address
    assert stats_rows(appkey, "--side", "client")["say"]["by_status"] == {"ok": 10}


def test_stats_keys_expire(fresh_metrics, appkey, providers, clients, redis_client):
    providers(appkey, stats_ttl=120)
    client = clients(appkey)
    wait_for(lambda: len(client.watcher.table) == 1, message="node in routing table")
    for _ in range(3):
        client.add(1, 2)
    assert metrics.flush_now() is True
    keys = list(redis_client.scan_iter(match=stats.stats_pattern("dev", appkey), count=1000))
    sides = {key.decode().split(":")[2] for key in keys}
    assert sides == {"server", "client"}
    for key in keys:
        ttl = redis_client.ttl(key)
        assert 0 < ttl <= (120 if b":server:" in key else stats.DEFAULT_TTL), (key, ttl)


def test_metrics_false_records_nothing(fresh_metrics, appkey, providers, clients):
    port = free_port()
    provider = providers(appkey, metrics=False, metrics_port=port)
    client = clients(appkey, metrics=False)
    wait_for(lambda: len(client.watcher.table) == 1, message="node in routing table")
    assert client.say() == "hello world"
    assert provider.recorder is None and client.recorder is None
    assert "probe_server_requests_total" in fetch(port)  # the families, without a sample
    assert scrape(port, "server") == {} and scrape(port, "client") == {}


def test_metrics_port_from_the_environment(appkey, providers, monkeypatch):
    port = free_port()
    monkeypatch.setenv("PROBE_METRICS_PORT", str(port))
    provider = providers(appkey)
    assert provider.metrics_endpoint.port == port
    assert "probe_server_requests" in urllib.request.urlopen(
        "http://127.0.0.1:%d/metrics" % port, timeout=5).read().decode()
    monkeypatch.setenv("PROBE_METRICS_PORT", "eighty")
    with pytest.raises(ProbeError, match="PROBE_METRICS_PORT"):
        providers(appkey)


def test_metrics_listens_on_loopback_unless_widened(fresh_metrics, appkey, providers,
                                                    monkeypatch):
    port = free_port()
    provider = providers(appkey, metrics_port=port)
    assert provider.metrics_endpoint.addr == "127.0.0.1"
    assert "probe_server_requests" in fetch(port)
    with pytest.raises(OSError):  # bound to 127.0.0.1 only: another address is refused
        fetch(port, host="127.0.0.2")
    # PROBE_METRICS_ADDR widens it (a host's real address, or 0.0.0.0 for every
    # interface); 127.0.0.2 shows the move without listening beyond loopback.
    monkeypatch.setenv("PROBE_METRICS_ADDR", "127.0.0.2")
    other = free_port()
    assert providers(appkey, metrics_port=other).metrics_endpoint.addr == "127.0.0.2"
    assert "probe_server_requests" in fetch(other, host="127.0.0.2")
    with pytest.raises(OSError):
        fetch(other)
    # The option wins over the environment.
    third = free_port()
    assert providers(appkey, metrics_port=third, metrics_addr="127.0.0.1").metrics_endpoint \
        .addr == "127.0.0.1"
    assert "probe_server_requests" in fetch(third)
    monkeypatch.setenv("PROBE_METRICS_ADDR", "every interface")
    with pytest.raises(ProbeError, match="PROBE_METRICS_ADDR"):
        providers(appkey, metrics_port=free_port())


@pytest.mark.parametrize("option", [{"stats_interval": 11}, {"stats_interval": 0},
                                    {"slow_call_ms": -1}, {"metrics_port": 70000},
                                    {"metrics_addr": ""}, {"metrics_addr": "a b"},
                                    {"metrics_addr": "a\n.b"}, {"metrics_addr": "a_b"},
                                    {"metrics_port": "\u0668\u0660\u0668\u0660"},
                                    {"metrics_addr": 8080}])
def test_bad_metrics_options_are_refused(option):
    # metrics_addr is checked as naming checks every host (full match, no '_').
    with pytest.raises(ProbeError):
        metrics.metrics_options(**option)


# -- units: exact under threads, mergeable across processes, percentiles ------------
def test_recording_is_exact_across_threads_even_after_they_end(fresh_metrics):
    recorder = metrics.Recorder("client", "unit_threads", "Svc")
    metrics.attach(recorder)

    def work():
        for index in range(5000):
            recorder.observe("m", "Svc_10.0.0.1_81", "ok" if index % 5 else "timeout", 0.0003)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    mid = metrics.snapshot()["calls"]  # a reader racing the writers must not break them
    for thread in threads:
        thread.join()
    labels = dict(appkey="unit_threads", service="Svc", method="m", node="10.0.0.1:81")
    for _ in range(2):  # the second read comes from the retired totals of dead threads
        made = in_process("client")
        row = ("unit_threads", "Svc", "10.0.0.1:81", "m")
        assert requests(made, "client") == {row + ("ok",): 32000, row + ("timeout",): 8000}
        assert value(made, "probe_client_request_seconds_bucket", le="0.0005", **labels) == 40000
        assert value(made, "probe_client_request_seconds_bucket", le="0.0002", **labels) == 0
    key = ("client", "unit_threads", "Svc", "m", "10.0.0.1:81", "ok")
    assert sum(mid.get(key, [0, 0])[:-1]) <= 32000


NO_IMPORT_HOOKS = r"""
import atexit
import probe.client, probe.server, probe.metrics as metrics
hooks = atexit._ncallbacks()
assert metrics.state._state is None, "importing probe created the metrics state"
metrics.get_recorder("client", "unit_hooks", "Svc")  # first use
assert atexit._ncallbacks() == hooks + 1, "first use registers one exit hook"
first = metrics.process_state()
assert metrics.fresh_state() is not first and metrics.process_state() is not first
assert atexit._ncallbacks() == hooks + 1, "a fresh state adds no hook"
print("ok")
"""


def test_importing_probe_creates_no_state_and_installs_no_hook():
    done = subprocess.run([sys.executable, "-c", NO_IMPORT_HOOKS], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_a_fresh_state_forgets_the_old_one(fresh_metrics, tmp_path):
    assert metrics.process_state() is fresh_metrics
    recorder = metrics.get_recorder("client", "unit_fresh", "Svc")
    metrics.attach(recorder)
    recorder.observe("m", "Svc_10.0.0.1_81", "ok", 0.001)
    metrics.enable_multiprocess(str(tmp_path))  # starts the background thread
    assert requests(in_process(), "client") == {("unit_fresh", "Svc", "10.0.0.1:81", "m", "ok"): 1}
    pump = fresh_metrics.pump.thread
    assert pump is not None and pump.is_alive()

    new = metrics.fresh_state()
    assert new is not fresh_metrics and metrics.process_state() is new
    assert in_process() == {}  # the old collector left the registry
    assert metrics.snapshot(other_processes=True) == {"calls": {}, "inflight": {}}
    assert metrics.get_recorder("client", "unit_fresh", "Svc") is not recorder
    wait_for(lambda: not pump.is_alive(), message="the old state's thread to end")
    assert new.pump.thread is None  # nothing to write yet: no thread


def test_snapshots_of_processes_merge(tmp_path):
    a = metrics.Recorder("server", "unit_merge", "Svc", node="10.0.0.1:81", inflight=lambda: 2)
    b = metrics.Recorder("server", "unit_merge", "Svc", node="10.0.0.1:81", inflight=lambda: 1)
    for seconds in (0.002, 0.02, 3.0):
        a.observe_server("m", "ok", seconds)
    b.observe_server("m", "ok", 0.002)
    b.observe_server("m", "error", 0.002)
    snaps = []
    for recorder in (a, b):
        calls, inflight = {}, {}
        recorder.snapshot_into(calls, inflight)
        snaps.append({"calls": calls, "inflight": inflight})
    merged = metrics.merge(*snaps)
    ok = ("server", "unit_merge", "Svc", "m", "10.0.0.1:81", "ok")
    assert sum(merged["calls"][ok][:-1]) == 4
    assert merged["calls"][ok][-1] == pytest.approx(3.024)
    assert merged["inflight"][("server", "unit_merge", "Svc", "10.0.0.1:81")] == 3

    # Through snapshot files, as pre-fork workers share them: a dead worker's
    # counts stay, its gauge goes.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    metrics.write_snapshot(str(tmp_path), snaps[0], pid=int(dead))
    metrics.write_snapshot(str(tmp_path), snaps[1], pid=1)  # pid 1 is alive
    files = metrics.read_snapshots(str(tmp_path))
    from_files = metrics.merge(*files)
    assert from_files["calls"] == merged["calls"]
    assert from_files["inflight"] == {("server", "unit_merge", "Svc", "10.0.0.1:81"): 1}
    families = {f.name: f for f in metrics.ProbeCollector.families(from_files)}
    samples = {(s.name, s.labels.get("status"), s.labels.get("le")): s.value
               for s in families["probe_server_requests"].samples
               + families["probe_server_request_seconds"].samples}
    assert samples[("probe_server_requests_total", "ok", None)] == 4
    assert samples[("probe_server_requests_total", "error", None)] == 1
    assert samples[("probe_server_request_seconds_count", None, None)] == 5
    assert samples[("probe_server_request_seconds_bucket", None, "0.002")] == 3
    assert samples[("probe_server_request_seconds_bucket", None, "+Inf")] == 5


def test_quantiles_from_buckets():
    buckets = [0] * (len(stats.BOUNDS) + 1)
    assert stats.quantile(buckets, 0.5) is None
    index = stats.BOUNDS.index(0.01)  # (0.005, 0.01]
    buckets[index] = 100
    assert stats.quantile(buckets, 0.5) == pytest.approx(0.0075)
    assert stats.quantile(buckets, 0.99) == pytest.approx(0.00995)
    buckets[-1] = 1000  # beyond the last bound: reported as the last bound
    assert stats.quantile(buckets, 0.99) == stats.BOUNDS[-1]


def test_a_failed_flush_is_merged_into_the_next(monkeypatch):
    """The unit version of the outage: the sink keeps what it could not write."""
    written = []

    def fake_write(client, env, slot, deltas, writer, ttl=None, ttls=None):
        if fail[0]:
            raise OSError("connection refused")
        written.append((slot, {k[3]: sum(v[:-1]) for k, v in deltas.items()}))

    fail = [False]
    monkeypatch.setattr(metrics.sink, "write_slot", fake_write)
    sink = metrics.RedisSink(load_settings_stub(), "dev")
    sink._client = object()
    recorder = metrics.Recorder("client", "unit_sink", "Svc")
    sink.recorders.append(recorder)
    recorder.observe("a", "Svc_10.0.0.1_81", "ok", 0.001)
    assert sink.flush(now=1000) is True
    recorder.observe("a", "Svc_10.0.0.1_81", "ok", 0.001)
    assert sink.flush(now=1005) is True  # same slot: the running total of the slot
    fail[0] = True
    recorder.observe("a", "Svc_10.0.0.1_81", "ok", 0.001)
    assert sink.flush(now=1012) is False
    fail[0] = False
    recorder.observe("a", "Svc_10.0.0.1_81", "ok", 0.001)
    assert sink.flush(now=1021) is True
    assert written == [(1000, {"a": 1}), (1000, {"a": 2}), (1020, {"a": 2})]


def load_settings_stub():
    from probe.settings import RedisSettings
    return RedisSettings("127.0.0.1", 1, None, False, ())


FORKED_WORKERS = r"""
import os, sys, threading
from probe import metrics
directory = sys.argv[1]
recorder = metrics.get_recorder("server", "unit_fork", "Svc", "10.0.0.1:81")
metrics.attach(recorder)
recorder.observe_server("m", "ok", 0.001)  # the parent's own call, before forking
metrics.enable_multiprocess(directory)
children = []
for worker in range(2):
    pid = os.fork()
    if pid == 0:
        def serve():
            for _ in range(1000 * (worker + 1)):
                recorder.observe_server("m", "ok", 0.001)
        thread = threading.Thread(target=serve)
        thread.start()
        thread.join()
        metrics.flush_now()
        os._exit(0)
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
calls = metrics.snapshot(other_processes=True)["calls"]
print(sum(calls[("server", "unit_fork", "Svc", "m", "10.0.0.1:81", "ok")][:-1]))
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_forked_workers_are_summed_by_the_parent(tmp_path):
    done = subprocess.run([sys.executable, "-c", FORKED_WORKERS, str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # 1 call in the parent + 1000 + 2000 in the workers; nothing counted twice.
    assert done.stdout.strip() == "3001"
