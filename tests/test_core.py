"""The core promise, against the real stack: a provider registers, a consumer
routes by weight through watches, and bad input is refused before anything is done."""

import ipaddress
import json
import threading
import time
from collections import Counter

import pytest

from conftest import ADVERTISED_HOST, IDL, run_probe, wait_for
from probe import naming
from probe.errors import InvalidServiceName, NoAvailableNode, ThriftFileError, UnknownAppkey
from probe.naming import NodeSettings
from probe.stores.nodestore import NodeStore
from probe.zk.session import shared_zookeeper, release_zookeeper
from probe.settings import load_settings


@pytest.fixture
def zk(stack):
    session = shared_zookeeper(load_settings().zookeeper)
    yield session.client
    release_zookeeper(session)


@pytest.fixture
def store(stack):
    settings = load_settings()
    return NodeStore(settings.redis, settings.env)


def test_demo_end_to_end(appkey, providers, clients):
    providers(appkey)
    client = clients(appkey)
    wait_for(lambda: len(client.watcher.table) == 1, message="node in routing table")
    assert client.say() == "hello world"
    assert client.add(2, 40) == 42
    from thriftpy2.thrift import TClient
    assert isinstance(client, TClient)


def test_znode_path_is_ephemeral_and_holds_the_settings_json(appkey, providers, zk, store):
    provider = providers(appkey)
    ip = ADVERTISED_HOST
    assert provider.host == ip
    path = "/services/dev/%s/DemoService_%s_%d" % (appkey, ip, provider.port)
    data, stat = zk.get(path)
    assert stat.ephemeralOwner != 0
    assert json.loads(data) == {"host": ip, "port": provider.port, "weight": 10, "valid": 1}
    field = "%s|dev|DemoService|%s|%d" % (appkey, ip, provider.port)
    assert json.loads(store.redis.hget("thriftprobe_dev", field)) == json.loads(data)
    provider.stop(grace=0)
    assert zk.exists(path) is None


def test_the_test_stacks_providers_advertise_loopback_only(appkey, providers, clients, zk,
                                                          tmp_path):
    """The stack's config says advertise_host: 127.0.0.1, so in-process and separate
    provider processes register 127.0.0.1, and consumers route only to 127.0.0.0/8."""
    from faults import ProviderProcess
    from probe.dev.stack import free_port
    assert load_settings().advertise_host == "127.0.0.1"
    providers(appkey, name="inproc")
    process = ProviderProcess(appkey, "process", free_port(), str(tmp_path))
    try:
        process.start(zk)  # waits for DemoService_127.0.0.1_<port>
        client = clients(appkey)
        wait_for(lambda: len(client.watcher.table) == 2, message="both providers")
        for node in client.watcher.table.all_nodes:
            assert ipaddress.ip_address(node.host).is_loopback, node
            data = json.loads(zk.get(naming.node_path("dev", appkey, "DemoService",
                                                      node.host, node.port))[0])
            assert data["host"] == "127.0.0.1"
        assert {client.whoami() for _ in range(50)} == {"inproc", "process"}
    finally:
        process.cleanup()


def test_advertise_host_override(appkey, providers, zk, monkeypatch):
    # The environment wins over the config's advertise_host (still loopback).
    monkeypatch.setenv("PROBE_ADVERTISE_HOST", "127.0.0.2")
    provider = providers(appkey)
    assert provider.host == "127.0.0.2"
    assert zk.exists("/services/dev/%s/DemoService_127.0.0.2_%d" % (appkey, provider.port))


def test_existing_operator_settings_are_kept(appkey, providers, zk, store):
    from probe.dev.stack import free_port
    port, ip = free_port(), ADVERTISED_HOST
    field = naming.settings_field(appkey, "dev", "DemoService", ip, port)
    store.put(field, NodeSettings(ip, port, weight=30, valid=0))
    providers(appkey, port=port)
    data, _ = zk.get(naming.node_path("dev", appkey, "DemoService", ip, port))
    assert json.loads(data) == {"host": ip, "port": port, "weight": 30, "valid": 0}
    assert store.get(field) == NodeSettings(ip, port, 30, 0)


def test_unknown_appkey_is_refused_and_nothing_is_registered(stack, providers, zk, store):
    from probe.dev.stack import free_port
    port = free_port()
    with pytest.raises(UnknownAppkey) as refused:
        providers("nobody_registered_this", port=port)
    assert "nobody_registered_this" in str(refused.value)
    assert zk.exists("/services/dev/nobody_registered_this") is None or \
        zk.get_children("/services/dev/nobody_registered_this") == []
    assert not [f for f in store.all("nobody_registered_this")]
    import socket
    probe_socket = socket.socket()
    probe_socket.bind(("0.0.0.0", port))  # the refused start left the port free
    probe_socket.close()


@pytest.mark.parametrize("bad", ["", "Demo-Service", "Demo Service", "a/b", None, "DemoService;"])
def test_bad_service_name_is_refused(appkey, bad, zk):
    from probe.server import start_service
    with pytest.raises(InvalidServiceName):
        start_service(IDL, appkey, bad, object(), port=0, block=False)
    parent = "/services/dev/%s" % appkey
    assert zk.exists(parent) is None or zk.get_children(parent) == []


def test_missing_service_or_file_is_refused(appkey):
    from probe.server import start_service
    with pytest.raises(ThriftFileError) as no_service:
        start_service(IDL, appkey, "NoSuchService", object(), port=0, block=False)
    assert "DemoService" in str(no_service.value)
    with pytest.raises(ThriftFileError):
        start_service("/nonexistent/demo.thrift", appkey, "DemoService", object(), port=0, block=False)


def _share(client, calls, method="whoami"):
    return Counter(getattr(client, method)() for _ in range(calls))


def test_equal_nodes_share_traffic_evenly(appkey, providers, clients):
    providers(appkey, name="a")
    providers(appkey, name="b")
    client = clients(appkey)
    wait_for(lambda: len(client.watcher.table) == 2, message="two nodes")
    counts = _share(client, 4000)
    # Binomial(4000, 0.5): sd 31.6, so +-6 sd is 1810..2190.
    assert 1810 <= counts["a"] <= 2190, counts
    assert counts["a"] + counts["b"] == 4000


def test_weights_10_to_30_give_about_one_to_three(appkey, providers, clients, store):
    from probe.dev.stack import free_port
    ip = ADVERTISED_HOST
    light, heavy = free_port(), free_port()
    store.put(naming.settings_field(appkey, "dev", "DemoService", ip, heavy), NodeSettings(ip, heavy, 30, 1))
    providers(appkey, name="light", port=light)
    providers(appkey, name="heavy", port=heavy)
    client = clients(appkey)
    wait_for(lambda: len(client.watcher.table) == 2, message="two nodes")
    counts = _share(client, 4000)
    # Binomial(4000, 0.25): mean 1000, sd 27.4; +-6 sd.
    assert 835 <= counts["light"] <= 1165, counts
    assert counts["light"] + counts["heavy"] == 4000


def test_stopped_provider_disappears_and_calls_move(appkey, providers, clients, zk):
    first = providers(appkey, name="first")
    providers(appkey, name="second")
    client = clients(appkey)
    wait_for(lambda: len(client.watcher.table) == 2, message="two nodes")
    first.stop(grace=0.3)
    assert zk.exists(first.path) is None
    wait_for(lambda: len(client.watcher.table) == 1, message="one node left")
    assert set(_share(client, 200)) == {"second"}


def test_no_node_gives_the_named_error_promptly(appkey, clients):
    client = clients(appkey, socket_timeout=20000)
    started = time.monotonic()
    with pytest.raises(NoAvailableNode) as error:
        client.say()
    # Generous bound: the point is it does not wait out the 20 s socket timeout.
    assert time.monotonic() - started < 5
    assert appkey in str(error.value) and "DemoService" in str(error.value) and "dev" in str(error.value)


def test_one_client_shared_by_eight_threads(appkey, providers, clients):
    providers(appkey, name="a")
    providers(appkey, name="b")
    client = clients(appkey)
    wait_for(lambda: len(client.watcher.table) == 2, message="two nodes")
    errors, wrong = [], []

    def worker(index):
        try:
            for call in range(300):
                text = "t%d-%d" % (index, call)
                if client.echo(text) != text:
                    wrong.append(text)
        except Exception as exc:  # any failure is a test failure below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and wrong == []


def test_cli_appkeys_and_nodes(stack, providers):
    key = "cli_%d" % int(time.time() * 1000)
    assert "added" in run_probe("appkey", "add", key).stdout
    assert key in run_probe("appkey", "list").stdout
    provider = providers(key)
    nodes = run_probe("nodes", key, "--json").stdout
    rows = json.loads(nodes)
    assert [(r["service"], r["address"], r["live"], r["weight"], r["valid"]) for r in rows] == \
        [("DemoService", provider.address, True, 10, 1)]
    assert "removed" in run_probe("appkey", "remove", key).stdout
    assert key not in run_probe("appkey", "list").stdout


def test_build_client_returns_with_the_table_filled(appkey, providers, clients):
    providers(appkey)
    for _ in range(20):
        client = clients(appkey)
        assert len(client.watcher.table) == 1  # no wait: the first listing is in place
        client.close()


def test_a_large_service_is_read_in_one_batch(appkey, clients, zk):
    parent = "/services/dev/%s" % appkey
    zk.ensure_path(parent)
    transaction = zk.transaction()
    for index in range(300):
        port = 10000 + index
        host = "10.9.%d.%d" % (index // 250, index % 250)
        transaction.create("%s/DemoService_%s_%d" % (parent, host, port),
                           NodeSettings(host, port).to_bytes(), ephemeral=True)
    transaction.commit()
    client = clients(appkey, snapshot_dir=False)
    assert len(client.watcher.table) == 300
    assert client.watcher.updates <= 3  # one table for the whole listing, not one per node


def test_consumer_started_before_any_provider_finds_it(appkey, providers, clients):
    client = clients(appkey)
    with pytest.raises(NoAvailableNode):
        client.say()
    providers(appkey, name="late")
    wait_for(lambda: len(client.watcher.table) == 1, message="the late provider")
    assert client.whoami() == "late"
