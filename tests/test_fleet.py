"""Fleet scale: what a change costs a consumer is in proportion to what changed
(counted in ZooKeeper reads, listings and table swaps, never timed), a burst is
one swap, nothing is lost from the table, and the local snapshot/backup files are
trusted only when they are this user's alone (ssh's StrictModes)."""

import json
import logging
import os
import random
import stat

import pytest
from kazoo.client import KazooClient

from conftest import wait_for
from probe import naming
from probe.routing.balancer import Node, RoutingTable, WeightedRandom
from probe.errors import UntrustedFile
from probe.naming import NodeSettings
from probe.routing.watcher import ServiceWatcher, snapshot_file
from probe.zk.session import ZooKeeper
from probe.settings import load_settings
from probe.zk import snapshot


# -- the routing table, derived one change at a time (pure) -------------------------------

def _node(i, weight=10, valid=1):
    return Node("S_10.0.%d.%d_%d" % (i // 250, i % 250, 9000 + i), "10.0.%d.%d" % (i // 250, i % 250),
                9000 + i, weight, valid, 0.0)


def _same(a, b):
    assert a.all_nodes == b.all_nodes and a.names == b.names
    assert a.nodes == b.nodes and a.weights == b.weights and a.total == b.total
    assert a.index == b.index and a.cumulative == b.cumulative


def test_updated_table_equals_a_fresh_build_after_random_changes():
    rng = random.Random(7)
    nodes = {i: _node(i, rng.randint(0, 20)) for i in range(300)}
    table = RoutingTable(nodes.values())
    for _ in range(500):
        i = rng.randrange(400)
        if i in nodes and rng.random() < 0.3:
            del nodes[i]
            table = table.updated(removed=[_node(i).name])
        else:
            nodes[i] = _node(i, rng.randint(0, 20), rng.choice((0, 1, 1)))
            table = table.updated([nodes[i]])
        _same(table, RoutingTable(nodes.values()))
    # Removing a name the table does not hold changes nothing.
    _same(table.updated(removed=["S_nothing_1"]), table)
    assert table.node_named(nodes[next(iter(nodes))].name) == nodes[next(iter(nodes))]
    assert table.node_named("S_nothing_1") is None


def test_bisect_pick_follows_weights_after_an_update():
    table = RoutingTable([_node(i, 10) for i in range(4)]).updated([_node(2, 70)])
    picker = WeightedRandom(random.Random(3))
    counts = {}
    for _ in range(20000):
        name = picker.pick(table).name
        counts[name] = counts.get(name, 0) + 1
    assert 0.66 < counts[_node(2).name] / 20000.0 < 0.74
    assert set(counts) == {_node(i).name for i in range(4)}


# -- the one snapshot/backup file writer and reader ---------------------------------------

def test_snapshot_files_are_private_and_no_temp_file_is_left(tmp_path):
    path = str(tmp_path / "root" / "dev" / "app" / "S.json")
    snapshot.write_json(path, {"nodes": [1, 2]})
    assert snapshot.read_json(path, 1000, str(tmp_path / "root")) == {"nodes": [1, 2]}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    for folder in ("root", "root/dev", "root/dev/app"):
        assert stat.S_IMODE(os.stat(str(tmp_path / folder)).st_mode) == 0o700
    with pytest.raises(TypeError):
        snapshot.write_json(path, {"bad": object()})
    assert os.listdir(os.path.dirname(path)) == ["S.json"]  # the failed write left nothing
    assert snapshot.read_json(path, 1000) == {"nodes": [1, 2]}  # and the old file is intact
    with pytest.raises(ValueError):
        snapshot.read_json(path, 5)


def test_the_writer_writes_a_burst_once_off_the_calling_thread(tmp_path):
    writer = snapshot.SnapshotWriter(delay=0.2)
    path = str(tmp_path / "w" / "s.json")
    for i in range(50):
        writer.schedule(path, lambda i=i: {"n": i})
    wait_for(lambda: os.path.exists(path), message="the write")
    assert writer.writes == 1 and json.load(open(path)) == {"n": 49}  # the latest wins
    writer.schedule(path, lambda: None)  # None: nothing to write (stale data)
    writer.flush(path)
    assert writer.writes == 1
    writer.schedule(path, lambda: {"n": 50})
    writer.flush(path)  # close(): a pending write is done now, on the caller's thread
    assert writer.writes == 2 and json.load(open(path)) == {"n": 50}


def _plant(root, path, document, how):
    snapshot.write_json(path, document)
    if how == "foreign":
        assert os.geteuid() == 0, "planting a file owned by another uid needs root (os.chown)"
        os.chown(path, 12345, 12345)
    elif how == "0666":
        os.chmod(path, 0o666)
    elif how == "0777":
        os.chmod(root, 0o777)


@pytest.mark.parametrize("how", ["foreign", "0666", "0777"])
def test_untrusted_files_are_refused(tmp_path, how):
    root = str(tmp_path / "root")
    path = os.path.join(root, "dev", "a.json")
    _plant(root, path, {"values": {}}, how)
    with pytest.raises(UntrustedFile):
        snapshot.read_json(path, 1000, root)


@pytest.mark.parametrize("how", ["foreign", "0666", "0777"])
def test_a_planted_config_backup_is_not_served(stack, appkey, tmp_path, caplog, how):
    from probe.configcenter import live_config
    root = str(tmp_path / "backups")
    path = naming.config_backup_file(root, "dev", appkey)
    _plant(root, path, {"env": "dev", "appkey": appkey, "values": {"db.url": "evil"}}, how)
    with caplog.at_level(logging.WARNING, logger="probe.configcenter"):
        # ZooKeeper answers but has no config for this appkey: the backup would be read.
        cfg = live_config(appkey, backup_dir=root)
    try:
        assert dict(cfg) == {} and "db.url" not in cfg
        warnings = [r for r in caplog.records if "UntrustedFile" in r.getMessage()]
        assert len(warnings) == 1 and path in warnings[0].getMessage()
    finally:
        cfg.close()


@pytest.mark.parametrize("how", ["foreign", "0666", "0777"])
def test_a_planted_routing_snapshot_is_not_served(stack, appkey, tmp_path, caplog, how):
    root = str(tmp_path / "snapshots")
    path = snapshot_file(root, "dev", appkey, "DemoService")
    evil = NodeSettings("127.0.0.1", 9).to_json()
    node = dict(json.loads(evil), name=naming.node_name("DemoService", "127.0.0.1", 9))
    _plant(root, path, {"written_at": 0, "nodes": [node]}, how)
    zk = ZooKeeper("127.0.0.1:1", session_timeout=2.0)  # nothing listens: start on the snapshot
    zk.start(timeout=0.2, keep_trying=True)
    try:
        with caplog.at_level(logging.WARNING, logger="probe.registry"):
            watcher = ServiceWatcher(zk, "dev", appkey, "DemoService", snapshot_dir=root)
            watcher.start()
        assert watcher.table.all_nodes == ()
        warnings = [r for r in caplog.records if "UntrustedFile" in r.getMessage()]
        assert len(warnings) == 1
        watcher.close()
    finally:
        zk.stop()


# -- the mirror engine against the real ZooKeeper -----------------------------------------

@pytest.fixture
def writer(stack):
    client = KazooClient(hosts=load_settings().zookeeper.hosts, timeout=10)
    client.start(20)
    yield client
    client.stop()
    client.close()


@pytest.fixture
def watch_service(stack):
    made = []

    def watch(appkey, **options):
        zk = ZooKeeper(load_settings().zookeeper.hosts, session_timeout=3.0)
        zk.start()
        watcher = ServiceWatcher(zk, "dev", appkey, "DemoService", snapshot_dir=False, **options)
        watcher.start()
        made.append((zk, watcher))
        return watcher

    yield watch
    for zk, watcher in made:
        watcher.close()
        zk.stop()


def _fleet(writer, appkey, count, weight=0, service="DemoService"):
    """Register `count` nodes (weight 0 by default) in one transaction; their names."""
    parent = naming.appkey_path("dev", appkey)
    writer.ensure_path(parent)
    names = []
    transaction = writer.transaction()
    for i in range(count):
        host, port = "10.20.%d.%d" % (i // 250, i % 250), 20000 + i
        name = naming.node_name(service, host, port)
        transaction.create(parent + "/" + name, NodeSettings(host, port, weight=weight).to_bytes(),
                           ephemeral=True)
        names.append(name)
    assert all(not isinstance(r, Exception) for r in transaction.commit())
    return parent, names


def _truth(writer, parent, service="DemoService"):
    nodes = {}
    for name in writer.get_children(parent):
        if naming.is_node_of(name, service):
            settings = NodeSettings.from_json(writer.get(parent + "/" + name)[0])
            nodes[name] = (settings.weight, settings.valid)
    return nodes


def _table(watcher):
    return {n.name: (n.weight, n.valid) for n in watcher.table.all_nodes}


def test_a_burst_of_new_nodes_is_one_swap_and_a_data_edit_reads_one_node(writer, watch_service, appkey):
    watcher = watch_service(appkey)
    mirror = watcher.mirror
    updates = watcher.updates
    parent, names = _fleet(writer, appkey, 500)
    wait_for(lambda: len(watcher.table.all_nodes) == 500, message="500 nodes")
    assert watcher.updates == updates + 1  # the whole transaction: one table swap
    assert mirror.reads == 500
    # One data edit: one read, no listing, one swap; every other node is still there.
    reads, listings, updates = mirror.reads, mirror.listings, watcher.updates
    target = names[123]
    writer.set(parent + "/" + target, NodeSettings("10.20.0.123", 20123, weight=77).to_bytes())
    wait_for(lambda: _table(watcher)[target] == (77, 1), message="the edit applied")
    assert mirror.reads == reads + 1 and mirror.listings == listings
    assert watcher.updates == updates + 1
    assert _table(watcher) == _truth(writer, parent)


def test_a_restart_reads_only_the_restarted_node(writer, watch_service, appkey):
    watcher = watch_service(appkey)
    parent, names = _fleet(writer, appkey, 300)
    wait_for(lambda: len(watcher.table.all_nodes) == 300, message="300 nodes")
    mirror = watcher.mirror
    reads = mirror.reads
    target = names[7]
    data = writer.get(parent + "/" + target)[0]
    writer.delete(parent + "/" + target)
    wait_for(lambda: target not in _table(watcher), message="the node gone")
    writer.create(parent + "/" + target, data, ephemeral=True)
    wait_for(lambda: target in _table(watcher), message="the node back")
    # The deletion's check and the new node's read: nothing else is read again.
    assert mirror.reads - reads == 2
    assert _table(watcher) == _truth(writer, parent)


def test_nothing_is_lost_through_churn(writer, watch_service, appkey):
    watcher = watch_service(appkey)
    parent, names = _fleet(writer, appkey, 200, weight=10)
    # Another service's nodes under the same appkey are listed but never read.
    _fleet(writer, appkey, 50, service="OtherService")
    wait_for(lambda: len(watcher.table.all_nodes) == 200, message="200 nodes")
    rng = random.Random(11)
    for step in range(120):
        name = rng.choice(names)
        path = parent + "/" + name
        settings = naming.parse_node_name(name)
        roll = rng.random()
        if roll < 0.5:
            if writer.exists(path):
                writer.set(path, NodeSettings(settings.ip, settings.port,
                                              weight=rng.randint(0, 50)).to_bytes())
        elif roll < 0.75:
            if writer.exists(path):
                writer.delete(path)
        else:
            if not writer.exists(path):
                writer.create(path, NodeSettings(settings.ip, settings.port,
                                                 weight=rng.randint(0, 50)).to_bytes(),
                              ephemeral=True)
    truth = _truth(writer, parent)
    wait_for(lambda: _table(watcher) == truth, timeout=20, message="the table equal to ZooKeeper")
    # The table was derived change by change; it equals one built from scratch.
    _same(watcher.table, RoutingTable(watcher.table.all_nodes))
    assert all(naming.is_node_of(n, "DemoService") for n in watcher.mirror.known())


def test_build_client_with_2000_registered_nodes_calls_at_once(writer, appkey, providers, clients):
    providers(appkey, name="real")
    parent, _ = _fleet(writer, appkey, 2000)
    client = clients(appkey, snapshot_dir=False)
    assert client.whoami() == "real"  # routable when build_client returned
    wait_for(lambda: client.watcher.mirror.ready, message="the whole first listing")
    assert len(client.watcher.table.all_nodes) == 2001
    # Handed over in chunks of 256 reads at most, then the rest in one batch.
    assert client.watcher.updates <= 2001 // 256 + 2
    assert _table(client.watcher) == _truth(writer, parent)


def test_a_big_service_starts_from_the_snapshot_and_reconciles(writer, appkey, providers, clients,
                                                               tmp_path):
    providers(appkey, name="real")
    parent, names = _fleet(writer, appkey, 2000)
    snapshots = str(tmp_path / "snapshots")
    first = clients(appkey, snapshot_dir=snapshots)
    wait_for(lambda: first.watcher.mirror.ready and len(first.watcher.table.all_nodes) == 2001,
             message="the first consumer's table")
    first.close()  # writes its snapshot now
    assert os.path.exists(snapshot_file(snapshots, "dev", appkey, "DemoService"))
    # The registry moves on while no consumer runs: one node leaves, one joins.
    writer.delete(parent + "/" + names[5])
    joined = naming.node_name("DemoService", "10.21.0.1", 21000)
    writer.create(parent + "/" + joined, NodeSettings("10.21.0.1", 21000, weight=0).to_bytes(),
                  ephemeral=True)
    second = clients(appkey, snapshot_dir=snapshots)
    assert second.whoami() == "real"
    wait_for(lambda: second.watcher.mirror.ready and not second.watcher.stale,
             message="the listing complete")
    table = _table(second.watcher)
    assert names[5] not in table and joined in table
    assert table == _truth(writer, parent)
