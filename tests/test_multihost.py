"""Providers on separate hosts: every process in its own network namespace.

Five namespaces made for this test only, with names no other run uses:

    switch  a bridge, and one veth pair per host plugged into it
    srv     198.18.0.1   ZooKeeper, Redis and MariaDB (Stack(host=...))
    p1      198.18.0.11  provider "p1"
    p2      198.18.0.12  provider "p2"
    cl      198.18.0.21  the consumer, and the `probe` CLI

198.18.0.0/15 is reserved for network testing (RFC 2544); the addresses exist only
inside these namespaces, which have no default route, so no packet can leave them.
Neither provider is told its address: each finds it by the outbound-route rule
(`probe.settings.outbound_ip` towards ZooKeeper). The bridge lives in its own
namespace so the host's firewall and bridge settings never see this traffic.

Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and iproute2; without them it fails
and says which, it does not skip.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid

import pytest
import yaml

from conftest import IDL, ROOT, wait_for

SUBNET = "198.18.0.%d/24"
HOSTS = {"srv": 1, "p1": 11, "p2": 12, "cl": 21}
SESSION_TIMEOUT = 3
CALLS = 400

CONSUMER = r'''
"""Reads one command per line, answers one JSON line: "calls N" -> who answered."""
import collections, json, sys
from probe.client import build_client

client = build_client(sys.argv[1], sys.argv[2], "DemoService", socket_timeout=2000)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    count = int(line.split()[1])
    seen = collections.Counter()
    for _ in range(count):
        try:
            seen[client.whoami()] += 1
        except Exception as exc:
            seen["error:" + type(exc).__name__] += 1
    print(json.dumps(seen), flush=True)
client.close()
'''


def _ip(*args, netns=None, check=True):
    argv = ["ip"] + (["-n", netns] if netns else []) + list(args)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        pytest.fail("`%s` failed (exit %d): %s" % (" ".join(argv), done.returncode,
                                                   done.stderr.strip()))
    return done


class Hosts:
    """The namespaces and their bridge; `remove()` deletes them all, whatever exists."""

    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.switch = "probe-%s-sw" % tag
        self.names = {role: "probe-%s-%s" % (tag, role) for role in HOSTS}
        self.bridge = "br%s" % tag
        self.tag = tag

    def address(self, role):
        return SUBNET.split("/")[0] % HOSTS[role]

    def create(self):
        if shutil.which("ip") is None:
            pytest.fail("iproute2 is not installed (no `ip` command): apt-get install "
                        "iproute2 (scripts/install-deps.sh installs it)")
        first = _ip("netns", "add", self.switch, check=False)
        if first.returncode != 0:
            pytest.fail("cannot create a network namespace with `ip netns add` (needs root: "
                        "CAP_SYS_ADMIN and CAP_NET_ADMIN; running as uid %d): %s"
                        % (os.getuid(), first.stderr.strip()))
        _ip("link", "add", self.bridge, "type", "bridge", netns=self.switch)
        _ip("link", "set", self.bridge, "up", netns=self.switch)
        for index, (role, netns) in enumerate(sorted(self.names.items())):
            _ip("netns", "add", netns)
            _ip("link", "set", "lo", "up", netns=netns)
            outside, inside = "v%s%d" % (self.tag, index), "eth0"
            # Both ends born in their namespaces: nothing appears in the host's.
            _ip("link", "add", outside, "netns", self.switch, "type", "veth",
                "peer", "name", inside, "netns", netns)
            _ip("link", "set", outside, "master", self.bridge, "up", netns=self.switch)
            _ip("addr", "add", SUBNET % HOSTS[role], "dev", inside, netns=netns)
            _ip("link", "set", inside, "up", netns=netns)

    def remove(self):
        for netns in list(self.names.values()) + [self.switch]:
            _ip("netns", "delete", netns, check=False)

    def run(self, role, argv, **kwargs):
        return ["ip", "netns", "exec", self.names[role]] + list(argv)


@pytest.fixture
def hosts():
    made = Hosts()
    try:
        made.create()
        yield made
    finally:
        made.remove()
    leftover = _ip("netns", "list", check=False).stdout
    assert made.tag not in leftover, "namespaces left behind: %s" % leftover


@pytest.fixture
def remote_stack(hosts, tmp_path):
    """ZooKeeper, Redis and MariaDB in the srv namespace, bound to its address."""
    from probe.dev import stack as devstack

    state = str(tmp_path / "stack")
    code = ("import sys; from probe.dev.stack import Stack; "
            "Stack(sys.argv[1], ports='free', host=sys.argv[2]).up(timeout=120)")
    started = subprocess.run(hosts.run("srv", [sys.executable, "-c", code, state,
                                               hosts.address("srv")]),
                             capture_output=True, text=True, timeout=180, env=_env())
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        stack = devstack.Stack(state, host=hosts.address("srv"))
        config = stack.config()
        config.pop("advertise_host", None)  # each provider must find its own address
        config["zkserver"]["dev"]["session_timeout"] = SESSION_TIMEOUT
        path = str(tmp_path / "config.yml")
        with open(path, "w") as out:
            yaml.safe_dump(config, out)
        yield {"config": path, "stack": stack}
    finally:
        # Stopping goes by pid, so it works from outside the namespace too.
        devstack.Stack(state, host=hosts.address("srv")).down(wipe=True)


def test_stack_refuses_a_host_it_cannot_bind_alone():
    """Stack(host=) takes one IPv4 address; a wildcard or a name is refused before
    anything starts."""
    from probe.dev.stack import Stack, StackError
    for bad in ("0.0.0.0", "example.com", "198.18.0.300", "", None):
        with pytest.raises(StackError, match="host must be one IPv4 address"):
            Stack("/nonexistent/probe-stack", ports="free", host=bad)


def _env(**extra):
    env = {key: value for key, value in os.environ.items() if not key.startswith("PROBE_")}
    env["PYTHONPATH"] = ROOT
    env.update(extra)
    return env


def test_providers_on_separate_hosts(hosts, remote_stack, tmp_path):
    from probe.dev.stack import free_port
    env = _env(PROBE_CONFIG=remote_stack["config"], PROBE_ENV="dev",
               PROBE_SNAPSHOT_DIR=str(tmp_path / "snapshots"), PROBE_TEST_GRACE="0.2")
    appkey = "mh_%s" % uuid.uuid4().hex[:8]
    processes = []

    def cli(*args):
        done = subprocess.run(hosts.run("cl", [sys.executable, "-m", "probe.cli"] + list(args)),
                              capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == 0, "probe %s: %s%s" % (" ".join(args), done.stdout, done.stderr)
        return done.stdout

    def nodes():
        return {row["address"]: row
                for row in json.loads(cli("nodes", appkey, "DemoService", "--json"))}

    try:
        cli("appkey", "add", appkey)
        # One port for both: each provider has a host (and a port space) of its own.
        port = free_port()
        for role in ("p1", "p2"):
            log = open(str(tmp_path / ("%s.log" % role)), "w")
            processes.append(subprocess.Popen(
                hosts.run(role, [sys.executable, os.path.join(ROOT, "tests", "provider_main.py"),
                                 appkey, role, str(port)]),
                stdout=log, stderr=subprocess.STDOUT, env=env))
        p1, p2 = processes
        p1_address = "%s:%d" % (hosts.address("p1"), port)
        p2_address = "%s:%d" % (hosts.address("p2"), port)

        def both_live():
            for process in processes:
                assert process.poll() is None, open(str(tmp_path / "p1.log")).read()[-2000:] \
                    + open(str(tmp_path / "p2.log")).read()[-2000:]
            listed = nodes()
            return all(listed.get(a, {}).get("live") for a in (p1_address, p2_address))

        wait_for(both_live, timeout=60, interval=0.5, message="both providers registered")
        listed = nodes()
        # `probe nodes` shows each provider at its own host's address, nothing else.
        assert sorted(listed) == sorted([p1_address, p2_address]), listed
        table = cli("nodes", appkey)
        for address in (p1_address, p2_address):
            assert any(address in line and " up " in line for line in table.splitlines()), table
        assert "127.0.0.1" not in table and "127.0.1.1" not in table, table

        script = tmp_path / "consumer.py"
        script.write_text(CONSUMER)
        consumer = subprocess.Popen(
            hosts.run("cl", [sys.executable, str(script), IDL, appkey]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        processes.append(consumer)
        assert json.loads(consumer.stdout.readline()) == {"ready": True}

        def calls(count=CALLS):
            consumer.stdin.write("calls %d\n" % count)
            consumer.stdin.flush()
            return json.loads(consumer.stdout.readline())

        seen = calls()
        assert set(seen) == {"p1", "p2"}, seen  # default weights 10/10: both serve

        # Weights: p2 at 0 takes nothing; back at 10 it serves again.
        cli("node", "weight", appkey, "DemoService", p2_address, "0")
        wait_for(lambda: calls(100) == {"p1": 100}, timeout=20, interval=0.1,
                 message="weight 0 on p2 reaching the consumer")
        assert nodes()[p2_address]["weight"] == 0
        cli("node", "weight", appkey, "DemoService", p2_address, "10")
        cli("node", "weight", appkey, "DemoService", p1_address, "1")
        # p1 at 1 against p2 at 10: p2 gets most calls (11:1 expected).
        wait_for(lambda: calls().get("p2", 0) > CALLS * 0.7, timeout=20, interval=0.1,
                 message="weights 1:10 reaching the consumer")
        cli("node", "weight", appkey, "DemoService", p1_address, "10")

        # Switches: p1 off leaves p2 alone; on again, both serve.
        cli("node", "disable", appkey, "DemoService", p1_address)
        wait_for(lambda: calls(100) == {"p2": 100}, timeout=20, interval=0.1,
                 message="p1 switched off")
        assert nodes()[p1_address]["valid"] == 0
        cli("node", "enable", appkey, "DemoService", p1_address)
        wait_for(lambda: set(calls()) == {"p1", "p2"}, timeout=20, interval=0.1,
                 message="p1 switched on again")

        # Failover across hosts: p2's host loses its provider (kill -9); every call
        # still succeeds, on p1, and p2 leaves the registry after its session.
        p2.send_signal(signal.SIGKILL)
        p2.wait(10)
        after = calls()
        assert after == {"p1": CALLS}, after
        wait_for(lambda: not nodes().get(p2_address, {}).get("live"),
                 timeout=SESSION_TIMEOUT * 5, interval=0.5, message="p2 leaving the registry")
        assert nodes()[p1_address]["live"]
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
