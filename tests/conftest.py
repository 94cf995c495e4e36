"""Fixtures: one real local stack (ZooKeeper, Redis, MariaDB on free loopback ports)
for the whole test session, fresh appkeys per test, in-process providers."""

import os
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDL = os.path.join(ROOT, "idl", "demo.thrift")
SESSION_TIMEOUT = 3
sys.path.insert(0, os.path.join(ROOT, "examples"))


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    from probe import devstack, settings
    state = tmp_path_factory.mktemp("stack")
    local = devstack.Stack(state_dir=str(state), ports="free")
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
    from probe.appkeys import AppkeyStore
    from probe.settings import load_settings
    key = "t_%s" % uuid.uuid4().hex[:10]
    store = AppkeyStore(load_settings().mysql)
    store.add(key)
    store.close()
    return key


@pytest.fixture
def providers(stack):
    """Start in-process providers: providers(appkey, name=...) -> Provider."""
    from demo_server import DemoServiceHandler
    from probe.server import start_service
    started = []

    def start(appkey, name=None, port=0, **options):
        options.setdefault("shutdown_grace", 0.2)
        handler = DemoServiceHandler(name or "node%d" % len(started))
        provider = start_service(IDL, appkey, "DemoService", handler, port=port, block=False, **options)
        started.append(provider)
        return provider

    yield start
    for provider in started:
        provider.stop(grace=0)


@pytest.fixture
def clients(stack):
    from probe.client import build_client
    made = []

    def build(appkey, **options):
        client = build_client(IDL, appkey, "DemoService", **options)
        made.append(client)
        return client

    yield build
    for client in made:
        client.close()


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
