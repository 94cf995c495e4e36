"""Config propagation: Admin.set_config (what `probe config set` runs) -> on_change in
N consumer processes, each holding a live_config. Driven from bench/run.py
(section "config"); the consumers are bench worker processes (spawned)."""

import os
import threading
import time

from bench.common import (Propagation, measure_propagation, report_propagation,
                          serve_cpu_requests, timed_znode_writes)

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
        serve_cpu_requests(conn, send_lock, lambda: counted["changes"])
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
    spec = Propagation(
        "config propagation", ("bench.configbench", "consumer"), "cfgconsumer",
        start_kwargs=lambda i: dict(appkey=appkey,
                                    backup_dir=os.path.join(bench.scratch, "configs", str(i))),
        write=lambda value: admin.set_config(appkey, KEY, value),
        arrived=lambda message, value: message[0] == "change" and message[2] == value,
        what="value", call_key="call_ms", cpu_key="consumer_cpu_ms_per_change")
    per_n, value = {}, 0
    with timed_znode_writes(admin.zk.client) as written:
        for n in cfg["ns"]:
            per_n[n], value = measure_propagation(bench, spec, n, cfg["changes"], value, written)
    bench.report.raw["config_propagation"] = {str(n): v for n, v in per_n.items()}
    report_propagation(
        bench.report, section, per_n, "set_config()",
        "time until the LAST of N consumers ran on_change; set_config() commits its MySQL "
        "history row after the znode write, so values near 0 or negative are normal",
        "consumer CPU per change", TARGET_P99_MS, spec.call_key, spec.cpu_key)
