"""Reliability details: refusals at start, malformed registry data, failover rules,
outlier ejection, idle connections closed by the server, Redis outages."""

import threading
import time

import pytest
import yaml

from conftest import ADVERTISED_HOST, IDL, close_wait_sockets, gated_handler, wait_for
from faults import ProviderProcess, fresh_zk
from probe import naming
from probe.dev.stack import free_port
from probe.errors import ComponentUnavailable
from probe.stores.nodestore import NodeStore
from probe.zk.session import release_zookeeper, shared_zookeeper
from probe.settings import load_settings


@pytest.fixture
def zk(stack):
    session = shared_zookeeper(load_settings().zookeeper)
    yield session.client
    release_zookeeper(session)


def config_with(tmp_path, section, values):
    config = yaml.safe_load(open(load_settings().path))
    config[section]["dev"].update(values)
    path = str(tmp_path / ("broken-%s.yml" % section))
    yaml.safe_dump(config, open(path, "w"))
    return path


@pytest.mark.parametrize("section, values, component", [
    ("mysql", {"port": None}, "MySQL"),
    ("redis", {"port": None}, "Redis"),
    ("zkserver", {"port": None}, "ZooKeeper"),
])
def test_unreachable_component_refuses_start_and_registers_nothing(
        appkey, tmp_path, zk, section, values, component):
    from demo_server import DemoServiceHandler
    from probe.server import start_service
    dead = free_port()
    values = {key: dead for key in values}
    path = config_with(tmp_path, section, values)
    port = free_port()
    started = time.monotonic()
    with pytest.raises(ComponentUnavailable) as refused:
        start_service(IDL, appkey, "DemoService", DemoServiceHandler("x"), port=port, block=False,
                      config_path=path, connect_timeout=1000)
    assert time.monotonic() - started < 15  # bounded by the connect timeout, never a hang
    assert component in str(refused.value) and str(dead) in str(refused.value)
    parent = naming.appkey_path("dev", appkey)
    assert zk.exists(parent) is None or zk.get_children(parent) == []
    settings = load_settings()
    assert NodeStore(settings.redis, "dev").all(appkey) == {}


def test_malformed_node_data_is_skipped(appkey, providers, clients, zk, caplog):
    provider = providers(appkey, name="good")
    parent = naming.appkey_path("dev", appkey)
    for index, raw in enumerate([b"not json", b'{"host": "10.1.1.1"}', b'{"host": 5, "port": "x"}',
                                 b"[1, 2]"]):
        zk.create("%s/DemoService_10.1.1.%d_%d" % (parent, index, 9000 + index), raw, ephemeral=True)
    client = clients(appkey)
    wait_for(lambda: len(client.watcher.table) == 1, message="the good node")
    assert {client.whoami() for _ in range(50)} == {"good"}
    assert "malformed" in caplog.text
    # A node whose data turns bad later drops out; the rest keep routing.
    zk.set(provider.path, b"{broken")
    wait_for(lambda: len(client.watcher.table) == 0, message="bad data skipped")
    zk.set(provider.path, provider.node_settings.to_bytes())
    wait_for(lambda: len(client.watcher.table) == 1, message="good data back")
    assert client.say() == "hello world"


def test_dead_node_is_ejected_and_calls_fail_over(appkey, providers, clients, zk):
    providers(appkey, name="alive")
    dead_port = free_port()
    ip = ADVERTISED_HOST
    zk.create(naming.node_path("dev", appkey, "DemoService", ip, dead_port),
              naming.NodeSettings(ip, dead_port).to_bytes(), ephemeral=True)
    client = clients(appkey, eject_after=2, eject_backoff=5)  # not idempotent
    wait_for(lambda: len(client.watcher.table) == 2, message="two nodes")
    answers = [client.whoami() for _ in range(300)]
    assert set(answers) == {"alive"}  # connect failures happen before sending: retried
    dead = naming.node_name("DemoService", ip, dead_port)
    assert dead in client.health.ejected()


def test_after_send_failures_retry_only_idempotent_methods(appkey, providers, clients):
    # slow() is held on the providers until the gates open, so every attempt times
    # out, and each handler counts the attempts that reached it.
    handlers = [gated_handler("a"), gated_handler("b")]
    for handler in handlers:
        providers(appkey, handler=handler)

    def attempts():
        return sum(handler.entered for handler in handlers)

    try:
        plain = clients(appkey, socket_timeout=300)
        wait_for(lambda: len(plain.watcher.table) == 2, message="two nodes")
        with pytest.raises(Exception) as timed_out:
            plain.slow(700)
        assert "timed out" in str(timed_out.value).lower()
        wait_for(lambda: attempts() == 1, message="the one slow call on a provider")
        retried = clients(appkey, socket_timeout=300, idempotent=["slow"], retries=2)
        wait_for(lambda: len(retried.watcher.table) == 2, message="two nodes")
        with pytest.raises(Exception):
            retried.slow(700)
        wait_for(lambda: attempts() >= 4, message="1 + 3 attempts on the providers")
    finally:
        for handler in handlers:
            handler.gate.set()
    # A retry of the first call would have been sent a whole timeout before the
    # second client even started: 1 (not idempotent, not retried) + 3 (retried).
    assert attempts() == 4


def test_pooled_connections_survive_a_server_that_drops_idle_ones(appkey, clients, zk):
    """thriftpy2's own server closes idle connections after client_timeout: the
    pool must notice before reuse, so no call fails."""
    import thriftpy2
    from thriftpy2.rpc import make_server
    from demo_server import DemoServiceHandler
    service = thriftpy2.load(IDL, module_name="bare_demo_thrift").DemoService
    port = free_port()
    ip = ADVERTISED_HOST
    server = make_server(service, DemoServiceHandler("bare"), ip, port, client_timeout=300)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    zk.create(naming.node_path("dev", appkey, "DemoService", ip, port),
              naming.NodeSettings(ip, port).to_bytes(), ephemeral=True, makepath=True)
    client = clients(appkey, retries=0)  # no failover: the pool alone must cope
    wait_for(lambda: len(client.watcher.table) == 1, message="bare node")
    for _ in range(4):
        assert client.whoami() == "bare"
        # The server drops the pooled connection after 0.3 s idle: our end of it
        # sits in CLOSE_WAIT until the pool notices.
        wait_for(lambda: close_wait_sockets(port, ip) >= 1, message="the server's idle close")
    server.close()


def test_redis_outage_does_not_stop_serving(appkey, providers, clients, stack):
    providers(appkey, name="a")
    client = clients(appkey)
    wait_for(lambda: len(client.watcher.table) == 1, message="node")
    stack.stop("redis")
    try:
        assert [client.say() for _ in range(100)] == ["hello world"] * 100
    finally:
        stack.start("redis")


def test_configured_log_dir_gets_the_provider_log(appkey, tmp_path, monkeypatch):
    log_dir = tmp_path / "logs"
    config = yaml.safe_load(open(load_settings().path))
    config["logging"] = {"dir": {"dev": str(log_dir)}}
    path = tmp_path / "with-logs.yml"
    yaml.safe_dump(config, open(str(path), "w"))
    monkeypatch.setenv("PROBE_CONFIG", str(path))
    inspector = fresh_zk()
    provider = ProviderProcess(appkey, "logged", free_port(), str(tmp_path))
    try:
        provider.start(inspector)
        assert provider.terminate() == 0
    finally:
        provider.cleanup()
        inspector.stop()
    text = (log_dir / ("%s_DemoService_server.log" % appkey)).read_text()
    assert "serving appkey=%s" % appkey in text and "stopped appkey=%s" % appkey in text


def test_sigterm_right_after_registration_still_deregisters(appkey, tmp_path):
    inspector = fresh_zk()
    try:
        for attempt in range(3):
            provider = ProviderProcess(appkey, "quick%d" % attempt, free_port(), str(tmp_path))
            try:
                provider.start(inspector)  # returns the moment the znode exists
                assert provider.terminate() == 0
                assert inspector.exists(provider.path()) is None
            finally:
                provider.cleanup()
    finally:
        inspector.stop()
