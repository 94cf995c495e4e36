"""Section 10: fleet scale. C consumer processes routing over one provider plus N
registered nodes of weight 0 (the shape of issue 22's measurements):

- consumer CPU per data edit of one node, and per restart (delete + create) of one
- bytes a consumer receives from ZooKeeper per restart (the kernel's tcp_info of
  its ZooKeeper socket, read with `ss`) and ZooKeeper's own packets sent per
  restart (`mntr` zk_packets_sent, every consumer included)
- build_client to the first successful call, with N nodes registered
- the ZooKeeper cost of many consumer sessions on a 3-node ensemble (connections,
  watches, packets and bytes per restart) from `mntr` and tcp_info, measured with
  as many sessions as the machine holds and extrapolated linearly to 1,000
  (labelled so)

The propagation p99 of a weight edit to the last of 50 consumer processes is
section 6 (same machinery, target 20 ms).
"""

import os
import re
import subprocess
import threading
import time

from bench.common import IDL, SERVICE, median, serve_until_stopped

EXTRAPOLATE_TO = 1000  # consumer sessions per ensemble the docs talk about


# -- worker processes ----------------------------------------------------------------------

def consumer(conn, appkey, expect):
    """A build_client routing over `expect` nodes. Answers ("wait", n): block (without
    spinning) until n more table swaps happened; "stats": CPU, swaps, reads, bytes."""
    from probe.client import build_client
    c = build_client(IDL, appkey, SERVICE, snapshot_dir=False)
    try:
        deadline = time.monotonic() + 120
        while len(c.watcher.table.all_nodes) < expect:
            if time.monotonic() > deadline:
                raise RuntimeError("only %d of %d nodes after 120 s"
                                   % (len(c.watcher.table.all_nodes), expect))
            time.sleep(0.01)
        assert c.say() == "hello world"
        watcher = c.watcher
        swapped = threading.Condition()
        original = watcher.on_change

        def hooked(table):
            if original is not None:
                original(table)
            with swapped:
                swapped.notify_all()
        watcher.on_change = hooked

        def stats():
            mirror = watcher.mirror
            return {"cpu": time.process_time(), "updates": watcher.updates, "reads": mirror.reads,
                    "listings": mirror.listings}

        def answer(message):
            if message == "stats":
                conn.send(stats())
            elif isinstance(message, tuple) and message[0] == "wait_node":
                _, name, valid, registered_at = message

                def arrived():
                    node = watcher.table.node_named(name)
                    return node is not None and node.valid == valid and (
                        registered_at is None or node.registered_at == registered_at)
                with swapped:
                    ok = swapped.wait_for(arrived, 30)
                conn.send(dict(stats(), ok=ok))
        conn.send(dict(stats(), ready=True))
        serve_until_stopped(conn, answer)
    finally:
        c.close()


def first_call(conn, appkey, repeats, snapshot_dir):
    """ms from build_client to its first successful say() (warm process: IDL parsed):
    without a snapshot (a host's first consumer), and with the snapshot a consumer
    before it left (a restart)."""
    from probe.client import build_client
    from probe.idl import load_service
    load_service(IDL, SERVICE)

    def timed(snapshots):
        t0 = time.perf_counter()
        c = build_client(IDL, appkey, SERVICE, snapshot_dir=snapshots)
        try:
            assert c.say() == "hello world"
            elapsed = (time.perf_counter() - t0) * 1e3
            deadline = time.monotonic() + 60
            while not c.watcher.mirror.ready and time.monotonic() < deadline:
                time.sleep(0.01)  # let the listing complete, so the snapshot is whole
        finally:
            c.close()
        return elapsed
    cold = [timed(False) for _ in range(repeats)]
    timed(snapshot_dir)  # leaves the snapshot behind, as a consumer that stops does
    warm = [timed(snapshot_dir) for _ in range(repeats)]
    conn.send({"ms": cold, "snapshot_ms": warm})
    serve_until_stopped(conn, lambda message: None)


def sessions(conn, hosts, env, appkey, count, expect):
    """`count` consumer sessions in one process (each its own ZooKeeper session and
    watcher, as `count` pre-fork workers would have): reports when all hold
    `expect` nodes, then waits."""
    from probe.routing.watcher import ServiceWatcher
    from probe.zk.session import ZooKeeper
    held = []
    try:
        for _ in range(count):
            zk = ZooKeeper(hosts, session_timeout=10.0)
            zk.start(timeout=20)
            watcher = ServiceWatcher(zk, env, appkey, SERVICE, snapshot_dir=False)
            watcher.start()
            held.append((zk, watcher))
        deadline = time.monotonic() + 120
        while any(not w.mirror.ready or len(w.table.all_nodes) < expect for _, w in held):
            if time.monotonic() > deadline:
                raise RuntimeError("sessions did not load %d nodes in 120 s" % expect)
            time.sleep(0.05)
        conn.send({"ready": True})

        def answer(message):
            if isinstance(message, tuple) and message[0] == "has":
                _, name, present = message
                end = time.monotonic() + 30
                while time.monotonic() < end:
                    if all((w.table.node_named(name) is not None) == present for _, w in held):
                        break
                    time.sleep(0.005)
                conn.send({"ok": True})
        serve_until_stopped(conn, answer)
    finally:
        for zk, watcher in held:
            watcher.close()
            zk.stop()


def ensemble_cost(bench, count, nodes, restarts):
    """What `count` consumer sessions cost a 3-node ensemble: connections and
    watches per session, packets and bytes per restart of one node."""
    from kazoo.client import KazooClient
    from probe.testing.ensemble import ZooKeeperEnsemble
    ensemble = ZooKeeperEnsemble(os.path.join(bench.scratch, "fleet-ensemble"), size=3)
    ensemble.up()
    try:
        zk = KazooClient(hosts=ensemble.hosts, timeout=10)
        zk.start(30)
        try:
            appkey = "fleet_ensemble"
            paths = _register(zk, "dev", appkey, nodes)
            base = _mntr(ensemble.hosts)
            worker = bench.workers.start("fleet-sessions", "bench.fleetbench", "sessions",
                                         hosts=ensemble.hosts, env="dev", appkey=appkey,
                                         count=count, expect=nodes)
            try:
                worker.recv(600)
                loaded = _mntr(ensemble.hosts)
                received0 = _zk_bytes_received({worker.pid}, ensemble.hosts)
                for k in range(restarts):
                    path = paths[k % len(paths)][0]
                    name = path.rsplit("/", 1)[-1]
                    data = zk.get(path)[0]
                    zk.delete(path)
                    worker.ask(("has", name, False), 60)
                    zk.create(path, data, ephemeral=True)
                    worker.ask(("has", name, True), 60)
                after = _mntr(ensemble.hosts)
                received1 = _zk_bytes_received({worker.pid}, ensemble.hosts)
            finally:
                bench.workers.stop(worker, timeout=30)
        finally:
            zk.stop()
            zk.close()
    finally:
        ensemble.down(wipe=True)

    def delta(a, b, key):
        return b.get(key, 0) - a.get(key, 0)
    return {"sessions": count, "nodes": nodes, "restarts": restarts,
            "connections": delta(base, loaded, "zk_num_alive_connections"),
            "watches": delta(base, loaded, "zk_watch_count"),
            "packets_per_restart": delta(loaded, after, "zk_packets_sent") / restarts,
            "bytes_per_restart": (received1 - received0) / float(restarts),
            "server_bytes_received_total": after.get("zk_bytes_received_count", 0)}


# -- the driver ------------------------------------------------------------------------------

def _mntr(hosts):
    """Summed numeric `mntr` figures of every server in `hosts`."""
    from probe.dev.stack import _four_letter_word
    total = {}
    for entry in hosts.split(","):
        host, port = entry.rsplit(":", 1)
        for line in _four_letter_word(int(port), "mntr", host=host).splitlines():
            parts = line.split("\t")
            if len(parts) == 2:
                try:
                    total[parts[0]] = total.get(parts[0], 0) + float(parts[1])
                except ValueError:
                    pass
    return total


def _zk_bytes_received(pids, hosts):
    """Bytes the processes `pids` received on their sockets to the ZooKeeper servers
    (the kernel's tcp_info, read with `ss`; 0 where ss is missing)."""
    ports = {entry.rsplit(":", 1)[1] for entry in hosts.split(",")}
    try:
        text = subprocess.run(["ss", "-tinpH", "state", "established"], capture_output=True,
                              text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    total, wanted = 0, False
    for line in text.splitlines():
        if not line.startswith(("\t", " ")):
            fields = line.split()
            pid = re.search(r"pid=(\d+)", line)
            wanted = (len(fields) >= 4 and fields[3].rsplit(":", 1)[-1] in ports
                      and pid is not None and int(pid.group(1)) in pids)
        elif wanted:
            found = re.search(r"bytes_received:(\d+)", line)
            total += int(found.group(1)) if found else 0
            wanted = False
    return total


def _register(zk, env, appkey, count):
    from probe import naming
    from probe.naming import NodeSettings
    zk.ensure_path(naming.appkey_path(env, appkey))
    paths, pending = [], []
    for i in range(count):
        host, port = "127.30.%d.%d" % (i // 250, i % 250 + 1), 30000 + i
        path = naming.node_path(env, appkey, SERVICE, host, port)
        data = NodeSettings(host, port, weight=0).to_bytes()
        pending.append(zk.create_async(path, data, ephemeral=True))
        paths.append((path, host, port))
    for result in pending:
        result.get(timeout=60)
    return paths


def _ask_all(workers, message, timeout=60):
    for worker in workers:
        worker.send(message)
    return [worker.recv(timeout) for worker in workers]


def _measure_changes(bench, zk, consumers, paths, edits, restarts, hosts):
    """Mean consumer CPU (ms) per edit and per restart, bytes per restart."""
    from probe.naming import NodeSettings
    before = _ask_all(consumers, "stats")

    def wait(name, valid, registered_at, what):
        for worker in consumers:
            worker.send(("wait_node", name, valid, registered_at))
        for worker in consumers:
            if not worker.recv(60)["ok"]:
                raise RuntimeError("%s of %s did not reach a consumer within 30 s" % (what, name))
    for k in range(edits):
        path, host, port = paths[k % len(paths)]
        # Every edit changes the node (enabled <-> disabled): one table swap each.
        valid = 0 if (k // len(paths)) % 2 == 0 else 1
        zk.set(path, NodeSettings(host, port, weight=0, valid=valid).to_bytes())
        wait(path.rsplit("/", 1)[-1], valid, None, "an edit")
    middle = _ask_all(consumers, "stats")
    pids = {worker.pid for worker in consumers}
    received0 = _zk_bytes_received(pids, hosts)
    mntr0 = _mntr(hosts)
    for k in range(restarts):
        path, host, port = paths[-1 - (k % len(paths))]
        data = zk.get(path)[0]
        zk.delete(path)
        zk.create(path, data, ephemeral=True)
        stat = zk.exists(path)
        wait(path.rsplit("/", 1)[-1], NodeSettings.from_json(data).valid, stat.ctime / 1000.0,
             "a restart")
    after = _ask_all(consumers, "stats")
    received1 = _zk_bytes_received(pids, hosts)
    mntr1 = _mntr(hosts)
    per = len(consumers)
    edit_cpu = sum(m["cpu"] - b["cpu"] for b, m in zip(before, middle)) / per / edits * 1e3
    restart_cpu = sum(a["cpu"] - m["cpu"] for m, a in zip(middle, after)) / per / restarts * 1e3
    restart_bytes = (received1 - received0) / float(per) / restarts
    restart_reads = sum(a["reads"] - m["reads"] for m, a in zip(middle, after)) / per / restarts
    edit_reads = sum(m["reads"] - b["reads"] for b, m in zip(before, middle)) / per / edits
    packets = (mntr1.get("zk_packets_sent", 0) - mntr0.get("zk_packets_sent", 0)) / restarts
    return {"edit_cpu_ms": edit_cpu, "restart_cpu_ms": restart_cpu,
            "restart_bytes": restart_bytes, "restart_reads": restart_reads,
            "edit_reads": edit_reads, "zk_packets_sent_per_restart": packets}


def run(bench):
    s = "13. fleet: C consumers x N nodes (one provider + N weight-0 nodes)"
    from kazoo.client import KazooClient
    from probe.settings import load_settings
    cfg = bench.cfg
    settings = load_settings()
    hosts = settings.zookeeper.hosts
    zk = KazooClient(hosts=hosts, timeout=10)
    zk.start(20)
    raw = {}
    try:
        for n in cfg["fleet_ns"]:
            appkey = "bench_%s_fleet%d" % (bench.run_id, n)
            bench.admin.add_appkey(appkey, "fleet benchmark")
            provider, _ = bench.start_provider("fleet-provider-%d" % n, "probe", appkey)
            try:
                bench.log("fleet: registering %d weight-0 nodes" % n)
                paths = _register(zk, settings.env, appkey, n)
                worker = bench.workers.start(
                    "fleet-first-%d" % n, "bench.fleetbench", "first_call", appkey=appkey,
                    repeats=cfg["fleet_first_repeats"],
                    snapshot_dir=os.path.join(bench.scratch, "fleet-snapshots"))
                try:
                    first = worker.recv(300)
                finally:
                    bench.workers.stop(worker)
                row = {"first_call_ms": median(first["ms"]), "first_call_samples": first["ms"],
                       "first_call_snapshot_ms": median(first["snapshot_ms"]),
                       "first_call_snapshot_samples": first["snapshot_ms"]}
                count = cfg["fleet_consumers"]
                bench.log("fleet: %d consumer processes x %d nodes" % (count, n))
                base = _mntr(hosts)
                consumers = [bench.workers.start("fleet-consumer-%d-%d" % (n, i), "bench.fleetbench",
                                                 "consumer", appkey=appkey, expect=n + 1)
                             for i in range(count)]
                try:
                    for worker in consumers:
                        worker.recv(300)
                    loaded = _mntr(hosts)
                    row.update(_measure_changes(bench, zk, consumers, paths, cfg["fleet_edits"],
                                                cfg["fleet_restarts"], hosts))
                    row["consumers"] = count
                    row["watches_per_consumer"] = (loaded.get("zk_watch_count", 0)
                                                   - base.get("zk_watch_count", 0)) / count
                    row["connections_per_consumer"] = (loaded.get("zk_num_alive_connections", 0)
                                                       - base.get("zk_num_alive_connections", 0)) / count
                finally:
                    bench.workers.stop_many(consumers)
                raw[str(n)] = row
            finally:
                bench.workers.stop(provider)
    finally:
        zk.stop()
        zk.close()
    bench.report.raw["fleet"] = raw
    _report(bench.report, s, raw, cfg)
    count, nodes = cfg["fleet_sessions"], cfg["fleet_session_nodes"]
    bench.log("fleet: %d consumer sessions x %d nodes on a 3-node ensemble" % (count, nodes))
    cost = ensemble_cost(bench, count, nodes, cfg["fleet_restarts"])
    bench.report.raw["fleet_ensemble"] = cost
    _report_ensemble(bench.report, s, cost)


def _report(report, s, raw, cfg):
    add = report.add
    sizes = sorted(int(n) for n in raw)
    small, large = raw[str(sizes[0])], raw[str(sizes[-1])]
    anchor = "N=%d" % sizes[0]
    for n in sizes:
        row = raw[str(n)]
        add(s, "consumer CPU per data edit, N=%d" % n, row["edit_cpu_ms"], "ms", anchor,
            small["edit_cpu_ms"], target=("ratio<=", 3.0) if n == sizes[-1] else None,
            note="mean of %d consumer processes; %.1f ZooKeeper read(s) per edit"
            % (row["consumers"], row["edit_reads"]))
    for n in sizes:
        row = raw[str(n)]
        add(s, "consumer CPU per restart (delete+create), N=%d" % n, row["restart_cpu_ms"], "ms",
            anchor, small["restart_cpu_ms"], target=("ratio<=", 3.0) if n == sizes[-1] else None,
            note="%.1f node read(s) per restart" % row["restart_reads"])
    for n in sizes:
        row = raw[str(n)]
        add(s, "consumer bytes read per restart, N=%d" % n, row["restart_bytes"] / 1024.0, "KB",
            anchor, small["restart_bytes"] / 1024.0,
            note="received on its ZooKeeper socket (tcp_info via ss): re-listing N names is the O(N) part")
    for n in sizes:
        row = raw[str(n)]
        add(s, "ZooKeeper packets sent per restart, N=%d, %d consumers" % (n, row["consumers"]),
            row["zk_packets_sent_per_restart"], "packets", anchor,
            small["zk_packets_sent_per_restart"], note="mntr zk_packets_sent")
    for n in sizes:
        row = raw[str(n)]
        add(s, "build_client -> first call, N=%d, no snapshot" % n, row["first_call_ms"], "ms",
            anchor, small["first_call_ms"], target=("value<", 500.0) if n >= 2000 else None,
            note="a host's first consumer (warm process), median of %d"
            % len(row["first_call_samples"]))
    for n in sizes:
        row = raw[str(n)]
        add(s, "build_client -> first call, N=%d, with snapshot" % n,
            row["first_call_snapshot_ms"], "ms", anchor, small["first_call_snapshot_ms"],
            target=("value<", 500.0) if n >= 2000 else None,
            note="a restarted consumer: routes on its snapshot past 0.2 s, reconciles after")
    add(s, "ZooKeeper watches per consumer session, N=%d" % sizes[-1],
        large["watches_per_consumer"], "watches",
        note="mntr zk_watch_count / consumers: one children watch + one per node of the service")
    extrapolated = large["watches_per_consumer"] * EXTRAPOLATE_TO
    add(s, "EXTRAPOLATED: watches for %d consumer sessions, N=%d" % (EXTRAPOLATE_TO, sizes[-1]),
        extrapolated, "watches",
        note="linear from %d measured sessions (labelled: not measured)" % large["consumers"])
    add(s, "EXTRAPOLATED: ZooKeeper packets per restart, %d consumers, N=%d"
        % (EXTRAPOLATE_TO, sizes[-1]),
        large["zk_packets_sent_per_restart"] / large["consumers"] * EXTRAPOLATE_TO, "packets",
        note="linear from %d measured consumers" % large["consumers"])
    add(s, "EXTRAPOLATED: bytes sent per restart, %d consumers, N=%d" % (EXTRAPOLATE_TO, sizes[-1]),
        large["restart_bytes"] * EXTRAPOLATE_TO / (1024.0 * 1024.0), "MB",
        note="per-consumer bytes x %d" % EXTRAPOLATE_TO)


def _report_ensemble(report, s, cost):
    add = report.add
    count, nodes = cost["sessions"], cost["nodes"]
    scale = EXTRAPOLATE_TO / float(count)
    add(s, "3-node ensemble: connections, %d sessions" % count, cost["connections"], "conns",
        note="mntr zk_num_alive_connections summed over the members")
    add(s, "3-node ensemble: watches, %d sessions x %d nodes" % (count, nodes), cost["watches"],
        "watches", note="mntr zk_watch_count summed: one children watch + one per node, per session")
    add(s, "3-node ensemble: packets sent per restart, %d sessions" % count,
        cost["packets_per_restart"], "packets", note="mntr zk_packets_sent, one delete + create")
    add(s, "3-node ensemble: bytes to consumers per restart, %d sessions" % count,
        cost["bytes_per_restart"] / 1024.0, "KB", note="tcp_info bytes_received of the sessions")
    add(s, "EXTRAPOLATED: watches, %d sessions x %d nodes" % (EXTRAPOLATE_TO, nodes),
        cost["watches"] * scale, "watches", note="linear from %d measured sessions" % count)
    add(s, "EXTRAPOLATED: packets per restart, %d sessions" % EXTRAPOLATE_TO,
        cost["packets_per_restart"] * scale, "packets",
        note="linear from %d measured sessions" % count)
    add(s, "EXTRAPOLATED: bytes per restart, %d sessions" % EXTRAPOLATE_TO,
        cost["bytes_per_restart"] * scale / (1024.0 * 1024.0), "MB",
        note="linear from %d measured sessions" % count)


__all__ = ["run", "consumer", "first_call", "sessions"]
