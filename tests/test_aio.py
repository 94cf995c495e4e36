"""The asyncio API (probe.aio) on the real stack: concurrency on one client,
failover, governance edits, the provider's limits, cancellation, interop.

Loops are driven with asyncio.run inside plain tests (no pytest plugin)."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from thriftpy2.thrift import TApplicationException

from conftest import ADVERTISED_HOST, IDL, ROOT, wait_for
from aio_server import AsyncDemoHandler, demo
from probe.aio import AsyncProvider, build_client
from probe.errors import ProbeError


async def until(predicate, timeout=15.0, message="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError("timed out after %.1f s waiting for %s" % (timeout, message))


async def provider(appkey, name="aio", **options):
    options.setdefault("shutdown_grace", 0.1)
    handler = options.pop("handler", None) or AsyncDemoHandler(name)
    started = await AsyncProvider(IDL, appkey, "DemoService", handler, options.pop("port", 0),
                                  **options).start()
    started.handler = handler
    return started


async def client_for(appkey, nodes=1, **options):
    client = await build_client(IDL, appkey, "DemoService", **options)
    await until(lambda: len(client.watcher.table) >= nodes, message="%d node(s) routed" % nodes)
    return client


def test_calls_answers_and_exceptions(appkey):
    async def main():
        served = await provider(appkey)
        client = await client_for(appkey)
        try:
            assert await client.say() == "hello world"
            assert await client.add(40, 2) == 42
            text = "h\u00e9llo " + "x" * 70000  # more than one read
            assert await client.echo(text) == text
            with pytest.raises(demo.DemoError) as declared:
                await client.fail("no luck")
            assert declared.value.message == "no luck"
            with pytest.raises(TApplicationException) as masked:
                await client.fail("undeclared")
            assert masked.value.type == TApplicationException.INTERNAL_ERROR
            assert "secret" not in str(masked.value) and "DemoService.fail" in str(masked.value)
            assert served.server.stats()["calls"] == 5
        finally:
            await client.close()
            await served.stop()
    asyncio.run(main())


class LoopThread(object):
    """An event loop on its own thread: the async provider serves there while the
    test thread plays blocking peers (hostile sockets, sync clients)."""

    def __init__(self):
        import threading
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def looped(stack):
    started = []
    loop = LoopThread()

    def start(appkey, **options):
        served = loop.run(provider(appkey, **options))
        started.append(served)
        return served
    start.loop = loop
    yield start
    for served in started:
        loop.run(served.stop(grace=0))
    loop.close()


def test_100_calls_in_flight_on_one_client_all_overlap(appkey):
    async def main():
        served = await provider(appkey)
        client = await client_for(appkey)
        try:
            replies = await asyncio.gather(*[client.slow(50) for _ in range(100)])
            assert replies == ["slept 50 ms"] * 100
            # The handler's own count: all 100 were running at once.
            assert served.handler.most_inflight == 100
            assert served.server.stats()["calls"] == 100
            pool = next(iter(client._pools.values()))
            assert pool.created == 100 and len(pool.idle) == 64  # max_idle kept
        finally:
            await client.close()
            await served.stop()
    asyncio.run(main())


def test_arguments_that_do_not_encode_neither_eject_nor_poison_the_next_call(appkey):
    async def main():
        await provider(appkey)
        await provider(appkey)
        client = await client_for(appkey, nodes=2)
        try:
            for _ in range(10):
                with pytest.raises(Exception) as raised:
                    await client.echo(123)  # echo() takes a string
                assert not isinstance(raised.value, ProbeError)
            assert client.health.ejected() == {} and client.health.ejections == 0
            assert await client.echo("still fine") == "still fine"
            assert await client.say() == "hello world"
        finally:
            await client.close()
    asyncio.run(main())


def test_a_cancelled_call_leaves_no_half_read_connection_in_the_pool(appkey):
    async def main():
        served = await provider(appkey)
        client = await client_for(appkey, socket_timeout=5000)
        try:
            assert await client.say() == "hello world"
            pool = next(iter(client._pools.values()))
            assert len(pool.idle) == 1
            task = asyncio.ensure_future(client.slow(300))
            await until(lambda: served.handler.inflight == 1, message="slow() running")
            assert len(pool.idle) == 0  # the call holds the one connection
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert len(pool.idle) == 0 and pool.open_now == 0  # closed, not pooled
            await asyncio.sleep(0.4)  # the late reply would have arrived by now
            # The next calls get a fresh connection and their own replies.
            assert await client.echo("after") == "after"
            assert await client.add(1, 2) == 3
            assert pool.created == 2
            # Calls cancelled by a caller's timeout too, more than eject_after in a row.
            for _ in range(5):
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(client.slow(300), 0.05)
            assert await client.whoami() == "aio"
            assert pool.open_now == 1
            assert client.health.ejected() == {}  # cancelling is no verdict on the node
        finally:
            await client.close()
            await served.stop()
    asyncio.run(main())


def test_method_timeout_and_reply_timeout(appkey):
    async def main():
        served = await provider(appkey)
        client = await client_for(appkey, socket_timeout=5000, timeouts={"slow": 100}, retries=0)
        try:
            from probe.aio import ReplyTimeout
            from probe.errors import NodeCallFailed
            with pytest.raises(NodeCallFailed) as failed:
                await client.slow(1000)
            assert isinstance(failed.value.__cause__, ReplyTimeout)
            assert failed.value.type == failed.value.TIMED_OUT
            assert await client.slow(10) == "slept 10 ms"
        finally:
            await client.close()
            await served.stop()
    asyncio.run(main())
    with pytest.raises(ProbeError):
        asyncio.run(build_client(IDL, appkey, "DemoService", timeouts={"nope": 10}))
    with pytest.raises(ProbeError):
        asyncio.run(build_client(IDL, appkey, "DemoService", timeouts={"slow": -1}))


def _spawn(appkey, name, port, log_dir):
    log = open(os.path.join(log_dir, "%s.log" % name), "w")
    env = dict(os.environ, PROBE_TEST_GRACE="0.3")
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "examples", "aio_server.py"),
                                str(port), appkey, name], stdout=log, stderr=subprocess.STDOUT,
                               env=env)
    log.close()
    return process


def test_failover_after_kill_9_of_one_of_two_async_providers(appkey, tmp_path):
    from probe.dev.stack import free_port
    processes = [_spawn(appkey, name, free_port(), str(tmp_path)) for name in ("a", "b")]

    async def main():
        client = await client_for(appkey, nodes=2, idempotent=True, socket_timeout=2000)
        calls = failed = 0
        seen = set()
        errors = []
        try:
            async def load(stop_at):
                nonlocal calls, failed
                while time.monotonic() < stop_at:
                    calls += 1
                    try:
                        seen.add(await client.whoami())
                    except Exception as exc:
                        failed += 1
                        errors.append(repr(exc))
            stop_at = time.monotonic() + 5.0
            workers = [asyncio.ensure_future(load(stop_at)) for _ in range(20)]
            await until(lambda: seen == {"a", "b"}, message="both providers answer")
            # A second of load first: the retry budget (20% of calls) then covers the
            # 20 calls in flight that the kill fails at once.
            await asyncio.sleep(1.0)
            processes[0].kill()  # kill -9 under load
            await asyncio.gather(*workers)
            assert calls > 200 and failed == 0, (errors[:2], client.budget_exhausted)
            seen.clear()
            for _ in range(20):
                seen.add(await client.whoami())
            assert seen == {"b"}
            # Node health saw it (until the registry drops the node, it stays ejected).
            assert client.health_report()["ejections"] >= 1
        finally:
            await client.close()
    try:
        asyncio.run(main())
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
    assert processes[1].returncode == 0  # SIGTERM: a graceful stop


def test_weight_edit_and_disable_reach_an_async_consumer(appkey):
    from probe.admin import Admin

    async def main():
        a = await provider(appkey, name="a")
        b = await provider(appkey, name="b")
        client = await client_for(appkey, nodes=2)
        try:
            def weights():
                return {node.port: (node.weight, node.valid)
                        for node in client.watcher.table.all_nodes}
            loop = asyncio.get_running_loop()
            with Admin() as admin:
                await loop.run_in_executor(None, admin.set_weight, appkey, "DemoService",
                                           "%s:%d" % (a.host, a.port), 90)
                await until(lambda: weights().get(a.port) == (90, 1), message="weight 90 seen")
                counts = {"a": 0, "b": 0}
                for _ in range(400):
                    counts[await client.whoami()] += 1
                assert counts["a"] > 3 * counts["b"]  # 90:10 expected ~9:1
                await loop.run_in_executor(None, admin.disable, appkey, "DemoService",
                                           "%s:%d" % (a.host, a.port))
                await until(lambda: weights().get(a.port) == (90, 0), message="a disabled")
                answers = {await client.whoami() for _ in range(50)}
                assert answers == {"b"}
        finally:
            await client.close()
            await a.stop()
            await b.stop()
    asyncio.run(main())


# -- hostile input against the async provider ----------------------------------------

def _connect(port):
    sock = socket.socket()
    sock.connect(("127.0.0.1", port))
    return sock


def _closed_by_peer(sock, timeout=10.0):
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def _header(name, seqid=1):
    import struct
    name = name.encode()
    return struct.pack("!iI", -2147418112 | 1, len(name)) + name + struct.pack("!i", seqid)


def _sync_say(port):
    from thriftpy2.rpc import make_client
    service = demo.DemoService
    client = make_client(service, "127.0.0.1", port, timeout=5000)
    try:
        return client.say()
    finally:
        client.close()


def test_idle_flood_and_max_connections(appkey, looped):
    import threading
    served = looped(appkey, max_connections=1000)
    threads_before = threading.active_count()
    flood = []
    try:
        for _ in range(1000):
            flood.append(_connect(served.port))
        wait_for(lambda: served.server.stats()["connections"] == 1000, message="1000 connections")
        assert threading.active_count() - threads_before < 3  # idle ones cost no thread
        extra = _connect(served.port)
        assert _closed_by_peer(extra, timeout=5)  # over max_connections: closed at once
        extra.close()
        assert served.server.stats()["rejected"] >= 1
        for sock in flood[:10]:  # room again: a real client is served meanwhile
            sock.close()
        wait_for(lambda: served.server.stats()["connections"] <= 990, message="room")
        assert _sync_say(served.port) == "hello world"
    finally:
        for sock in flood:
            sock.close()
    wait_for(lambda: served.server.stats()["connections"] == 0, message="flood gone")
    assert _sync_say(served.port) == "hello world"


def test_idle_timeout_closes_quiet_connections(appkey, looped):
    served = looped(appkey, idle_timeout=0.3)
    quiet = _connect(served.port)
    assert _closed_by_peer(quiet, timeout=5)
    quiet.close()
    assert served.server.stats()["timed_out"] >= 1
    assert _sync_say(served.port) == "hello world"


@pytest.mark.parametrize("body", [
    b"\x0b\x00\x01\x60\x00\x00\x00",            # a string of 1.5 GiB
    b"\x0f\x00\x01\x0b\x60\x00\x00\x00",        # a list of 1.5 G strings
])
def test_huge_length_prefix_closes_the_connection_before_reading_it(appkey, looped, body):
    served = looped(appkey)
    sock = _connect(served.port)
    sock.sendall(_header("echo") + body + b"x" * 64)
    assert _closed_by_peer(sock, timeout=5)
    sock.close()
    framed = _connect(served.port)
    framed.sendall(b"\x60\x00\x00\x00" + b"\x80\x01")  # a 1.5 GiB frame
    assert _closed_by_peer(framed, timeout=5)
    framed.close()
    assert served.server.stats()["protocol_errors"] == 2
    assert served.handler.calls == 0
    assert _sync_say(served.port) == "hello world"


def test_slow_sender_is_cut_after_read_timeout(appkey, looped):
    served = looped(appkey, read_timeout=0.5)
    message = _header("say") + b"\x00"
    slow = _connect(served.port)
    slow.sendall(message[:3])
    for index in range(3, 8):
        time.sleep(0.05)
        slow.sendall(message[index:index + 1])
    assert _sync_say(served.port) == "hello world"  # others are served meanwhile
    assert _closed_by_peer(slow, timeout=5)
    slow.close()
    assert served.server.stats()["timed_out"] >= 1
    assert served.server.stats()["protocol_errors"] >= 1


# -- interop ---------------------------------------------------------------------------

def test_sync_probe_client_calls_the_async_provider(appkey, looped):
    from probe.client import build_client as build_sync
    served = looped(appkey)
    client = build_sync(IDL, appkey, "DemoService")
    try:
        wait_for(lambda: len(client.watcher.table) == 1, message="routed")
        assert client.say() == "hello world"
        assert client.add(2, 40) == 42
        with pytest.raises(demo.DemoError):
            client.fail("x")
        assert client.echo("y" * 100000) == "y" * 100000
        # (counted on the provider's loop thread just after the reply is written)
        wait_for(lambda: served.server.stats()["calls"] == 4, message="4 calls counted")
    finally:
        client.close()


def test_framed_thriftpy2_client_calls_the_async_provider(appkey, looped):
    from thriftpy2.rpc import make_client
    from thriftpy2.transport import TFramedTransportFactory
    served = looped(appkey)
    client = make_client(demo.DemoService, "127.0.0.1", served.port,
                         trans_factory=TFramedTransportFactory(), timeout=5000)
    try:
        assert client.say() == "hello world"
        assert client.add(1, 1) == 2
    finally:
        client.close()


@pytest.fixture(scope="module")
def apache(tmp_path_factory):
    import importlib
    import shutil
    compiler = shutil.which("thrift")
    if compiler is None:
        pytest.fail("the Apache Thrift compiler is not installed: run `make deps`")
    out = tmp_path_factory.mktemp("apache-thrift-aio")
    subprocess.run([compiler, "--gen", "py", "-out", str(out), IDL], check=True,
                   capture_output=True, timeout=60)
    (out / "demo").rename(out / "apache_demo_aio")
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module("apache_demo_aio.DemoService"), \
            importlib.import_module("apache_demo_aio.ttypes")
    finally:
        sys.path.remove(str(out))
        for name in [n for n in sys.modules if n.split(".")[0] == "apache_demo_aio"]:
            del sys.modules[name]


def test_apache_thrift_client_calls_the_async_provider(appkey, looped, apache):
    from thrift.protocol import TBinaryProtocol
    from thrift.transport import TSocket, TTransport
    service_module, ttypes = apache
    served = looped(appkey)
    transport = TTransport.TBufferedTransport(TSocket.TSocket("127.0.0.1", served.port))
    client = service_module.Client(TBinaryProtocol.TBinaryProtocol(transport))
    transport.open()
    try:
        assert client.say() == "hello world"
        assert client.add(20, 22) == 42
        with pytest.raises(ttypes.DemoError) as declared:
            client.fail("boom")
        assert declared.value.message == "boom"
        assert client.echo("z" * 9000) == "z" * 9000
    finally:
        transport.close()


def test_async_client_calls_a_sync_provider_and_an_apache_server(appkey, providers, apache):
    import threading
    from thrift.protocol import TBinaryProtocol
    from thrift.server import TServer
    from thrift.transport import TSocket, TTransport
    from probe import naming
    from probe.demo import DemoServiceHandler
    from probe.dev.stack import free_port
    from probe.zk.registration import Registration
    from probe.zk.session import release_zookeeper, shared_zookeeper
    from probe.settings import load_settings
    service_module, ttypes = apache
    providers(appkey, name="sync")
    port = free_port()
    server = TServer.TThreadedServer(
        service_module.Processor(DemoServiceHandler("apache", errors=ttypes)),
        TSocket.TServerSocket(host=ADVERTISED_HOST, port=port),
        TTransport.TBufferedTransportFactory(), TBinaryProtocol.TBinaryProtocolFactory(),
        daemon=True)
    threading.Thread(target=server.serve, daemon=True).start()
    zk = shared_zookeeper(load_settings().zookeeper)
    registration = Registration(zk, naming.node_path("dev", appkey, "DemoService",
                                                     ADVERTISED_HOST, port),
                                naming.NodeSettings(ADVERTISED_HOST, port))
    wait_for(lambda: _listening(port), message="Apache server listening")
    registration.register()

    async def main():
        client = await client_for(appkey, nodes=2)
        try:
            seen = set()
            for _ in range(60):
                seen.add(await client.whoami())
                assert await client.add(2, 3) == 5
            assert seen == {"sync", "apache"}
            for _ in range(10):
                with pytest.raises(demo.DemoError):
                    await client.fail("both")
            results = await asyncio.gather(*[client.echo(str(i)) for i in range(50)])
            assert results == [str(i) for i in range(50)]
        finally:
            await client.close()
    try:
        asyncio.run(main())
    finally:
        registration.close()
        release_zookeeper(zk)


def _listening(port):
    try:
        socket.create_connection((ADVERTISED_HOST, port), timeout=1).close()
        return True
    except OSError:
        return False


def test_retry_budget_covers_a_burst_of_failures_at_one_instant():
    """Many calls in flight fail together when a node dies: the budget the calls
    earned is there for all of them, not only max_banked."""
    from probe.routing.budget import RetryBudget
    now = [100.0]
    budget = RetryBudget(clock=lambda: now[0])
    for _ in range(1000):
        budget.deposit()
    now[0] += 1.0
    assert sum(budget.try_withdraw() for _ in range(150)) == 150  # 20% of 1000 + banked
    assert sum(budget.try_withdraw() for _ in range(200)) < 70     # then it is spent


# -- dialects, overload, TLS, metrics, drain -----------------------------------------

def test_async_provider_advertises_a_dialect_and_every_client_speaks_it(appkey, looped):
    from thriftpy2.protocol import TCompactProtocolFactory
    from thriftpy2.rpc import make_client
    from thriftpy2.transport import TFramedTransportFactory
    from probe.client import build_client as build_sync
    served = looped(appkey, transport="framed", protocol="compact")

    async def main():
        client = await client_for(appkey)
        try:
            node = client.watcher.table.nodes[0]
            assert (node.transport, node.protocol) == ("framed", "compact")
            assert await client.add(40, 2) == 42
            with pytest.raises(demo.DemoError):
                await client.fail("compact")
            replies = await asyncio.gather(*[client.echo("c%d" % i) for i in range(30)])
            assert replies == ["c%d" % i for i in range(30)]
        finally:
            await client.close()
    looped.loop.run(main())  # the client on the provider's loop: both share it
    sync = build_sync(IDL, appkey, "DemoService")
    try:
        wait_for(lambda: len(sync.watcher.table) == 1, message="routed")
        assert sync.echo("sync framed compact") == "sync framed compact"
    finally:
        sync.close()
    # Whatever it advertises, the port takes every dialect (first bytes tell).
    for transport, protocol in ((None, None), (TFramedTransportFactory(), None),
                                (None, TCompactProtocolFactory())):
        options = {"timeout": 5000}
        if transport is not None:
            options["trans_factory"] = transport
        if protocol is not None:
            options["proto_factory"] = protocol
        raw = make_client(demo.DemoService, "127.0.0.1", served.port, **options)
        try:
            assert raw.add(1, 2) == 3
        finally:
            raw.close()


def test_overload_reply_moves_a_non_idempotent_call_to_another_node(appkey):
    async def main():
        capped = await provider(appkey, name="capped", max_inflight=1)
        other = await provider(appkey, name="other")
        client = await client_for(appkey, nodes=2, socket_timeout=5000)
        try:
            replies = await asyncio.gather(*[client.slow(100) for _ in range(20)])
            assert replies == ["slept 100 ms"] * 20  # not idempotent, none failed
            assert capped.server.stats()["overloaded"] >= 1
            assert capped.handler.most_inflight == 1
            assert capped.handler.calls + other.handler.calls == 20
        finally:
            await client.close()
            await capped.stop()
            await other.stop()
    asyncio.run(main())


def test_mutual_tls_between_async_client_and_async_provider(secure_config, secure_appkey):
    from probe.client import build_client as build_sync

    async def main():
        served = await provider(secure_appkey, config_path=secure_config, env="dev")
        client = await client_for(secure_appkey, config_path=secure_config, env="dev",
                                  snapshot_dir=False)
        try:
            assert await client.say() == "hello world"
            results = await asyncio.gather(*[client.add(i, i) for i in range(50)])
            assert results == [2 * i for i in range(50)]
            pool = next(iter(client._pools.values()))
            assert pool.created <= 50
            # A plaintext client gets nothing through the TLS-only port.
            reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
            writer.write(_header("say") + b"\x00")
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
            # The threaded probe client reaches the async provider over TLS too.
            loop = asyncio.get_running_loop()
            sync = await loop.run_in_executor(None, lambda: build_sync(
                IDL, secure_appkey, "DemoService", config_path=secure_config, env="dev",
                snapshot_dir=False))
            try:
                await until(lambda: len(sync.watcher.table) == 1)
                assert await loop.run_in_executor(None, sync.say) == "hello world"
            finally:
                sync.close()
        finally:
            await client.close()
            await served.stop()
    asyncio.run(main())


def test_metrics_count_calls_on_both_sides(appkey):
    from prometheus_client import REGISTRY

    def total(side, status=None):
        count = 0.0
        for family in REGISTRY.collect():
            for sample in family.samples:
                if sample.name == "probe_%s_requests_total" % side \
                        and sample.labels.get("appkey") == appkey \
                        and (status is None or sample.labels.get("status") == status):
                    count += sample.value
        return count

    async def main():
        served = await provider(appkey)
        client = await client_for(appkey)
        try:
            await asyncio.gather(*[client.say() for _ in range(30)])
            with pytest.raises(demo.DemoError):
                await client.fail("counted")
        finally:
            await client.close()
            await served.stop()
    asyncio.run(main())
    assert total("client") == 31 and total("client", "exception") == 1
    assert total("server") == 31 and total("server", "ok") == 30


def test_stop_deregisters_then_drains_calls_in_flight(appkey):
    async def main():
        served = await provider(appkey, shutdown_grace=0.3)
        client = await client_for(appkey, socket_timeout=5000)
        try:
            calls = [asyncio.ensure_future(client.slow(500)) for _ in range(5)]
            await until(lambda: served.handler.inflight == 5, message="5 calls running")
            await served.stop()
            assert [await call for call in calls] == ["slept 500 ms"] * 5  # drained, not cut
            await until(lambda: len(client.watcher.table.all_nodes) == 0, message="deregistered")
            assert served.stopped
        finally:
            await client.close()
    asyncio.run(main())


def test_start_service_runs_until_cancelled_and_refuses_bad_options(appkey):
    from probe.aio import start_service

    async def main():
        started = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(start_service(
            IDL, appkey, "DemoService", AsyncDemoHandler("svc"), port=0, shutdown_grace=0,
            on_started=started.set_result))
        served = await asyncio.wait_for(started, 30)
        client = await client_for(appkey)
        try:
            assert await client.whoami() == "svc"
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert served.stopped
            await until(lambda: len(client.watcher.table.all_nodes) == 0, message="deregistered")
        finally:
            await client.close()
    asyncio.run(main())
    for bad in ({"max_connections": 0}, {"read_timeout": -1}, {"transport": "zmq"},
                {"max_message_bytes": "4MB"}, {"max_inflight": 0}):
        with pytest.raises(ProbeError):
            asyncio.run(start_service(IDL, appkey, "DemoService", AsyncDemoHandler(), **bad))
    with pytest.raises(ProbeError):  # an appkey MySQL does not know: refused before serving
        asyncio.run(start_service(IDL, "no_such_" + appkey, "DemoService", AsyncDemoHandler(),
                                  port=0))


def test_the_fastapi_example_calls_a_probe_service(appkey, looped, monkeypatch):
    """examples/fastapi_app.py as a user runs it: its lifespan builds the async
    client, each request awaits the provider (here the async one)."""
    from fastapi.testclient import TestClient
    import fastapi_app
    looped(appkey, name="behind-fastapi")
    monkeypatch.setenv("PROBE_APPKEY", appkey)
    with TestClient(fastapi_app.app) as http:
        wait_for(lambda: http.get("/hello").status_code == 200, message="routed")
        assert http.get("/hello").json() == {"message": "hello world", "node": "behind-fastapi"}
        assert http.get("/add", params={"a": 2, "b": 40}).json() == {"sum": 42}
        assert http.get("/fail", params={"message": "nope"}).json() == {
            "failed": True, "message": "nope"}


def test_a_peer_that_never_reads_its_replies_is_cut_after_read_timeout(appkey, looped):
    import struct
    served = looped(appkey, read_timeout=0.5)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", served.port))
    text = b"x" * (3 * 1024 * 1024)
    call = _header("echo") + struct.pack("!bhi", 11, 1, len(text)) + text + b"\x00"
    sock.sendall(call)
    for index in range(2, 6):  # more calls queued behind the unread reply
        sock.sendall(_header("echo", index) + struct.pack("!bhi", 11, 1, 3) + b"abc\x00")
    wait_for(lambda: served.server.stats()["timed_out"] >= 1, message="the reader cut off")
    assert served.handler.calls == 0  # echo() is not counted; slow() is
    assert served.server.stats()["calls"] == 1  # the calls behind it never ran
    assert _closed_by_peer(sock, timeout=5)
    sock.close()
    assert _sync_say(served.port) == "hello world"


@pytest.mark.parametrize("balancer", ["round_robin", "least_inflight", "p2c_ewma"])
def test_every_balancer_routes_async_calls(appkey, balancer):
    async def main():
        a = await provider(appkey, name="a")
        b = await provider(appkey, name="b")
        client = await client_for(appkey, nodes=2, balancer=balancer)
        try:
            answers = await asyncio.gather(*[client.whoami() for _ in range(200)])
            assert set(answers) == {"a", "b"}
            assert min(answers.count("a"), answers.count("b")) >= 20
        finally:
            await client.close()
            await a.stop()
            await b.stop()
    asyncio.run(main())


def test_pipelined_and_half_closed_requests_are_answered_in_order(appkey, looped):
    import struct
    served = looped(appkey)
    sock = _connect(served.port)
    calls = b"".join(_header("echo", seqid) + struct.pack("!bhi", 11, 1, 2) +
                     b"%02d" % seqid + b"\x00" for seqid in range(1, 4))
    sock.sendall(calls)
    sock.shutdown(socket.SHUT_WR)  # nothing more to say: the replies must still come
    received = b""
    sock.settimeout(10)
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    sock.close()
    replies = [received[i:i + 26] for i in range(0, len(received), 26)]  # 26 bytes each
    assert replies == [struct.pack("!iI", -2147418112 | 2, 4) + b"echo" +
                       struct.pack("!ibhi", seqid, 11, 0, 2) + b"%02d" % seqid + b"\x00"
                       for seqid in range(1, 4)]
    assert served.server.stats()["calls"] == 3


def test_calls_still_running_after_drain_timeout_are_cancelled_at_close(appkey):
    async def main():
        served = await provider(appkey, shutdown_grace=0, drain_timeout=0.2)
        client = await client_for(appkey, socket_timeout=5000, retries=0)
        try:
            call = asyncio.ensure_future(client.slow(3000))
            await until(lambda: served.handler.inflight == 1, message="slow() running")
            await served.stop()
            assert served.handler.inflight == 0  # cancelled, not left running
            from probe.errors import NodeCallFailed
            with pytest.raises(NodeCallFailed):
                await call
        finally:
            await client.close()
    asyncio.run(main())


def _readable(socks):
    import select
    return select.select(socks, [], [], 0)[0]


def test_tls_connections_still_handshaking_count_against_max_connections(secure_config,
                                                                         secure_appkey):
    from probe.client import build_client as build_sync
    loop = LoopThread()
    # read_timeout long: the silent sockets are held by the cap, not cut by the deadline.
    served = loop.run(provider(secure_appkey, config_path=secure_config, env="dev",
                               max_connections=5, read_timeout=60))
    flood = []
    try:
        for _ in range(50):  # TCP connects that never send a ClientHello
            flood.append(_connect(served.port))
        wait_for(lambda: served.server.stats()["rejected"] == 45, message="45 rejected")
        stats = served.server.stats()
        assert stats["connections"] == 5 and stats["rejected"] == 45
        wait_for(lambda: len(_readable(flood)) == 45, message="45 closed by the provider")
        assert len(_readable(flood)) == 45  # the 5 others are held, handshaking
        for sock in flood:
            sock.close()
        wait_for(lambda: served.server.stats()["connections"] == 0, message="flood gone")
        sync = build_sync(IDL, secure_appkey, "DemoService", config_path=secure_config,
                          env="dev", snapshot_dir=False)
        try:
            wait_for(lambda: len(sync.watcher.table) == 1, message="routed")
            assert sync.say() == "hello world"  # a real TLS client is answered
        finally:
            sync.close()
        assert served.server.stats()["connections"] <= 5
    finally:
        for sock in flood:
            sock.close()
        loop.run(served.stop(grace=0))
        loop.close()


class _BigReplies(AsyncDemoHandler):
    async def whoami(self) -> str:
        return "x" * (8 * 1024 * 1024)  # past what the kernel takes (tcp_wmem max, 4 MiB)


def test_unread_replies_of_all_connections_are_bounded_together(appkey, looped):
    from probe.rpc.server import PARKED_REPLY_FACTOR
    served = looped(appkey, handler=_BigReplies(), max_message_bytes=256 * 1024,
                    read_timeout=60)
    server = served.server
    bound = PARKED_REPLY_FACTOR * 256 * 1024  # 4 MiB, the threaded provider's bound

    async def buffered():  # what asyncio holds for the peers, measured on the loop
        total = 0
        for conn in list(server.connections):
            size = conn.transport.get_write_buffer_size()
            raw = getattr(conn, "raw", None)  # the TCP transport under a TLS one
            if raw is not None and raw is not conn.transport:
                size += raw.get_write_buffer_size()
            total += size
        return total

    callers = []
    for _ in range(6):  # 6 × 8 MiB replies nobody reads
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", served.port))
        sock.sendall(_header("whoami") + b"\x00")
        callers.append(sock)
    try:
        wait_for(lambda: server.stats()["calls"] == 6, message="6 calls answered")
        total = looped.loop.run(buffered())
        assert total <= bound
        assert server.max_unsent_reply_bytes == bound
        assert server.stats()["unsent_reply_bytes"] <= bound
        overflows = server.stats()["reply_overflows"]
        assert overflows >= 1  # 48 MiB do not fit in 4 MiB: some connections were aborted
        assert server.stats()["connections"] == 6 - overflows
        wait_for(lambda: len(_readable(callers)) == overflows, message="aborted ones closed")
        assert server.stats()["timed_out"] == 0  # cut by the bound, not by read_timeout
        assert _sync_say(served.port) == "hello world"  # another caller is answered
    finally:
        for sock in callers:
            sock.close()
    wait_for(lambda: server.stats()["connections"] == 0, message="callers gone")
    assert server.stats()["unsent_reply_bytes"] == 0


def test_a_tls_handshake_that_never_starts_is_cut_after_read_timeout(secure_config,
                                                                     secure_appkey):
    loop = LoopThread()
    served = loop.run(provider(secure_appkey, config_path=secure_config, env="dev",
                               max_connections=5, read_timeout=0.5))
    silent = [_connect(served.port) for _ in range(3)]
    try:
        wait_for(lambda: len(_readable(silent)) == 3, message="silent handshakes cut")
        wait_for(lambda: served.server.stats()["connections"] == 0, message="none held")
        stats = served.server.stats()
        assert stats["rejected"] == 0  # under the cap: cut by the deadline, not refused
        assert stats["timed_out"] + stats["handshake_failures"] == 3
    finally:
        for sock in silent:
            sock.close()
        loop.run(served.stop(grace=0))
        loop.close()
