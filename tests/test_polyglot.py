"""Polyglot fleets: the official Apache Thrift libraries of Java and Node against probe.

Built by the test itself from idl/polyglot.thrift, once per session: Java with
Debian's thrift compiler, libthrift-java (0.16) and javac (`make deps` installs
them); Node with npm's `thrift` pinned to the compiler's version, installed into
tests/.node (kept between runs). Java and Node code: tests/polyglot/.

- Node and Java clients in buffered/framed x binary/compact call a probe provider
  (a struct of i64/list/map/binary, a declared exception, oneway then a call).
- A Java TThreadedSelectorServer (framed), a THsHaServer (framed, compact) and a
  TThreadPoolServer speaking compact, each registered with `probe register`,
  serve behind a probe consumer beside a probe provider; weight and disable edits
  keep their dialect; a server killed behind `probe register` leaves the registry
  within the session timeout, and SIGTERM deregisters.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ADVERTISED_HOST, ROOT, SESSION_TIMEOUT, run_probe, wait_for
from probe import naming
from probe.dev.stack import free_port
from probe.idl import load_module
from probe.zk.session import release_zookeeper, shared_zookeeper
from probe.settings import load_settings

POLY_IDL = os.path.join(ROOT, "idl", "polyglot.thrift")
SOURCES = os.path.join(ROOT, "tests", "polyglot")
NODE_DIR = os.path.join(ROOT, "tests", ".node")
THRIFT_JAR_DIR = "/usr/share/java"
DIALECTS = [("buffered", "binary"), ("buffered", "compact"), ("framed", "binary"),
            ("framed", "compact")]


def _compiler_version():
    out = subprocess.run(["thrift", "--version"], capture_output=True, text=True, timeout=30)
    return out.stdout.split()[-1]


@pytest.fixture(scope="session")
def polyglot(tmp_path_factory):
    """{"java": classpath, "node_gen": generated Node code, "node_path": NODE_PATH}."""
    for tool in ("thrift", "javac", "java", "node", "npm"):
        if shutil.which(tool) is None:
            pytest.fail("%s is not installed: run `make deps` (thrift-compiler, "
                        "default-jdk-headless, libthrift-java, nodejs, npm)" % tool)
    jar = os.path.join(THRIFT_JAR_DIR, "thrift.jar")
    if not os.path.exists(jar):
        pytest.fail("libthrift-java is not installed (%s): run `make deps`" % jar)
    out = tmp_path_factory.mktemp("polyglot")
    java_gen, node_gen, classes = out / "java", out / "gen-nodejs", out / "classes"
    for folder in (java_gen, node_gen, classes):
        folder.mkdir()
    subprocess.run(["thrift", "--gen", "java:generated_annotations=suppress", "-out",
                    str(java_gen), POLY_IDL], check=True, capture_output=True, timeout=60)
    subprocess.run(["thrift", "--gen", "js:node", "-out", str(node_gen), POLY_IDL],
                   check=True, capture_output=True, timeout=60)
    classpath = ":".join([jar, os.path.join(THRIFT_JAR_DIR, "slf4j-api.jar"),
                          os.path.join(THRIFT_JAR_DIR, "slf4j-nop.jar")])
    sources = [str(p) for p in java_gen.rglob("*.java")] + [os.path.join(SOURCES, "PolyMain.java")]
    subprocess.run(["javac", "-nowarn", "-d", str(classes), "-cp", classpath] + sources,
                   check=True, capture_output=True, timeout=300)
    # npm's thrift, the compiler's version, in a folder of the tests' own (cached).
    version = _compiler_version()
    installed = os.path.join(NODE_DIR, "node_modules", "thrift", "package.json")
    if not os.path.exists(installed) or json.load(open(installed))["version"] != version:
        os.makedirs(NODE_DIR, exist_ok=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--no-save", "--prefix",
                        NODE_DIR, "thrift@%s" % version], check=True, capture_output=True,
                       timeout=300)
    return {"java": str(classes) + ":" + classpath, "node_gen": str(node_gen),
            "node_path": os.path.join(NODE_DIR, "node_modules")}


def java_client(polyglot, host, port, transport, protocol):
    return subprocess.run(["java", "-cp", polyglot["java"], "PolyMain", "client", host, str(port),
                           transport, protocol], capture_output=True, text=True, timeout=120)


def node_client(polyglot, host, port, transport, protocol):
    env = dict(os.environ, NODE_PATH=polyglot["node_path"])
    return subprocess.run(["node", os.path.join(SOURCES, "client.js"), polyglot["node_gen"], host,
                           str(port), transport, protocol], capture_output=True, text=True,
                          timeout=120, env=env)


class PolyHandler(object):
    def __init__(self, name):
        self.name = name
        self.noted = []
        self.errors = load_module(POLY_IDL)

    def roundtrip(self, sample):
        return sample

    def whoami(self):
        return self.name

    def fail(self, message):
        raise self.errors.PolyError(message=message)

    def note(self, text):
        self.noted.append(text)

    def notes(self):
        return ",".join(self.noted)


@pytest.fixture
def poly_providers(stack):
    from probe.server import start_service
    started = []

    def start(appkey, name, **options):
        provider = start_service(POLY_IDL, appkey, "PolyService", PolyHandler(name), port=0,
                                 block=False, shutdown_grace=0.1, **options)
        started.append(provider)
        return provider
    yield start
    for provider in started:
        provider.stop(grace=0)


@pytest.fixture
def processes():
    """Start background processes; every one is stopped (and reaped) after the test."""
    started = []

    def start(args, **kwargs):
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, **kwargs)
        started.append(process)
        return process
    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(30)
        if process.stdout is not None:
            process.stdout.close()


# ------------------------------------------------------- Java and Node -> probe provider

@pytest.mark.parametrize("dialect", DIALECTS, ids="+".join)
def test_java_and_node_clients_call_a_probe_provider(polyglot, appkey, poly_providers, dialect):
    provider = poly_providers(appkey, "probe")
    for run in (java_client, node_client):
        done = run(polyglot, provider.host, provider.port, *dialect)
        assert done.returncode == 0 and done.stdout.strip() == "ok probe", (
            run.__name__, done.stdout, done.stderr[-2000:])
    assert sorted(provider.handler.noted) == sorted(
        "%s-%s-%s" % (lang, *dialect) for lang in ("java", "node"))
    assert provider.server.stats()["protocol_errors"] == 0


# ------------------------------------------------------- Java servers behind probe register

JAVA_SERVERS = [  # (kind, transport, protocol): what each Java server speaks
    ("selector", "framed", "binary"),
    ("hsha", "framed", "compact"),
    ("threadpool", "buffered", "compact"),
]


def start_java_server(polyglot, processes, kind, protocol, name):
    port = free_port()
    process = processes(["java", "-cp", polyglot["java"], "PolyMain", "server", kind, str(port),
                         protocol, name])
    assert process.stdout.readline().strip() == "listening", "the Java %s server did not start" % kind
    return port, process


def node_data(zk, appkey, service, port):
    raw, _ = zk.client.get(naming.node_path("dev", appkey, service, ADVERTISED_HOST, port))
    return json.loads(raw)


def node_exists(zk, appkey, service, port):
    return zk.client.exists(naming.node_path("dev", appkey, service, ADVERTISED_HOST, port)) is not None


def test_java_servers_registered_by_probe_register_share_traffic_with_a_probe_provider(
        polyglot, appkey, poly_providers, processes):
    from probe.client import build_client
    poly_providers(appkey, "probe")
    registrars, ports, javas = {}, {}, {}
    for kind, transport, protocol in JAVA_SERVERS:
        ports[kind], javas[kind] = start_java_server(polyglot, processes, kind, protocol, kind)
        port = ports[kind]
        args = [sys.executable, "-m", "probe.cli", "register", appkey, "PolyService",
                "%s:%d" % (ADVERTISED_HOST, port), "--transport", transport, "--protocol", protocol]
        if kind == "selector":
            args += ["--check", "whoami", "--weight", "20"]  # a real Thrift call as the check
        registrars[kind] = processes(args)
    zk = shared_zookeeper(load_settings().zookeeper)
    client = build_client(POLY_IDL, appkey, "PolyService", socket_timeout=3000)
    try:
        wait_for(lambda: len(client.watcher.table) == 4, timeout=30, message="the four nodes")
        dialects = {node.port: (node.transport, node.protocol) for node in client.watcher.table.nodes}
        for kind, transport, protocol in JAVA_SERVERS:
            assert dialects[ports[kind]] == (transport, protocol)
            data = node_data(zk, appkey, "PolyService", ports[kind])
            assert data.get("transport", "buffered") == transport
            assert data.get("protocol", "binary") == protocol
        assert node_data(zk, appkey, "PolyService", ports["selector"])["weight"] == 20

        seen = {client.whoami() for _ in range(300)}
        assert seen == {"probe", "selector", "hsha", "threadpool"}
        module = client.thrift_module
        sample = module.Sample(id=-2 ** 63, tags=["a", "b\u00e9", ""],
                               counts={"x": 2 ** 63 - 1, "y": -1}, blob=b"\x00\x01\x80\xff")
        for _ in range(40):  # every node, every dialect: the same struct back
            assert client.roundtrip(sample) == sample
            with pytest.raises(module.PolyError) as declared:
                client.fail("boom")
            assert declared.value.message == "boom"
            client.note("n")
            # The call after a oneway finds its connection in step (each node keeps its
            # own notes, so a node picked before any note reached it answers "").
            assert set(client.notes().split(",")) <= {"n", ""}

        # Operator edits keep the dialect (and every field they do not own).
        run_probe("node", "weight", appkey, "PolyService", "%s:%d" % (ADVERTISED_HOST,
                                                                     ports["selector"]), "0")
        run_probe("node", "disable", appkey, "PolyService", "%s:%d" % (ADVERTISED_HOST,
                                                                      ports["hsha"]))
        selector = node_data(zk, appkey, "PolyService", ports["selector"])
        assert (selector["weight"], selector["transport"]) == (0, "framed")
        hsha = node_data(zk, appkey, "PolyService", ports["hsha"])
        assert (hsha["valid"], hsha["transport"], hsha["protocol"]) == (0, "framed", "compact")
        wait_for(lambda: len(client.watcher.table) == 2, message="the edits to reach the client")
        assert {client.whoami() for _ in range(60)} == {"probe", "threadpool"}
        run_probe("node", "weight", appkey, "PolyService", "%s:%d" % (ADVERTISED_HOST,
                                                                     ports["selector"]), "30")
        run_probe("node", "enable", appkey, "PolyService", "%s:%d" % (ADVERTISED_HOST,
                                                                     ports["hsha"]))
        wait_for(lambda: len(client.watcher.table) == 4, message="the nodes back")
        assert {client.whoami() for _ in range(300)} == {"probe", "selector", "hsha", "threadpool"}

        # A server killed behind `probe register` leaves within the session timeout.
        killed_port = ports["threadpool"]
        javas["threadpool"].kill()
        killed_at = time.monotonic()
        wait_for(lambda: not node_exists(zk, appkey, "PolyService", killed_port),
                 timeout=SESSION_TIMEOUT + 5, interval=0.05, message="the dead node to go")
        assert time.monotonic() - killed_at <= SESSION_TIMEOUT
        assert registrars["threadpool"].poll() is None  # it waits for the server to come back
        wait_for(lambda: len(client.watcher.table) == 3, message="the client to drop it")
        assert {client.whoami() for _ in range(100)} == {"probe", "selector", "hsha"}

        # SIGTERM deregisters at once, and the registrar exits 0.
        registrars["hsha"].send_signal(signal.SIGTERM)
        assert registrars["hsha"].wait(20) == 0
        assert not node_exists(zk, appkey, "PolyService", ports["hsha"])
    finally:
        client.close()
        release_zookeeper(zk)
