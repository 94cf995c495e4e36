"""RPC mutual TLS (`rpc_tls.<env>`) against a real secured stack (`Stack(secure=True)`,
as `probe stack up --secure` makes it: its config names an RPC CA and a certificate
for both ends). Providers serve TLS only; probe consumers connect with their
certificate; everything else a provider and a consumer do keeps working over TLS."""

import logging
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys

import pytest
import yaml
from prometheus_client import REGISTRY
from thriftpy2.rpc import make_client
from thriftpy2.transport import TTransportException

from conftest import IDL, ROOT, client_builder, provider_starter, wait_for, write_config

from probe import naming
from probe.dev.certs import make_stack_certs
from probe.errors import ConfigError, NodeUnreachable
from probe.rpc.tls import RpcTlsError
from probe.settings import load_settings

ENV = "dev"
SAY_CALL = struct.pack("!iI", -2147418112 | 1, 3) + b"say" + struct.pack("!i", 1) + b"\x00"


@pytest.fixture(scope="session")
def tls_stack(secure_stack, tmp_path_factory):
    """The secured stack's config (it has rpc_tls.dev), its RPC certificates, and a
    second set of certificates from an unrelated CA."""
    _, config_path, _ = secure_stack
    with open(config_path) as handle:
        config = yaml.safe_load(handle)
    stranger = make_stack_certs(str(tmp_path_factory.mktemp("stranger-certs")))
    return config_path, config["rpc_tls"][ENV], stranger


@pytest.fixture
def config(tls_stack):
    return tls_stack[0]


@pytest.fixture
def tls_files(tls_stack):
    return tls_stack[1]


@pytest.fixture
def stranger(tls_stack):
    return tls_stack[2]


@pytest.fixture
def appkey(secure_appkey):
    return secure_appkey


@pytest.fixture
def providers(config):
    start = provider_starter("tls%d", config_path=config, env=ENV)
    yield start
    start.stop_all()


@pytest.fixture
def clients(config):
    build = client_builder(config_path=config, env=ENV, snapshot_dir=False)
    yield build
    build.close_all()


def tls_socket(provider, ca=None, cert=None, key=None, timeout=10.0):
    """A raw TLS connection to `provider` (handshake done), as any TLS client makes it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    if ca:
        context.load_verify_locations(ca)
    else:
        context.verify_mode = ssl.CERT_NONE
    if cert:
        context.load_cert_chain(cert, key)
    raw = socket.create_connection(("127.0.0.1", provider.port), timeout=timeout)
    return context.wrap_socket(raw)


def read_until_closed(sock):
    """Everything the peer sends until it closes; raises socket.timeout if it does not."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            return data
        if not chunk:
            return data
        data += chunk


def call_and_read(sock):
    """Send say() and return what comes back before the close (b"" when refused)."""
    try:
        sock.sendall(SAY_CALL)
    except OSError:  # the provider closed first (ssl.SSLError is an OSError)
        return b""
    return read_until_closed(sock)


def requests_total(side, appkey):
    """Calls of `appkey` counted in probe_<side>_requests_total of this process."""
    total = 0.0
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name == "probe_%s_requests_total" % side and \
                    sample.labels.get("appkey") == appkey:
                total += sample.value
    return total


# -- a probe consumer over TLS -------------------------------------------------------

def test_consumer_calls_over_tls_reuse_the_pooled_connection(appkey, providers, clients):
    provider = providers(appkey, name="tls-node")
    assert provider.server.ssl_context is not None
    client = clients(appkey)
    assert client.say() == "hello world"
    assert client.echo("x" * 100000) == "x" * 100000  # many TLS records, one message
    assert client.add(2, 3) == 5
    with pytest.raises(Exception) as raised:
        client.fail("declared")
    assert type(raised.value).__name__ == "DemoError" and raised.value.message == "declared"
    for _ in range(20):
        assert client.whoami() == "tls-node"
    (pool,) = client._pools.values()
    assert pool.created == 1  # every call went over the one TLS connection
    assert isinstance(pool.idle[0].sock, ssl.SSLSocket)
    assert pool.idle[0].sock.version() in ("TLSv1.2", "TLSv1.3")
    assert provider.server.stats()["protocol_errors"] == 0


def test_metrics_count_calls_over_tls(appkey, providers, clients):
    providers(appkey)
    client = clients(appkey)
    for _ in range(5):
        client.say()
    with pytest.raises(Exception):
        client.fail("boom")
    assert requests_total("client", appkey) == 6
    wait_for(lambda: requests_total("server", appkey) == 6, message="6 server-side calls")


def test_a_pooled_tls_connection_the_provider_closed_is_replaced_unseen(appkey, providers, clients):
    provider = providers(appkey, idle_timeout=0.3)
    client = clients(appkey)
    assert client.say() == "hello world"
    (pool,) = client._pools.values()
    wait_for(lambda: provider.server.stats()["connections"] == 0, message="idle close")
    assert provider.server.stats()["timed_out"] >= 1
    assert client.say() == "hello world"  # the stale check saw the close: no error
    assert pool.created == 2


# -- callers the provider refuses -----------------------------------------------------

def test_plaintext_thrift_client_is_refused_with_one_warning(appkey, providers, caplog):
    from probe.idl import load_service
    provider = providers(appkey)
    service = load_service(IDL, "DemoService")
    caplog.set_level(logging.WARNING, logger="probe.server")
    for _ in range(3):
        plain = make_client(service, "127.0.0.1", provider.port, timeout=5000)
        with pytest.raises((TTransportException, OSError)):
            plain.say()
        plain.close()
    assert provider.server.stats()["calls"] == 0
    assert provider.server.stats()["protocol_errors"] == 3
    lines = [r for r in caplog.records if "TLS handshake refused" in r.getMessage()]
    assert len(lines) == 1  # one line per peer per minute
    assert "127.0.0.1" in lines[0].getMessage()


def test_tls_client_without_a_certificate_is_refused(appkey, providers, tls_files):
    provider = providers(appkey)
    sock = tls_socket(provider, ca=tls_files["ca"])  # TLS 1.3: the refusal comes after
    try:
        assert call_and_read(sock) == b""
    finally:
        sock.close()
    wait_for(lambda: provider.server.stats()["protocol_errors"] == 1, message="refusal counted")
    assert provider.server.stats()["calls"] == 0


def test_certificate_from_another_ca_is_refused(appkey, providers, stranger):
    provider = providers(appkey)
    try:
        sock = tls_socket(provider, cert=stranger.rpc_consumer.cert, key=stranger.rpc_consumer.key)
    except ssl.SSLError as exc:  # refused within the handshake
        assert "ALERT" in exc.reason
    else:
        try:
            assert call_and_read(sock) == b""
        finally:
            sock.close()
    wait_for(lambda: provider.server.stats()["protocol_errors"] == 1, message="refusal counted")
    assert provider.server.stats()["calls"] == 0


def test_a_probe_consumer_with_a_foreign_certificate_gets_no_call_through(
        appkey, providers, clients, config, stranger, tmp_path):
    provider = providers(appkey)

    def foreign(data):
        data["rpc_tls"][ENV] = {"ca": stranger.rpc_ca, "cert": stranger.rpc_consumer.cert,
                                "key": stranger.rpc_consumer.key}
    client = clients(appkey, config_path=write_config(tmp_path / "foreign.yml", config, foreign))
    with pytest.raises(NodeUnreachable) as raised:
        client.say()
    assert "TLS handshake" in str(raised.value)
    assert provider.server.stats()["calls"] == 0


def test_provider_handshake_of_a_silent_client_is_cut_after_read_timeout(appkey, providers, caplog):
    provider = providers(appkey, read_timeout=0.3, idle_timeout=300)
    caplog.set_level(logging.WARNING, logger="probe.server")
    sock = socket.create_connection(("127.0.0.1", provider.port), timeout=20)
    try:
        assert read_until_closed(sock) == b""  # closed by the provider, long before 20 s
    finally:
        sock.close()
    assert provider.server.stats()["timed_out"] == 1
    assert any("TLS handshake not complete" in r.getMessage() for r in caplog.records)


def test_half_a_tls_record_is_cut_after_read_timeout(appkey, providers, tls_files):
    """A record that never completes counts as a message that never completes."""
    provider = providers(appkey, read_timeout=0.3, idle_timeout=300)
    sock = tls_socket(provider, tls_files["ca"], tls_files["cert"], tls_files["key"], timeout=20)
    try:
        sock.sendall(SAY_CALL)
        assert sock.recv(4096)  # the reply: the connection works
        raw = socket.socket(fileno=os.dup(sock.fileno()))
        raw.sendall(b"\x17\x03\x03\x00\x40" + b"\x00" * 10)  # header says 64 bytes, 10 follow
        raw.close()
        assert read_until_closed(sock) == b""
    finally:
        sock.close()
    assert provider.server.stats()["timed_out"] == 1


# -- limits over TLS -----------------------------------------------------------------

def test_idle_timeout_holds_over_tls(appkey, providers, tls_files):
    provider = providers(appkey, idle_timeout=0.3)
    sock = tls_socket(provider, tls_files["ca"], tls_files["cert"], tls_files["key"], timeout=20)
    try:
        sock.sendall(SAY_CALL)
        reply = sock.recv(4096)
        assert b"hello world" in reply
        assert read_until_closed(sock) == b""
    finally:
        sock.close()
    assert provider.server.stats()["timed_out"] == 1
    assert provider.server.stats()["protocol_errors"] == 0


def test_a_giant_length_prefix_over_tls_closes_the_connection(appkey, providers, tls_files):
    provider = providers(appkey, max_message_bytes=4096)
    sock = tls_socket(provider, tls_files["ca"], tls_files["cert"], tls_files["key"], timeout=20)
    try:
        # echo(text) whose string declares 1.5 GiB: refused the moment its length is in.
        call = (struct.pack("!iI", -2147418112 | 1, 4) + b"echo" + struct.pack("!i", 1)
                + struct.pack("!bh", 11, 1) + struct.pack("!i", 1536 * 1024 * 1024))
        sock.sendall(call)
        assert read_until_closed(sock) == b""
    finally:
        sock.close()
    stats = provider.server.stats()
    assert stats["protocol_errors"] == 1 and stats["calls"] == 0


def test_max_connections_holds_over_tls(appkey, providers, tls_files):
    provider = providers(appkey, max_connections=1)
    first = tls_socket(provider, tls_files["ca"], tls_files["cert"], tls_files["key"])
    try:
        first.sendall(SAY_CALL)
        assert b"hello world" in first.recv(4096)
        with pytest.raises((ssl.SSLError, OSError)):
            second = tls_socket(provider, tls_files["ca"], tls_files["cert"], tls_files["key"])
            second.sendall(SAY_CALL)
            if not second.recv(4096):
                raise OSError("closed")
        assert provider.server.stats()["rejected"] == 1
    finally:
        first.close()


# -- failover -----------------------------------------------------------------------

def test_failover_between_two_tls_providers_when_one_stops(appkey, providers, clients):
    first = providers(appkey, name="first")
    providers(appkey, name="second")
    attempts = []
    client = clients(appkey, observe=lambda method, node, status, seconds: attempts.append(
        (node, status)))
    wait_for(lambda: len(client.watcher.table) == 2, message="two nodes")
    seen = {client.whoami() for _ in range(40)}
    assert seen == {"first", "second"}
    # The first provider's port closes while its znode is still there: connects are
    # refused, and every call (none idempotent) moves to the second before sending.
    first.server.stop_accepting()
    first.server.drain(5)
    wait_for(lambda: first.server.stats()["connections"] == 0, message="first closed its connections")
    # On a loaded machine even loopback delivers the FIN a moment later, and the pool
    # skips its stale check for a connection released less than STALE_CHECK_AFTER
    # ago (by design: see probe.rpc.pool); a request written then meets the close, as
    # it would on any server closing at that instant. Let both moments pass.
    from probe.rpc.pool import STALE_CHECK_AFTER, perf_counter
    (pool,) = [p for p in client._pools.values() if p.port == first.port]
    wait_for(lambda: all(conn.is_stale() and perf_counter() - conn.released_at > STALE_CHECK_AFTER
                         for conn in list(pool.idle)), message="the close arrived")
    del attempts[:]
    try:
        assert {client.whoami() for _ in range(20)} == {"second"}
    except Exception as exc:
        raise AssertionError("%r attempts: %s; first %s %s; pools %s" % (
            exc, attempts, first.port, first.server.stats(),
            [(p.port, p.created) for p in client._pools.values()]))
    first.stop(grace=0)
    wait_for(lambda: len(client.watcher.table) == 1, message="one node")
    assert client.say() == "hello world"


def test_a_refused_tls_handshake_counts_as_a_connect_failure(
        appkey, providers, clients, config, stranger, tls_files, tmp_path):
    """A provider that trusts another CA refuses our certificate (with TLS 1.3 the
    consumer learns it on its first read): the call moves to the good node, even
    for a method that is not idempotent, because nothing reached a handler."""
    def distrusting(data):
        data["rpc_tls"][ENV] = {"ca": stranger.rpc_ca, "cert": tls_files["cert"],
                                "key": tls_files["key"]}
    picky = providers(appkey, name="picky",
                      config_path=write_config(tmp_path / "picky.yml", config, distrusting))
    providers(appkey, name="good")
    client = clients(appkey, retries=2, eject_after=100)
    wait_for(lambda: len(client.watcher.table) == 2, message="two nodes")
    assert {client.whoami() for _ in range(20)} == {"good"}
    assert picky.server.stats()["calls"] == 0
    assert picky.server.stats()["protocol_errors"] >= 1


def test_a_plaintext_provider_is_a_connect_failure_for_a_tls_consumer(
        appkey, providers, clients, config, tmp_path):
    def plaintext(data):
        del data["rpc_tls"]
    plain = providers(appkey, name="plain",
                      config_path=write_config(tmp_path / "plain.yml", config, plaintext))
    assert plain.server.ssl_context is None
    providers(appkey, name="tls")
    client = clients(appkey, eject_after=100)
    wait_for(lambda: len(client.watcher.table) == 2, message="two nodes")
    assert {client.whoami() for _ in range(20)} == {"tls"}
    assert plain.server.stats()["calls"] == 0


# -- workers=N over TLS ----------------------------------------------------------------

def test_two_workers_serve_tls(appkey, config, clients, tmp_path):
    from probe.dev.stack import free_port
    port = free_port()
    env = dict(os.environ, PROBE_CONFIG=config, PROBE_ENV=ENV, PROBE_TEST_WORKERS="2",
               PROBE_TEST_GRACE="0.2")
    env.pop("PROBE_METRICS_PORT", None)
    log_path = tmp_path / "provider.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "provider_main.py"),
                                    appkey, "w", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                   env=env)
    try:
        client = clients(appkey, max_idle=0)  # every call opens (and handshakes) anew
        wait_for(lambda: process.poll() is None and len(client.watcher.table) == 1, timeout=30,
                 message="the provider registered (log: %s)" % log_path)
        pids = set()
        for _ in range(60):
            pids.add(client.pid())
            if len(pids) == 2:
                break
        assert len(pids) == 2 and process.pid not in pids
        assert client.say() == "hello world"
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert "mutual TLS" in log_path.read_text()


# -- refused starts -----------------------------------------------------------------

def test_a_bad_pem_refuses_the_start_before_anything_is_registered(appkey, config, tmp_path):
    from probe.server import start_service
    from probe.client import build_client
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    settings = load_settings(config, ENV)
    good = settings.rpc_tls
    for bad in ({"cert": str(garbage)}, {"key": str(garbage)}, {"ca": str(garbage)},
                {"key": good.ca}):  # a key that is no key
        def change(data, bad=bad):
            data["rpc_tls"][ENV].update(bad)
        path = write_config(tmp_path / "bad.yml", config, change)
        with pytest.raises(RpcTlsError) as raised:
            start_service(IDL, appkey, "DemoService", object(), port=0, block=False,
                          config_path=path, env=ENV)
        assert "rpc_tls.%s" % ENV in str(raised.value)
        assert isinstance(raised.value, ConfigError)
        with pytest.raises(RpcTlsError):
            build_client(IDL, appkey, "DemoService", config_path=path, env=ENV,
                         snapshot_dir=False)

    def missing(data):
        data["rpc_tls"][ENV]["cert"] = str(tmp_path / "nowhere.pem")
    with pytest.raises(ConfigError) as raised:
        start_service(IDL, appkey, "DemoService", object(), port=0, block=False,
                      config_path=write_config(tmp_path / "missing.yml", config, missing), env=ENV)
    assert "nowhere.pem" in str(raised.value)
    from kazoo.client import KazooClient
    tls = settings.zookeeper.tls  # the secured stack's ZooKeeper speaks TLS
    zk = KazooClient(hosts=settings.zookeeper.hosts, **(tls.kazoo_options() if tls else {}))
    zk.start(10)
    try:
        parent = naming.appkey_path(ENV, appkey)
        assert not zk.exists(parent) or zk.get_children(parent) == []  # nothing registered
    finally:
        zk.stop()
        zk.close()


def test_an_encrypted_key_is_refused_not_prompted_for(tmp_path, tls_files):
    from cryptography.hazmat.primitives import serialization
    from probe.rpc.tls import server_context
    from probe.settings import RpcTls
    with open(tls_files["key"], "rb") as handle:
        key = serialization.load_pem_private_key(handle.read(), None)
    locked = tmp_path / "locked-key.pem"
    locked.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(RpcTlsError) as raised:
        server_context(RpcTls(tls_files["ca"], tls_files["cert"], str(locked)))
    assert "encrypted" in str(raised.value)


def test_graceful_stop_drains_a_call_in_flight_over_tls(appkey, providers, clients):
    import threading
    provider = providers(appkey)
    client = clients(appkey, socket_timeout=10000)
    assert client.say() == "hello world"
    results = []
    caller = threading.Thread(target=lambda: results.append(client.slow(400)))
    caller.start()
    wait_for(lambda: provider.server.inflight == 1, message="the call in flight")
    provider.stop(grace=0)
    caller.join(10)
    assert results == ["slept 400 ms"]
    assert provider.server.stats()["connections"] == 0


# -- pure logic ---------------------------------------------------------------------

def test_contexts_are_mutual_tls_1_2_or_newer(tls_files):
    from probe.rpc.tls import client_context, server_context
    from probe.settings import RpcTls
    tls = RpcTls(tls_files["ca"], tls_files["cert"], tls_files["key"])
    server, client = server_context(tls), client_context(tls)
    for context in (server, client):
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert client.check_hostname is False  # the CA is the trust boundary (docs/notes/rpc-tls.md)
    with pytest.raises(RpcTlsError) as raised:
        server_context(RpcTls(tls_files["ca"], None, tls_files["key"]))
    assert "'cert' is missing" in str(raised.value)


def test_only_a_peer_alert_counts_as_a_refused_handshake():
    from probe.rpc.tls import is_refused_handshake
    alert = ssl.SSLError(1, "tlsv13 alert certificate required")
    alert.reason = "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    assert is_refused_handshake(alert)
    eof = ssl.SSLEOFError(8, "EOF occurred in violation of protocol")
    assert not is_refused_handshake(eof)
    assert not is_refused_handshake(ConnectionResetError())
    assert not is_refused_handshake(TTransportException(TTransportException.END_OF_FILE, "eof"))


def test_a_reply_bigger_than_the_socket_buffers_reaches_a_slow_reader(appkey, providers, tls_files):
    """The provider's non-blocking TLS send waits for a reader that is slow to take
    its reply (within read_timeout), as a blocking send would."""
    import time
    provider = providers(appkey, max_message_bytes=64 * 1024 * 1024)
    text = b"y" * (12 * 1024 * 1024)  # more than loopback's autotuned buffers take
    call = (struct.pack("!iI", -2147418112 | 1, 4) + b"echo" + struct.pack("!i", 7)
            + struct.pack("!bh", 11, 1) + struct.pack("!i", len(text)) + text + b"\x00")
    sock = tls_socket(provider, tls_files["ca"], tls_files["cert"], tls_files["key"], timeout=20)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(call)
        time.sleep(0.3)  # let the provider fill every buffer between us
        # message header (16 bytes), field 0 header and length (7), the text, STOP (1)
        expected = 16 + 7 + len(text) + 1
        reply = bytearray()
        while len(reply) < expected:
            chunk = sock.recv(65536)
            assert chunk, "closed after %d bytes" % len(reply)
            reply += chunk
    finally:
        sock.close()
    assert text in reply
    assert provider.server.stats()["protocol_errors"] == 0


@pytest.mark.parametrize("dialect", [("buffered", "compact"), ("framed", "binary"),
                                     ("framed", "compact")], ids="+".join)
def test_mutual_tls_under_every_dialect(appkey, providers, clients, dialect):
    transport, protocol = dialect
    provider = providers(appkey, name="tls-" + transport, transport=transport, protocol=protocol)
    client = clients(appkey)
    wait_for(lambda: len(client.watcher.table) == 1, message="the node")
    (node,) = client.watcher.table.nodes
    assert (node.transport, node.protocol) == dialect
    assert client.echo("x" * 100000) == "x" * 100000
    with pytest.raises(Exception) as raised:
        client.fail("declared")
    assert type(raised.value).__name__ == "DemoError" and raised.value.message == "declared"
    assert [client.add(i, 1) for i in range(20)] == [i + 1 for i in range(20)]
    (pool,) = client._pools.values()
    assert pool.created == 1 and isinstance(pool.idle[0].sock, ssl.SSLSocket)
    assert provider.server.stats()["protocol_errors"] == 0
