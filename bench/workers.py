"""Worker processes of the benchmark. Each function runs in its own spawned process
(see common.child_entry), talks to the driver over `conn`, and returns when the
driver sends None (or closes the pipe)."""

import gc
import os
import socket
import threading
import time

from bench.common import (IDL, SERVICE, latency_summary, median, serve_cpu_requests,
                          serve_until_stopped)

BARE_TIMEOUT_MS = 5000


def _bare_service():
    import thriftpy2
    return thriftpy2.load(IDL, module_name="demo_thrift").DemoService


def _handler(name="bench"):
    from probe.demo import DemoServiceHandler
    return DemoServiceHandler(name)


def _wait_for_stop(conn):
    serve_until_stopped(conn, lambda message: conn.send(
        {"error": "unexpected message %r" % (message,)}))


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- servers -------------------------------------------------------------------------

def provider(conn, kind, appkey=None, workers=None):
    """kind 'probe': probe's start_service; kind 'bare': thriftpy2's make_server."""
    handler = _handler()
    if kind == "probe":
        from probe.server import start_service
        options = {"shutdown_grace": 0}
        if workers is not None:
            options["workers"] = workers
        served = start_service(IDL, appkey, SERVICE, handler, port=0, block=False, **options)
        conn.send({"host": served.host, "port": served.port, "pid": os.getpid()})
        try:
            _wait_for_stop(conn)
        finally:
            served.stop(grace=0)
    elif kind == "bare":
        from thriftpy2.rpc import make_server
        port = _free_port()
        server = make_server(_bare_service(), handler, "127.0.0.1", port)
        thread = threading.Thread(target=server.serve, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        conn.send({"host": "127.0.0.1", "port": port, "pid": os.getpid()})
        _wait_for_stop(conn)
        server.close()
    else:
        raise ValueError("unknown provider kind %r" % kind)


# -- the client under test ------------------------------------------------------------

def _timed_single(call, seconds, warmup):
    perf = time.perf_counter
    warm_end = perf() + warmup
    while perf() < warm_end:
        call()
    samples = []
    append = samples.append
    cpu0 = time.process_time()
    start = t1 = perf()
    end = start + seconds
    while t1 < end:
        t0 = perf()
        call()
        t1 = perf()
        append(t1 - t0)
    cpu = time.process_time() - cpu0
    elapsed = t1 - start
    result = {"calls": len(samples), "seconds": elapsed, "cps": len(samples) / elapsed,
              "client_cpu_us_per_call": cpu / len(samples) * 1e6}
    result.update(latency_summary(samples))
    return result


def _timed_threads(calls, seconds, warmup):
    """One thread per callable; counts calls that start inside [mark, mark+seconds]."""
    perf = time.perf_counter
    ready = threading.Barrier(len(calls) + 1)
    samples = [[] for _ in calls]
    errors = []
    window = {}

    def run(index, call):
        try:
            append = samples[index].append
            ready.wait()
            mark, end = window["mark"], window["end"]
            while True:
                t0 = perf()
                if t0 >= end:
                    return
                call()
                if t0 >= mark:
                    append(perf() - t0)
        except BaseException as exc:  # surfaced to the driver below
            errors.append(repr(exc))

    threads = [threading.Thread(target=run, args=(i, c), daemon=True) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    window["mark"] = perf() + warmup
    window["end"] = window["mark"] + seconds
    ready.wait()
    while perf() < window["mark"]:
        time.sleep(0.001)
    cpu0 = time.process_time()
    for thread in threads:
        thread.join()
    cpu = time.process_time() - cpu0
    if errors:
        raise RuntimeError("calls failed in threads: %s" % errors[:3])
    merged = [s for per_thread in samples for s in per_thread]
    result = {"calls": len(merged), "seconds": seconds, "cps": len(merged) / seconds,
              "client_cpu_us_per_call": cpu / max(1, len(merged)) * 1e6,
              "per_thread_calls": [len(s) for s in samples]}
    result.update(latency_summary(merged))
    return result


def client(conn, appkey, host, port, config_path, env):
    """Runs the client-side measurements the driver asks for, one at a time."""
    from thriftpy2.rpc import make_client
    from probe.client import build_client
    from bench.seedclient import SeedStyleClient

    bare_service = _bare_service()
    probe_clients = {}

    def probe_client(kind):
        if kind not in probe_clients:
            options = {"metrics": False} if kind == "probe_nometrics" else {}
            probe_clients[kind] = build_client(IDL, appkey, SERVICE, **options)
        return probe_clients[kind]

    def bare_client():
        return make_client(bare_service, host, port, timeout=BARE_TIMEOUT_MS)

    try:
        while True:
            try:
                command = conn.recv()
            except EOFError:
                return
            if command is None:
                return
            op = command["op"]
            if op == "single":
                kind = command["kind"]
                closer = None
                if kind == "bare":
                    target = bare_client()
                    closer = target.close
                elif kind in ("seed", "seed_closing"):
                    target = SeedStyleClient(bare_service, appkey, SERVICE, env, config_path,
                                             socket_timeout=BARE_TIMEOUT_MS,
                                             close_sessions=kind == "seed_closing")
                else:
                    target = probe_client(kind)
                try:
                    assert target.say() == "hello world"
                    result = _timed_single(target.say, command["seconds"], command["warmup"])
                finally:
                    if closer:
                        closer()
                result["kind"] = kind
                conn.send(result)
            elif op == "threads":
                kind, count = command["kind"], command["threads"]
                if kind == "bare":
                    bares = [bare_client() for _ in range(count)]
                    calls = [b.say for b in bares]
                else:
                    shared = probe_client("probe")
                    calls = [shared.say] * count
                    bares = []
                try:
                    result = _timed_threads(calls, command["seconds"], command["warmup"])
                finally:
                    for b in bares:
                        b.close()
                result["kind"] = kind
                if kind != "bare":
                    pools = probe_clients["probe"]._pools
                    result["pool_connections"] = sum(p.created for p in pools.values())
                conn.send(result)
            else:
                conn.send({"error": "unknown op %r" % op})
    finally:
        for c in probe_clients.values():
            c.close()


def load(conn):
    """A load generator for the server comparison: one bare client per round."""
    from thriftpy2.rpc import make_client
    service = _bare_service()
    while True:
        try:
            command = conn.recv()
        except EOFError:
            return
        if command is None:
            return
        c = make_client(service, command["host"], command["port"], timeout=BARE_TIMEOUT_MS)
        try:
            say = c.say
            say()
            # Shared wall clock: every load process measures the same window.
            perf = time.perf_counter
            offset = time.time() - perf()
            mark = command["start_at"] - offset
            end = mark + command["seconds"]
            while perf() < mark:
                say()
            samples = []
            append = samples.append
            t1 = perf()
            while t1 < end:
                t0 = perf()
                say()
                t1 = perf()
                append(t1 - t0)
        finally:
            c.close()
        conn.send({"calls": len(samples), "samples": samples})


# -- governance measurements ---------------------------------------------------------------

def consumer(conn, appkey, snapshot_dir):
    """Holds a build_client and reports every routing-table change with its time."""
    from probe.client import build_client
    c = build_client(IDL, appkey, SERVICE, snapshot_dir=snapshot_dir)
    try:
        deadline = time.monotonic() + 60
        while not c.watcher.table.all_nodes:
            if time.monotonic() > deadline:
                raise RuntimeError("no node in the routing table after 60 s")
            time.sleep(0.005)
        assert c.say() == "hello world"
        watcher = c.watcher
        original = watcher.on_change
        send_lock = threading.Lock()

        def hooked(table):
            if original is not None:
                original(table)
            seen = time.time()
            with send_lock:
                conn.send(("table", seen, [n.weight for n in table.all_nodes]))
        watcher.on_change = hooked
        with send_lock:
            conn.send(("ready", time.time(), [n.weight for n in watcher.table.all_nodes]))
        serve_cpu_requests(conn, send_lock, lambda: watcher.updates)
    finally:
        c.close()


def memory(conn, appkey, expect, snapshot_dir):
    """RSS of a consumer before/after build_client watching `expect` nodes, and the
    time until its routing table holds all of them."""
    from bench.common import rss_bytes
    from probe.client import build_client
    from probe.idl import load_service
    load_service(IDL, SERVICE)  # the IDL is not the nodes' memory
    gc.collect()
    time.sleep(0.05)
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    c = build_client(IDL, appkey, SERVICE, snapshot_dir=snapshot_dir)
    built = time.perf_counter() - t0
    deadline = time.monotonic() + 300
    while len(c.watcher.table.all_nodes) < expect:
        if time.monotonic() > deadline:
            raise RuntimeError("only %d of %d nodes after 300 s" % (len(c.watcher.table.all_nodes), expect))
        time.sleep(0.0005)
    full = time.perf_counter() - t0
    updates = c.watcher.updates
    gc.collect()
    time.sleep(0.2)
    rss1 = rss_bytes()
    conn.send({"rss_before": rss0, "rss_after": rss1, "build_client_s": built,
               "table_full_s": full, "nodes": len(c.watcher.table.all_nodes),
               "table_publishes": updates})
    try:
        _wait_for_stop(conn)
    finally:
        c.close()


def first_call(conn, kind, appkey, host, port, config_path, env, repeats):
    """Seconds from making a client to its first successful say(); the first try
    includes parsing the IDL (a cold process), the others do not."""
    import thriftpy2
    from thriftpy2.rpc import make_client
    from probe.client import build_client
    from probe.errors import NoAvailableNode
    from bench.seedclient import SeedStyleClient

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        if kind == "bare":
            service = thriftpy2.load(IDL, module_name="demo_thrift").DemoService
            c = make_client(service, host, port, timeout=BARE_TIMEOUT_MS)
            assert c.say() == "hello world"
        elif kind == "probe":
            c = build_client(IDL, appkey, SERVICE)
            deadline = time.monotonic() + 30
            while True:
                try:
                    assert c.say() == "hello world"
                    break
                except NoAvailableNode:
                    if time.monotonic() > deadline:
                        raise
        elif kind == "seed":
            service = thriftpy2.load(IDL, module_name="demo_thrift").DemoService
            c = SeedStyleClient(service, appkey, SERVICE, env, config_path,
                                socket_timeout=BARE_TIMEOUT_MS)
            assert c.say() == "hello world"
        else:
            raise ValueError(kind)
        times.append(time.perf_counter() - t0)
        c.close()
    conn.send({"cold_ms": times[0] * 1e3,
               "warm_ms": median(times[1:]) * 1e3 if len(times) > 1 else None,
               "all_ms": [t * 1e3 for t in times]})
    _wait_for_stop(conn)


def balancer(conn, sizes, budget):
    """ns per pick for each balancer and µs per RoutingTable build, per table size."""
    import random
    from probe.routing.balancer import LeastInFlight, Node, RoutingTable, SmoothRoundRobin, WeightedRandom

    def per_op(fn, arg, repeats=7):
        # Calibrate the loop count to ~`budget` s per repeat; the fastest repeat is the
        # one least disturbed by other processes (timeit's rule).
        loops = 1
        while True:
            t0 = time.perf_counter()
            for _ in range(loops):
                fn(arg)
            took = time.perf_counter() - t0
            if took >= budget / 4 or loops >= 1 << 22:
                break
            loops *= 4
        loops = max(1, int(loops * budget / max(took, 1e-9)))
        results = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(loops):
                fn(arg)
            results.append((time.perf_counter() - t0) / loops)
        return min(results)

    rng = random.Random(7)
    out = {}
    for n in sizes:
        nodes = [Node("%s_10.9.%d.%d_9090" % (SERVICE, i // 250, i % 250 + 1),
                      "10.9.%d.%d" % (i // 250, i % 250 + 1), 9090, rng.randint(1, 100), 1, 0.0)
                 for i in range(n)]
        table = RoutingTable(nodes)
        row = {"rebuild_us": per_op(RoutingTable, nodes) * 1e6}
        for name, chooser in (("weighted_random", WeightedRandom()),
                              ("round_robin", SmoothRoundRobin()),
                              ("least_inflight", LeastInFlight(lambda node: 0))):
            row[name + "_ns"] = per_op(chooser.pick, table) * 1e9
        out[n] = row
    conn.send(out)
    _wait_for_stop(conn)


def callpath(conn, appkey, host, port, batch, repeats):
    """Client CPU per call with no network wait: each client talks over a socketpair
    whose far end holds canned replies, so only the client's own work is timed
    (encode, send syscall, recv syscall, decode, plus probe's routing, pooling and
    metrics). probe's pooled connection is swapped for the socketpair one; this
    relies on probe.rpc.pool internals, so a change there reports n/a, not an error."""
    import socket
    from thriftpy2.protocol import TBinaryProtocolFactory
    from thriftpy2.protocol.binary import TBinaryProtocol
    from thriftpy2.thrift import TClient, TMessageType
    from thriftpy2.transport import TBufferedTransportFactory, TMemoryBuffer, TSocket
    from probe.rpc import pool as probe_pool
    from probe.rpc.codec import DEFAULT_CODEC
    from probe.client import build_client
    from probe.idl import load_service

    service = load_service(IDL, SERVICE)

    def canned(seqids):
        buf = TMemoryBuffer()
        proto = TBinaryProtocol(buf)
        for seqid in seqids:
            proto.write_message_begin("say", TMessageType.REPLY, seqid)
            service.say_result(success="hello world").write(proto)
            proto.write_message_end()
        return buf.getvalue()

    def drain(sock):
        sock.setblocking(False)
        try:
            while sock.recv(1 << 16):
                pass
        except BlockingIOError:
            pass
        finally:
            sock.setblocking(True)

    def measure(call, far, replies):
        """ns per call: the fastest of `repeats` batches (timeit's rule)."""
        best = None
        for _ in range(repeats):
            far.sendall(replies())
            t0 = time.perf_counter()
            for _ in range(batch):
                call()
            took = time.perf_counter() - t0
            drain(far)
            best = took if best is None else min(best, took)
        return best / batch * 1e9

    out = {}
    near, far = socket.socketpair()
    bare = TClient(service, TBinaryProtocolFactory().get_protocol(
        TBufferedTransportFactory().get_transport(TSocket(sock=near))))
    out["bare"] = measure(bare.say, far, lambda: canned([0] * batch))
    near.close()
    far.close()

    class CannedConnection(probe_pool.Connection):
        __slots__ = ()

        def __init__(self, sock):
            self.sock = sock
            self.transport = TBufferedTransportFactory().get_transport(TSocket(sock=sock))
            self.protocol = TBinaryProtocolFactory().get_protocol(self.transport)
            self.send_call = DEFAULT_CODEC.send_call
            self.poller = None
            self.seqid = 0
            self.released_at = 0.0

        def is_stale(self):
            return False  # the canned replies wait in the buffer; the poll is timed apart

    for kind, options in (("probe", {}), ("probe_nometrics", {"metrics": False})):
        client = build_client(IDL, appkey, SERVICE, **options)
        try:
            assert client.say() == "hello world"
            node = client.watcher.table.nodes[0]
            pool = client._pools[node.name]
            near, far = socket.socketpair()
            fake = CannedConnection(near)
            pool.idle.clear()
            pool.idle.append(fake)
            state = {"seqid": 0}

            def replies():
                seqids = []
                for _ in range(batch):
                    state["seqid"] = (state["seqid"] + 1) & 0x7FFFFFFF
                    seqids.append(state["seqid"])
                return canned(seqids)
            out[kind] = measure(client.say, far, replies)
            if pool.created != 1 or list(pool.idle) != [fake]:
                raise RuntimeError("the canned connection was not the one used")
            pool.idle.clear()
            near.close()
            far.close()
        finally:
            client.close()

    # The pool's staleness check, timed on a real idle connection.
    real = probe_pool.Connection(host, port, 1000, 1000)
    try:
        stale = real.is_stale
        best = None
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(batch):
                stale()
            took = time.perf_counter() - t0
            best = took if best is None else min(best, took)
        out["is_stale"] = best / batch * 1e9
    finally:
        real.close()
    conn.send(out)
    _wait_for_stop(conn)


def client_cpu(conn, appkey, host, port, rounds, calls, warmup_calls):
    """Client thread CPU per say() (time.thread_time) and calls/s, unpinned, in
    alternating rounds of bare make_client, probe (metrics on) and probe metrics=False
    against the same provider. Thread CPU leaves out the metrics pump and the
    ZooKeeper threads, which do not run per call."""
    from thriftpy2.rpc import make_client
    from probe.client import build_client

    bare = make_client(_bare_service(), host, port, timeout=BARE_TIMEOUT_MS)
    clients = {"bare": bare, "probe": build_client(IDL, appkey, SERVICE),
               "probe_nometrics": build_client(IDL, appkey, SERVICE, metrics=False)}
    out = {kind: [] for kind in clients}
    try:
        for client in clients.values():
            assert client.say() == "hello world"
        thread_time, perf = time.thread_time, time.perf_counter
        for _ in range(rounds):
            for kind, client in clients.items():
                say = client.say
                for _ in range(warmup_calls):
                    say()
                gc.collect()
                cpu0, wall0 = thread_time(), perf()
                for _ in range(calls):
                    say()
                cpu, wall = thread_time() - cpu0, perf() - wall0
                out[kind].append({"cpu_us_per_call": cpu / calls * 1e6, "cps": calls / wall})
    finally:
        for client in clients.values():
            client.close()
    conn.send(out)
    _wait_for_stop(conn)


# -- gray failures (bench/graybench.py) -------------------------------------------------

def gray_provider(conn, appkey, label):
    """A probe provider whose whoami() the driver switches between answering,
    raising (an undeclared exception) and sleeping: {"mode": "ok"|"raise"|"slow",
    "delay": seconds}. Hangs are the driver's SIGSTOP on this process."""
    from probe.demo import DemoServiceHandler
    from probe.server import start_service
    state = {"mode": "ok", "delay": 0.0}

    class Gray(DemoServiceHandler):
        def whoami(self):
            mode = state["mode"]
            if mode == "raise":
                raise RuntimeError("database is down")
            if mode == "slow":
                time.sleep(state["delay"])
            return label

    served = start_service(IDL, appkey, SERVICE, Gray(label), port=0, block=False,
                           shutdown_grace=0, metrics=False)
    conn.send({"host": served.host, "port": served.port, "pid": os.getpid()})

    def answer(message):
        state.update(message)
        conn.send({"ok": True})
    try:
        serve_until_stopped(conn, answer)
    finally:
        served.stop(grace=0)
