"""Gray failures on the real stack: a node that stays registered while it hangs,
throws, slows down or speaks something else. Each test counts failed calls,
attempts per node after detection and extra attempts; none judges wall-clock
speed."""

import os
import signal
import socket
import threading
import time
from collections import Counter

import pytest
import thriftpy2
from thriftpy2.rpc import make_client
from thriftpy2.thrift import TApplicationException
from thriftpy2.transport import TTransportException

from conftest import ADVERTISED_HOST, IDL, run_probe, wait_for
from faults import Load, ProviderProcess, fresh_zk
from probe import metrics, naming
from probe.errors import NodeCallFailed, ProbeError
from probe.routing.budget import RetryBudget
from probe.routing.health import HealthPolicy
from probe.rpc.outcomes import OVERLOADED, TIMEOUT
from probe.rpc.overload import OVERLOAD_PREFIX


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def inspector(stack):
    zk = fresh_zk()
    yield zk
    zk.stop()
    zk.close()


class Attempts(object):
    """The client's `observe` hook: every attempt's (node, status), in order."""

    def __init__(self):
        self.items = []  # list.append is atomic
        self.began = []  # (node, perf_counter when the attempt began)

    def __call__(self, method, node, status, seconds):
        self.began.append((node, time.perf_counter() - seconds))
        self.items.append((node, status))

    def started_after(self, node, moment):
        """Attempts on `node` that began after `moment` (perf_counter)."""
        return sum(1 for n, began in list(self.began) if n == node and began > moment)

    def count(self, node=None, status=None, since=0):
        return sum(1 for n, s in self.items[since:]
                   if (node is None or n == node) and (status is None or s == status))


class RawListener(object):
    """A TCP listener registered in ZooKeeper as a DemoService node that is not one:
    `mode="blackhole"` accepts and never answers, `mode="closer"` reads the request
    and closes the connection."""

    def __init__(self, zk, appkey, mode):
        self.mode = mode
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.requests = 0
        self.held = []
        self._stop = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()
        self.name = naming.node_name("DemoService", ADVERTISED_HOST, self.port)
        zk.create(naming.node_path("dev", appkey, "DemoService", ADVERTISED_HOST, self.port),
                  naming.NodeSettings(ADVERTISED_HOST, self.port).to_bytes(), ephemeral=True,
                  makepath=True)

    def _accept(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.mode == "blackhole":
                self.held.append(conn)
                continue
            threading.Thread(target=self._close_after_request, args=(conn,), daemon=True).start()

    def _close_after_request(self, conn):
        conn.settimeout(5)
        try:
            while conn.recv(4096):
                self.requests += 1
                break
        except OSError:
            pass
        conn.close()

    def close(self):
        self._stop = True
        self.sock.close()
        for conn in self.held:
            conn.close()


def routed(client, count):
    wait_for(lambda: len(client.watcher.table) == count, message="%d nodes routed" % count)


def node_of(provider):
    return naming.node_name("DemoService", provider.host, provider.port)


def raising_handler():
    from demo_server import DemoServiceHandler

    class Broken(DemoServiceHandler):
        calls = 0
        fixed = False

        def whoami(self):
            if self.fixed:
                return "fixed"
            Broken.calls += 1
            raise RuntimeError("database is down")
    return Broken("broken")


def sleeping_handler(name, seconds):
    from demo_server import DemoServiceHandler

    class Sleepy(DemoServiceHandler):
        def whoami(self):
            time.sleep(seconds)
            return name
    return Sleepy(name)


# -- a hung node (SIGSTOP, shorter than its ZooKeeper session) -------------------------------

def test_a_hung_node_costs_a_few_calls_not_its_duration(appkey, providers, clients, inspector,
                                                        tmp_path):
    hung = ProviderProcess(appkey, "a", free_port(), str(tmp_path)).start(inspector)
    try:
        providers(appkey, name="b")
        attempts = Attempts()
        client = clients(appkey, socket_timeout=300, observe=attempts)  # not idempotent
        routed(client, 2)
        hung_node = naming.node_name("DemoService", ADVERTISED_HOST, hung.port)
        with Load(client, threads=4) as load:
            load.wait_seen(["a", "b"])
            os.kill(hung.process.pid, signal.SIGSTOP)
            try:
                wait_for(lambda: hung_node in client.health.ejected(), message="ejection")
                detected = time.perf_counter()
                load.reset_seen()
                load.wait_calls(2000)
                # Still stopped (its session outlives this): the znode is still there.
                assert inspector.exists(hung.path())
                after = attempts.started_after(hung_node, detected)
            finally:
                os.kill(hung.process.pid, signal.SIGCONT)
            failed = load.failed
            errors = list(load.errors)
        # After the ejection only half-open probes (one at a time) went to it.
        assert after <= client.health.ejections
        assert failed <= 3 * 4, errors  # at most 3 failed calls per calling thread
        assert any("NodeCallFailed" in e and hung_node in e and "whoami" in e for e in errors)
        # Once it answers again a probe re-admits it and it gets calls again.
        def readmitted():
            try:
                client.whoami()
            except TTransportException:
                pass  # the half-open probe may still time out on the late replies
            return client.health.readmissions >= 1
        wait_for(readmitted, timeout=40, message="re-admission")
        before = attempts.count(hung_node)
        wait_for(lambda: client.whoami() and attempts.count(hung_node) > before, timeout=20,
                 message="calls reach the re-admitted node")
    finally:
        hung.cleanup()


# -- a node whose every call raises ------------------------------------------------------------

def test_a_node_that_raises_on_every_call_is_ejected(appkey, providers, clients):
    broken = raising_handler()
    bad = providers(appkey, handler=broken)
    providers(appkey, name="good")
    attempts = Attempts()
    client = clients(appkey, observe=attempts)
    routed(client, 2)
    failed = 0
    for _ in range(600):
        try:
            assert client.whoami() == "good"
        except TApplicationException as exc:
            assert exc.type == TApplicationException.INTERNAL_ERROR
            failed += 1
    # 3 in a row eject it; after that only failed half-open probes reach it.
    assert broken.calls == failed
    assert 3 <= failed <= 2 + client.health.ejections
    assert node_of(bad) in client.health.ejected()


def test_declared_exceptions_never_eject(appkey, providers, clients):
    providers(appkey, name="a")
    providers(appkey, name="b")
    client = clients(appkey)
    routed(client, 2)
    demo = client.thrift_module
    for _ in range(100):
        with pytest.raises(demo.DemoError):
            client.fail("declared")
    assert client.health.ejected() == {} and client.health.ejections == 0


def test_arguments_that_do_not_encode_are_the_callers_fault_not_the_nodes(appkey, providers,
                                                                          clients):
    # echo() takes a string: an int fails while the request is encoded. That is no
    # answer from the node, so health must not count it, and the next call works.
    providers(appkey, name="a")
    providers(appkey, name="b")
    client = clients(appkey)
    routed(client, 2)
    for _ in range(20):
        with pytest.raises(Exception) as raised:
            client.echo(123)
        assert not isinstance(raised.value, (NodeCallFailed, ProbeError))
    assert client.health.ejected() == {} and client.health.ejections == 0
    assert not client.health.panic
    assert client.echo("still fine") == "still fine"


# -- a slow node --------------------------------------------------------------------------------

def test_a_slow_node_gets_a_small_share(appkey, providers, clients):
    slow = providers(appkey, handler=sleeping_handler("slow", 0.05))
    providers(appkey, name="fast")
    attempts = Attempts()
    client = clients(appkey, observe=attempts)
    routed(client, 2)
    slow_node = node_of(slow)
    with Load(client, threads=4) as load:
        wait_for(lambda: slow_node in client.health.factors(), message="the slow node scaled down")
        start = len(attempts.items)
        load.reset_seen()
        load.wait_calls(2000)
        share = attempts.count(slow_node, since=start) / float(len(attempts.items) - start)
    assert load.failed == 0
    assert share <= 0.2  # by weighted random over health-scaled weights


def test_p2c_ewma_sends_little_to_a_slow_node(appkey, providers, clients):
    slow = providers(appkey, handler=sleeping_handler("slow", 0.05))
    providers(appkey, name="fast")
    attempts = Attempts()
    client = clients(appkey, observe=attempts, balancer="p2c_ewma")
    routed(client, 2)
    answers = Counter(client.whoami() for _ in range(600))
    assert answers["fast"] >= 0.8 * 600 and attempts.count(node_of(slow)) < 0.2 * 600


# -- listeners that are not thrift servers ---------------------------------------------------

def test_a_listener_that_never_answers(appkey, providers, clients, inspector):
    providers(appkey, name="good")
    hole = RawListener(inspector, appkey, "blackhole")
    try:
        attempts = Attempts()
        client = clients(appkey, socket_timeout=100, observe=attempts)
        routed(client, 2)
        failures = []
        for _ in range(300):
            try:
                assert client.whoami() == "good"
            except NodeCallFailed as exc:
                failures.append(exc)
        assert failures and all(f.node == hole.name and f.method == "whoami"
                                and f.type == TTransportException.TIMED_OUT for f in failures)
        timeouts = attempts.count(hole.name, TIMEOUT)
        assert len(failures) == timeouts <= 2 + client.health.ejections
        # An idempotent method retries elsewhere: every call succeeds.
        idem = clients(appkey, socket_timeout=100, idempotent=True, observe=Attempts())
        routed(idem, 2)
        assert all(idem.whoami() == "good" for _ in range(300))
        assert idem.observe.count(hole.name) <= 2 + idem.health.ejections
    finally:
        hole.close()


def test_a_listener_that_closes_after_the_request(appkey, providers, clients, inspector):
    providers(appkey, name="good")
    closer = RawListener(inspector, appkey, "closer")
    try:
        attempts = Attempts()
        client = clients(appkey, idempotent=True, observe=attempts)
        routed(client, 2)
        calls = 400
        assert all(client.whoami() == "good" for _ in range(calls))
        wasted = attempts.count(closer.name)
        assert 3 <= wasted <= 2 + client.health.ejections  # a wasted attempt each, until ejected
        assert len(attempts.items) == calls + wasted
        plain = clients(appkey)  # not idempotent: the caller sees which node failed
        routed(plain, 2)
        failures = []
        for _ in range(200):
            try:
                plain.whoami()
            except TTransportException as exc:  # still catchable as the transport error
                failures.append(exc)
        assert failures and all(isinstance(f, NodeCallFailed) and closer.name in str(f)
                                and "DemoService" in str(f) for f in failures)
        assert len(failures) <= 2 + plain.health.ejections
    finally:
        closer.close()


# -- every node failing: panic mode, and the retry budget bounds extra attempts ---------------

def test_every_node_failing_panics_and_the_budget_bounds_retries(appkey, clients, inspector):
    closers = [RawListener(inspector, appkey, "closer") for _ in range(2)]
    try:
        attempts = Attempts()
        client = clients(appkey, idempotent=True, observe=attempts,
                         retry_budget=RetryBudget(percent=20, min_per_second=10))
        routed(client, 2)
        started = time.monotonic()
        calls = 600
        for _ in range(calls):
            with pytest.raises(NodeCallFailed):
                client.whoami()
        elapsed = time.monotonic() - started
        assert client.health.panic and client.health.panics >= 1
        extra = len(attempts.items) - calls
        # 20% of the calls + 10/s + the 10 a new budget starts with (not 2 retries a call).
        assert extra <= 0.2 * calls + 10 * elapsed + 10 + 1
        assert client.budget_exhausted >= calls - extra
        # Panic mode routes across both nodes.
        assert {node for node, _ in attempts.items[-100:]} == {c.name for c in closers}
    finally:
        for closer in closers:
            closer.close()


# -- overload replies -----------------------------------------------------------------------

def counting_handler(name, gate=None):
    from demo_server import DemoServiceHandler

    class Counting(DemoServiceHandler):
        def __init__(self):
            super().__init__(name)
            self.whoami_calls = 0
            self.lock = threading.Lock()

        def whoami(self):
            with self.lock:
                self.whoami_calls += 1
            return name

        def slow(self, millis):
            gate.wait(30)
            return "released"
    return Counting()


def test_overloaded_replies_are_retried_elsewhere_and_never_run_twice(appkey, providers, clients,
                                                                      fresh_metrics):
    gate = threading.Event()
    busy_handler = counting_handler("busy", gate)
    busy = providers(appkey, handler=busy_handler, max_inflight=1)
    # Not idempotent. The held slow() call must not time out while the attempts are
    # counted (on a loaded machine 300 calls can take longer than 500 ms).
    client = clients(appkey, metrics_port=0, timeouts={"slow": 30000})
    routed(client, 1)
    holder = threading.Thread(target=client.slow, args=(1,))
    holder.start()  # takes the busy node's only slot
    try:
        wait_for(lambda: busy.server.inflight == 1, message="the slot taken")
        # Any other client sees a TApplicationException naming overload.
        direct = make_client(client.thrift_module.DemoService, "127.0.0.1", busy.port)
        with pytest.raises(TApplicationException) as caught:
            direct.whoami()
        direct.close()
        assert caught.value.type == TApplicationException.INTERNAL_ERROR
        assert caught.value.message.startswith(OVERLOAD_PREFIX) and "overloaded" in str(caught.value)
        free_handler = counting_handler("free")
        providers(appkey, handler=free_handler)
        routed(client, 2)
        attempts = Attempts()
        client.observe = attempts
        calls = 300
        answers = [client.whoami() for _ in range(calls)]
        seen = len(attempts.items)  # before the held slow() call ends
    finally:
        gate.set()
        holder.join(10)
    assert answers == ["free"] * calls  # nothing failed
    assert busy_handler.whoami_calls == 0 and free_handler.whoami_calls == calls  # ran once each
    overloaded = attempts.count(node_of(busy), OVERLOADED)
    assert overloaded >= 1 and seen == calls + overloaded  # one extra attempt per overload
    assert busy.server.stats()["overloaded"] == overloaded + 1  # + the direct client's
    assert client.health.overloads == overloaded and client.health.ejected() == {}
    import urllib.request
    text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % client.metrics_endpoint.port,
                                  timeout=10).read().decode()
    assert 'probe_client_overload_replies_total{appkey="%s",service="DemoService"} %d.0' % (
        appkey, overloaded) in text


def test_per_method_overload_cap_and_option_checks(appkey, providers):
    with pytest.raises(ProbeError, match="unknown methods nope"):
        providers(appkey, max_inflight_per_method={"nope": 1})
    with pytest.raises(ProbeError, match="max_inflight"):
        providers(appkey, max_inflight=0)
    gate = threading.Event()
    provider = providers(appkey, handler=counting_handler("p", gate),
                         max_inflight_per_method={"slow": 1})
    service = thriftpy2.load(IDL, module_name="gray_demo_thrift").DemoService
    first = make_client(service, "127.0.0.1", provider.port, timeout=10000)
    holder = threading.Thread(target=first.slow, args=(1,))
    holder.start()
    try:
        wait_for(lambda: provider.server.inflight == 1, message="slow() running")
        second = make_client(service, "127.0.0.1", provider.port)
        with pytest.raises(TApplicationException, match="max_inflight_per_method 1"):
            second.slow(1)
        assert second.whoami() == "p"  # other methods are not capped
        second.close()
    finally:
        gate.set()
        holder.join(10)
        first.close()


# -- per-method timeouts, options -------------------------------------------------------------

def test_per_method_timeouts_override_the_socket_timeout(appkey, providers, clients):
    providers(appkey, name="a")
    client = clients(appkey, socket_timeout=100, timeouts={"slow": 3000})
    routed(client, 1)
    assert client.slow(300) == "slow:300" or client.slow(300)
    assert client.say() == "hello world"
    other = clients(appkey, socket_timeout=100)
    routed(other, 1)
    with pytest.raises(NodeCallFailed) as caught:
        other.slow(300)
    assert caught.value.type == TTransportException.TIMED_OUT and "slow" in str(caught.value)


@pytest.mark.parametrize("options, message", [
    ({"timeouts": {"nope": 100}}, "unknown methods nope"),
    ({"timeouts": {"slow": 0}}, "timeouts"),
    ({"timeouts": [("slow", 1)]}, "timeouts"),
    ({"health": "yes"}, "health"),
    ({"retry_budget": 5}, "retry_budget"),
    ({"balancer": "p2c_ewma", "health": False}, "p2c_ewma"),
    ({"health": HealthPolicy(), "eject_after": 0}, "eject_after"),
])
def test_bad_health_options_are_refused_by_name(appkey, clients, options, message):
    with pytest.raises(ProbeError, match=message):
        clients(appkey, **options)


def test_eject_after_and_backoff_map_onto_the_policy(appkey, clients):
    client = clients(appkey, eject_after=7, eject_backoff=2.5)
    assert client.health.policy.consecutive_failures == 7
    assert client.health.policy.base_ejection_s == 2.5
    off = clients(appkey, health=False)
    assert off.health is None


# -- visible: metrics, probe nodes ----------------------------------------------------------

def test_ejections_show_in_metrics_and_probe_nodes(appkey, providers, clients, fresh_metrics):
    bad = providers(appkey, handler=raising_handler())
    providers(appkey, name="good")
    client = clients(appkey, metrics_port=0, stats_interval=0.2)
    routed(client, 2)
    for _ in range(50):
        try:
            client.whoami()
        except TApplicationException:
            pass
    assert node_of(bad) in client.health.ejected()
    import urllib.request
    text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % client.metrics_endpoint.port,
                                  timeout=10).read().decode()
    labels = 'appkey="%s",service="DemoService"' % appkey
    assert "probe_client_ejections_total{%s} 1.0" % labels in text
    assert "probe_client_panic{%s} 0.0" % labels in text
    assert 'probe_client_node_ejected{appkey="%s",node="127.0.0.1:%d",service="DemoService"} 1.0' \
        % (appkey, bad.port) in text
    metrics.flush_now()
    done = run_probe("nodes", appkey)
    line = next(l for l in done.stdout.splitlines() if ":%d" % bad.port in l)
    assert "ejected by 1 consumer(s)" in line and "consecutive failures" in line
    import json
    rows = json.loads(run_probe("nodes", appkey, "--json").stdout)
    by_port = {row["address"]: row for row in rows}
    assert by_port["127.0.0.1:%d" % bad.port]["ejected_by"] == 1
    assert all(row["ejected_by"] == 0 for addr, row in by_port.items()
               if addr != "127.0.0.1:%d" % bad.port)


def test_fleet_health_reports_are_cleared_on_readmission_and_checked(appkey, providers, clients,
                                                                    fresh_metrics):
    from probe.stores.nodestore import connect_redis
    from probe.settings import load_settings
    from probe.stores.stats import read_node_health
    redis_client = connect_redis(load_settings().redis)
    broken = raising_handler()
    bad = providers(appkey, handler=broken)
    providers(appkey, name="good")
    client = clients(appkey, stats_interval=0.2,
                     health=HealthPolicy(base_ejection_s=0.2, max_ejection_s=0.2))
    routed(client, 2)
    for _ in range(20):
        try:
            client.whoami()
        except TApplicationException:
            pass
    key = ("DemoService", "127.0.0.1:%d" % bad.port)
    metrics.flush_now()
    assert list(read_node_health(redis_client, "dev", appkey)) == [key]
    # Untrusted entries: malformed or stale ones are skipped, never raise.
    hash_key = naming.health_key("dev", appkey)
    redis_client.hset(hash_key, mapping={"garbage": "{", "DemoService|1.2.3.4:5|w": "[]",
                                         "DemoService|1.2.3.4:6|w": '{"reason": "x", "at": 0}'})
    assert list(read_node_health(redis_client, "dev", appkey)) == [key]
    # The handler is fixed: a half-open probe re-admits the node, the report goes.
    broken.fixed = True
    wait_for(lambda: client.whoami() and client.health.readmissions >= 1, timeout=20,
             message="re-admission")
    metrics.flush_now()
    assert read_node_health(redis_client, "dev", appkey) == {}
