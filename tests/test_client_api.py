"""The consumer's public API: build_client's signature, the IDL module probe uses,
the watcher/caller race on node health, and the kazoo behaviour probe relies on."""

import inspect
import logging
import socket
import sys
import threading

import pytest
import thriftpy2
from kazoo.client import KazooClient
from kazoo.exceptions import ConnectionLoss
from kazoo.protocol.states import KeeperState
from kazoo.retry import KazooRetry
from thriftpy2.thrift import TClient

import probe
from conftest import IDL, wait_for
from probe.routing.balancer import Node, RoutingTable
from probe.client import ProbeClient, build_client
from probe.errors import ProbeError
from probe.idl import load_service
from probe.routing.health import ServiceHealth
from probe.rpc.outcomes import CONNECTION_ERROR, OK


# -- the signature ---------------------------------------------------------------------

def test_unknown_keyword_fails_as_python_does():
    # Refused by Python itself, before any file, config or ZooKeeper is touched.
    with pytest.raises(TypeError, match="unexpected keyword argument 'retires'"):
        build_client("no/such.thrift", "hello_www", "DemoService", retires=3)


def test_options_are_keyword_only():
    with pytest.raises(TypeError, match="positional"):
        build_client(IDL, "hello_www", "DemoService", 500, 1000)


def test_every_parameter_is_typed_and_documented():
    signature = inspect.signature(build_client)
    params = list(signature.parameters.values())
    assert [p.name for p in params[:4]] == ["thrift_path", "appkey", "service_name", "socket_timeout"]
    assert signature.parameters["socket_timeout"].default == 500
    assert all(p.kind is p.KEYWORD_ONLY for p in params[4:])
    assert not [p for p in params if p.kind is p.VAR_KEYWORD]
    assert all(p.annotation is not p.empty for p in params), "untyped parameter"
    assert signature.return_annotation is ProbeClient and issubclass(ProbeClient, TClient)
    doc = build_client.__doc__
    assert [p.name for p in params if ":param %s:" % p.name not in doc] == []


@pytest.mark.parametrize("option", [{"socket_timeout": 0}, {"connect_timeout": -5},
                                    {"retries": -1}, {"retries": 1.5}, {"eject_backoff": 0},
                                    {"warmup": -1}, {"idempotent": ["nope"]},
                                    {"balancer": "fastest"}, {"observe": "print"}])
def test_bad_option_values_are_named(option):
    name = next(iter(option))
    with pytest.raises(ProbeError, match=name if name != "balancer" else "fastest"):
        build_client(IDL, "hello_www", "DemoService", **option)


def test_py_typed_ships_beside_the_package():
    import os
    assert os.path.isfile(os.path.join(os.path.dirname(probe.__file__), "py.typed"))


# -- the IDL module probe uses ------------------------------------------------------------

def test_load_thrift_is_the_module_probe_uses():
    demo = probe.load_thrift(IDL)
    assert demo is probe.load_thrift(IDL)
    assert demo.DemoService is load_service(IDL, "DemoService")
    # What a user gets from thriftpy2 directly is another set of classes.
    other = thriftpy2.load(IDL, module_name="user_demo_thrift")
    assert other.DemoError is not demo.DemoError


def test_declared_exception_is_caught_through_load_thrift(appkey, providers, clients):
    demo = probe.load_thrift(IDL)
    providers(appkey)
    client = clients(appkey)
    assert client.thrift_module is demo
    wait_for(lambda: len(client.watcher.table) == 1, message="node in routing table")
    try:
        client.fail("no luck")
    except demo.DemoError as exc:
        assert exc.message == "no luck"
    else:
        pytest.fail("fail() returned instead of raising DemoError")
    assert client.say() == "hello world"  # the connection was fine for the next call


# -- the race: callers change node health while the watcher prunes it ----------------------

def test_health_is_pruned_while_callers_change_it(appkey, clients):
    """The watcher thread iterates node health while a calling thread records a
    connect failure in the middle of that iteration (forced with a tracer at
    every line of an iteration in probe/routing/health.py). Iterating a dict another
    thread resizes raised RuntimeError; health must be copied on write instead."""
    client = clients(appkey)
    nodes = [Node("DemoService_127.0.0.1_%d" % port, "127.0.0.1", port, 10, 1)
             for port in (1, 2, 3, 4)]
    for node in nodes[:3]:
        client.health.end(node, CONNECTION_ERROR, 0.001)
    fresh = [Node("DemoService_127.0.0.2_%d" % port, "127.0.0.2", port, 10, 1)
             for port in (1, 2, 3)]
    triggered = []
    client_file = sys.modules[ServiceHealth.__module__].__file__

    def record_failure_elsewhere():
        caller = threading.Thread(target=client.health.end,
                                  args=(fresh[len(triggered)], CONNECTION_ERROR, 0.001))
        caller.start()
        caller.join(0.3)  # holding a lock over the iteration makes it wait: also fine
        triggered.append(caller)

    def iterating_a_dict(frame):
        # A comprehension's iterator is its local ".0"; the node states are the only
        # dict forget() iterates in one.
        iterator = frame.f_locals.get(".0")
        return type(iterator).__name__ in ("dict_keyiterator", "dict_itemiterator",
                                           "dict_valueiterator")

    def tracer(frame, event, arg):
        if frame.f_code.co_filename != client_file:
            return None

        def local(frame, event, arg):
            if event == "line" and len(triggered) < len(fresh) and iterating_a_dict(frame):
                record_failure_elsewhere()
            return local
        return local

    # The new table drops nodes[0] and keeps the rest: its health must go, the
    # failures recorded meanwhile must stay.
    table = RoutingTable(nodes[1:] + fresh)
    sys.settrace(tracer)
    try:
        client._on_table(table)
    finally:
        sys.settrace(None)
    for caller in triggered:
        caller.join(5)
    assert triggered, "the tracer never ran inside an iteration: the test proves nothing"
    assert nodes[0].name not in client.health._states
    assert {n.name for n in nodes[1:3]} <= set(client.health._states)
    assert len(client.health._states) == 2 + len(triggered)  # no failure was lost


def test_health_survives_concurrent_failures_and_table_changes(appkey, clients):
    client = clients(appkey)
    nodes = [Node("DemoService_127.0.0.1_%d" % port, "127.0.0.1", port, 10, 1)
             for port in range(1, 41)]
    tables = [RoutingTable(nodes[:20]), RoutingTable(nodes[20:])]
    errors = []

    def watcher():
        try:
            for _ in range(300):
                for table in tables:
                    client._on_table(table)
        except Exception as exc:
            errors.append(exc)

    def caller(offset):
        try:
            for _ in range(30):
                for node in nodes[offset::2]:
                    client.health.end(node, CONNECTION_ERROR, 0.001)
                    client.health.end(node, OK, 0.001)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=watcher)] + [threading.Thread(target=caller, args=(i,))
                                                     for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert not any(thread.is_alive() for thread in threads)


# -- kazoo behaviour probe relies on ---------------------------------------------------------

def test_kazoo_stop_fails_requests_queued_while_disconnected():
    """probe.zk.session.ZooKeeper restarts a session stuck in SUSPENDED with
    stop() + start_async(), trusting stop() to fail every queued request with
    ConnectionLoss, so that no recovery task waits for ever. If a kazoo release
    changes that, this fails."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket closes
    quiet = logging.getLogger("probe.tests.kazoo")  # refused connects are expected here
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    client = KazooClient(hosts="127.0.0.1:%d" % port, timeout=2.0, logger=quiet,
                         connection_retry=KazooRetry(max_tries=-1, delay=0.05, max_delay=0.2))
    client.start_async()
    try:
        # Before its connection thread reports CONNECTING, a client refuses requests.
        wait_for(lambda: client.client_state == KeeperState.CONNECTING, message="CONNECTING")
        queued = client.exists_async("/probe-test")
        assert not queued.ready()
        client.stop()
        with pytest.raises(ConnectionLoss):
            queued.get(timeout=5)
    finally:
        client.stop()
        client.close()


def test_shared_session_reports_connected_through_a_state_listener(stack):
    from probe.zk.session import ZooKeeper
    from probe.settings import load_settings
    zk = ZooKeeper(load_settings().zookeeper.hosts)
    assert not zk.wait_connected(0)
    try:
        zk.start(timeout=10)
        assert zk.wait_connected(5) and zk.connected
    finally:
        zk.stop()
    assert not zk.connected and not zk.wait_connected(0)
