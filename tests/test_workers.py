"""A pre-forked provider (workers=2): one registration, both processes serve, a
dead worker is replaced, SIGTERM drains every worker, /metrics adds them up."""

import os
import time
import urllib.request

import pytest

from conftest import ADVERTISED_HOST, wait_for
from faults import Load, ProviderProcess, fresh_zk
from probe.dev.stack import free_port


@pytest.fixture
def two_workers(appkey, tmp_path, monkeypatch):
    metrics_port = free_port()
    monkeypatch.setenv("PROBE_TEST_WORKERS", "2")
    monkeypatch.setenv("PROBE_TEST_STATS_INTERVAL", "0.5")
    monkeypatch.setenv("PROBE_METRICS_PORT", str(metrics_port))
    inspector = fresh_zk()
    provider = ProviderProcess(appkey, "w", free_port(), str(tmp_path)).start(inspector)
    yield provider, inspector, metrics_port
    provider.cleanup()
    inspector.stop()


def worker_pids(parent):
    """Children of every thread of `parent` (a replacement worker is forked by the
    supervising thread, so it is listed under that thread)."""
    pids = set()
    for task in os.listdir("/proc/%d/task" % parent):
        with open("/proc/%d/task/%s/children" % (parent, task)) as handle:
            pids.update(int(pid) for pid in handle.read().split())
    return pids


def test_two_workers_share_one_registration(appkey, two_workers, clients):
    provider, inspector, metrics_port = two_workers
    assert inspector.get_children("/services/dev/%s" % appkey) == [
        "DemoService_%s_%d" % (ADVERTISED_HOST, provider.port)]
    children = worker_pids(provider.process.pid)
    assert len(children) == 2
    client = clients(appkey)
    wait_for(lambda: len(client.watcher.table) == 1, message="one node")
    # Each new connection lands on whichever worker accepts it: use several.
    seen = set()
    for _ in range(40):
        other = clients(appkey, metrics=False)
        wait_for(lambda: len(other.watcher.table) == 1, message="node")
        seen.add(other.pid())
        other.close()
        if seen == children:
            break
    assert seen == children
    calls = 40
    for _ in range(calls):
        client.say()

    def served_say():
        text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % metrics_port, timeout=5).read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith("probe_server_requests_total{") and 'appkey="%s"' % appkey in line \
                    and 'method="say"' in line and 'status="ok"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return total == calls
    wait_for(served_say, timeout=20, message="parent /metrics adds up the workers")


def test_a_killed_worker_is_replaced(appkey, two_workers, clients):
    provider, inspector, _ = two_workers
    client = clients(appkey, idempotent=True)
    wait_for(lambda: len(client.watcher.table) == 1, message="one node")
    before = worker_pids(provider.process.pid)
    with Load(client) as load:
        load.wait_seen(["w"])
        os.kill(sorted(before)[0], 9)
        wait_for(lambda: len(worker_pids(provider.process.pid) - before) == 1, timeout=10,
                 message="a new worker")
        load.reset_seen()
        load.wait_seen(["w"])
    load.report("workers=2, one worker killed with kill -9 (idempotent)")


def test_sigterm_drains_every_worker(appkey, two_workers, clients):
    provider, inspector, _ = two_workers
    client = clients(appkey)
    wait_for(lambda: len(client.watcher.table) == 1, message="one node")
    children = worker_pids(provider.process.pid)
    assert client.slow(50) == "slept 50 ms"
    assert provider.terminate() == 0
    assert inspector.get_children("/services/dev/%s" % appkey) == []
    time.sleep(0.2)
    for pid in children:
        assert not os.path.exists("/proc/%d" % pid) or \
            open("/proc/%d/stat" % pid).read().split()[2] == "Z"
