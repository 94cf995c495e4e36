"""Live governance against the real stack: weight and switch edits reach a running
consumer, survive a provider restart, are audited, and bad edits write nothing."""

import json
import threading
from collections import Counter

import pytest

from conftest import gated_handler, run_probe, wait_for
from probe import naming
from probe.admin import Admin
from probe.errors import (InvalidNodeAddress, InvalidWeight, NoAvailableNode, UnknownAppkey,
                          UnknownNode)


@pytest.fixture
def admin(stack):
    with Admin() as session:
        yield session


def shares(client, calls=2000):
    return Counter(client.whoami() for _ in range(calls))


def weights_seen(client):
    return {node.name: (node.weight, node.valid) for node in client.watcher.table.all_nodes}


def node_of(client, provider):
    return naming.node_name("DemoService", provider.host, provider.port)


def fully_warmed(client):
    """True once every node of the client's table has its configured weight (a call
    first: the client rebuilds a warming table when it picks)."""
    client.say()
    table = client.watcher.table
    return all(weight == node.weight for node, weight in zip(table.nodes, table.weights))


def test_weight_edit_moves_traffic(appkey, providers, clients, admin):
    a = providers(appkey, name="a")
    providers(appkey, name="b")
    client = clients(appkey)
    wait_for(lambda: len(client.watcher.table) == 2, message="two nodes")
    change = admin.set_weight(appkey, "DemoService", a.address, 30)
    assert change["live"] is True and change["old"] == 10 and change["new"] == 30
    wait_for(lambda: weights_seen(client)[node_of(client, a)] == (30, 1), message="weight 30 seen")
    counts = shares(client, 4000)
    # a has 30 of 40: Binomial(4000, .75), sd 27.4; +-6 sd around 3000.
    assert 2835 <= counts["a"] <= 3165, counts


def test_disable_takes_node_to_zero_and_enable_brings_it_back(appkey, providers, clients, admin):
    a = providers(appkey, name="a")
    providers(appkey, name="b")
    client = clients(appkey)
    wait_for(lambda: len(client.watcher.table) == 2, message="two nodes")
    admin.disable(appkey, "DemoService", a.address)
    wait_for(lambda: weights_seen(client)[node_of(client, a)][1] == 0, message="a disabled")
    assert shares(client, 500) == {"b": 500}
    admin.enable(appkey, "DemoService", a.address)
    wait_for(lambda: weights_seen(client)[node_of(client, a)][1] == 1, message="a enabled")
    assert shares(client, 500)["a"] > 100


def test_all_disabled_or_zero_weight_gives_the_named_error(appkey, providers, clients, admin):
    a = providers(appkey, name="a")
    b = providers(appkey, name="b")
    client = clients(appkey)
    wait_for(lambda: len(client.watcher.table) == 2, message="two nodes")
    admin.disable(appkey, "DemoService", a.address)
    admin.set_weight(appkey, "DemoService", b.address, 0)
    wait_for(lambda: len(client.watcher.table) == 0, message="no eligible node")
    with pytest.raises(NoAvailableNode) as error:
        client.say()
    assert "2 registered" in str(error.value)


def test_calls_in_flight_on_a_disabled_node_finish(appkey, providers, clients, admin):
    handler = gated_handler("a")
    a = providers(appkey, handler=handler)
    client = clients(appkey, socket_timeout=15000)
    wait_for(lambda: len(client.watcher.table) == 1, message="node a")
    outcome = []
    caller = threading.Thread(target=lambda: outcome.append(client.slow(1)))
    caller.start()
    try:
        wait_for(lambda: handler.entered == 1, message="the slow call in flight on a")
        admin.disable(appkey, "DemoService", a.address)
        # The consumer has taken a out of its table while the call is still open.
        wait_for(lambda: len(client.watcher.table) == 0, message="a disabled")
        assert outcome == []
    finally:
        handler.gate.set()
    caller.join(10)
    assert outcome == ["released"]
    with pytest.raises(NoAvailableNode):
        client.say()


def test_settings_survive_a_provider_restart(appkey, providers, clients, admin):
    from probe.dev.stack import free_port
    port = free_port()
    first = providers(appkey, name="a", port=port)
    providers(appkey, name="b")
    admin.disable(appkey, "DemoService", first.address)
    admin.set_weight(appkey, "DemoService", first.address, 70)
    first.stop(grace=0)
    again = providers(appkey, name="a2", port=port)
    data, _ = admin.zk.client.get(again.path)
    assert json.loads(data)["valid"] == 0 and json.loads(data)["weight"] == 70
    client = clients(appkey)
    wait_for(lambda: len(client.watcher.table.all_nodes) == 2, message="both nodes")
    assert shares(client, 300) == {"b": 300}
    admin.enable(appkey, "DemoService", again.address)
    wait_for(lambda: len(client.watcher.table) == 2, message="a2 enabled")
    assert "a2" in shares(client, 300)


def test_change_to_a_down_node_waits_in_redis(appkey, providers, admin):
    from probe.dev.stack import free_port
    port = free_port()
    ip = providers(appkey, name="other").host
    address = "%s:%d" % (ip, port)
    with pytest.raises(UnknownNode):
        admin.set_weight(appkey, "DemoService", address, 40)
    change = admin.set_weight(appkey, "DemoService", address, 40, create=True)
    assert change["live"] is False
    started = providers(appkey, name="late", port=port)
    data, _ = admin.zk.client.get(started.path)
    assert json.loads(data)["weight"] == 40


def _snapshot(admin, appkey, provider):
    field = naming.settings_field(appkey, admin.env, "DemoService", provider.host, provider.port)
    redis_all = admin.nodestore.redis.hgetall(naming.settings_hash(admin.env))
    live = admin.zk.client.get(provider.path)[0]
    return redis_all, live, len(admin.audit(appkey, limit=1000)), field


@pytest.mark.parametrize("address, weight, error", [
    (None, -1, InvalidWeight), (None, 1001, InvalidWeight), (None, "2.5", InvalidWeight),
    (None, "abc", InvalidWeight), (None, 10 ** 12, InvalidWeight),
    ("10.0.0.1", 20, InvalidNodeAddress), ("10.0.0.1:99999", 20, InvalidNodeAddress),
    ("not an address", 20, InvalidNodeAddress), ("10.255.255.1:1", 20, UnknownNode),
])
def test_refused_edits_write_nothing(appkey, providers, admin, address, weight, error):
    provider = providers(appkey)
    before = _snapshot(admin, appkey, provider)
    with pytest.raises(error):
        admin.set_weight(appkey, "DemoService", address or provider.address, weight)
    assert _snapshot(admin, appkey, provider) == before


def test_unknown_appkey_and_service_edits_write_nothing(appkey, providers, admin):
    provider = providers(appkey)
    before = _snapshot(admin, appkey, provider)
    with pytest.raises(UnknownAppkey):
        admin.disable("no_such_appkey_x", "DemoService", provider.address)
    with pytest.raises(UnknownNode):
        admin.disable(appkey, "OtherService", provider.address)
    assert _snapshot(admin, appkey, provider) == before


def test_cli_refusals_and_audit(appkey, providers, admin):
    provider = providers(appkey)
    refused = run_probe("node", "weight", appkey, "DemoService", provider.address, "-5", check=False)
    assert refused.returncode != 0 and "InvalidWeight" in refused.stderr and "-5" in refused.stderr
    done = run_probe("node", "weight", appkey, "DemoService", provider.address, "25", "--by", "alice")
    assert "10 -> 25" in done.stdout
    run_probe("node", "disable", appkey, "DemoService", provider.address, "--by", "bob")
    rows = json.loads(run_probe("audit", appkey, "--json").stdout)
    assert [(r["changed_by"], r["action"], r["old"], r["new"], r["node"]) for r in rows] == [
        ("bob", "valid", "1", "0", provider.address),
        ("alice", "weight", "10", "25", provider.address)]
    listing = run_probe("nodes", appkey, "--json").stdout
    assert [(r["weight"], r["valid"]) for r in json.loads(listing)] == [(25, 0)]


def test_round_robin_client_gives_exact_shares(appkey, providers, clients, admin):
    a = providers(appkey, name="a")
    providers(appkey, name="b")
    admin.set_weight(appkey, "DemoService", a.address, 30)
    client = clients(appkey, balancer="round_robin")
    wait_for(lambda: weights_seen(client).get(node_of(client, a)) == (30, 1), message="weight 30")
    assert shares(client, 400) == {"a": 300, "b": 100}


def test_least_inflight_client_avoids_the_busy_node(appkey, providers, clients):
    busy = gated_handler("busy")
    providers(appkey, handler=busy)
    client = clients(appkey, balancer="least_inflight", socket_timeout=15000)
    wait_for(lambda: len(client.watcher.table) == 1, message="the busy node")
    # Two calls held open on the only node, then an idle node joins at equal weight.
    holders = [threading.Thread(target=client.slow, args=(1,)) for _ in range(2)]
    for thread in holders:
        thread.start()
    try:
        wait_for(lambda: busy.entered == 2, message="two calls in flight on the busy node")
        providers(appkey, name="idle")
        wait_for(lambda: len(client.watcher.table) == 2, message="the idle node")
        # One call at a time: the idle node never has more than 1 in flight, the
        # busy one has 2, so every quick call goes to the idle node.
        assert shares(client, 200) == {"idle": 200}
    finally:
        busy.gate.set()
    for thread in holders:
        thread.join(10)
    # Not busy any more: it gets its share again.
    assert "busy" in shares(client, 200)


def test_warmup_ramps_a_new_nodes_share(appkey, providers, clients):
    providers(appkey, name="old")
    client = clients(appkey, warmup=4)
    wait_for(lambda: len(client.watcher.table) == 1, message="old node")
    wait_for(lambda: fully_warmed(client), message="the old node's own warm-up")
    providers(appkey, name="new")
    wait_for(lambda: len(client.watcher.table) == 2, message="new node")
    early = shares(client, 1000)
    assert early["new"] < 250, early  # ramping from weight 1 of 10
    wait_for(lambda: fully_warmed(client), message="the new node's warm-up")
    late = shares(client, 2000)
    # Warmed up: equal weights, Binomial(2000, .5) sd 22.4; +-6 sd.
    assert 866 <= late["new"] <= 1134, late


def test_appkey_add_and_remove_are_audited_and_a_refused_one_writes_nothing(stack, admin):
    import uuid
    key = "t_audit_%s" % uuid.uuid4().hex[:8]
    refused = run_probe("appkey", "add", key, "--by", "x" * 129, check=False)
    assert refused.returncode != 0 and "changed-by" in refused.stderr
    assert key not in [row["appkey"] for row in admin.list_appkeys()]
    assert admin.audit(key) == []
    run_probe("appkey", "add", key, "--description", "billing", "--by", "carol")
    run_probe("appkey", "remove", key, "--by", "dave")
    rows = json.loads(run_probe("audit", key, "--json").stdout)
    assert [(r["changed_by"], r["action"], r["new"]) for r in rows] == [
        ("dave", "appkey remove", ""), ("carol", "appkey add", "billing")]
