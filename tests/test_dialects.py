"""Node dialects (transport buffered/framed x protocol binary/compact): the registry
contract, the provider's per-connection detection and limits, the consumer's
codec per node, operator edits that keep what they do not own, and `probe
register`'s refusals and checks. Java and Node: tests/test_polyglot.py."""

import json
import logging
import socket
import struct
import threading

import pytest
from thriftpy2.protocol import TBinaryProtocol, TCompactProtocol
from thriftpy2.rpc import make_client
from thriftpy2.protocol import TBinaryProtocolFactory, TCompactProtocolFactory
from thriftpy2.thrift import TMessageType
from thriftpy2.transport import (TBufferedTransportFactory, TFramedTransportFactory,
                                 TMemoryBuffer)

from conftest import ADVERTISED_HOST, IDL, run_probe, wait_for
from probe import naming
from probe.routing.balancer import Node
from probe.errors import InvalidAppkey, InvalidHost, InvalidNodeAddress, InvalidNodeData, ProbeError
from probe.governance.register import ForeignNode, RegisterError
from probe.idl import load_service
from probe.rpc.messagelimits import (NEED_MORE, CompactScanner, FramedScanner, MessageRejected,
                                 MessageScanner, scanner_for)
from probe.naming import NodeSettings
from probe.zk.session import release_zookeeper, shared_zookeeper
from probe.rpc.codec import DEFAULT_CODEC, codec_for
from probe.settings import load_settings

DIALECTS = [("buffered", "binary"), ("buffered", "compact"), ("framed", "binary"),
            ("framed", "compact")]
FACTORIES = {"buffered": TBufferedTransportFactory, "framed": TFramedTransportFactory,
             "binary": TBinaryProtocolFactory, "compact": TCompactProtocolFactory}
SERVICE = load_service(IDL, "DemoService")


def encode_call(protocol, name, args, seqid=1):
    """One CALL message in `protocol` ("binary" | "compact"), unframed."""
    buf = TMemoryBuffer()
    proto = (TBinaryProtocol if protocol == "binary" else TCompactProtocol)(buf)
    proto.write_message_begin(name, TMessageType.CALL, seqid)
    proto.write_struct(args)
    proto.write_message_end()
    return buf.getvalue()


def framed(message):
    return struct.pack("!i", len(message)) + message


# -- the registry contract -------------------------------------------------------------

def test_node_data_dialect_defaults_and_round_trip():
    plain = NodeSettings.from_json('{"host": "10.0.0.5", "port": 81}')
    assert plain.dialect == ("buffered", "binary")
    assert json.loads(plain.to_json()) == {"host": "10.0.0.5", "port": 81, "weight": 10, "valid": 1}
    raw = ('{"host": "10.0.0.5", "port": 81, "weight": 3, "valid": 1, "transport": "framed", '
           '"protocol": "compact", "owner": {"team": "pay"}, "zone": "b"}')
    settings = NodeSettings.from_json(raw)
    assert settings.dialect == ("framed", "compact")
    assert json.loads(settings._replace(weight=7).to_json()) == dict(json.loads(raw), weight=7)


@pytest.mark.parametrize("field, value", [("transport", "http"), ("protocol", "json"),
                                          ("transport", 1), ("protocol", None.__class__.__name__),
                                          ("transport", ["framed"])])
def test_an_unknown_dialect_value_is_invalid_node_data(field, value):
    data = {"host": "10.0.0.5", "port": 81, field: value}
    with pytest.raises(InvalidNodeData) as refused:
        NodeSettings.from_json(json.dumps(data))
    assert field in str(refused.value)


def test_codecs_are_shared_per_dialect_and_refuse_unknown_names():
    assert codec_for() is DEFAULT_CODEC is codec_for("buffered", "binary")
    assert codec_for("framed", "compact").dialect == ("framed", "compact")
    with pytest.raises(InvalidNodeData):
        codec_for("framed", "json")


def test_the_disk_snapshot_carries_the_dialect():
    from probe.routing.watcher import _snapshot_node
    entry = {"name": "DemoService_10.0.0.5_81", "host": "10.0.0.5", "port": 81, "weight": 10,
             "valid": 1, "registered_at": 1.0, "transport": "framed", "protocol": "compact"}
    node = _snapshot_node(entry, "DemoService")
    assert (node.transport, node.protocol) == ("framed", "compact")
    assert _snapshot_node(node._asdict(), "DemoService") == node  # what the watcher writes
    old = {key: value for key, value in entry.items() if key not in ("transport", "protocol")}
    assert _snapshot_node(old, "DemoService").transport == "buffered"  # written before dialects
    with pytest.raises(ValueError):
        _snapshot_node(dict(entry, protocol="thrift-json"), "DemoService")


def test_a_node_tuple_defaults_to_buffered_binary():
    node = Node("S_10.0.0.1_1", "10.0.0.1", 1, 10, 1)
    assert (node.transport, node.protocol) == ("buffered", "binary")


# -- the provider's scanners -------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["binary", "compact"])
def test_scanners_find_the_end_of_every_kind_of_call_piece_by_piece(protocol):
    args = SERVICE.echo_args(text="h\u00e9llo " * 300)
    message = encode_call(protocol, "echo", args) + encode_call(protocol, "say", SERVICE.say_args())
    first_length = len(encode_call(protocol, "echo", args))
    scanner = scanner_for(message[0], 1 << 20)
    assert scanner.compact == (protocol == "compact")
    for cut in range(1, first_length):
        assert scanner.scan(message[:cut]) == NEED_MORE
    assert scanner.scan(message) == first_length
    frame = framed(encode_call(protocol, "add", SERVICE.add_args(a=-5, b=2 ** 31 - 1)))
    scanner = scanner_for(frame[0], 1 << 20)
    assert isinstance(scanner, FramedScanner) and scanner.header == 4
    assert scanner.scan(frame[:3]) == NEED_MORE
    assert scanner.scan(frame[:-1]) == NEED_MORE
    assert scanner.scan(frame + b"\x80") == len(frame)
    assert scanner.compact == (protocol == "compact")


def compact_call(body, name=b"echo"):
    """A compact CALL header (seqid 1) followed by `body` (the args struct's bytes)."""
    return bytes([0x82, 0x21, 0x01, len(name)]) + name + body


def test_the_compact_scanner_refuses_what_exceeds_the_limits():
    limit = 4096
    # A string declaring 1 GiB: refused from its varint alone.
    with pytest.raises(MessageRejected, match="string/binary"):
        CompactScanner(limit).scan(compact_call(b"\x18" + b"\x80\x80\x80\x80\x04"))
    # A list declaring a billion i64s.
    with pytest.raises(MessageRejected, match="container"):
        CompactScanner(limit).scan(compact_call(b"\x19" + b"\xf6" + b"\x80\x94\xeb\xdc\x03"))
    # A map declaring more entries than fit.
    with pytest.raises(MessageRejected, match="container"):
        CompactScanner(limit).scan(compact_call(b"\x1b" + b"\xb8\x17" + b"\x88"))
    # Nesting deeper than 64: lists of lists.
    deep = compact_call(b"\x19" + b"\x19" * 70)
    with pytest.raises(MessageRejected, match="nested deeper"):
        CompactScanner(limit).scan(deep)
    # A varint that never ends.
    with pytest.raises(MessageRejected, match="varint"):
        CompactScanner(limit).scan(compact_call(b"\x16" + b"\xff" * 12))
    # Not a CALL: a REPLY header.
    with pytest.raises(MessageRejected, match="CALL"):
        CompactScanner(limit).scan(bytes([0x82, 0x41, 1, 1]) + b"x\x00")
    # An unknown type id.
    with pytest.raises(MessageRejected, match="unknown compact type"):
        CompactScanner(limit).scan(compact_call(b"\x1e\x00"))
    # A well-formed call with nested containers of every kind passes.
    ok = compact_call(b"\x1c" b"\x19\x25\x02\x04" b"\x1b\x01\x58\x02\x01a" b"\x11\x00" b"\x00")
    assert CompactScanner(limit).scan(ok) == len(ok)


def test_a_frame_length_is_checked_before_the_frame_arrives():
    scanner = FramedScanner(4096)
    with pytest.raises(MessageRejected, match="frame declares"):
        scanner.scan(struct.pack("!i", 4097))  # four bytes in: refused, nothing allocated
    for bad in (0, -1):
        with pytest.raises(MessageRejected):
            FramedScanner(4096).scan(struct.pack("!i", bad))
    # A frame whose message ends before (or runs past) the frame's end.
    message = encode_call("binary", "say", SERVICE.say_args())
    with pytest.raises(MessageRejected, match="holds"):
        FramedScanner(4096).scan(struct.pack("!i", len(message) + 3) + message + b"\x00" * 3)
    with pytest.raises(MessageRejected, match="incomplete"):
        FramedScanner(4096).scan(struct.pack("!i", len(message) - 1) + message)
    with pytest.raises(MessageRejected, match="in the frame"):
        FramedScanner(4096).scan(struct.pack("!i", 10) + b"GET / HTTP")


def test_the_first_byte_picks_the_scanner():
    assert type(scanner_for(0x80, 100)) is MessageScanner
    assert type(scanner_for(0x82, 100)) is CompactScanner
    assert type(scanner_for(0x00, 100)) is FramedScanner
    with pytest.raises(MessageRejected):
        scanner_for(0x81, 100)
    with pytest.raises(MessageRejected):
        scanner_for(0xff, 100)


# -- a probe provider in every dialect ---------------------------------------------------

@pytest.mark.parametrize("dialect", DIALECTS, ids="+".join)
def test_thriftpy2_clients_of_every_dialect_share_one_provider_port(appkey, providers, dialect):
    provider = providers(appkey, name="any")
    transport, protocol = dialect
    client = make_client(SERVICE, provider.host, provider.port, timeout=5000,
                         trans_factory=FACTORIES[transport](), proto_factory=FACTORIES[protocol]())
    try:
        assert client.echo("x" * 100000) == "x" * 100000
        assert client.add(-7, 3) == -4
        with pytest.raises(Exception) as raised:
            client.fail("declared")
        assert type(raised.value).__name__ == "DemoError"
        assert client.whoami() == "any"
    finally:
        client.close()
    assert provider.server.stats()["protocol_errors"] == 0


@pytest.mark.parametrize("protocol", ["binary", "compact"])
def test_an_oversized_frame_closes_the_connection_before_it_is_read(appkey, providers, protocol):
    provider = providers(appkey, name="small", max_message_bytes=4096)
    sock = socket.create_connection((provider.host, provider.port), timeout=10)
    try:
        # The length alone (2 GiB - 1) is refused: nothing of the frame is sent.
        sock.sendall(struct.pack("!i", 2 ** 31 - 1) + (b"\x80" if protocol == "binary" else b"\x82"))
        assert sock.recv(100) == b""
    finally:
        sock.close()
    wait_for(lambda: provider.server.stats()["protocol_errors"] == 1, message="the refusal")
    # A framed call within the limit is answered in a frame.
    sock = socket.create_connection((provider.host, provider.port), timeout=10)
    try:
        sock.sendall(framed(encode_call(protocol, "add", SERVICE.add_args(a=1, b=2))))
        head = sock.recv(4, socket.MSG_WAITALL)
        (length,) = struct.unpack("!i", head)
        reply = sock.recv(length, socket.MSG_WAITALL)
        assert len(reply) == length and reply[0] == (0x80 if protocol == "binary" else 0x82)
    finally:
        sock.close()


def test_start_service_refuses_an_unknown_dialect_before_anything_is_written(appkey, providers):
    with pytest.raises(InvalidNodeData, match="transport"):
        providers(appkey, transport="zeromq")
    with pytest.raises(InvalidNodeData, match="protocol"):
        providers(appkey, protocol="json")


# -- the consumer's codec per node ---------------------------------------------------------

def test_one_client_speaks_each_node_its_own_dialect(appkey, providers, clients, fresh_metrics):
    for transport, protocol in DIALECTS:
        providers(appkey, name="%s+%s" % (transport, protocol), transport=transport,
                  protocol=protocol)
    client = clients(appkey)
    wait_for(lambda: len(client.watcher.table) == 4, message="the four nodes")
    zk = shared_zookeeper(load_settings().zookeeper)
    try:
        for node in client.watcher.table.nodes:
            raw, _ = zk.client.get(naming.node_path("dev", appkey, "DemoService", node.host, node.port))
            data = json.loads(raw)
            assert (data.get("transport", "buffered"), data.get("protocol", "binary")) == \
                (node.transport, node.protocol)
            if node.transport == "buffered" and node.protocol == "binary":
                assert set(data) == {"host", "port", "weight", "valid"}  # as before dialects
    finally:
        release_zookeeper(zk)
    assert {client.whoami() for _ in range(200)} == {"%s+%s" % d for d in DIALECTS}
    for pool in client._pools.values():
        assert pool.created == 1  # every dialect's connection stays in step and is reused
    for _ in range(40):
        assert client.echo("\u2713" * 3000) == "\u2713" * 3000
        with pytest.raises(Exception) as raised:
            client.fail("x")
        assert type(raised.value).__name__ == "DemoError"
    # The same metrics in every dialect: each node's calls are counted under its name.
    from prometheus_client import REGISTRY
    counted = {}
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name == "probe_client_requests_total" and sample.labels.get("appkey") == appkey:
                counted[sample.labels["status"]] = counted.get(sample.labels["status"], 0) + sample.value
    assert counted.get("ok", 0) >= 240 and counted.get("exception", 0) == 40, counted


def test_failover_from_a_dead_framed_node_to_a_compact_one(appkey, providers, clients):
    dead = providers(appkey, name="framed", transport="framed")
    providers(appkey, name="compact", protocol="compact")
    client = clients(appkey)
    wait_for(lambda: len(client.watcher.table) == 2, message="both nodes")
    dead.server.close()  # the port is gone, the znode stays: a connect failure
    assert {client.whoami() for _ in range(30)} == {"compact"}


def test_a_node_with_an_unknown_dialect_is_skipped_with_a_warning(appkey, providers, clients, caplog):
    good = providers(appkey, name="good")
    client = clients(appkey)
    wait_for(lambda: len(client.watcher.table) == 1, message="the node")
    zk = shared_zookeeper(load_settings().zookeeper)
    path = naming.node_path("dev", appkey, "DemoService", ADVERTISED_HOST, 1)
    try:
        with caplog.at_level(logging.WARNING, logger="probe"):
            zk.client.create(path, json.dumps({"host": ADVERTISED_HOST, "port": 1, "weight": 10,
                                               "valid": 1, "transport": "http2"}).encode(),
                             ephemeral=True)
            wait_for(lambda: "http2" in caplog.text, message="the warning")
        assert [n.port for n in client.watcher.table.all_nodes] == [good.port]
        assert {client.whoami() for _ in range(10)} == {"good"}
    finally:
        zk.client.delete(path)
        release_zookeeper(zk)


def test_a_dialect_change_in_node_data_replaces_the_pooled_connections(appkey, stack, clients):
    """A node that re-declares its dialect (a foreign server switched to framed) is
    spoken to in the new one; its old connections are dropped."""
    from probe.rpc.server import ThriftServer
    from demo_server import DemoServiceHandler
    server = ThriftServer(SERVICE, DemoServiceHandler("switch"), ADVERTISED_HOST, 0)
    port = server.bind()
    server.start()
    zk = shared_zookeeper(load_settings().zookeeper)
    path = naming.node_path("dev", appkey, "DemoService", ADVERTISED_HOST, port)
    try:
        zk.client.create(path, NodeSettings(ADVERTISED_HOST, port).to_bytes(), ephemeral=True,
                         makepath=True)
        client = clients(appkey)
        wait_for(lambda: len(client.watcher.table) == 1, message="the node")
        assert client.whoami() == "switch"
        first_pool = next(iter(client._pools.values()))
        zk.client.set(path, NodeSettings(ADVERTISED_HOST, port, transport="framed",
                                         protocol="compact").to_bytes())
        wait_for(lambda: client.watcher.table.nodes[0].transport == "framed", message="the edit")
        assert client.whoami() == "switch"
        (pool,) = client._pools.values()
        assert pool is not first_pool and pool.codec.dialect == ("framed", "compact")
    finally:
        zk.client.delete(path)
        release_zookeeper(zk)
        server.close()


# -- operator edits keep what they do not own ------------------------------------------------

def test_weight_and_switch_edits_keep_every_field_they_do_not_own(appkey, stack):
    zk = shared_zookeeper(load_settings().zookeeper)
    port = 4321
    path = naming.node_path("dev", appkey, "DemoService", ADVERTISED_HOST, port)
    data = {"host": ADVERTISED_HOST, "port": port, "weight": 10, "valid": 1,
            "transport": "framed", "protocol": "compact", "owner": "team-pay",
            "labels": {"zone": "b", "canary": True}}
    try:
        zk.client.create(path, json.dumps(data).encode(), ephemeral=True, makepath=True)
        address = "%s:%d" % (ADVERTISED_HOST, port)
        run_probe("node", "weight", appkey, "DemoService", address, "77")
        run_probe("node", "disable", appkey, "DemoService", address)
        live = json.loads(zk.client.get(path)[0])
        assert live == dict(data, weight=77, valid=0)
        from probe.stores.nodestore import NodeStore
        store = NodeStore(load_settings().redis, "dev")
        try:
            stored = json.loads(store.get_raw(naming.settings_field(
                appkey, "dev", "DemoService", ADVERTISED_HOST, port)))
        finally:
            store.close()
        assert stored == dict(data, weight=77, valid=0)
        run_probe("node", "enable", appkey, "DemoService", address)
        assert json.loads(zk.client.get(path)[0]) == dict(data, weight=77, valid=1)
    finally:
        zk.client.delete(path)
        release_zookeeper(zk)


def test_a_provider_keeps_its_own_dialect_whatever_redis_says(appkey, providers):
    """Redis holds weight and switch for a node; what it speaks is the process's."""
    first = providers(appkey, name="a", protocol="compact")
    port = first.port
    first.stop(grace=0)
    second = providers(appkey, name="b", port=port)  # same address, now buffered + binary
    assert second.registration.data.dialect == ("buffered", "binary")


# -- probe register ------------------------------------------------------------------------

@pytest.mark.parametrize("args, error", [
    (("b@d", "DemoService", "127.0.0.1", 1), InvalidAppkey),
    (("app", "DemoService", "bad_host", 1), InvalidHost),
    (("app", "DemoService", "127.0.0.1", 0), InvalidNodeAddress),
    (("app", "DemoService", "127.0.0.1", 70000), InvalidNodeAddress),
    (("app", "Demo/Service", "127.0.0.1", 1), ProbeError),
])
def test_register_refuses_bad_arguments(args, error):
    with pytest.raises(error):
        ForeignNode(*args)


def test_register_refuses_bad_options():
    for options in ({"transport": "zmq"}, {"protocol": "json"}, {"weight": 1001},
                    {"check": "two words"}, {"interval": 0}, {"fall": 0}):
        with pytest.raises(ProbeError):
            ForeignNode("app", "DemoService", "127.0.0.1", 1, **options)


def test_register_cli_refuses_before_anything_is_written(stack, appkey):
    unknown = "t_missing_appkey"
    done = run_probe("register", unknown, "DemoService", "127.0.0.1:9", check=False)
    assert done.returncode == 2 and "t_missing_appkey" in done.stderr
    done = run_probe("register", appkey, "DemoService", "127.0.0.1:0", check=False)
    assert done.returncode == 2 and "port" in done.stderr
    zk = shared_zookeeper(load_settings().zookeeper)
    try:
        assert not zk.client.exists(naming.appkey_path("dev", unknown))
    finally:
        release_zookeeper(zk)
    from probe.stores.nodestore import NodeStore
    store = NodeStore(load_settings().redis, "dev")
    try:
        assert store.get_raw(naming.settings_field(unknown, "dev", "DemoService", "127.0.0.1", 9)) is None
    finally:
        store.close()


@pytest.mark.parametrize("dialect", DIALECTS, ids="+".join)
def test_a_thrift_call_check_passes_in_the_declared_dialect_only(appkey, providers, dialect):
    provider = providers(appkey, name="checked")
    node = ForeignNode(appkey, "DemoService", provider.host, provider.port, transport=dialect[0],
                       protocol=dialect[1], check="say")
    assert node.check() is None
    # An unknown method is answered with a TApplicationException: alive all the same.
    assert ForeignNode(appkey, "DemoService", provider.host, provider.port, transport=dialect[0],
                       protocol=dialect[1], check="no_such_method").check() is None


def test_a_thrift_call_check_fails_on_a_server_that_does_not_speak_thrift(stack):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]

    def answer_garbage():
        for _ in range(2):
            conn, _ = listener.accept()
            conn.recv(100)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            conn.close()
    thread = threading.Thread(target=answer_garbage, daemon=True)
    thread.start()
    try:
        tcp = ForeignNode("app", "DemoService", "127.0.0.1", port, check_timeout=2)
        assert tcp.check() is None  # a TCP check is content with the connect
        thrift = ForeignNode("app", "DemoService", "127.0.0.1", port, check="ping", check_timeout=2)
        assert thrift.check() is not None
    finally:
        thread.join(5)
        listener.close()
    assert ForeignNode("app", "DemoService", "127.0.0.1", port).check() is not None  # refused


def test_register_comes_back_when_the_server_answers_again(appkey, providers):
    provider = providers(appkey, name="flappy")
    port = provider.port
    node = ForeignNode(appkey, "OtherService", provider.host, port, transport="framed",
                       interval=0.05, fall=1).open()
    runner = threading.Thread(target=node.run, daemon=True)
    runner.start()
    zk = shared_zookeeper(load_settings().zookeeper)
    path = naming.node_path("dev", appkey, "OtherService", provider.host, port)
    try:
        wait_for(lambda: zk.client.exists(path), message="registration")
        assert json.loads(zk.client.get(path)[0])["transport"] == "framed"
        run_probe("node", "weight", appkey, "OtherService", "%s:%d" % (provider.host, port), "42")
        provider.stop(grace=0)
        wait_for(lambda: not zk.client.exists(path), message="deregistration")
        providers(appkey, name="back", port=port)
        wait_for(lambda: zk.client.exists(path), message="registration again")
        # The operator's edit came back from Redis, the dialect from the command line.
        again = json.loads(zk.client.get(path)[0])
        assert (again["weight"], again["transport"]) == (42, "framed")
    finally:
        node.stop()
        runner.join(10)
        node.close()
        assert not zk.client.exists(path)
        release_zookeeper(zk)


def test_a_frame_that_never_completes_is_cut_at_read_timeout(appkey, providers):
    provider = providers(appkey, name="slow", read_timeout=0.3)
    sock = socket.create_connection((provider.host, provider.port), timeout=10)
    try:
        message = encode_call("compact", "say", SERVICE.say_args())
        sock.sendall(struct.pack("!i", len(message) + 100) + message)  # 100 bytes short
        assert sock.recv(100) == b""  # closed by the provider, not by our timeout
    finally:
        sock.close()
    wait_for(lambda: provider.server.stats()["timed_out"] == 1, message="the cut")


class _PausableRelay(object):
    """A loopback TCP relay to `port` that `cut()` makes unreachable (every
    connection closed, new ones refused) and `restore()` reopens on the same port."""

    def __init__(self, port):
        self.target = port
        self.port = None
        self.socks = []
        self.lock = threading.Lock()
        self.restore()

    def restore(self):
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port or 0))
        listener.listen(8)
        self.port = listener.getsockname()[1]
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self):
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() so the port frees
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            socks, self.socks = self.socks, []
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.socks += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source, sink):
        while True:
            try:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
            except OSError:
                break
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def test_register_deletes_the_node_of_a_server_that_died_while_zookeeper_was_away(
        stack, appkey, caplog):
    """The review's bug: the server dies while ZooKeeper is unreachable; the session
    reconnects within its timeout and keeps its ephemeral node, so the delete must
    stay pending and be done on reconnect, by the same (still live) session."""
    from probe.zk.session import ZooKeeper
    caplog.set_level(logging.INFO, logger="probe")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    port = server.getsockname()[1]
    relay = _PausableRelay(stack.ports["zookeeper"])
    # A long session timeout: the node can only leave because it was deleted.
    zk = ZooKeeper("127.0.0.1:%d" % relay.port, session_timeout=60.0)
    assert zk.start(timeout=15)
    # The first session's callbacks (run on zk's worker, after a jitter) done first: one
    # still queued at the cut would re-create the node and hold close() until reconnect.
    idle = threading.Event()
    zk.submit(idle.set)
    assert idle.wait(30)
    node = ForeignNode(appkey, "OtherService", "127.0.0.1", port, interval=0.05, fall=1).open()
    release_zookeeper(node.zk)
    node.zk = zk  # the registrar's session goes through the relay
    runner = threading.Thread(target=node.run, daemon=True)
    inspector = shared_zookeeper(load_settings().zookeeper)
    path = naming.node_path("dev", appkey, "OtherService", "127.0.0.1", port)
    try:
        runner.start()
        wait_for(lambda: node.registered and inspector.client.exists(path), message="registration")
        session = zk.session_id
        assert inspector.client.exists(path).ephemeralOwner == session
        relay.cut()
        wait_for(lambda: not zk.connected, message="the registrar losing ZooKeeper")
        server.close()  # the server dies while ZooKeeper is away
        wait_for(lambda: not node.registered, message="the failed check deregistering")
        assert inspector.client.exists(path) is not None  # nobody could delete it yet
        relay.restore()
        wait_for(lambda: inspector.client.exists(path) is None, timeout=30,
                 message="the node leaving once ZooKeeper is back")
        # Deleted by the very session that registered it, which lives on: no expiry.
        assert zk.session_id == session and zk.connected
        assert not node.registered
        # Warned once for the whole outage, not once per loop pass.
        unreachable = [r for r in caplog.records if "is unreachable: deleting" in r.getMessage()]
        assert len(unreachable) == 1
    finally:
        node.stop()
        runner.join(10)
        node.zk = None
        node.close()
        zk.stop()
        relay.cut()
        release_zookeeper(inspector)
