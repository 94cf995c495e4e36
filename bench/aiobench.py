"""Section "aio": the asyncio API on one event loop, beside bare thriftpy2 aio.

Two server processes: probe's asyncio provider (probe.aio, registered) and bare
thriftpy2 `make_aio_server` (binary, buffered). One client process with one loop:

- client: with 1, 10 and 100 calls in flight, probe's async client (one client,
  its per-node pool) beside bare thriftpy2 `make_aio_client` (one client per call
  in flight: a thriftpy2 aio connection carries one call at a time, thriftpy2#245),
  both calling probe's asyncio provider; calls/s and the loop thread's CPU per call,
  paired alternating rounds.
- server: the same load (bare aio clients, 10 in flight) against probe's asyncio
  provider and against bare make_aio_server; calls/s and the server process's CPU
  per call.
"""

import asyncio
import os
import time

from bench.common import IDL, SERVICE, cpu_seconds, median
from bench.workers import _free_port, _wait_for_stop

SECTION = "12. asyncio (one loop)"
INFLIGHT = (1, 10, 100)


def run(bench):
    """Report the rows of the asyncio section on `bench.report`."""
    appkey = "bench_%s_aio" % bench.run_id
    bench.admin.add_appkey(appkey, "benchmark")
    started = []
    try:
        probe_server = bench.workers.start("aio-provider", "bench.aiobench", "provider",
                                           appkey=appkey)
        started.append(probe_server)
        probe_info = probe_server.recv(60)
        bare_server = bench.workers.start("aio-bare-server", "bench.aiobench", "bare_server")
        started.append(bare_server)
        bare_info = bare_server.recv(60)
        cfg = bench.cfg
        client = bench.workers.start(
            "aio-client", "bench.aiobench", "client", appkey=appkey,
            probe_port=probe_info["port"], bare_port=bare_info["port"],
            rounds=cfg["rounds"], seconds=cfg["seconds"], warmup=cfg["warmup"],
            server_pids={"probe": probe_info["pid"], "bare": bare_info["pid"]})
        started.append(client)
        out = client.recv(900)
    finally:
        bench.workers.stop_many(started)
    bench.report.raw["aio"] = out
    add = bench.report.add
    for inflight in INFLIGHT:
        rounds = out["client"][str(inflight)]
        probe = [r["probe"] for r in rounds]
        bare = [r["bare"] for r in rounds]
        pairs = [p["cps"] / b["cps"] for p, b in zip(probe, bare) if b["cps"] > 0]
        add(SECTION, "async client, %d in flight: calls/s" % inflight,
            median([r["cps"] for r in probe]), "calls/s",
            "bare make_aio_client x%d" % inflight, median([r["cps"] for r in bare]),
            ratio_value=median(pairs) if pairs else None,
            note="round-by-round ratios %s" % " ".join("%.2f" % x for x in pairs))
        add(SECTION, "async client, %d in flight: loop CPU per call" % inflight,
            median([r["cpu_us"] for r in probe]), "us",
            "bare make_aio_client x%d" % inflight, median([r["cpu_us"] for r in bare]))
    server = out["server"]
    probe = [r["probe"] for r in server]
    bare = [r["bare"] for r in server]
    pairs = [p["cps"] / b["cps"] for p, b in zip(probe, bare) if b["cps"] > 0]
    add(SECTION, "async provider, 10 in flight: calls/s", median([r["cps"] for r in probe]),
        "calls/s", "bare make_aio_server", median([r["cps"] for r in bare]),
        ratio_value=median(pairs) if pairs else None,
        note="load: bare make_aio_client x10 on one loop; ratios %s"
        % " ".join("%.2f" % x for x in pairs))
    add(SECTION, "async provider: server CPU per call", median([r["server_cpu_us"] for r in probe]),
        "us", "bare make_aio_server", median([r["server_cpu_us"] for r in bare]))


# -- worker processes -----------------------------------------------------------------

class _Handler(object):
    """DemoService, every method a coroutine (the rows call say())."""

    async def say(self):
        return "hello world"

    async def echo(self, text):
        return text

    async def add(self, a, b):
        return a + b

    async def fail(self, message):
        return message

    async def slow(self, millis):
        await asyncio.sleep(millis / 1000.0)
        return "slow"

    async def whoami(self):
        return "bench"

    async def pid(self):
        return os.getpid()


def _serve_on_loop(conn, start):
    """Run `start()` (a coroutine returning (info, stop coroutine)) on a loop in a
    thread, send `info`, serve until the driver says stop."""
    import threading
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    info, stop = asyncio.run_coroutine_threadsafe(start(), loop).result(60)
    info["pid"] = os.getpid()
    conn.send(info)
    try:
        _wait_for_stop(conn)
    finally:
        asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def provider(conn, appkey):
    from probe.aio import AsyncProvider

    async def start():
        served = await AsyncProvider(IDL, appkey, SERVICE, _Handler(), 0, shutdown_grace=0,
                                     metrics=True).start()
        return {"port": served.port}, (lambda: served.stop(grace=0))
    _serve_on_loop(conn, start)


def bare_server(conn):
    """thriftpy2's TAsyncServer runs its own loop (serve() blocks): on a thread here."""
    import socket
    import threading
    from thriftpy2.contrib.aio.rpc import make_server
    from probe.idl import load_service
    port = _free_port()
    loop = asyncio.new_event_loop()
    # client_timeout=None: its default closes a connection quiet for 3 s, and the
    # server rows come after the client rows.
    server = make_server(load_service(IDL, SERVICE), _Handler(), "127.0.0.1", port, loop=loop,
                         client_timeout=None)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    conn.send({"port": port, "pid": os.getpid()})
    try:
        _wait_for_stop(conn)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


async def _timed(calls, seconds, warmup, server_pid=None):
    """Run every coroutine function of `calls` in a loop at once for `seconds`;
    calls/s, the loop thread's CPU per call, and with `server_pid` that process's."""
    stop_at = [time.perf_counter() + warmup]
    counts = [0]

    async def worker(call):
        while time.perf_counter() < stop_at[0]:
            await call()
            counts[0] += 1
    await asyncio.gather(*[worker(call) for call in calls])
    counts[0] = 0
    server0 = cpu_seconds(server_pid) if server_pid else 0.0
    cpu0, start = time.thread_time(), time.perf_counter()
    stop_at[0] = start + seconds
    await asyncio.gather(*[worker(call) for call in calls])
    elapsed = time.perf_counter() - start
    cpu = time.thread_time() - cpu0
    calls_done = max(counts[0], 1)
    result = {"calls": counts[0], "seconds": elapsed, "cps": counts[0] / elapsed,
              "cpu_us": cpu / calls_done * 1e6}
    if server_pid:
        result["server_cpu_us"] = (cpu_seconds(server_pid) - server0) / calls_done * 1e6
    return result


def client(conn, appkey, probe_port, bare_port, rounds, seconds, warmup, server_pids):
    conn.send(asyncio.run(_client(appkey, probe_port, bare_port, rounds, seconds, warmup,
                                  server_pids)))
    _wait_for_stop(conn)


async def _client(appkey, probe_port, bare_port, rounds, seconds, warmup, server_pids):
    from thriftpy2.contrib.aio.rpc import make_client
    from probe.aio import build_client
    from probe.idl import load_service
    service = load_service(IDL, SERVICE)
    probe = await build_client(IDL, appkey, SERVICE, 5000, snapshot_dir=False, metrics=False)
    deadline = time.monotonic() + 30
    while not len(probe.watcher.table):
        if time.monotonic() > deadline:
            raise RuntimeError("the asyncio provider did not appear in the registry")
        await asyncio.sleep(0.02)
    bare = {}
    for port in (probe_port, bare_port):
        bare[port] = [await make_client(service, "127.0.0.1", port, timeout=5000)
                      for _ in range(max(INFLIGHT))]
    out = {"client": {}, "server": []}
    try:
        for inflight in INFLIGHT:
            results = []
            for index in range(rounds):
                order = ("probe", "bare") if index % 2 == 0 else ("bare", "probe")
                result = {}
                for kind in order:
                    if kind == "probe":
                        calls = [probe.say] * inflight
                    else:
                        calls = [one.say for one in bare[probe_port][:inflight]]
                    result[kind] = await _timed(calls, seconds, warmup)
                results.append(result)
            out["client"][str(inflight)] = results
        for index in range(rounds):
            order = ("probe", "bare") if index % 2 == 0 else ("bare", "probe")
            result = {}
            for kind in order:
                port = probe_port if kind == "probe" else bare_port
                result[kind] = await _timed([one.say for one in bare[port][:10]], seconds,
                                            warmup, server_pids[kind])
            out["server"].append(result)
    finally:
        for clients in bare.values():
            for one in clients:
                one.close()
        await probe.close()
    return out
