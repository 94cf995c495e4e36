"""Hostile registry data and hostile admin input, against the real stack.

Znodes written straight into ZooKeeper, a doctored snapshot file, a doctored Redis
copy, racing admin edits, over-long and sneaky CLI/API input, bad advertise hosts.
Each test checks that consumers keep routing to the real providers only, and that
a refused change wrote nothing anywhere (Redis, ZooKeeper, the audit table).
Every address used is on 127.0.0.0/8, or is never contacted (skipped znodes).
"""

import json
import logging
import os
import subprocess
import sys
import threading

import pymysql
import pytest
from kazoo.client import KazooClient

from conftest import ROOT, run_probe, wait_for
from probe import naming
from probe.admin import Admin
from probe.stores.appkeys import AppkeyStore
from probe.dev.stack import free_port
from probe.errors import (ComponentUnavailable, InvalidAppkey, InvalidHost, InvalidNodeAddress,
                          InvalidServiceName, InvalidWeight, ProbeError, SchemaMissing)
from probe.naming import NodeSettings
from probe.stores.nodestore import NodeStore
from probe.routing.watcher import snapshot_file
from probe.settings import load_settings

LOOPBACK = "127.0.0.1"


@pytest.fixture
def writer(stack):
    """A separate ZooKeeper session, as a hostile registry writer would have."""
    client = KazooClient(hosts=load_settings().zookeeper.hosts)
    client.start(timeout=10)
    yield client
    client.stop()
    client.close()


@pytest.fixture
def admin(stack):
    with Admin() as session:
        yield session


@pytest.fixture
def store(stack):
    settings = load_settings()
    node_store = NodeStore(settings.redis, settings.env)
    yield node_store
    node_store.close()


def loopback_provider(providers, appkey, name, **options):
    return providers(appkey, name=name, advertise_host=LOOPBACK, **options)


def names_in(client):
    return {node.name for node in client.watcher.table.all_nodes}


def deep_json(depth=1700):
    return (b'{"host": "127.0.0.1", "port": 1, "x": ' + b'{"a": ' * depth + b"1"
            + b"}" * depth + b"}")


def hostile_znodes():
    """(znode name, data): each must be skipped by every consumer."""
    huge, deep, bad_port, garbage = free_port(), free_port(), free_port(), free_port()
    return [
        ("DemoService_127.0.0.1_%d" % huge,
         b'{"host": "127.0.0.1", "port": %d, "weight": %s}' % (huge, b"9" * 400)),
        ("DemoService_127.0.0.1_%d" % deep, deep_json()),
        ("DemoService_10.0.0.2_8081", b'{"host": "elsewhere", "port": 443, "weight": 10, "valid": 1}'),
        ("DemoService_127.0.0.1_%d" % bad_port,
         b'{"host": "127.0.0.1", "port": 70000, "weight": 10, "valid": 1}'),
        ("DemoService_127.0.0.1_%d" % garbage, b"\xff\xfe\x00garbage\x80"),
        ("DemoService_127.0.0.2_%d" % garbage, b"[1, 2, 3]"),
        ("DemoService_127.0.0.3_%d" % garbage,
         b'{"host": "127.0.0.3", "port": %d, "weight": -5}' % garbage),
        ("DemoService_127.0.0.4_%d" % garbage, b'{"host": "127.0.0.4", "port": %d, "pad": "%s"}'
         % (garbage, b"x" * 10000)),
    ]


def skip_warnings(caplog, name):
    return [r for r in caplog.records if r.levelno == logging.WARNING
            and r.name == "probe.registry" and "skipping node" in r.getMessage()
            and name in r.getMessage()]


def test_hostile_znodes_are_skipped_and_the_table_keeps_updating(
        appkey, providers, clients, writer, admin, caplog):
    caplog.set_level(logging.WARNING, logger="probe.registry")
    a = loopback_provider(providers, appkey, "a")
    b = loopback_provider(providers, appkey, "b")
    real = {naming.node_name("DemoService", p.host, p.port) for p in (a, b)}
    parent = naming.appkey_path("dev", appkey)
    hostile = hostile_znodes()
    for name, data in hostile:
        writer.create(parent + "/" + name, data, ephemeral=True)
    client = clients(appkey, snapshot_dir=False)
    wait_for(lambda: names_in(client) == real, message="only the two real nodes")
    # Checked before any call: no hostile address ever gets traffic.
    assert all(node.host == LOOPBACK for node in client.watcher.table.all_nodes)
    assert {client.whoami() for _ in range(60)} == {"a", "b"}
    for name, _ in hostile:
        assert len(skip_warnings(caplog, name)) == 1, name
    # `probe nodes` lists the foreign znode under its name's address, with the reason.
    foreign = [r for r in admin.nodes(appkey) if r["address"] == "10.0.0.2:8081"]
    assert len(foreign) == 1 and "elsewhere:443" in foreign[0]["problem"]

    # An event storm on one bad node: still one warning, table still the real nodes.
    storm = hostile[2][0]
    for index in range(25):
        writer.set(parent + "/" + storm, b'{"host": "elsewhere%d", "port": 443}' % index)
    updates = client.watcher.updates
    c = loopback_provider(providers, appkey, "c")  # later updates still apply
    real.add(naming.node_name("DemoService", c.host, c.port))
    wait_for(lambda: names_in(client) == real, message="the new provider")
    assert client.watcher.updates > updates
    assert len(skip_warnings(caplog, storm)) == 1

    # A provider that leaves really leaves (the table is not frozen).
    b.stop(grace=0)
    real.discard(naming.node_name("DemoService", b.host, b.port))
    wait_for(lambda: names_in(client) == real, message="b gone from the table")
    assert {client.whoami() for _ in range(60)} == {"a", "c"}

    # A real node whose data turns hostile drops out; when it is repaired it is back.
    writer.set(a.path, b'{"host": "127.0.0.9", "port": %d, "weight": 10, "valid": 1}' % a.port)
    wait_for(lambda: names_in(client) == real - {naming.node_name("DemoService", a.host, a.port)},
             message="a skipped")
    writer.set(a.path, NodeSettings(a.host, a.port).to_bytes())
    wait_for(lambda: names_in(client) == real, message="a back")


def test_resync_skips_hostile_znodes_too(appkey, providers, clients, writer):
    a = loopback_provider(providers, appkey, "a")
    parent = naming.appkey_path("dev", appkey)
    client = clients(appkey, snapshot_dir=False)
    wait_for(lambda: len(client.watcher.table) == 1, message="a")
    for name, data in hostile_znodes():
        writer.create(parent + "/" + name, data, ephemeral=True)
    client.watcher.resync()
    assert names_in(client) == {naming.node_name("DemoService", a.host, a.port)}
    assert client.watcher.resyncs >= 1


def dead_zookeeper_config(tmp_path):
    import yaml
    config = yaml.safe_load(open(load_settings().path))
    config["zkserver"]["dev"] = {"host": LOOPBACK, "port": free_port()}
    path = str(tmp_path / "dead-zk.yml")
    yaml.safe_dump(config, open(path, "w"))
    return path


def test_hostile_snapshot_is_validated_on_load(appkey, clients, tmp_path):
    good_port = free_port()
    good = {"name": "DemoService_127.0.0.1_%d" % good_port, "host": LOOPBACK, "port": good_port,
            "weight": 10, "valid": 1, "registered_at": 0.0}
    entries = [
        good,
        dict(good, name="DemoService_10.0.0.2_8081", host="elsewhere", port=443),
        dict(good, name="DemoService_127.0.0.1_1", port=1, weight=10 ** 400),
        dict(good, name="DemoService_127.0.0.1_2", port=2, weight=5000),
        dict(good, name="DemoService_127.0.0.1_3", port=3, valid="yes"),
        dict(good, name="DemoService_127.0.0.1_4", port=4, registered_at=float("inf")),
        dict(good, name="OtherService_127.0.0.1_5", port=5),
        dict(good, name="DemoService_127.0.0.1_6", port=6, host="127.0.0.1/x"),
        "not an object", [1, 2], None,
    ]
    snapshots = tmp_path / "snapshots"
    path = snapshot_file(str(snapshots), "dev", appkey, "DemoService")
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as out:
        out.write(json.dumps({"written_at": "yesterday", "nodes": entries}))
    config = dead_zookeeper_config(tmp_path)
    client = clients(appkey, config_path=config, snapshot_dir=str(snapshots), zk_timeout=0.3)
    assert client.watcher.stale
    assert [(n.name, n.host, n.port, n.weight) for n in client.watcher.table.all_nodes] == [
        (good["name"], LOOPBACK, good_port, 10)]


@pytest.mark.parametrize("content", [
    b"{" * 5000 + b"}" * 5000,                  # RecursionError
    b'{"nodes": [' + b'{"a": ' * 3000 + b"1" + b"}" * 3000 + b"]}",
    b"\xff\xfe not utf-8",
    b'{"nodes": {"name": "x"}}',
    b"[]",
])
def test_unusable_snapshot_files_are_refused_whole(appkey, clients, tmp_path, content):
    snapshots = tmp_path / "snapshots"
    path = snapshot_file(str(snapshots), "dev", appkey, "DemoService")
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as out:
        out.write(content)
    client = clients(appkey, config_path=dead_zookeeper_config(tmp_path),
                     snapshot_dir=str(snapshots), zk_timeout=0.3)
    assert client.watcher.table.all_nodes == ()


def test_hostile_redis_copy_cannot_redirect_a_starting_provider(appkey, providers, store, writer):
    port = free_port()
    field = naming.settings_field(appkey, "dev", "DemoService", LOOPBACK, port)
    store.put(field, NodeSettings("elsewhere", 443, weight=40, valid=1))
    provider = loopback_provider(providers, appkey, "a", port=port)
    data, _ = writer.get(provider.path)
    assert json.loads(data) == {"host": LOOPBACK, "port": port, "weight": 40, "valid": 1}


def own_data(writer, provider):
    try:
        return json.loads(writer.get(provider.path)[0])
    except Exception:
        return None


def expire_session(zk):
    """Expire a kazoo session the way ZooKeeper does: another client takes it over
    with the same id and password, then closes it."""
    session_id, password = zk.client.client_id
    thief = KazooClient(hosts=zk.hosts, client_id=(session_id, password))
    thief.start(timeout=10)
    thief.stop()
    thief.close()


@pytest.mark.parametrize("how", ["deleted", "expired"])
def test_hostile_redis_copy_cannot_redirect_a_reregistration(appkey, providers, clients, store,
                                                             writer, how):
    provider = loopback_provider(providers, appkey, "a")
    field = naming.settings_field(appkey, "dev", "DemoService", provider.host, provider.port)
    # Someone rewrites the Redis copy: another address, an operator weight.
    store.put(field, NodeSettings("10.0.0.2", 443, weight=33, valid=1))
    expected = {"host": LOOPBACK, "port": provider.port, "weight": 33, "valid": 1}
    if how == "deleted":
        writer.delete(provider.path)
    else:
        before = provider.zk.session_id
        expire_session(provider.zk)
        wait_for(lambda: provider.zk.session_id not in (None, before), timeout=20,
                 message="a new provider session")
    wait_for(lambda: own_data(writer, provider) == expected, timeout=20,
             message="re-registered with its own address")
    client = clients(appkey, snapshot_dir=False)
    wait_for(lambda: len(client.watcher.table) == 1, message="routable")
    assert client.whoami() == "a"

    # Malformed Redis data (deep JSON) at the next re-registration: the last known
    # settings are used, the provider stays registered.
    store.redis.hset(naming.settings_hash("dev"), field, deep_json())
    writer.delete(provider.path)
    wait_for(lambda: own_data(writer, provider) == expected, timeout=20,
             message="re-registered with the last known settings")


EDIT_ROUNDS = 25
EDITOR = r"""
import sys
from probe.admin import Admin
appkey, address, kind, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
with Admin() as admin:
    for i in range(rounds):
        if kind == "weight":
            admin.set_weight(appkey, "DemoService", address, 100 + i, by="weights")
        elif i % 2 == 0:
            admin.disable(appkey, "DemoService", address, by="switch")
        else:
            admin.enable(appkey, "DemoService", address, by="switch")
"""


def test_concurrent_admin_edits_from_two_processes_both_land(appkey, providers, admin, writer):
    provider = loopback_provider(providers, appkey, "a")
    env = dict(os.environ, PYTHONPATH=ROOT)
    editors = [subprocess.Popen([sys.executable, "-c", EDITOR, appkey, provider.address, kind,
                                 str(EDIT_ROUNDS)], env=env, stderr=subprocess.PIPE, text=True)
               for kind in ("weight", "switch")]
    for editor in editors:
        _, errors = editor.communicate(timeout=120)
        assert editor.returncode == 0, errors
    last_weight, last_valid = 100 + EDIT_ROUNDS - 1, 0 if (EDIT_ROUNDS - 1) % 2 == 0 else 1
    expected = {"host": LOOPBACK, "port": provider.port, "weight": last_weight, "valid": last_valid}
    field = naming.settings_field(appkey, "dev", "DemoService", provider.host, provider.port)
    assert json.loads(admin.nodestore.redis.hget(naming.settings_hash("dev"), field)) == expected
    assert own_data(writer, provider) == expected
    rows = admin.audit(appkey, limit=1000)
    assert len(rows) == 2 * EDIT_ROUNDS
    assert [r["new"] for r in reversed(rows) if r["changed_by"] == "weights"] == \
        [str(100 + i) for i in range(EDIT_ROUNDS)]


def test_concurrent_edits_in_lockstep_keep_both_keys(appkey, providers, writer):
    """Each round, a weight edit and a switch edit start together (a barrier); after
    the round both must be in Redis and in the znode. A read-then-write without a
    compare-and-set loses one of them within a few rounds."""
    provider = loopback_provider(providers, appkey, "a")
    field = provider_field(appkey, provider)
    barrier = threading.Barrier(2, timeout=60)
    failures = []

    def edit(kind, own):
        try:
            for i in range(EDIT_ROUNDS):
                barrier.wait()
                if kind == "weight":
                    own.set_weight(appkey, "DemoService", provider.address, 200 + i)
                else:
                    own.enable(appkey, "DemoService", provider.address) if i % 2 \
                        else own.disable(appkey, "DemoService", provider.address)
                barrier.wait()
                if kind == "weight":  # one checker per round, while the other waits
                    expected = {"host": LOOPBACK, "port": provider.port, "weight": 200 + i,
                                "valid": i % 2}
                    stored = own.nodestore.get(field)._asdict()
                    live = own_data(writer, provider)
                    if stored != expected or live != expected:
                        failures.append((i, stored, live))
                barrier.wait()
        except Exception as exc:  # reported below, with the thread's error
            failures.append(exc)
            barrier.abort()

    with Admin() as first, Admin() as second:
        first.appkeys.require(appkey), second.appkeys.require(appkey)  # connect before racing
        second.nodestore.ping()
        first.nodestore.ping()
        threads = [threading.Thread(target=edit, args=("weight", first)),
                   threading.Thread(target=edit, args=("switch", second))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    assert failures == []


def provider_field(appkey, provider):
    return naming.settings_field(appkey, "dev", "DemoService", provider.host, provider.port)


def everything(admin, appkey, provider):
    """What a refused change must leave as it was: Redis, the znode, the audit."""
    return (admin.nodestore.redis.hgetall(naming.settings_hash("dev")),
            admin.zk.client.get(provider.path)[0], admin.audit(limit=100000))


@pytest.mark.parametrize("edit, error", [
    (dict(service="S" * 129), InvalidServiceName),
    (dict(service="DemoService\n"), InvalidServiceName),
    (dict(by="x" * 129), ProbeError),
    (dict(by="alice\nbob"), ProbeError),
    (dict(address="%s:80" % ("a" * 254)), InvalidNodeAddress),
    (dict(address="%s.%s:80" % ("a" * 64, "b")), InvalidNodeAddress),
    (dict(address="bad_host:80"), InvalidNodeAddress),
    (dict(address="a/b:80"), InvalidNodeAddress),
    (dict(weight="25\n"), InvalidWeight),
    (dict(weight="\uff12\uff15"), InvalidWeight),      # fullwidth digits
    (dict(weight="\u0662\u0665"), InvalidWeight),      # Arabic-Indic digits
    (dict(weight=" 25"), InvalidWeight),
    (dict(weight=10 ** 400), InvalidWeight),
    (dict(port_text="\uff18\uff10"), InvalidNodeAddress),
    (dict(port_text="80\n"), InvalidNodeAddress),
    (dict(appkey_suffix="\n"), InvalidAppkey),
    (dict(appkey_suffix="x" * 129), InvalidAppkey),
])
def test_sneaky_and_overlong_edits_write_nothing(appkey, providers, admin, edit, error):
    provider = loopback_provider(providers, appkey, "a")
    before = everything(admin, appkey, provider)
    address = edit.get("address", provider.address)
    if "port_text" in edit:
        address = "%s:%s" % (provider.host, edit["port_text"])
    with pytest.raises(error):
        admin.set_weight(appkey + edit.get("appkey_suffix", ""), edit.get("service", "DemoService"),
                         address, edit.get("weight", 25), by=edit.get("by", "tester"))
    assert everything(admin, appkey, provider) == before


def test_cli_refuses_overlong_by_and_writes_nothing(appkey, providers, admin):
    provider = loopback_provider(providers, appkey, "a")
    before = everything(admin, appkey, provider)
    refused = run_probe("node", "disable", appkey, "DemoService", provider.address,
                        "--by", "m" * 200, check=False)
    assert refused.returncode == 2 and "--by" in refused.stderr and "Traceback" not in refused.stderr
    refused = run_probe("node", "weight", appkey, "DemoService", provider.address, "\u0663",
                        check=False)
    assert refused.returncode == 2 and "InvalidWeight" in refused.stderr
    assert everything(admin, appkey, provider) == before


@pytest.fixture
def mysql_root(stack):
    settings = load_settings().mysql
    connection = pymysql.connect(host=settings.host, port=settings.port, user=settings.username,
                                 password=settings.password, database=settings.database,
                                 autocommit=True)
    yield connection
    connection.close()


def test_missing_audit_table_refuses_the_change_before_any_write(appkey, providers, admin,
                                                                 mysql_root):
    provider = loopback_provider(providers, appkey, "a")
    before = everything(admin, appkey, provider)
    with mysql_root.cursor() as cursor:
        cursor.execute("RENAME TABLE governance_audit TO governance_audit_hidden")
    try:
        with pytest.raises(SchemaMissing) as refused:
            admin.set_weight(appkey, "DemoService", provider.address, 77)
        assert "governance_audit" in str(refused.value)
    finally:
        with mysql_root.cursor() as cursor:
            cursor.execute("RENAME TABLE governance_audit_hidden TO governance_audit")
    assert everything(admin, appkey, provider) == before


class MysqlDiesMidChange(Admin):
    """An Admin whose MySQL connection is killed (for real, by the server) after
    Redis was written and before the audit row is committed."""

    killer = None

    def _update_live(self, path, name, field, key, value, attempts=20):
        applied = super()._update_live(path, name, field, key, value, attempts)
        if self.killer is not None:
            connection_id = self.appkeys._connection.thread_id()
            with self.killer.cursor() as cursor:
                cursor.execute("KILL %d" % connection_id)
            self.killer = None
        return applied


def test_mysql_failing_at_commit_undoes_redis_and_zookeeper(appkey, providers, admin, mysql_root):
    provider = loopback_provider(providers, appkey, "a")
    before = everything(admin, appkey, provider)
    with MysqlDiesMidChange() as dying:
        dying.killer = mysql_root
        with pytest.raises(ComponentUnavailable) as refused:
            dying.set_weight(appkey, "DemoService", provider.address, 66)
        assert "undone" in str(refused.value)
    assert everything(admin, appkey, provider) == before
    # And the next edit works normally.
    admin.set_weight(appkey, "DemoService", provider.address, 67)
    assert json.loads(admin.zk.client.get(provider.path)[0])["weight"] == 67


@pytest.mark.parametrize("bad", ["bad_host", "a/b", "127.0.0.1\n", "h\u00e9st"])
def test_provider_with_a_bad_advertise_host_registers_nothing(appkey, providers, store, writer,
                                                              bad):
    with pytest.raises(InvalidHost):
        providers(appkey, name="bad", advertise_host=bad)
    parent = naming.appkey_path("dev", appkey)
    assert writer.exists(parent) is None or writer.get_children(parent) == []
    assert store.all(appkey) == {}


def test_bad_advertise_host_from_the_environment_is_refused(appkey, providers, store, writer,
                                                            monkeypatch):
    monkeypatch.setenv("PROBE_ADVERTISE_HOST", "bad_host")
    with pytest.raises(InvalidHost) as refused:
        providers(appkey, name="bad")
    assert "PROBE_ADVERTISE_HOST" in str(refused.value)
    parent = naming.appkey_path("dev", appkey)
    assert writer.exists(parent) is None or writer.get_children(parent) == []
    assert store.all(appkey) == {}


def test_schema_ddl_runs_once_per_process(stack, mysql_root):
    store = AppkeyStore(load_settings().mysql)
    try:
        store.list()  # the schema is known to exist from here on
        again = AppkeyStore(load_settings().mysql)
        counted = []

        def creates():
            with again._connection.cursor() as cursor:
                cursor.execute("SHOW SESSION STATUS LIKE 'Com_create_table'")
                return int(cursor.fetchone()[1])
        again.list()
        counted.append(creates())
        for _ in range(5):
            again.list()
            again.audit(limit=1)
            again.exists("nobody")
        counted.append(creates())
        assert counted == [0, 0]
        again.close()
    finally:
        store.close()
