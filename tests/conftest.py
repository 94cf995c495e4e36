"""Fixtures: one real local stack (ZooKeeper, Redis, MariaDB on free loopback ports)
for the whole test session, fresh appkeys per test, in-process providers; and the
helpers tests share (test modules never import from each other)."""

import os
import subprocess
import sys
import threading
import time
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDL = os.path.join(ROOT, "idl", "demo.thrift")
SESSION_TIMEOUT = 3
# The test stack's config says `advertise_host: 127.0.0.1`: every provider the tests
# start registers this address, so no test traffic leaves the loopback network.
ADVERTISED_HOST = "127.0.0.1"
sys.path.insert(0, os.path.join(ROOT, "examples"))


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    from probe import settings
    from probe.testing import FaultStack
    state = tmp_path_factory.mktemp("stack")
    local = FaultStack(state_dir=str(state), ports="free")
    local.up()
    # A short session timeout keeps the fault tests quick: a dead provider leaves
    # the registry within 3 s.
    import yaml
    config = yaml.safe_load(open(local.config_path))
    config["zkserver"]["dev"]["session_timeout"] = SESSION_TIMEOUT
    test_config = os.path.join(str(state), "config-test.yml")
    with open(test_config, "w") as out:
        yaml.safe_dump(config, out)
    os.environ["PROBE_CONFIG"] = test_config
    os.environ["PROBE_ENV"] = "dev"
    os.environ["PROBE_SNAPSHOT_DIR"] = str(tmp_path_factory.mktemp("snapshots"))
    settings.clear_cache()
    try:
        yield local
    finally:
        local.down()


@pytest.fixture
def appkey(stack):
    """A freshly registered appkey, so tests never see each other's nodes."""
    from probe.stores.appkeys import AppkeyStore
    from probe.settings import load_settings
    key = "t_%s" % uuid.uuid4().hex[:10]
    store = AppkeyStore(load_settings().mysql)
    store.add(key)
    store.close()
    return key


def provider_starter(default_name="node%d", **fixed):
    """start(appkey, name=None, port=0, handler=None, **options) -> a started
    in-process Provider of DemoService; `fixed` options (a config path, an env) go
    to every start. `start.stop_all()` stops them."""
    from demo_server import DemoServiceHandler
    from probe.server import start_service
    started = []

    def start(appkey, name=None, port=0, handler=None, **options):
        options.setdefault("shutdown_grace", 0.2)
        for key, value in fixed.items():
            if options.get(key) is None:
                options[key] = value
        handler = handler or DemoServiceHandler(name or default_name % len(started))
        provider = start_service(IDL, appkey, "DemoService", handler, port=port, block=False,
                                 **options)
        started.append(provider)
        return provider

    def stop_all():
        for provider in started:
            provider.stop(grace=0)
    start.stop_all = stop_all
    return start


@pytest.fixture
def providers(stack):
    """Start in-process providers: providers(appkey, name=...) -> Provider."""
    start = provider_starter()
    yield start
    start.stop_all()


# -- a secured stack (ZooKeeper digest ACLs, Redis ACL user + TLS, MariaDB TLS, RPC
# mutual TLS), shared by the security and RPC TLS tests ------------------------------
SECURE_ENV = "dev"


@pytest.fixture(scope="session")
def secure_stack(tmp_path_factory):
    """`probe stack up --secure` on free loopback ports: (stack, config path, secrets)."""
    import json
    from probe.dev.stack import Stack
    state = str(tmp_path_factory.mktemp("secure-stack"))
    secured = Stack(state_dir=state, ports="free", secure=True)
    try:
        secured.up()
        with open(os.path.join(state, "secrets.json")) as handle:
            secrets = json.load(handle)
        yield secured, secured.config_path, secrets
    finally:
        secured.down()


@pytest.fixture
def secure_config(secure_stack):
    return secure_stack[1]


@pytest.fixture
def secure_appkey(secure_config):
    """A fresh appkey registered in the secured stack."""
    from probe.admin import Admin
    key = "s_%s" % uuid.uuid4().hex[:10]
    with Admin(config_path=secure_config, env=SECURE_ENV) as admin:
        admin.add_appkey(key)
    return key


@pytest.fixture
def secure_providers(secure_config):
    """providers() against the secured stack (a `config_path` option overrides it)."""
    start = provider_starter("secure%d", config_path=secure_config, env=SECURE_ENV)
    yield start
    start.stop_all()


def client_builder(**fixed):
    """build(appkey, **options) -> a probe client of DemoService; `fixed` options (a
    config path, an env) go to every client unless given. `build.close_all()`."""
    from probe.client import build_client
    made = []

    def build(appkey, **options):
        for key, value in fixed.items():
            if options.get(key) is None:
                options[key] = value
        client = build_client(IDL, appkey, "DemoService", **options)
        made.append(client)
        return client

    def close_all():
        for client in made:
            client.close()
    build.close_all = close_all
    return build


@pytest.fixture
def clients(stack):
    build = client_builder()
    yield build
    build.close_all()


def write_config(path, base, change):
    """A copy of the YAML config `base` at `path`, with `change(config)` applied."""
    import yaml
    with open(base) as handle:
        config = yaml.safe_load(handle)
    change(config)
    with open(path, "w") as out:
        yaml.safe_dump(config, out)
    return str(path)


@pytest.fixture
def fresh_metrics():
    """An empty metrics state for the test (probe.metrics.fresh_state), so what it
    asserts counts only its own calls; another empty one is put in after it."""
    from probe import metrics
    yield metrics.fresh_state()
    metrics.fresh_state()


def wait_for(predicate, timeout=10.0, interval=0.02, message="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("timed out after %.1f s waiting for %s" % (timeout, message))


def gated_handler(name):
    """A demo handler whose slow() blocks until ``handler.gate`` is set (at most 30 s).
    ``handler.entered`` counts the slow() calls that reached it, so a test knows a
    call is in flight on this node without sleeping or reading client internals."""
    from demo_server import DemoServiceHandler

    class GatedHandler(DemoServiceHandler):
        def __init__(self):
            super().__init__(name)
            self.gate = threading.Event()
            self.entered = 0
            self._lock = threading.Lock()

        def slow(self, millis):
            with self._lock:
                self.entered += 1
            self.gate.wait(30)
            return "released"

    return GatedHandler()


def close_wait_sockets(port, host="127.0.0.1"):
    """How many of this machine's TCP sockets to host:port are in CLOSE_WAIT: the
    peer (the server) closed the connection and our side has not yet."""
    packed = "".join("%02X" % int(part) for part in reversed(host.split(".")))
    wanted = "%s:%04X" % (packed, port)
    count = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[2] == wanted and fields[3] == "08":  # 08: TCP_CLOSE_WAIT
                count += 1
    return count


def run_probe(*args, env=None, check=True):
    """Run the `probe` CLI in a subprocess, as a user would."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    done = subprocess.run([sys.executable, "-m", "probe.cli"] + list(args), capture_output=True,
                          text=True, env=full_env, timeout=60)
    if check and done.returncode != 0:
        raise AssertionError("probe %s failed (%d): %s %s" % (" ".join(args), done.returncode,
                                                             done.stdout, done.stderr))
    return done


def pytest_terminal_summary(terminalreporter):
    try:
        from faults import RESULTS
    except ImportError:
        return
    if RESULTS:
        terminalreporter.write_sep("-", "fault suite: calls attempted / failed")
        for scenario, attempted, failed in RESULTS:
            terminalreporter.write_line("%-58s %7d attempted %4d failed" % (scenario, attempted, failed))
