"""Hostile input, round two: every listener probe opens (console, /metrics, the RPC
port's write side), the console login, and the config center's CLI, attacked as an
outsider would, on the real stack. Each test asserts what a secure system does:
another client is answered within a few seconds while the attack runs, threads and
memory stay bounded, the attacker's connections are reclaimed."""

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import pytest
import thriftpy2
from thriftpy2.protocol.cybin import TCyBinaryProtocol
from thriftpy2.thrift import TMessageType
from thriftpy2.transport import TCyMemoryBuffer

from conftest import run_probe, wait_for

HERE = os.path.dirname(os.path.abspath(__file__))
HOSTILE_IDL = os.path.join(HERE, "hostile.thrift")
ANSWER_WITHIN = 5.0  # seconds another client may wait while an attack runs


def _rss_mib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise AssertionError("no VmRSS")


def _timed_get(url, context=None):
    """(status, seconds) of one GET by a well-behaved client."""
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=ANSWER_WITHIN + 5, context=context) as reply:
            reply.read()
            status = reply.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    return status, time.monotonic() - started


def _closed_by_server(sock, timeout):
    """True once the server closed `sock` (EOF or reset) within `timeout` s."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except (ConnectionError, socket.timeout, OSError) as exc:
        return not isinstance(exc, socket.timeout)
    return False


def _connect(port, count):
    return [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]


def _close_all(socks):
    for sock in socks:
        try:
            sock.close()
        except OSError:
            pass


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    from probe.dev.certs import make_stack_certs
    return make_stack_certs(str(tmp_path_factory.mktemp("hostile-certs")))


@pytest.fixture
def console(stack):
    from probe.console import ConsoleServer
    server = ConsoleServer(bind="127.0.0.1", port=0).start()
    yield server
    server.stop()


@pytest.fixture
def tls_console(stack, certs):
    from probe.console import ConsoleServer
    server = ConsoleServer(bind="127.0.0.1", port=0, cert=certs.server.cert,
                           key=certs.server.key).start()
    yield server
    server.stop()


# -- console ---------------------------------------------------------------------
def test_console_answers_while_40_connections_trickle_headers(console):
    """slowloris: 40 connections send one header line every 2 s."""
    threads_before = threading.active_count()
    socks = _connect(console.port, 40)
    stop = threading.Event()

    def trickle():
        line = 0
        while not stop.is_set():
            for sock in socks:
                try:
                    sock.sendall(b"GET /login HTTP/1.1\r\nHost: x\r\n" if line == 0 else
                                 b"X-Line-%d: y\r\n" % line)
                except OSError:
                    pass
            line += 1
            stop.wait(2)

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    try:
        time.sleep(0.5)
        for _ in range(3):
            status, took = _timed_get(console.url + "/login")
            assert status == 200 and took < ANSWER_WITHIN, (status, took)
            time.sleep(1)
        # One thread for the trickler; the server adds none per connection.
        assert threading.active_count() - threads_before <= 1 + 8
        # The header deadline (10 s from the first byte) reclaims every trickler.
        assert all(_closed_by_server(sock, 15) for sock in socks)
    finally:
        stop.set()
        trickler.join(5)
        _close_all(socks)


def test_console_refuses_a_huge_header_without_holding_it(console):
    """One request with a 128 MiB header and no login."""
    rss_before = _rss_mib()
    sock = socket.create_connection(("127.0.0.1", console.port), timeout=5)
    sent = 0
    chunk = b"a" * (1024 * 1024)
    try:
        sock.sendall(b"GET /login HTTP/1.1\r\nHost: x\r\nX-Big: ")
        while sent < 128 * 1024 * 1024:
            sock.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass  # the server closed it: what we want
    finally:
        sock.close()
    assert sent < 16 * 1024 * 1024, "the server took %d bytes of one header" % sent
    assert _rss_mib() - rss_before < 40
    status, took = _timed_get(console.url + "/login")
    assert status == 200 and took < ANSWER_WITHIN


def test_console_header_cap_answers_431(console):
    sock = socket.create_connection(("127.0.0.1", console.port), timeout=5)
    try:
        sock.sendall(b"GET /login HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (64 * 1024) + b"\r\n\r\n")
    except OSError:
        pass
    try:
        reply = sock.recv(4096)
    except OSError:
        reply = b""
    sock.close()
    assert reply == b"" or reply.startswith(b"HTTP/1.1 431 ")


def test_https_console_answers_while_connections_never_start_tls(tls_console, certs):
    stalled = _connect(tls_console.port, 20)
    try:
        context = ssl.create_default_context(cafile=certs.ca)
        for _ in range(3):
            status, took = _timed_get(tls_console.url + "/login", context)
            assert status == 200 and took < ANSWER_WITHIN, (status, took)
        # The handshake deadline (5 s) reclaims them.
        assert all(_closed_by_server(sock, 12) for sock in stalled)
    finally:
        _close_all(stalled)


# -- /metrics ----------------------------------------------------------------------
def test_https_metrics_scrape_while_a_connection_sends_nothing(monkeypatch, certs):
    from probe import metrics
    monkeypatch.setenv("PROBE_METRICS_CERTFILE", certs.server.cert)
    monkeypatch.setenv("PROBE_METRICS_KEYFILE", certs.server.key)
    monkeypatch.delenv("PROBE_METRICS_CLIENT_CAFILE", raising=False)
    endpoint = metrics.serve(0)
    silent = _connect(endpoint.port, 3)
    try:
        context = ssl.create_default_context(cafile=certs.ca)
        for _ in range(3):
            status, took = _timed_get("https://127.0.0.1:%d/metrics" % endpoint.port, context)
            assert status == 200 and took < ANSWER_WITHIN, (status, took)
    finally:
        _close_all(silent)
        endpoint.close()


def test_plain_metrics_60_silent_connections_cost_no_thread(monkeypatch):
    from probe import metrics
    for name in ("PROBE_METRICS_CERTFILE", "PROBE_METRICS_KEYFILE", "PROBE_METRICS_CLIENT_CAFILE"):
        monkeypatch.delenv(name, raising=False)
    endpoint = metrics.serve(0)
    url = "http://127.0.0.1:%d/metrics" % endpoint.port
    try:
        _timed_get(url)
        threads_before = threading.active_count()
        silent = _connect(endpoint.port, 60)
        try:
            time.sleep(0.5)
            status, took = _timed_get(url)
            assert status == 200 and took < ANSWER_WITHIN
            assert threading.active_count() - threads_before <= 1
            assert all(_closed_by_server(sock, 15) for sock in silent)  # reclaimed
        finally:
            _close_all(silent)
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        assert "probe_server_requests_total" in body or "# HELP" in body
    finally:
        endpoint.close()


def test_metrics_names_are_kept(fresh_metrics, monkeypatch):
    from probe import metrics
    for name in ("PROBE_METRICS_CERTFILE", "PROBE_METRICS_KEYFILE", "PROBE_METRICS_CLIENT_CAFILE"):
        monkeypatch.delenv(name, raising=False)
    endpoint = metrics.serve(0)
    try:
        body = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % endpoint.port,
                                      timeout=5).read().decode()
        for name in ("probe_server_requests", "probe_client_requests",
                     "probe_server_request_seconds", "probe_client_request_seconds"):
            assert "# TYPE %s" % name in body
    finally:
        endpoint.close()


# -- RPC write side ------------------------------------------------------------------
class EchoHandler(object):
    def say(self):
        return "hello world"

    def boom(self, text):
        raise RuntimeError("no")

    def depth(self, node):
        return 0

    def echo(self, text):
        return text


WORKERS = 16


def _echo_request(service, size):
    membuf = TCyMemoryBuffer()
    protocol = TCyBinaryProtocol(membuf)
    protocol.write_message_begin("echo", TMessageType.CALL, 1)
    protocol.write_struct(service.echo_args(text="x" * size))
    protocol.write_message_end()
    return membuf.getvalue()


def test_callers_that_never_read_replies_pin_no_worker(stack, appkey):
    """More callers than workers send echo requests with a 4 KiB receive window and
    never read. (Here the kernel takes ~2 MiB of a reply a caller does not read, so
    the replies are 3 MiB: each would hold a worker in a blocking send.)"""
    from probe.client import build_client
    from probe.server import start_service
    module = thriftpy2.load(HOSTILE_IDL, module_name="hostile_echo_thrift")
    provider = start_service(HOSTILE_IDL, appkey, "HostileService", EchoHandler(), port=0,
                             block=False, shutdown_grace=0, advertise_host="127.0.0.1",
                             worker_threads=WORKERS, read_timeout=4)
    client = build_client(HOSTILE_IDL, appkey, "HostileService", socket_timeout=10000)
    request = _echo_request(module.HostileService, 3 * 1024 * 1024)
    attackers = []
    try:
        wait_for(lambda: len(client.watcher.table) == 1, message="the provider in the table")
        assert client.say() == "hello world"

        def attack():
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", provider.port))
            attackers.append(sock)
            try:
                sock.settimeout(20)
                sock.sendall(request)
            except OSError:
                pass

        senders = [threading.Thread(target=attack, daemon=True) for _ in range(WORKERS + 8)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(30)
        time.sleep(1)
        for _ in range(3):
            started = time.monotonic()
            assert client.say() == "hello world"
            assert time.monotonic() - started < ANSWER_WITHIN
        # The parked replies are bounded and dropped by the write deadline (read_timeout).
        server = provider.server
        wait_for(lambda: server.stats()["inflight"] == 0, message="no call pinned")
        assert server._parked_reply_bytes <= server.max_parked_reply_bytes
        wait_for(lambda: server.stats()["connections"] <= 2, timeout=20,
                 message="non-reading callers closed by the write deadline")
        assert server.stats()["timed_out"] >= WORKERS  # by the write deadline, not by EOF
    finally:
        _close_all(attackers)
        client.close()
        provider.stop(grace=0)


def test_tls_callers_that_never_read_replies_pin_no_worker(certs):
    """The same over mutual TLS, on the provider's server itself."""
    from probe.rpc.tls import client_context, server_context
    from probe.settings import RpcTls
    from probe.rpc.server import ThriftServer
    module = thriftpy2.load(HOSTILE_IDL, module_name="hostile_echo_tls_thrift")
    tls = RpcTls(certs.rpc_ca, certs.rpc_provider.cert, certs.rpc_provider.key)
    server = ThriftServer(module.HostileService, EchoHandler(), "127.0.0.1", 0,
                          worker_threads=4, read_timeout=8, ssl_context=server_context(tls))
    server.bind()
    server.start()
    request = _echo_request(module.HostileService, 3 * 1024 * 1024)
    attackers = []
    try:
        def attack():
            raw = socket.socket()
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            raw.connect(("127.0.0.1", server.port))
            sock = client_context(tls).wrap_socket(raw)
            attackers.append(sock)
            try:
                sock.settimeout(20)
                sock.sendall(request)
            except OSError:
                pass

        senders = [threading.Thread(target=attack, daemon=True) for _ in range(8)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(30)
        wait_for(lambda: server.calls >= 8, message="the echo calls served")
        raw = socket.create_connection(("127.0.0.1", server.port))
        good = client_context(tls).wrap_socket(raw)
        good.settimeout(ANSWER_WITHIN)
        membuf = TCyMemoryBuffer()
        protocol = TCyBinaryProtocol(membuf)
        protocol.write_message_begin("say", TMessageType.CALL, 1)
        protocol.write_struct(module.HostileService.say_args())
        protocol.write_message_end()
        good.sendall(membuf.getvalue())
        assert b"hello world" in good.recv(4096)  # 4 workers, 8 non-readers: still answered
        good.close()
        wait_for(lambda: server.inflight == 0, message="no call pinned on a send")
        wait_for(lambda: server.stats()["connections"] == 0, timeout=25,
                 message="non-reading TLS callers closed by the write deadline")
    finally:
        _close_all(attackers)
        server.close()


# -- console login ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def login_app(stack):
    from probe.console import create_app
    app = create_app()
    users = app.extensions["probe_console"].users
    users.add_user("Carol", "carol-password-1", "viewer")  # stored as carol
    users.add_user("nextuser", "next-password-1", "viewer")
    yield app
    users.remove_user("carol")
    users.remove_user("nextuser")
    app.extensions["probe_console"].close()


def _login(app, name, password, next_page=None, address="10.9.9.9"):
    client = app.test_client()
    page = client.get("/login", environ_base={"REMOTE_ADDR": address}).get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    form = {"csrf_token": token, "username": name, "password": password}
    if next_page is not None:
        form["next"] = next_page
    return client.post("/login", data=form, environ_base={"REMOTE_ADDR": address})


def test_user_names_are_one_identity_whatever_the_case(login_app):
    from probe.console.users import normalize_username
    assert normalize_username("CaRoL") == "carol"
    assert _login(login_app, "CAROL", "carol-password-1", address="10.1.0.1").status_code == 303
    for attempt in range(5):
        assert _login(login_app, "carol", "wrong-password", address="10.1.1.%d" % attempt) \
            .status_code == 200
    for variant in ("carol", "Carol", "CAROL", "cArol"):
        reply = _login(login_app, variant, "carol-password-1", address="10.1.2.1")
        assert reply.status_code == 429, variant
        assert "Set-Cookie" not in reply.headers or "probe_session" not in reply.headers["Set-Cookie"]


@pytest.mark.parametrize("target", ["/\t/evil.example/x", "//evil.example/x", "/\\evil.example/x",
                                    "\\\\evil.example/x", "https://evil.example/x", "/\n/evil.example",
                                    "/\r\n/evil.example", " //evil.example", "/\x00/evil.example",
                                    "evil.example/x"])
def test_next_accepts_only_a_same_site_path(login_app, target):
    reply = _login(login_app, "nextuser", "next-password-1", target, address="10.2.0.1")
    assert reply.status_code == 303
    location = reply.headers["Location"]
    parts = urlsplit(location)
    assert parts.netloc in ("", "localhost") and not parts.path.startswith("//"), location
    assert "evil" not in location


def test_next_keeps_a_same_site_path(login_app):
    reply = _login(login_app, "nextuser", "next-password-1", "/audit?x=1", address="10.2.0.2")
    assert urlsplit(reply.headers["Location"]).path == "/audit"


def test_same_site_path_unit():
    from probe.console.auth import same_site_path
    assert same_site_path("/apps/a_b?x=//y") == "/apps/a_b?x=//y"
    for bad in ("/\t/evil", "//evil", "/\\evil", "http://evil", "", None, 5, "/\x7f", "/\x85x",
                "/" + "a" * 2000):
        assert same_site_path(bad) is None, repr(bad)


# -- config center ------------------------------------------------------------------------
def _deep(depth):
    return "[" * depth + "]" * depth


def test_a_value_too_deep_is_refused_by_set_and_one_within_the_limit_is_served(appkey):
    from probe.configcenter import live_config
    from probe.configcenter.values import MAX_DEPTH
    refused = run_probe("config", "set", appkey, "deep", _deep(985), check=False)
    assert refused.returncode == 2 and "InvalidConfigValue" in refused.stderr
    assert "Traceback" not in refused.stderr
    run_probe("config", "set", appkey, "deep", _deep(MAX_DEPTH))
    cfg = live_config(appkey)
    try:
        wait_for(lambda: cfg.get("deep") is not None, message="the deep value served")
        depth, value = 0, cfg.get("deep")
        while isinstance(value, list):
            depth, value = depth + 1, value[0] if value else None
        assert depth == MAX_DEPTH
    finally:
        cfg.close()


def test_config_set_reads_the_value_from_stdin_and_a_file(appkey, tmp_path):
    from probe.configcenter import MAX_VALUE_BYTES
    big = json.dumps("v" * (600 * 1024))  # over one command-line argument (128 KiB)
    done = subprocess.run([sys.executable, "-m", "probe.cli", "config", "set", appkey, "big", "-"],
                          input=big.encode() + b"\n", capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(run_probe("config", "get", appkey, "big").stdout) == json.loads(big)
    path = tmp_path / "value.json"
    path.write_text('{"a": [1, 2]}\n')
    run_probe("config", "set", appkey, "fromfile", "--file", str(path))
    assert json.loads(run_probe("config", "get", appkey, "fromfile").stdout) == {"a": [1, 2]}
    path.write_text('[3]')
    run_probe("config", "set", appkey, "fromfile", "@" + str(path))
    assert json.loads(run_probe("config", "get", appkey, "fromfile").stdout) == [3]
    over = subprocess.run([sys.executable, "-m", "probe.cli", "config", "set", appkey, "big", "-"],
                          input=b'"' + b"x" * MAX_VALUE_BYTES + b'"', capture_output=True, timeout=60)
    assert over.returncode == 2 and b"InvalidConfigValue" in over.stderr
    assert b"Traceback" not in over.stderr


def test_history_limit_minus_5_is_a_clear_error(appkey):
    done = run_probe("config", "history", appkey, "k", "--limit", "-5", check=False)
    assert done.returncode == 2
    assert "InvalidArgument" in done.stderr and "--limit" in done.stderr
    for leak in ("Traceback", "1064", "SQL", "LIMIT"):
        assert leak not in done.stderr


def test_no_cli_path_prints_a_traceback_for_bad_input(appkey, tmp_path):
    bad = [
        ["config", "history", appkey, "k", "--limit", "-5"],
        ["config", "history", appkey, "k", "--limit", "abc"],
        ["config", "history", appkey, "k", "--limit", "99999999999999999999999"],
        ["config", "rollback", appkey, "k", "-1"],
        ["config", "rollback", appkey, "k", "1e3"],
        ["config", "set", appkey, "bad key!", "1"],
        ["config", "set", appkey, "k", "{"],
        ["config", "set", appkey, "k", "NaN"],
        ["config", "set", appkey, "k"],
        ["config", "set", appkey, "k", "1", "--file", str(tmp_path / "missing.json")],
        ["config", "set", appkey, "k", "--file", str(tmp_path / "missing.json")],
        ["config", "set", appkey, "k", "--file", str(tmp_path)],
        ["audit", "--limit", "0"],
        ["stats", appkey, "--minutes", "nan"],
        ["stats", appkey, "--minutes", "-1"],
        ["console", "--port", "70000"],
        ["console", "--session-ttl", "-3"],
        ["console", "--warmup", "inf"],
        ["node", "weight", appkey, "S", "127.0.0.1:1", "-5"],
        ["node", "weight", appkey, "S", "not-an-address", "5"],
        ["appkey", "add", "bad appkey!"],
    ]
    for argv in bad:
        done = run_probe(*argv, check=False)
        assert done.returncode != 0, argv
        assert "Traceback" not in done.stderr, (argv, done.stderr)
        assert done.stderr.strip(), argv


# -- ZooKeeper over TLS ---------------------------------------------------------------------
class _Relay(object):
    """A loopback TCP relay that records every byte between a client and `port`."""

    def __init__(self, port):
        self.target = port
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.seen = bytearray()
        self.lock = threading.Lock()
        self.socks = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            self.socks += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source, sink):
        while True:
            try:
                data = source.recv(65536)
                if not data:
                    break
                with self.lock:
                    self.seen += data
                sink.sendall(data)
            except OSError:
                break
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.listener.close()
        _close_all(self.socks)


def _session_through(relay, auth, tls):
    from probe.zk.session import ZooKeeper
    zk = ZooKeeper("127.0.0.1:%d" % relay.port, 6.0, auth=auth, tls=tls)
    try:
        zk.start(timeout=15)
        zk.client.ensure_path("/hostile-tls")
        zk.client.get_children("/")
    finally:
        zk.stop()


def test_zookeeper_digest_never_crosses_the_wire_in_clear(secure_stack):
    from probe.settings import load_settings
    stack, config_path, _ = secure_stack
    settings = load_settings(config_path, "dev").zookeeper
    assert settings.tls is not None, "probe stack up --secure writes zkserver TLS settings"
    password = settings.auth.split(":", 1)[1].encode()
    secure_port = int(settings.hosts.rsplit(":", 1)[1])
    relay = _Relay(secure_port)
    try:
        _session_through(relay, settings.auth, settings.tls)
        assert len(relay.seen) > 1000  # the session really went through the relay
        assert password not in relay.seen
    finally:
        relay.close()
    # The same session on the plain client port: the relay sees the password (so
    # the assertion above can fail).
    plain = _Relay(stack.ports["zookeeper"])
    try:
        _session_through(plain, settings.auth, None)
        assert password in plain.seen
    finally:
        plain.close()


def test_zookeeper_tls_settings_are_checked(tmp_path):
    from probe.errors import ConfigError
    from probe.settings import load_settings
    pem = tmp_path / "ca.pem"
    pem.write_text("x")
    base = {"mysql": {"dev": {"host": "127.0.0.1", "port": 1, "username": "u", "password": "p",
                              "database": "d"}},
            "redis": {"dev": {"host": "127.0.0.1", "port": 1}}}

    def settings(zk):
        import yaml
        path = tmp_path / ("c%d.yml" % len(list(tmp_path.iterdir())))
        path.write_text(yaml.safe_dump(dict(base, zkserver={"dev": dict(
            {"host": "127.0.0.1", "port": 2181}, **zk)})))
        return load_settings(str(path), "dev").zookeeper

    assert settings({}).tls is None
    tls = settings({"use_ssl": True, "ca": str(pem), "certfile": str(pem), "keyfile": str(pem)}).tls
    assert tls.kazoo_options()["use_ssl"] is True and tls.ca == str(pem)
    for bad in ({"use_ssl": "yes"}, {"use_ssl": True}, {"ca": str(pem)},
                {"use_ssl": True, "ca": str(pem), "certfile": str(pem)},
                {"use_ssl": True, "ca": str(tmp_path / "missing.pem")},
                {"use_ssl": True, "ca": str(pem), "verify_certs": "no"}):
        with pytest.raises(ConfigError) as refused:
            settings(bad)
        assert "zkserver.dev" in str(refused.value)


# -- the bounded HTTP server itself (no stack needed) ----------------------------------------
def _wsgi_app(environ, start_response):
    body = environ["wsgi.input"].read()
    if environ["PATH_INFO"] == "/big":
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return [b"x" * (8 * 1024 * 1024)]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"path=%s body=%s" % (environ["PATH_INFO"].encode(), body)]


@pytest.fixture
def http_server():
    from probe.rpc.httpserver import BoundedHttpServer, HttpLimits
    started = []

    def start(**limits):
        server = BoundedHttpServer(_wsgi_app, "127.0.0.1", 0, limits=HttpLimits(**limits)).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _connect_from(source, port):
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def _ask(sock, request=b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n"):
    sock.settimeout(5)
    sock.sendall(request)
    return sock.recv(65536)


def test_http_caps_connections_per_address_and_in_all(http_server):
    """Past a cap, a newcomer replaces the oldest connection still waiting for its
    request: a flood of idle connections never locks a real client out."""
    server = http_server(max_per_address=4, max_connections=6)
    mine = [_connect_from("127.0.0.1", server.port) for _ in range(4)]
    others = []
    try:
        time.sleep(0.2)
        newcomer = _connect_from("127.0.0.1", server.port)
        others.append(newcomer)
        assert _ask(newcomer).startswith(b"HTTP/1.1 200 ")
        assert _closed_by_server(mine[0], 5)  # the oldest of that address made room
        assert server.connection_count() == 4
        others += [_connect_from("127.0.0.3", server.port) for _ in range(2)]
        time.sleep(0.2)
        assert server.connection_count() == 6
        last = _connect_from("127.0.0.4", server.port)  # 6 in all: the oldest waiting goes
        others.append(last)
        assert _ask(last).startswith(b"HTTP/1.1 200 ")
        assert _closed_by_server(mine[1], 5)
        assert server.connection_count() <= 6 and server.evicted == 2
    finally:
        _close_all(mine + others)


def test_http_reply_not_read_is_dropped_by_the_write_deadline(http_server):
    server = http_server(write_timeout=1.0)
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reader.connect(("127.0.0.1", server.port))
    try:
        reader.sendall(b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n")
        time.sleep(0.3)
        other = socket.create_connection(("127.0.0.1", server.port))
        assert _ask(other).startswith(b"HTTP/1.1 200 ")
        other.close()
        wait_for(lambda: server.connection_count() == 0, timeout=10,
                 message="the non-reading connection closed")
    finally:
        reader.close()


def test_http_keep_alive_pipelining_body_and_idle_reclaim(http_server):
    server = http_server(idle_timeout=0.5)
    sock = socket.create_connection(("127.0.0.1", server.port))
    try:
        sock.settimeout(5)
        sock.sendall(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nPOST /b HTTP/1.1\r\nHost: h\r\n"
                     b"Content-Length: 3\r\n\r\nabc")
        replies = b""
        while replies.count(b"HTTP/1.1 200 ") < 2 or not replies.endswith(b"body=abc"):
            replies += sock.recv(65536)
        assert b"path=/a body=" in replies and b"path=/b body=abc" in replies
        assert _closed_by_server(sock, 5)  # idle after its replies: reclaimed
    finally:
        sock.close()


def test_http_expect_100_continue_and_body_cap(http_server):
    server = http_server(max_body_bytes=100)
    sock = socket.create_connection(("127.0.0.1", server.port))
    try:
        sock.settimeout(5)
        sock.sendall(b"POST /c HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 100 ")
        sock.sendall(b"ok")
        assert b"body=ok" in sock.recv(65536)
    finally:
        sock.close()
    big = socket.create_connection(("127.0.0.1", server.port))
    try:
        assert _ask(big, b"POST /c HTTP/1.1\r\nHost: h\r\nContent-Length: 101\r\n\r\n") \
            .startswith(b"HTTP/1.1 413 ")
    finally:
        big.close()


def test_http_limits_are_checked():
    from probe.errors import ProbeError
    from probe.rpc.httpserver import HttpLimits
    for bad in ({"workers": 0}, {"request_timeout": -1}, {"max_header_bytes": True}):
        with pytest.raises(ProbeError):
            HttpLimits(**bad).check()
