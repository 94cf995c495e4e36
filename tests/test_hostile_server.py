"""Hostile peers against a real provider (real ZooKeeper, Redis and MariaDB from the
session stack): idle floods, slowloris, giant length prefixes, garbage, deep
nesting, a handler leaking a secret. Each asserts the connection was dealt with
and that the provider kept serving a real probe client."""

import logging
import os
import random
import socket
import struct
import threading
import time

import pytest
import thriftpy2
from thriftpy2.protocol.cybin import TCyBinaryProtocol
from thriftpy2.thrift import TApplicationException, TMessageType
from thriftpy2.transport import TCyMemoryBuffer

from conftest import wait_for
from probe.errors import ProbeError
from probe.rpc.messagelimits import NEED_MORE, MessageRejected, MessageScanner

HERE = os.path.dirname(os.path.abspath(__file__))
HOSTILE_IDL = os.path.join(HERE, "hostile.thrift")
GIANT = 0x60000000  # 1.5 GiB


class HostileHandler(object):
    def say(self):
        return "hello world"

    def boom(self, text):
        raise RuntimeError("db password=hunter2 while handling %s" % text)

    def depth(self, node):
        count = 0
        while node is not None:
            count, node = count + 1, node.child
        return count


@pytest.fixture
def hostile(stack, appkey):
    """start(**limits) -> (provider, client) for HostileService."""
    from probe.client import build_client
    from probe.server import start_service
    started = []

    def start(**options):
        options.setdefault("shutdown_grace", 0)
        options.setdefault("advertise_host", "127.0.0.1")  # test traffic stays on loopback
        provider = start_service(HOSTILE_IDL, appkey, "HostileService", HostileHandler(), port=0,
                                 block=False, **options)
        client = build_client(HOSTILE_IDL, appkey, "HostileService", socket_timeout=5000)
        started.append((provider, client))
        wait_for(lambda: len(client.watcher.table) == 1, message="the provider in the table")
        return provider, client

    yield start
    for provider, client in started:
        client.close()
        provider.stop(grace=0)


def connect(provider, source="127.0.0.1"):
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", provider.port))
    return sock


def closed_by_peer(sock, timeout=10.0):
    """True once the provider has closed `sock` (EOF or reset)."""
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def header(name="say", seqid=1, mtype=TMessageType.CALL):
    encoded = name.encode()
    return struct.pack("!iI", -2147418112 | mtype, len(encoded)) + encoded + struct.pack("!i", seqid)


def encode_call(args, name):
    buf = TCyMemoryBuffer()
    protocol = TCyBinaryProtocol(buf)
    protocol.write_message_begin(name, TMessageType.CALL, 7)
    args.write(protocol)
    protocol.write_message_end()
    return buf.getvalue()


def server_records(caplog, level):
    return [r for r in caplog.records if r.name == "probe.server" and r.levelno == level]


def memory_kb(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError("no %s in /proc/self/status" % field)


# -- the scanner alone (pure logic) -------------------------------------------------------

def test_scanner_finds_the_end_of_real_messages_fed_in_any_pieces():
    module = thriftpy2.load(HOSTILE_IDL, module_name="hostile_scan_thrift")
    node = None
    for _ in range(20):
        node = module.Node(child=node)
    for args, name in ((module.HostileService.depth_args(node=node), "depth"),
                       (module.HostileService.boom_args(text="x" * 300), "boom"),
                       (module.HostileService.say_args(), "say")):
        data = encode_call(args, name)
        scanner = MessageScanner(1 << 20)
        assert scanner.scan(data + b"next message") == len(data)
        scanner.reset()
        cuts = sorted(random.sample(range(1, len(data)), min(10, len(data) - 1)))
        for cut in cuts:
            assert scanner.scan(data[:cut]) == NEED_MORE
        assert scanner.scan(data) == len(data)


@pytest.mark.parametrize("body", [
    struct.pack("!bhi", 11, 1, GIANT),                 # string
    struct.pack("!bhi", 11, 1, -5),                    # negative length
    struct.pack("!bhbi", 15, 1, 8, GIANT),             # list<i32>
    struct.pack("!bhbi", 14, 1, 11, GIANT),            # set<string>
    struct.pack("!bhbbi", 13, 1, 11, 12, GIANT),       # map<string, struct>
    struct.pack("!bh", 99, 1),                         # no such type
])
def test_scanner_refuses_a_declared_size_before_its_payload(body):
    with pytest.raises(MessageRejected):
        MessageScanner(4 << 20).scan(header("echo") + body)


def test_scanner_refuses_deep_nesting_and_oversized_messages():
    deep = header("depth") + struct.pack("!bh", 12, 1) * 100
    with pytest.raises(MessageRejected, match="deeper"):
        MessageScanner(1 << 20).scan(deep)
    data = header("boom") + struct.pack("!bhi", 11, 1, 1000) + b"x" * 1000 + b"\0"
    assert MessageScanner(2000).scan(data) == len(data)
    with pytest.raises(MessageRejected):
        MessageScanner(900).scan(data)
    with pytest.raises(MessageRejected):
        MessageScanner(1 << 20).scan(b"GET / HTTP/1.1\r\n")


# -- option validation --------------------------------------------------------------------

@pytest.mark.parametrize("option, value", [
    ("max_connections", 0), ("max_connections", "10"), ("idle_timeout", -1),
    ("read_timeout", 0), ("read_timeout", True), ("max_message_bytes", 2 ** 40),
    ("worker_threads", 0), ("connect_timeout", 1.0), ("workers", 0),
])
def test_bad_limit_is_refused_before_anything_is_touched(stack, appkey, option, value):
    from probe.server import start_service
    with pytest.raises(ProbeError, match=option):
        start_service(HOSTILE_IDL, appkey, "HostileService", HostileHandler(), port=0, block=False,
                      **{option: value})


def test_unknown_option_is_a_type_error(stack, appkey):
    from probe.server import start_service
    with pytest.raises(TypeError, match="max_conections"):
        start_service(HOSTILE_IDL, appkey, "HostileService", HostileHandler(), port=0, block=False,
                      max_conections=5)


# -- against a running provider -----------------------------------------------------------

def test_idle_flood_costs_no_thread_and_calls_are_answered(hostile):
    provider, client = hostile()
    assert client.say() == "hello world"
    threads_before = threading.active_count()
    flood = []
    try:
        for _ in range(1500):
            flood.append(connect(provider))
        wait_for(lambda: provider.server.stats()["connections"] >= 1500, message="1500 connections")
        assert client.say() == "hello world"
        assert threading.active_count() - threads_before < 10
    finally:
        for sock in flood:
            sock.close()
    wait_for(lambda: provider.server.stats()["connections"] <= 2, message="flood gone")


def test_connections_beyond_max_connections_are_closed_at_once(hostile):
    provider, client = hostile(max_connections=5)
    held = [connect(provider) for _ in range(5)]
    try:
        wait_for(lambda: provider.server.stats()["connections"] == 5, message="5 connections")
        extra = connect(provider)
        assert closed_by_peer(extra, timeout=5)
        extra.close()
        assert provider.server.stats()["rejected"] >= 1
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: provider.server.stats()["connections"] == 0, message="held ones closed")
    assert client.say() == "hello world"


def test_slowloris_is_cut_after_read_timeout_and_holds_no_worker(hostile, caplog):
    provider, client = hostile(read_timeout=1.0, worker_threads=2)
    message = header("say") + b"\0"
    slow = [connect(provider) for _ in range(6)]  # three times the worker threads
    try:
        for sock in slow:
            sock.sendall(message[:3])
        wait_for(lambda: provider.server.stats()["workers"] >= 1, message="a worker")
        for index in range(1, 4):  # dribbling, never finishing
            for sock in slow:
                sock.sendall(message[2 + index:3 + index])
            assert client.say() == "hello world"  # answered while they dribble
        for sock in slow:
            assert closed_by_peer(sock, timeout=10)
    finally:
        for sock in slow:
            sock.close()
    assert provider.server.stats()["timed_out"] >= 6
    assert provider.server.stats()["workers"] <= 2
    assert client.say() == "hello world"
    assert any("read_timeout" in r.getMessage() for r in server_records(caplog, logging.WARNING))


@pytest.mark.parametrize("kind, body", [
    ("string", struct.pack("!bhi", 11, 1, GIANT)),
    ("binary", struct.pack("!bhi", 11, 1, GIANT)),
    ("list", struct.pack("!bhbi", 15, 1, 11, GIANT)),
    ("set", struct.pack("!bhbi", 14, 1, 10, GIANT)),
    ("map", struct.pack("!bhbbi", 13, 1, 11, 11, GIANT)),
])
def test_giant_length_prefix_closes_the_connection_before_allocating(hostile, kind, body):
    provider, client = hostile()
    peak_before, rss_before = memory_kb("VmPeak"), memory_kb("VmRSS")
    for _ in range(3):
        sock = connect(provider)
        sock.sendall(header("boom") + body + b"x" * 64)  # the prefix and a little payload
        assert closed_by_peer(sock, timeout=5), kind
        sock.close()
    # 3 x 1.5 GiB were declared; neither address space nor memory grew by anything like it.
    assert memory_kb("VmPeak") - peak_before < 512 * 1024
    assert memory_kb("VmRSS") - rss_before < 64 * 1024
    assert provider.server.stats()["protocol_errors"] >= 3
    assert client.say() == "hello world"


def test_garbage_and_http_close_the_connection_with_one_warning_per_peer(hostile, caplog):
    provider, client = hostile()
    caplog.set_level(logging.INFO, logger="probe")
    payloads = [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", bytes(range(256)) * 4, b"\x80\x01\x00\x07xx"]
    for source in ("127.0.0.1", "127.0.0.2"):
        for payload in payloads * 2:
            sock = connect(provider, source)
            sock.sendall(payload)
            assert closed_by_peer(sock, timeout=5)
            sock.close()
    warnings = [r for r in server_records(caplog, logging.WARNING) if "protocol error" in r.getMessage()]
    assert len(warnings) == 2, [r.getMessage() for r in warnings]
    assert [("127.0.0.1:" in w.getMessage(), "127.0.0.2:" in w.getMessage()) for w in warnings] == [
        (True, False), (False, True)]
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in warnings)
    assert provider.server.stats()["protocol_errors"] == 2 * len(payloads) * 2
    assert client.say() == "hello world"


def test_deep_nesting_is_refused_and_shallow_is_served(hostile):
    provider, client = hostile()
    module = client.module if hasattr(client, "module") else thriftpy2.load(
        HOSTILE_IDL, module_name="hostile_thrift")
    node = None
    for _ in range(30):
        node = module.Node(child=node)
    assert client.depth(node) == 30
    sock = connect(provider)
    sock.sendall(header("depth") + struct.pack("!bh", 12, 1) * 5000)
    assert closed_by_peer(sock, timeout=5)
    sock.close()
    assert provider.server.stats()["protocol_errors"] == 1
    assert client.say() == "hello world"


def test_undeclared_exception_reaches_the_caller_without_its_text(hostile, caplog):
    provider, client = hostile()
    caplog.set_level(logging.INFO, logger="probe")
    with pytest.raises(TApplicationException) as raised:
        client.boom("order 42")
    assert raised.value.type == TApplicationException.INTERNAL_ERROR
    assert "hunter2" not in str(raised.value) and "RuntimeError" not in str(raised.value)
    assert "HostileService" in str(raised.value) and "boom" in str(raised.value)
    errors = server_records(caplog, logging.ERROR)
    assert len(errors) == 1
    text = caplog.text
    assert "hunter2" in text and "Traceback" in text
    assert "HostileService.boom" in errors[0].getMessage() and "127.0.0.1:" in errors[0].getMessage()
    assert client.say() == "hello world"


def test_idle_timeout_closes_idle_connections_and_pooled_clients_carry_on(hostile):
    provider, client = hostile(idle_timeout=0.3)
    for _ in range(3):
        assert client.say() == "hello world"
        wait_for(lambda: provider.server.stats()["connections"] == 0, message="idle close")
    assert provider.server.stats()["timed_out"] >= 3
    assert client.say() == "hello world"


def test_a_thread_that_cannot_start_does_not_stop_the_provider(hostile, monkeypatch):
    import probe.rpc.server as thriftserver
    real_thread = threading.Thread
    failures = []

    class NoThreads(real_thread):
        def start(self):
            if len(failures) < 3:
                failures.append(self.name)
                raise RuntimeError("can't start new thread")
            return real_thread.start(self)

    provider, client = hostile(worker_threads=4)
    monkeypatch.setattr(thriftserver, "_new_thread", NoThreads)
    fresh = [connect(provider) for _ in range(3)]  # their first calls need new workers
    try:
        for sock in fresh:
            sock.sendall(header("say") + b"\0")
        for sock in fresh:
            sock.settimeout(10)
            assert sock.recv(100)  # answered once a worker could start
    finally:
        for sock in fresh:
            sock.close()
    assert len(failures) == 3
    assert client.say() == "hello world"


def test_accept_survives_running_out_of_file_descriptors(hostile, caplog):
    import resource
    provider, client = hostile()
    assert client.say() == "hello world"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 20, hard))
        try:
            while True:
                held.append(socket.socket())
        except OSError:
            pass
        held.pop().close()  # one fd for our connection: the provider's accept() gets EMFILE
        sock = socket.socket()
        sock.connect(("127.0.0.1", provider.port))
        wait_for(lambda: "cannot accept" in caplog.text, message="the EMFILE warning")
    finally:
        for spare in held:
            spare.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    sock.sendall(header("say") + b"\0")
    sock.settimeout(10)
    assert b"hello world" in sock.recv(1000)  # accepted once fds were free again
    sock.close()
    assert client.say() == "hello world"


def test_many_busy_clients_at_once_are_all_served(hostile):
    """Connections that arrive together each get a worker, although every worker
    keeps its own busy connection (no call waits behind another client's stream)."""
    from thriftpy2.rpc import make_client
    provider, client = hostile()
    service = thriftpy2.load(HOSTILE_IDL, module_name="hostile_busy_thrift").HostileService
    start = threading.Barrier(16)
    stop = time.monotonic() + 1.5
    done, errors = [], []

    def busy():
        bare = make_client(service, "127.0.0.1", provider.port, timeout=3000)
        try:
            start.wait()
            count = 0
            while time.monotonic() < stop:
                bare.say()
                count += 1
            done.append(count)
        except Exception as exc:
            errors.append(repr(exc))
        finally:
            bare.close()

    threads = [threading.Thread(target=busy) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == [] and len(done) == 16 and min(done) > 0


def test_a_handler_calling_sys_exit_gets_internal_error_and_kills_no_worker(appkey, providers):
    # SystemExit is no Exception: caught as one of those only, it ended the worker
    # thread for good, and with every worker gone the provider answered nobody.
    import sys

    from thriftpy2.rpc import make_client

    from conftest import IDL
    from demo_server import DemoServiceHandler
    from probe.idl import load_service

    class Exiting(DemoServiceHandler):
        def echo(self, text):
            sys.exit(3)

    provider = providers(appkey, handler=Exiting("exiting"), worker_threads=2)
    service = load_service(IDL, "DemoService")
    for _ in range(5):
        client = make_client(service, "127.0.0.1", provider.port, timeout=3000)
        try:
            with pytest.raises(TApplicationException) as caught:
                client.echo("x")
            assert caught.value.type == TApplicationException.INTERNAL_ERROR
        finally:
            client.close()
    client = make_client(service, "127.0.0.1", provider.port, timeout=3000)
    try:
        assert client.say() == "hello world"
    finally:
        client.close()
