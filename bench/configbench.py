"""Config propagation: Admin.set_config (what `probe config set` runs) -> on_change in
N consumer processes, each holding a live_config. Driven from bench/run.py
(section "config"); the consumers are bench worker processes (spawned)."""

import os
import threading
import time

from bench.common import BenchError, median, percentile

FULL = dict(ns=(1, 10, 50), changes=30)
SMOKE = dict(ns=(1, 3), changes=3)
KEY = "bench.value"
TARGET_P99_MS = 50.0


def consumer(conn, appkey, backup_dir):
    """Holds a live_config and reports every change of KEY with the time it arrived."""
    from probe.configcenter import live_config
    cfg = live_config(appkey, backup_dir=backup_dir)
    send_lock = threading.Lock()
    counted = {"changes": 0}

    def changed(key, old, new):
        seen = time.time()
        counted["changes"] += 1
        if key == KEY:
            with send_lock:
                conn.send(("change", seen, new))
    cfg.on_change(changed)
    try:
        with send_lock:
            conn.send(("ready", time.time(), cfg.get(KEY)))
        cpu_ready, changes_ready = time.process_time(), counted["changes"]
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return
            if message is None:
                return
            if message == "cpu":  # CPU this consumer spent since it was ready
                with send_lock:
                    conn.send(("cpu", time.process_time() - cpu_ready,
                               counted["changes"] - changes_ready))
    finally:
        cfg.close()


def run(bench):
    """Measure and add the rows to bench.report."""
    cfg = SMOKE if bench.smoke else FULL
    section = "7. config set -> on_change in N consumer processes"
    admin = bench.admin
    appkey = "cfgbench_%s" % bench.run_id
    admin.add_appkey(appkey, "config benchmark")
    admin.set_config(appkey, KEY, 0)
    kazoo = admin.zk.client
    written = []
    original_set = kazoo.set

    def timed_set(*args, **kwargs):
        result = original_set(*args, **kwargs)
        written.append(time.time())
        return result
    per_n, value = {}, 0
    kazoo.set = timed_set
    try:
        for n in cfg["ns"]:
            per_n[n], value = _propagate(bench, appkey, n, cfg["changes"], value, written)
    finally:
        kazoo.set = original_set
    bench.report.raw["config_propagation"] = {str(n): v for n, v in per_n.items()}
    first = min(per_n)
    anchor = "N=%d" % first
    for key, title, note in (
            ("from_return_ms", "from set_config() return",
             "time until the LAST of N consumers ran on_change; set_config() commits its MySQL "
             "history row after the znode write, so values near 0 or negative are normal"),
            ("from_write_ms", "from the znode write", "same, counted from the znode set() returning")):
        for stat, q in (("p50", 50), ("p99", 99)):
            base = percentile(per_n[first][key], q)
            for n in sorted(per_n):
                bench.report.add(section, "N=%d, all consumers, %s, %s" % (n, title, stat),
                                 percentile(per_n[n][key], q), "ms", anchor, base,
                                 target=("value<", TARGET_P99_MS) if stat == "p99" else None,
                                 note=note if (n == first and stat == "p50") else None)
    base = median(per_n[first]["call_ms"])
    for n in sorted(per_n):
        bench.report.add(section, "N=%d, set_config() call duration, median" % n,
                         median(per_n[n]["call_ms"]), "ms", anchor, base)
    base = per_n[first]["consumer_cpu_ms_per_change"]
    for n in sorted(per_n):
        bench.report.add(section, "N=%d, consumer CPU per change" % n,
                         per_n[n]["consumer_cpu_ms_per_change"], "ms", anchor, base,
                         note="N x this / %d cores bounds how fast the last consumer can be"
                         % (os.cpu_count() or 1) if n == max(per_n) else None)


def _propagate(bench, appkey, n, changes, value, written):
    bench.log("config propagation: starting %d consumer processes" % n)
    consumers = [bench.workers.start("cfgconsumer%d" % i, "bench.configbench", "consumer",
                                     appkey=appkey,
                                     backup_dir=os.path.join(bench.scratch, "configs", str(i)))
                 for i in range(n)]
    out = {"from_return_ms": [], "from_write_ms": [], "call_ms": []}
    try:
        started = time.monotonic()
        for consumer in consumers:
            message = consumer.recv(max(5.0, 240 - (time.monotonic() - started)))
            if message[0] != "ready":
                raise BenchError("config consumer sent %r before ready" % (message,))
        bench.log("config propagation: %d consumers ready in %.1f s; %d changes"
                  % (n, time.monotonic() - started, changes))
        for _ in range(changes):
            value += 1
            del written[:]
            t_call = time.time()
            bench.admin.set_config(appkey, KEY, value)
            t_return = time.time()
            seen = _collect(consumers, value, timeout=15.0)
            t_write = written[-1] if written else t_return
            last = max(seen)
            out["from_return_ms"].append((last - t_return) * 1e3)
            out["from_write_ms"].append((last - t_write) * 1e3)
            out["call_ms"].append((t_return - t_call) * 1e3)
            time.sleep(0.05)
        cpu, counted = 0.0, 0
        for consumer in consumers:
            consumer.send("cpu")
            while True:
                message = consumer.recv(30)
                if message[0] == "cpu":
                    cpu += message[1]
                    counted += message[2]
                    break
        out["consumer_cpu_ms_per_change"] = cpu / max(1, counted) * 1e3
    finally:
        bench.workers.stop_many(consumers)
    return out, value


def _collect(consumers, value, timeout):
    """Wait until every consumer reports `value`; the wall-clock times they saw it."""
    import multiprocessing.connection
    from bench.common import check_message
    by_conn = {consumer.conn: i for i, consumer in enumerate(consumers)}
    seen = [None] * len(consumers)
    waiting = set(by_conn)
    deadline = time.monotonic() + timeout
    while waiting:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError("%d of %d config consumers did not see value %d within %.0f s"
                             % (len(waiting), len(consumers), value, timeout))
        for conn in multiprocessing.connection.wait(list(waiting), left):
            try:
                message = conn.recv()
            except EOFError:
                raise BenchError("config consumer %d died" % by_conn[conn])
            check_message("cfgconsumer%d" % by_conn[conn], message)
            if message[0] == "change" and message[2] == value:
                seen[by_conn[conn]] = message[1]
                waiting.discard(conn)
    return seen
