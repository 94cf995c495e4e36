"""The fault suite: four consumer threads on two provider processes while things
break. Every scenario counts calls attempted and failed and asserts zero failed."""

import json
import time

import pytest

from conftest import ADVERTISED_HOST, IDL, SESSION_TIMEOUT, wait_for
from faults import Load, ProviderProcess, fresh_zk
from probe.dev.stack import free_port
from probe.settings import load_settings


@pytest.fixture
def inspector(stack):
    client = fresh_zk()
    yield client
    client.stop()
    client.close()


@pytest.fixture
def pair(appkey, inspector, tmp_path):
    started = []

    def start(name, port=None):
        provider = ProviderProcess(appkey, name, port or free_port(), str(tmp_path))
        started.append(provider)
        return provider.start(inspector)

    a, b = start("a"), start("b")
    yield appkey, a, b, start
    for provider in started:
        provider.cleanup()


def consumer(clients, appkey, **options):
    client = clients(appkey, **options)
    wait_for(lambda: len(client.watcher.table) == 2, message="both providers routed")
    return client


def test_sigterm_on_one_provider_fails_no_call(pair, clients):
    appkey, a, b, _ = pair
    client = consumer(clients, appkey)  # not idempotent: only a clean drain avoids failures
    with Load(client) as load:
        load.wait_seen(["a", "b"])
        assert a.terminate() == 0
        load.reset_seen()
        load.wait_calls(200)
        assert set(load.seen) == {"b"}
    load.report("SIGTERM one provider (non-idempotent calls)")


def test_rolling_restart_under_load_fails_no_call(pair, clients, inspector):
    appkey, a, b, start = pair
    client = consumer(clients, appkey)
    with Load(client) as load:
        for old, name in ((a, "a2"), (b, "b2")):
            load.wait_seen([old.name])
            old.terminate()
            start(name, port=old.port)
            load.reset_seen()
            load.wait_seen([name])
    load.report("rolling restart of both providers (non-idempotent)")


def test_kill_9_with_idempotent_calls_fails_no_call(pair, clients):
    appkey, a, b, _ = pair
    client = consumer(clients, appkey, idempotent=True)
    with Load(client) as load:
        load.wait_seen(["a", "b"])
        a.kill()
        # The dead node's znode lives until its session times out; calls go on.
        wait_for(lambda: len(client.watcher.table) == 1, timeout=SESSION_TIMEOUT + 15,
                 message="dead node gone")
        load.reset_seen()
        load.wait_calls(200)
        assert set(load.seen) == {"b"}
    load.report("kill -9 one provider (idempotent calls)")


def test_kill_9_non_idempotent_calls_before_send_are_retried(pair, clients):
    """Calls that pick the dead node after the kill fail to connect: they were never
    sent, so they fail over even though the method is not idempotent."""
    appkey, a, b, _ = pair
    client = consumer(clients, appkey)
    a.kill()  # returns once the process is gone: its port refuses connections
    answers = [client.whoami() for _ in range(200)]
    assert set(answers) == {"b"}
    dead = list(client.health.ejected())
    assert dead and dead[0].endswith("_%d" % a.port)  # ejected while its znode lives


def test_zookeeper_killed_for_a_few_seconds_fails_no_call(pair, clients, stack):
    appkey, a, b, _ = pair
    client = consumer(clients, appkey)
    with Load(client) as load:
        load.wait_seen(["a", "b"])
        stack.kill("zookeeper")
        time.sleep(2.5)
        assert len(client.watcher.table) == 2  # last known table kept
        stack.start("zookeeper")
        load.reset_seen()
        load.wait_seen(["a", "b"])
        # Same session on reconnect: the consumer still re-reads the service in full.
        wait_for(lambda: client.watcher.resyncs >= 1, message="full resync after reconnect")
    load.report("ZooKeeper killed for 2.5 s")


def test_zookeeper_down_past_session_timeout_reregisters(pair, clients, stack):
    appkey, a, b, _ = pair
    client = consumer(clients, appkey)
    with Load(client) as load:
        load.wait_seen(["a", "b"])
        stack.stop("zookeeper")
        time.sleep(SESSION_TIMEOUT + 1.5)
        stack.start("zookeeper")
        # Sessions expire on the restarted server; providers must register again.
        inspector = fresh_zk()
        try:
            wait_for(lambda: inspector.exists(a.path()) and inspector.exists(b.path()),
                     timeout=30, message="providers registered again")
        finally:
            inspector.stop()
        load.reset_seen()
        load.wait_seen(["a", "b"])
        assert len(client.watcher.table) == 2
    load.report("ZooKeeper down past the session timeout (expiry)")


def test_zookeeper_back_with_data_wiped(pair, clients, stack):
    appkey, a, b, _ = pair
    client = consumer(clients, appkey)
    with Load(client) as load:
        load.wait_seen(["a", "b"])
        stack.stop("zookeeper")
        stack.start("zookeeper", wipe=True)
        inspector = fresh_zk()
        try:
            ip = ADVERTISED_HOST
            wait_for(lambda: inspector.exists(a.path(ip)) and inspector.exists(b.path(ip)),
                     timeout=40, message="providers re-registered on the wiped ZooKeeper")
            # Consumers resynced with the new server: a change there reaches them.
            inspector.set(a.path(ip), json.dumps({"host": ip, "port": a.port, "weight": 10,
                                                  "valid": 0}).encode())
            wait_for(lambda: len(client.watcher.table) == 1, timeout=30,
                     message="consumer watching the wiped ZooKeeper")
            inspector.set(a.path(ip), json.dumps({"host": ip, "port": a.port, "weight": 10,
                                                  "valid": 1}).encode())
        finally:
            inspector.stop()
        wait_for(lambda: len(client.watcher.table) == 2, timeout=30, message="both again")
        load.reset_seen()
        load.wait_seen(["a", "b"])
    load.report("ZooKeeper back with its data wiped")


def test_znode_deleted_by_hand_comes_back(pair, clients, inspector):
    appkey, a, b, _ = pair
    client = consumer(clients, appkey)
    path = a.path()
    with Load(client) as load:
        load.wait_seen(["a", "b"])
        inspector.delete(path)
        wait_for(lambda: inspector.exists(path), message="znode re-created")
        wait_for(lambda: len(client.watcher.table) == 2, message="routed again")
        load.reset_seen()
        load.wait_seen(["a", "b"])
    load.report("provider znode deleted by hand")


def test_consumer_starts_while_zookeeper_is_down(pair, clients, stack, tmp_path):
    appkey, a, b, _ = pair
    snapshots = str(tmp_path / "snap")
    first = consumer(clients, appkey, snapshot_dir=snapshots)
    first.close()
    stack.kill("zookeeper")
    try:
        from probe.client import build_client
        late = build_client(IDL, appkey, "DemoService", snapshot_dir=snapshots, zk_timeout=1)
        try:
            assert late.watcher.stale and len(late.watcher.table) == 2
            with Load(late) as load:
                load.wait_seen(["a", "b"])
                load.wait_calls(200)
            load.report("consumer started while ZooKeeper is down (snapshot)")
        finally:
            stack.start("zookeeper")
            wait_for(lambda: not late.watcher.stale, timeout=30, message="resynced after outage")
            late.close()
    finally:
        if not stack.status()["zookeeper"]["running"]:
            stack.start("zookeeper")


def test_kill_9_and_restart_on_the_same_port(pair, clients, inspector, tmp_path):
    appkey, a, b, _ = pair
    client = consumer(clients, appkey, idempotent=True)
    path = a.path()
    old_owner = inspector.exists(path).ephemeralOwner

    def owner():
        stat = inspector.exists(path)
        return stat.ephemeralOwner if stat else None

    restarted = ProviderProcess(appkey, "a2", a.port, str(tmp_path))
    try:
        with Load(client) as load:
            load.wait_seen(["a", "b"])
            a.kill()
            restarted.start()
            # It registers while the dead session still owns the znode: it takes it over.
            wait_for(lambda: owner() not in (None, old_owner), timeout=20, message="znode taken over")
            load.reset_seen()
            load.wait_seen(["a2", "b"])
            # The dead session's expiry must not take the new node with it. Nothing
            # outside the server shows when a session without a connection expires:
            # wait out its timeout.
            time.sleep(SESSION_TIMEOUT + 1)
            assert owner() not in (None, old_owner)
            load.reset_seen()
            load.wait_seen(["a2"])
        load.report("kill -9 and restart on the same port (idempotent)")
    finally:
        restarted.cleanup()


def test_ensemble_leader_killed_under_load(appkey, clients, tmp_path, monkeypatch):
    import yaml
    from probe import settings as settings_module
    from probe.testing import ZooKeeperEnsemble
    ensemble = ZooKeeperEnsemble(str(tmp_path / "ensemble"))
    ensemble.up()
    started = []
    try:
        config = yaml.safe_load(open(load_settings().path))
        config["zkserver"]["dev"] = {"hosts": ensemble.hosts, "session_timeout": 4}
        path = str(tmp_path / "ensemble.yml")
        yaml.safe_dump(config, open(path, "w"))
        monkeypatch.setenv("PROBE_CONFIG", path)
        settings_module.clear_cache()
        inspector = fresh_zk(ensemble.hosts)
        for name in ("a", "b"):
            started.append(ProviderProcess(appkey, name, free_port(), str(tmp_path)).start(inspector))
        client = consumer(clients, appkey)
        with Load(client) as load:
            load.wait_seen(["a", "b"])
            leader = ensemble.leader()
            ensemble.kill(leader)
            assert ensemble.leader(timeout=30) != leader  # a new one was elected
            wait_for(lambda: all(inspector.exists(p.path()) for p in started), timeout=30,
                     message="nodes still registered")
            load.reset_seen()
            load.wait_seen(["a", "b"])
        inspector.stop()
        load.report("3-node ZooKeeper ensemble, leader killed")
    finally:
        for provider in started:
            provider.cleanup()
        ensemble.down()
        settings_module.clear_cache()


def test_sigterm_while_zookeeper_is_down(pair, clients, stack):
    """The provider cannot deregister: it must still stop promptly, and consumers,
    which still list it, fail over when it refuses connections. Idempotent calls:
    consumers that never heard of the stop may send into a connection the draining
    provider is closing, which a non-idempotent call may not retry."""
    appkey, a, b, _ = pair
    client = consumer(clients, appkey, idempotent=True)
    try:
        with Load(client) as load:
            load.wait_seen(["a", "b"])
            stack.kill("zookeeper")
            assert a.terminate() == 0  # returns: no hang on the unreachable registry
            load.reset_seen()
            load.wait_calls(200)
            assert set(load.seen) == {"b"}
    finally:
        stack.start("zookeeper")
    load.report("SIGTERM while ZooKeeper is down (idempotent)")
