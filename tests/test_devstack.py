"""probe.dev.stack (and probe.testing's fault control and ZooKeeper ensemble)
against real ZooKeeper, Redis and MariaDB processes.

Every server runs on free loopback ports in a temporary folder, and every
fixture stops what it started even when a test fails.
"""

import contextlib
import os
import socket
import subprocess
import sys

import pymysql
import pytest
import redis
import yaml
from kazoo.client import KazooClient

from probe.dev import stack as devstack
from probe.dev.stack import DEV_PORTS, Stack, StackError, free_port
from probe.testing import FaultStack, ZooKeeperEnsemble

SYSTEM_PORTS = {2181, 3306, 6379}


def pid_alive(pid):
    """True if pid exists and is not a zombie (an exited, unreaped process)."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as handle:
            data = handle.read()
    except OSError:
        return False
    return data[data.rindex(b")") + 2:].split()[0] not in (b"Z", b"X")


@contextlib.contextmanager
def zookeeper_client(hosts):
    client = KazooClient(hosts=hosts, timeout=5)
    client.start(timeout=15)
    try:
        yield client
    finally:
        client.stop()
        client.close()


def mysql_connect(port):
    return pymysql.connect(host="127.0.0.1", port=port, user="probe",
                           password="probe", database="probe", connect_timeout=5)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = FaultStack(str(tmp_path_factory.mktemp("stack")), ports="free")
    try:
        stack.up()
        yield stack
    finally:
        stack.down()


def running_pids(stack):
    status = stack.status()
    assert all(entry["running"] for entry in status.values()), status
    return {name: entry["pid"] for name, entry in status.items()}


# ----------------------------------------------------------------------- one stack

def test_up_starts_every_component_and_each_answers(stack):
    status = stack.status()
    ports = {entry["port"] for entry in status.values()}
    assert len(ports) == 3
    assert not ports & (SYSTEM_PORTS | set(DEV_PORTS.values()))

    with zookeeper_client(status["zookeeper"]["address"]) as client:
        client.create("/devstack-test", b"hello")
        assert client.get("/devstack-test")[0] == b"hello"

    assert redis.Redis(host="127.0.0.1", port=status["redis"]["port"]).ping()

    connection = mysql_connect(status["mysql"]["port"])
    try:
        with connection.cursor() as cursor:
            cursor.execute("CREATE TABLE IF NOT EXISTS t (id INT)")
            cursor.execute("SELECT DATABASE(), CURRENT_USER()")
            assert cursor.fetchone() == ("probe", "probe@127.0.0.1")
    finally:
        connection.close()


def test_config_file_follows_the_project_format(stack):
    with open(stack.config_path) as handle:
        text = handle.read()
    ports = stack.ports
    assert yaml.safe_load(text) == stack.config() == {
        "mysql": {"dev": {"host": "127.0.0.1", "port": ports["mysql"],
                          "username": "probe", "password": "probe",
                          "database": "probe"}},
        "redis": {"dev": {"host": "127.0.0.1", "port": ports["redis"],
                          "password": None, "cluster": 0}},
        "zkserver": {"dev": {"host": "127.0.0.1", "port": ports["zookeeper"]}},
        "advertise_host": "127.0.0.1",
    }
    assert ("  dev: {host: 127.0.0.1, port: %d, password: null, cluster: 0}"
            % ports["redis"]) in text


def test_up_again_is_idempotent_and_another_stack_object_finds_the_servers(stack):
    before = running_pids(stack)
    stack.up()
    assert running_pids(stack) == before
    # What the CLI does on its next run: a new object, default "dev" ports,
    # which the ports recorded in stack.json override.
    again = Stack(stack.state_dir)
    assert again.ports == stack.ports
    again.up()
    assert running_pids(again) == before


def test_stop_and_start_zookeeper_keeps_its_port(stack):
    port = stack.status()["zookeeper"]["port"]
    stack.stop("zookeeper")
    status = stack.status()["zookeeper"]
    assert status == dict(status, running=False, pid=None, port=port)

    stack.start("zookeeper")
    status = stack.status()["zookeeper"]
    assert status["running"] and status["port"] == port
    with zookeeper_client(status["address"]) as client:
        assert client.exists("/devstack-test") is not None  # data survived


def test_start_with_wipe_gives_an_empty_zookeeper(stack):
    address = stack.status()["zookeeper"]["address"]
    with zookeeper_client(address) as client:
        client.ensure_path("/devstack-wipe/child")

    stack.start("zookeeper", wipe=True)

    with zookeeper_client(address) as client:
        assert client.exists("/devstack-wipe") is None
        assert client.get_children("/") == ["zookeeper"]


def test_up_restarts_a_killed_component_only(stack):
    before = running_pids(stack)
    stack.kill("mysql")
    assert not pid_alive(before["mysql"])
    assert stack.status()["mysql"]["running"] is False

    stack.up()
    after = running_pids(stack)
    assert after["zookeeper"] == before["zookeeper"]
    assert after["redis"] == before["redis"]
    assert after["mysql"] != before["mysql"]
    mysql_connect(stack.ports["mysql"]).close()  # the user and its data survived


def test_unknown_component_is_refused(stack):
    with pytest.raises(StackError, match="unknown component 'kafka'"):
        stack.stop("kafka")


# -------------------------------------------------------------- process lifetime

def probe_stack(*args):
    """`probe stack ...` in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "probe.cli", "stack"] + list(args),
                          capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_servers_outlive_their_starter_and_down_stops_them(tmp_path):
    state_dir = str(tmp_path / "stack")
    stack = Stack(state_dir)
    try:
        started = probe_stack("up", "--dir", state_dir, "--free-ports")
        assert started.returncode == 0, started.stderr
        assert "PROBE_CONFIG=%s" % stack.config_path in started.stdout
        stack = Stack(state_dir)  # now sees the ports the starter recorded
        pids = running_pids(stack)
        assert all(pid_alive(pid) for pid in pids.values())
        assert probe_stack("status", "--dir", state_dir).returncode == 0
        with open(stack.config_path) as handle:
            assert yaml.safe_load(handle)["advertise_host"] == "127.0.0.1"
    finally:
        stack.down()

    assert not any(pid_alive(pid) for pid in pids.values())
    assert not any(entry["running"] or entry["pid"]
                   for entry in stack.status().values())
    assert probe_stack("status", "--dir", state_dir).returncode == 3  # not running
    stack.down()  # a second down has nothing to do

    wiped = probe_stack("down", "--dir", state_dir, "--wipe")
    assert wiped.returncode == 0 and "wiped" in wiped.stdout
    assert not os.path.exists(state_dir)


# ------------------------------------------------------------------------ errors

def test_a_taken_port_is_named_and_nothing_is_started(tmp_path):
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen(1)
    taken = squatter.getsockname()[1]
    stack = Stack(str(tmp_path / "stack"),
                  ports={"zookeeper": free_port(), "redis": taken, "mysql": free_port()})
    try:
        with pytest.raises(StackError) as error:
            stack.up()
        assert "port %d (redis)" % taken in str(error.value)
        assert not any(entry["pid"] for entry in stack.status().values())
    finally:
        stack.down()
        squatter.close()


def test_a_missing_server_names_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setattr(devstack, "ZOOKEEPER_JAR", str(tmp_path / "missing.jar"))
    with pytest.raises(StackError, match="apt-get install zookeeper"):
        Stack(str(tmp_path / "a"), ports="free").up()

    monkeypatch.setitem(devstack.SERVER_BINARIES, "java", ("no-such-java",))
    with pytest.raises(StackError, match="needs Java"):
        Stack(str(tmp_path / "b"), ports="free").up()

    monkeypatch.undo()
    monkeypatch.setitem(devstack.SERVER_BINARIES, "redis-server", ("no-such-redis",))
    with pytest.raises(StackError, match="apt-get install redis-server"):
        Stack(str(tmp_path / "c"), ports="free").up()

    monkeypatch.setitem(devstack.SERVER_BINARIES, "mariadbd", ("no-such-mariadbd",))
    monkeypatch.setitem(devstack.SERVER_BINARIES, "redis-server", ("redis-server",))
    with pytest.raises(StackError, match="apt-get install mariadb-server"):
        Stack(str(tmp_path / "d"), ports="free").up()


@pytest.mark.parametrize("ports, message", [
    ("bogus", "ports must be"),
    ({"redis": 6379}, "port 6379 for redis is not allowed"),
    ({"mysql": 3306}, "port 3306 for mysql is not allowed"),
    ({"kafka": 9092}, "unknown component"),
    ({"redis": 22181}, "distinct ports"),
])
def test_bad_ports_are_refused(tmp_path, ports, message):
    with pytest.raises(StackError, match=message):
        Stack(str(tmp_path), ports=ports)


def test_dev_ports_and_overrides(tmp_path):
    assert Stack(str(tmp_path), ports="dev").ports == DEV_PORTS
    assert Stack(str(tmp_path), ports={"redis": 26380}).ports == dict(
        DEV_PORTS, redis=26380)


def test_mysql_socket_moves_to_tmp_when_the_state_dir_is_too_deep(tmp_path):
    shallow = Stack(str(tmp_path / "s"))
    assert shallow.status()["mysql"]["running"] is False
    assert shallow._servers["mysql"].socket_path.startswith(str(tmp_path))
    deep = Stack(str(tmp_path / ("d" * 120)))
    socket_path = deep._servers["mysql"].socket_path
    assert socket_path.startswith("/tmp/probe-mysql-") and len(socket_path) < 100


def test_free_port_can_be_bound():
    port = free_port()
    assert port not in SYSTEM_PORTS
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_stack_ports_stay_out_of_the_ephemeral_range():
    """An outgoing connection's local port comes from that range: a server port
    chosen there could be taken before the server binds it."""
    from probe.dev.stack import _ephemeral_ports, _free_ports
    low, _ = _ephemeral_ports()
    ports = _free_ports(50)
    assert len(set(ports)) == 50
    assert all(port < low for port in ports) and not set(ports) & set(DEV_PORTS.values())


# ---------------------------------------------------------------------- ensemble

def test_ensemble_elects_a_new_leader_when_the_leader_dies(tmp_path):
    ensemble = ZooKeeperEnsemble(str(tmp_path / "ensemble"))
    pids = []
    try:
        ensemble.up()
        pids = [member["pid"] for member in ensemble.status()]
        assert len(ensemble.hosts.split(",")) == 3
        with zookeeper_client(ensemble.hosts) as client:
            client.create("/survives", b"yes")

        old_leader = ensemble.leader()
        ensemble.kill(old_leader)
        assert not pid_alive(pids[old_leader])
        new_leader = ensemble.leader(timeout=30)
        assert new_leader != old_leader

        with zookeeper_client(ensemble.hosts) as client:
            assert client.get("/survives")[0] == b"yes"

        ensemble.start(old_leader)  # rejoins the quorum on its old ports
        modes = [member["mode"] for member in ensemble.status()]
        assert sorted(modes) == ["follower", "follower", "leader"]
        pids = [member["pid"] for member in ensemble.status()]
    finally:
        ensemble.down()
    assert not any(pid_alive(pid) for pid in pids if pid)
