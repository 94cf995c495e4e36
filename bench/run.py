"""probe's benchmark: every figure next to its anchor from the same run.

    python bench/run.py            # full run (a few minutes), writes bench/results.json
    python bench/run.py --smoke    # tiny counts for CI: must not crash, never judges speed

It starts its own local stack (ZooKeeper, Redis, MariaDB on free ports in a temp
folder) and tears it down, with every worker process, however the run ends (a
watchdog process cleans up even after SIGKILL). Servers and clients run in
separate processes so no measurement shares a GIL with what it measures.

Sections:
  1. single-thread say(): bare thriftpy2 make_client (anchor), the seed article's
     client (the "before"), probe's build_client (with metrics off too, if supported)
  1d. client thread CPU per call and calls/s, unpinned: bare vs probe
  2. 8 threads: one shared probe client vs 8 bare clients
  3. server: probe provider vs bare make_server under 4 load processes; workers=1 vs 2
  4. balancer pick cost and table rebuild for 1..1000 nodes; consumer memory for 1000
  5. build_client to first successful call
  6. live governance: admin set_weight to N consumer processes routing by it
  7. config center: `probe config set` to on_change in N consumer processes (bench/configbench.py)
  8. provider threads and RSS with 5,000 idle connections open (bench/idle.py)
  9. RPC mutual TLS vs plaintext, single thread (bench/tlsbench.py)
 10. gray failures of one of two nodes: hang, slow node, error storm, every node
     failing, with 4 calling threads (bench/graybench.py)
 11. node dialects: framed / compact beside bare thriftpy2 (bench/dialectbench.py)
 12. asyncio: one loop with 1, 10, 100 calls in flight, probe.aio's client vs bare
     thriftpy2 make_aio_client, probe.aio's provider vs bare make_aio_server
     (bench/aiobench.py)
 13. fleet: C consumers x N nodes: CPU per edit and per restart, bytes per restart,
     build_client to first call, ZooKeeper watches per session (bench/fleetbench.py)

Ratios are value / anchor; for throughput higher is better, for latency, CPU and
time lower is better; the target column says which way. Throughput ratios are the
median of paired, alternating rounds.
"""

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
if sys.path[0] == HERE:  # `python bench/run.py` puts bench/ first; `bench.x` is what we import
    sys.path.pop(0)

from bench.common import (BenchError, IDL, SERVICE, Propagation, Watchdog, Workers,  # noqa: E402
                          cpu_seconds, latency_summary, machine_cpu_seconds, measure_propagation,
                          median, ratio, report_propagation, set_affinity, timed_znode_writes)

FULL = dict(rounds=9, seconds=1.5, warmup=0.2, seed_rounds=3, seed_seconds=2.0,
            same_core_rounds=5, same_core_seconds=1.0, callpath_batch=100, callpath_repeats=300,
            thread_rounds=7, thread_seconds=2.0, threads=8,
            server_rounds=7, server_seconds=2.0, load_procs=4, worker_rounds=5,
            sizes=(1, 10, 100, 1000), balancer_budget=0.04,
            mem_nodes=1000, mem_snapshot_off=True, first_repeats=5,
            prop_ns=(1, 10, 50), prop_changes=20,
            fleet_ns=(20, 200, 2000), fleet_consumers=8, fleet_edits=30, fleet_restarts=20,
            fleet_first_repeats=3, fleet_sessions=60, fleet_session_nodes=2000)
SMOKE = dict(rounds=1, seconds=0.3, warmup=0.05, seed_rounds=1, seed_seconds=0.3,
             same_core_rounds=1, same_core_seconds=0.3, callpath_batch=100, callpath_repeats=10,
             thread_rounds=1, thread_seconds=0.3, threads=8,
             server_rounds=1, server_seconds=0.3, load_procs=4, worker_rounds=1,
             sizes=(1, 10, 100, 1000), balancer_budget=0.002,
             mem_nodes=100, mem_snapshot_off=False, first_repeats=2,
             prop_ns=(1, 3), prop_changes=2,
             fleet_ns=(20, 100), fleet_consumers=2, fleet_edits=3, fleet_restarts=2,
             fleet_first_repeats=1, fleet_sessions=3, fleet_session_nodes=50)
SECTIONS = ("client", "client_cpu", "first_call", "propagation", "server", "balancer", "memory",
            "config", "idle", "tls", "gray", "dialects", "aio",
            "fleet")

TARGETS = {
    "client_single": 1.0,      # probe >= 1.0x bare, single thread
    "client_threads": 0.9,     # shared probe client >= 0.9x 8 bare clients
    "client_cpu_extra_us": 1.0,  # probe client thread CPU per call <= bare + 1 us, unpinned
    "server": 1.0,             # probe provider >= 1.0x bare make_server (and <= 1.0x CPU/call)
    "pick_flat": 1.5,          # pick(1000 nodes) <= 1.5x pick(10 nodes)
    "propagation_p99_ms": 20.0,  # issue 22: the last of 50 consumers within 20 ms
}


# -- rows of the report --------------------------------------------------------------

class Report(object):
    def __init__(self):
        self.rows = []
        self.raw = {}
        self.errors = []
        self.features = {}

    def add(self, section, name, value, unit, anchor=None, anchor_value=None, ratio_value=None,
            target=None, note=None):
        """target: None, ("ratio>=", x), ("ratio<=", x) or ("value<", x)."""
        if ratio_value is None and anchor_value is not None:
            ratio_value = ratio(value, anchor_value)
        met = None
        if target is not None:
            kind, limit = target
            if kind == "ratio>=" and ratio_value is not None:
                met = ratio_value >= limit
            elif kind == "ratio<=" and ratio_value is not None:
                met = ratio_value <= limit
            elif kind == "value<" and value is not None:
                met = value < limit
        self.rows.append({"section": section, "name": name, "value": value, "unit": unit,
                          "anchor": anchor, "anchor_value": anchor_value, "ratio": ratio_value,
                          "target": _target_text(target), "met": met, "note": note,
                          "target_limit": target[1] if target else None})

    def na(self, section, name, why):
        self.rows.append({"section": section, "name": name, "value": None, "unit": "n/a",
                          "anchor": None, "anchor_value": None, "ratio": None, "target": None,
                          "met": None, "note": why})


def _target_text(target):
    if target is None:
        return None
    kind, limit = target
    return {"ratio>=": ">= %.2fx", "ratio<=": "<= %.2fx", "value<": "< %g"}[kind] % limit


def _fmt(value, unit):
    if value is None:
        return "n/a"
    if unit == "calls/s":
        return "{:,.0f}/s".format(value)
    if unit == "us":
        return "%.1f us" % value
    if unit == "ms":
        return "%.2f ms" % value if value < 100 else "%.0f ms" % value
    if unit == "ns":
        return "%.0f ns" % value if value < 10000 else "%.1f us" % (value / 1000.0)
    if unit == "MB":
        return "%.1f MB" % value
    if unit == "KB":
        return "%.1f KB" % value
    if unit == "s":
        return "%.2f s" % value
    if unit == "%":
        return "%.2f%%" % value
    return "%s %s" % (value, unit)


def _fmt_ratio(row):
    value = row["ratio"]
    if value is None:
        return ""
    limit = row.get("target_limit")
    if limit is not None and row["target"] and "x" in row["target"] and abs(value - limit) < 0.005:
        return "%.3fx" % value  # so a miss by a hair does not print as the target itself
    return "%.2fx" % value


def print_table(report, out=sys.stdout):
    headers = ("measure", "value", "anchor", "anchor value", "ratio", "target", "met")
    lines = []
    section = None
    for row in report.rows:
        if row["section"] != section:
            section = row["section"]
            lines.append(("## " + section,) + ("",) * 6)
        met = {True: "yes", False: "NO", None: ""}[row["met"]]
        lines.append(("  " + row["name"], _fmt(row["value"], row["unit"]) if row["unit"] != "n/a"
                      else "n/a", row["anchor"] or "",
                      _fmt(row["anchor_value"], row["unit"]) if row["anchor_value"] is not None else "",
                      _fmt_ratio(row),
                      row["target"] or "", met))
    widths = [max(len(h), *(len(l[i]) for l in lines if not l[0].startswith("## ")))
              for i, h in enumerate(headers)]
    rule = "-+-".join("-" * w for w in widths)
    out.write(" | ".join(h.ljust(w) for h, w in zip(headers, widths)) + "\n" + rule + "\n")
    for line in lines:
        if line[0].startswith("## "):
            out.write(line[0] + "\n")
        else:
            out.write(" | ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() + "\n")
    notes = [(r["name"], r["note"]) for r in report.rows if r["note"]]
    if notes:
        out.write("\nnotes:\n")
        for name, note in notes:
            out.write("  - %s: %s\n" % (name.strip(), note))
    out.flush()


# -- the run -------------------------------------------------------------------------------

class Bench(object):
    def __init__(self, cfg, smoke, scratch, workers, report, pin=True):
        self.pin = pin
        self.cfg = cfg
        self.smoke = smoke
        self.scratch = scratch
        self.workers = workers
        self.report = report
        self.run_id = uuid.uuid4().hex[:6]
        self.appkey = "bench_%s" % self.run_id
        self.provider = None
        self.provider_info = None
        self._admin = None

    @property
    def admin(self):
        if self._admin is None:
            from probe.admin import Admin
            self._admin = Admin()
        return self._admin

    def close(self):
        if self._admin is not None:
            self._admin.close()
            self._admin = None

    def log(self, message):
        sys.stderr.write("[bench %s] %s\n" % (time.strftime("%H:%M:%S"), message))
        sys.stderr.flush()

    def start_provider(self, name, kind, appkey=None, workers=None, timeout=60):
        options = {"kind": kind, "appkey": appkey}
        if workers is not None:
            options["workers"] = workers
        worker = self.workers.start(name, "bench.workers", "provider", **options)
        info = worker.recv(timeout)
        return worker, info

    def ensure_provider(self):
        if self.provider is None:
            self.admin.add_appkey(self.appkey, "benchmark")
            self.provider, self.provider_info = self.start_provider("provider", "probe", self.appkey)
            self.log("probe provider on %s:%d (pid %d)" % (self.provider_info["host"],
                     self.provider_info["port"], self.provider_info["pid"]))
        return self.provider_info

    # -- 1 + 2: the client ---------------------------------------------------------------
    def placement(self):
        """(client CPUs, server CPUs) for the client measurements, or (None, None)."""
        if self.pin and (os.cpu_count() or 1) >= 2:
            return {0}, {1}
        return None, None

    def section_client(self):
        cfg, report = self.cfg, self.report
        info = self.ensure_provider()
        from probe.settings import load_settings
        settings = load_settings()
        client_cpus, server_cpus = self.placement()
        report.features["placement"] = ("client on CPU %s, server on CPU %s" % (
            sorted(client_cpus), sorted(server_cpus)) if client_cpus else "unpinned")

        def start_client(name):
            worker = self.workers.start(name, "bench.workers", "client", appkey=self.appkey,
                                        host=info["host"], port=info["port"],
                                        config_path=settings.path, env=settings.env)
            if client_cpus:
                set_affinity(worker.pid, client_cpus)
            return worker

        if server_cpus:
            set_affinity(self.provider.pid, server_cpus)
        client = start_client("client")
        try:
            kinds = ["bare", "probe", "probe_nometrics"]
            self.log("single-thread say(): %d alternating rounds of %s, %.1f s each"
                     % (cfg["rounds"], "/".join(kinds), cfg["seconds"]))
            rounds = self._single_rounds(client, kinds, cfg["rounds"], cfg["seconds"])
            self.log("seed-style client: %d rounds of %.1f s, each in a throwaway process"
                     % (cfg["seed_rounds"], cfg["seed_seconds"]))
            for kind in ("seed", "seed_closing"):
                rounds[kind] = []
                for _ in range(cfg["seed_rounds"]):
                    # It leaks a ZooKeeper session per call, as the article's did.
                    seed = start_client("seed-client")
                    try:
                        rounds[kind].append(seed.ask({"op": "single", "kind": kind,
                                                      "seconds": cfg["seed_seconds"], "warmup": 0.0},
                                                     timeout=120))
                    finally:
                        self.workers.stop(seed)
            self.report.raw["single_thread"] = rounds
            self._report_single(rounds, kinds)

            self.log("%d threads: %d alternating rounds of %.1f s" % (cfg["threads"], cfg["thread_rounds"],
                                                                       cfg["thread_seconds"]))
            threads = {"bare": [], "probe": []}
            for _ in range(cfg["thread_rounds"]):
                for kind in ("bare", "probe"):
                    threads[kind].append(client.ask({"op": "threads", "kind": kind,
                                                     "threads": cfg["threads"],
                                                     "seconds": cfg["thread_seconds"],
                                                     "warmup": cfg["warmup"]}))
            self.report.raw["threads"] = threads
            self._report_threads(threads)

            if client_cpus:
                # Client and server on one core: no cross-core wake-ups, so calls/s is
                # bounded by client CPU + server CPU per call. Shows CPU overhead plainly.
                set_affinity(self.provider.pid, client_cpus)
                self.log("same core: %d alternating rounds of %.1f s"
                         % (cfg["same_core_rounds"], cfg["same_core_seconds"]))
                same = self._single_rounds(client, kinds, cfg["same_core_rounds"],
                                           cfg["same_core_seconds"])
                self.report.raw["single_thread_same_core"] = same
                self._report_single(same, kinds, same_core=True)
        finally:
            self.workers.stop(client)
            set_affinity(self.provider.pid, None)
        self._callpath(info, client_cpus)

    def _callpath(self, info, client_cpus):
        s = "1c. client call path CPU per call, no network wait (socketpair, canned replies)"
        self.log("call path: %d batches of %d calls per client"
                 % (self.cfg["callpath_repeats"], self.cfg["callpath_batch"]))
        worker = self.workers.start("callpath", "bench.workers", "callpath", appkey=self.appkey,
                                    host=info["host"], port=info["port"],
                                    batch=self.cfg["callpath_batch"],
                                    repeats=self.cfg["callpath_repeats"])
        if client_cpus:
            set_affinity(worker.pid, client_cpus)
        try:
            out = worker.recv(300)
        except BenchError as exc:
            # It swaps a connection inside probe's pool: internals may move.
            self.report.na(s, "call path", "could not measure: %s" % str(exc).strip().splitlines()[-1])
            return
        finally:
            self.workers.stop(worker)
        self.report.raw["callpath_ns"] = out
        add = self.report.add
        anchor = "bare TClient"
        add(s, "bare thriftpy2 TClient", out["bare"], "ns", anchor, out["bare"])
        stale = out.get("is_stale", 0.0)
        labels = {"probe": "probe build_client", "probe_nometrics": "probe metrics=False"}
        for kind in ("probe", "probe_nometrics"):
            if kind in out:
                add(s, labels[kind], out[kind] + stale, "ns", anchor, out["bare"],
                    note="includes the pool's staleness poll (%.0f ns, timed apart)" % stale
                    if kind == "probe" else None)
        add(s, "  of which: pool staleness poll(0)", stale, "ns", anchor, out["bare"])
        if "probe_nometrics" in out:
            add(s, "  of which: metrics (on - off)", out["probe"] - out["probe_nometrics"], "ns",
                anchor, out["bare"])

    def _single_rounds(self, client, kinds, count, seconds):
        rounds = {kind: [] for kind in kinds}
        for _ in range(count):
            for kind in kinds:
                rounds[kind].append(client.ask({"op": "single", "kind": kind, "seconds": seconds,
                                                "warmup": self.cfg["warmup"]}))
        return rounds

    def _report_single(self, rounds, kinds, same_core=False):
        s = "1. single-thread say(), one provider"
        if same_core:
            s = "1b. single-thread say(), client and server on ONE core (CPU-bound)"
        elif self.placement()[0]:
            s += ", client and server on separate cores"
        add = self.report.add
        bare = rounds["bare"]
        bare_cps = median([r["cps"] for r in bare])
        anchor = "bare make_client"
        add(s, "bare make_client calls/s", bare_cps, "calls/s", anchor, bare_cps)
        labels = {"probe": "probe build_client", "probe_nometrics": "probe metrics=False"}
        if same_core:
            for kind in kinds[1:]:
                add(s, labels[kind] + " calls/s", median([r["cps"] for r in rounds[kind]]), "calls/s",
                    anchor, bare_cps, target=("ratio>=", TARGETS["client_single"]),
                    note=_paired_note(rounds[kind], bare))
            bare_cpu = median([r["client_cpu_us_per_call"] for r in bare])
            add(s, "bare client CPU per call", bare_cpu, "us", anchor, bare_cpu)
            for kind in kinds[1:]:
                add(s, "%s client CPU per call" % labels[kind],
                    median([r["client_cpu_us_per_call"] for r in rounds[kind]]), "us", anchor, bare_cpu)
            return
        seed = rounds["seed"]
        add(s, "seed client (before) calls/s", median([r["cps"] for r in seed]), "calls/s",
            anchor, bare_cps,
            note="re-created: per call YAML read, new ZooKeeper session (leaked, as in the "
                 "article), children+data reads, new TCP connection")
        add(s, "seed client, closing its sessions", median([r["cps"] for r in rounds["seed_closing"]]),
            "calls/s", anchor, bare_cps, note="the same plus zk.stop()/close() per call")
        for kind in kinds[1:]:
            add(s, labels[kind] + " calls/s", median([r["cps"] for r in rounds[kind]]), "calls/s",
                anchor, bare_cps, target=("ratio>=", TARGETS["client_single"]),
                note=_paired_note(rounds[kind], bare))
        for stat, title in (("p50_us", "p50"), ("p99_us", "p99")):
            bare_value = median([r[stat] for r in bare])
            add(s, "bare %s latency" % title, bare_value, "us", anchor, bare_value)
            add(s, "seed client %s latency" % title, median([r[stat] for r in seed]), "us",
                anchor, bare_value)
            for kind in kinds[1:]:
                add(s, "%s %s latency" % (labels[kind], title), median([r[stat] for r in rounds[kind]]),
                    "us", anchor, bare_value)
        bare_cpu = median([r["client_cpu_us_per_call"] for r in bare])
        add(s, "bare client CPU per call", bare_cpu, "us", anchor, bare_cpu)
        for kind in kinds[1:]:
            add(s, "%s client CPU per call" % labels[kind],
                median([r["client_cpu_us_per_call"] for r in rounds[kind]]), "us", anchor, bare_cpu)

    def _report_threads(self, threads):
        s = "2. %d threads, one provider" % self.cfg["threads"]
        add = self.report.add
        anchor = "%d bare clients" % self.cfg["threads"]
        bare = threads["bare"]
        bare_cps = median([r["cps"] for r in bare])
        add(s, "%d bare clients (1 each) calls/s" % self.cfg["threads"], bare_cps, "calls/s", anchor, bare_cps)
        add(s, "1 shared probe client calls/s", median([r["cps"] for r in threads["probe"]]), "calls/s",
            anchor, bare_cps, target=("ratio>=", TARGETS["client_threads"]),
            note=_paired_note(threads["probe"], bare))
        for stat, title in (("p50_us", "p50"), ("p99_us", "p99")):
            bare_value = median([r[stat] for r in bare])
            add(s, "bare %s latency" % title, bare_value, "us", anchor, bare_value)
            add(s, "shared probe %s latency" % title, median([r[stat] for r in threads["probe"]]), "us",
                anchor, bare_value)
        bare_cpu = median([r["client_cpu_us_per_call"] for r in bare])
        add(s, "bare client CPU per call", bare_cpu, "us", anchor, bare_cpu)
        add(s, "shared probe client CPU per call",
            median([r["client_cpu_us_per_call"] for r in threads["probe"]]), "us", anchor, bare_cpu)

    # -- 1d: client CPU per call, unpinned ----------------------------------------------
    def section_client_cpu(self):
        """Client thread CPU per say() and calls/s with nothing pinned (as users run),
        bare make_client vs probe, alternating rounds against one provider."""
        s = "1d. client thread CPU per say(), unpinned (time.thread_time, alternating rounds)"
        info = self.ensure_provider()
        set_affinity(self.provider.pid, None)
        # Many short alternating blocks: each kind sees the same share of the noise of
        # a shared machine, and the median of paired differences shrugs most of it off.
        rounds, calls = (2, 300) if self.smoke else (61, 3000)
        self.log("client CPU, unpinned: %d alternating rounds of %d calls" % (rounds, calls))
        worker = self.workers.start("client-cpu", "bench.workers", "client_cpu", appkey=self.appkey,
                                    host=info["host"], port=info["port"], rounds=rounds,
                                    calls=calls, warmup_calls=calls // 10)
        try:
            out = worker.recv(60 + rounds * calls * 0.002)
        finally:
            self.workers.stop(worker)
        self.report.raw["client_cpu_unpinned"] = out
        add = self.report.add
        anchor = "bare make_client"
        cpu = {kind: median([r["cpu_us_per_call"] for r in out[kind]]) for kind in out}
        cps = {kind: median([r["cps"] for r in out[kind]]) for kind in out}
        labels = {"probe": "probe build_client", "probe_nometrics": "probe metrics=False"}
        add(s, "bare client CPU per call", cpu["bare"], "us", anchor, cpu["bare"])
        for kind in ("probe", "probe_nometrics"):
            add(s, "%s client CPU per call" % labels[kind], cpu[kind], "us", anchor, cpu["bare"])
        extra = [p["cpu_us_per_call"] - b["cpu_us_per_call"] for p, b in zip(out["probe"], out["bare"])]
        add(s, "probe - bare client CPU per call (metrics on)", median(extra), "us",
            target=("value<", TARGETS["client_cpu_extra_us"]),
            note="median of round-by-round differences %s" % " ".join("%.2f" % x for x in extra))
        add(s, "bare make_client calls/s, unpinned", cps["bare"], "calls/s", anchor, cps["bare"])
        for kind in ("probe", "probe_nometrics"):
            add(s, "%s calls/s, unpinned" % labels[kind], cps[kind], "calls/s", anchor, cps["bare"],
                note=_paired_note([{"cps": r["cps"]} for r in out[kind]],
                                  [{"cps": r["cps"]} for r in out["bare"]]))

    # -- 3: the server ---------------------------------------------------------------------
    def section_server(self):
        cfg = self.cfg
        info = self.ensure_provider()
        bare_worker, bare_info = self.start_provider("bare-server", "bare")
        loads = [self.workers.start("load%d" % i, "bench.workers", "load")
                 for i in range(cfg["load_procs"])]
        try:
            targets = {"bare": bare_info, "probe": info}
            self.log("server: %d alternating rounds of %.1f s, %d load processes"
                     % (cfg["server_rounds"], cfg["server_seconds"], len(loads)))
            rounds = {"bare": [], "probe": []}
            for _ in range(cfg["server_rounds"]):
                for kind in ("bare", "probe"):
                    rounds[kind].append(self._load_round(loads, targets[kind], cfg["server_seconds"]))
            self.report.raw["server"] = {k: [_strip(r) for r in v] for k, v in rounds.items()}
            self._report_server(rounds)
        finally:
            self.workers.stop(bare_worker)
        try:
            self._workers_option(loads)
        finally:
            self.workers.stop_many(loads)

    def _load_round(self, loads, target, seconds):
        start_at = time.time() + 0.4  # time to connect and warm up
        for load in loads:
            load.send({"host": "127.0.0.1", "port": target["port"], "start_at": start_at,
                       "seconds": seconds})
        time.sleep(max(0.0, start_at - time.time()))
        cpu0 = cpu_seconds(target["pid"])
        time.sleep(max(0.0, start_at + seconds - time.time()))
        cpu1 = cpu_seconds(target["pid"])
        replies = [load.recv(seconds + 60) for load in loads]
        samples = [s for reply in replies for s in reply["samples"]]
        calls = sum(reply["calls"] for reply in replies)
        result = {"calls": calls, "cps": calls / seconds, "server_cpu_s": cpu1 - cpu0,
                  "server_cpu_us_per_call": (cpu1 - cpu0) / max(1, calls) * 1e6,
                  "per_process_calls": [reply["calls"] for reply in replies]}
        result.update(latency_summary(samples))
        return result

    def _report_server(self, rounds):
        s = "3. server, %d load processes (bare clients)" % self.cfg["load_procs"]
        add = self.report.add
        anchor = "bare make_server"
        bare = rounds["bare"]
        bare_cps = median([r["cps"] for r in bare])
        add(s, "bare make_server calls/s", bare_cps, "calls/s", anchor, bare_cps)
        add(s, "probe provider calls/s", median([r["cps"] for r in rounds["probe"]]), "calls/s",
            anchor, bare_cps, target=("ratio>=", TARGETS["server"]),
            note=_paired_note(rounds["probe"], bare))
        bare_cpu = median([r["server_cpu_us_per_call"] for r in bare])
        add(s, "bare server CPU per call", bare_cpu, "us", anchor, bare_cpu)
        add(s, "probe server CPU per call", median([r["server_cpu_us_per_call"] for r in rounds["probe"]]),
            "us", anchor, bare_cpu, target=("ratio<=", TARGETS["server"]))
        for stat, title in (("p50_us", "p50"), ("p99_us", "p99")):
            bare_value = median([r[stat] for r in bare])
            add(s, "bare server %s latency" % title, bare_value, "us", anchor, bare_value)
            add(s, "probe server %s latency" % title, median([r[stat] for r in rounds["probe"]]), "us",
                anchor, bare_value)

    def _workers_option(self, loads):
        s = "3b. provider workers=N (multi-process)"
        appkey = "bench_%s_wk" % self.run_id
        self.admin.add_appkey(appkey, "benchmark workers=N")
        started = {}
        try:
            for n in (1, 2):
                started[n] = self.start_provider("provider-w%d" % n, "probe", appkey, workers=n)
            self.log("workers=1 vs 2: %d alternating rounds" % self.cfg["worker_rounds"])
            rounds = {1: [], 2: []}
            for _ in range(self.cfg["worker_rounds"]):
                for n in (1, 2):
                    rounds[n].append(self._load_round(loads, started[n][1], self.cfg["server_seconds"]))
        finally:
            for worker, _ in started.values():
                self.workers.stop(worker)
        self.report.raw["workers"] = {str(k): [_strip(r) for r in v] for k, v in rounds.items()}
        add = self.report.add
        anchor = "workers=1"
        one = median([r["cps"] for r in rounds[1]])
        add(s, "workers=1 calls/s", one, "calls/s", anchor, one)
        add(s, "workers=2 calls/s", median([r["cps"] for r in rounds[2]]), "calls/s", anchor, one,
            note="2 cores shared with the 4 load processes: 2x is out of reach here; "
                 + _paired_note(rounds[2], rounds[1]))
        cpu_one = median([r["server_cpu_us_per_call"] for r in rounds[1]])
        add(s, "workers=1 server CPU per call", cpu_one, "us", anchor, cpu_one)
        add(s, "workers=2 server CPU per call", median([r["server_cpu_us_per_call"] for r in rounds[2]]),
            "us", anchor, cpu_one)
        for stat, title in (("p50_us", "p50"), ("p99_us", "p99")):
            base = median([r[stat] for r in rounds[1]])
            add(s, "workers=1 %s latency" % title, base, "us", anchor, base)
            add(s, "workers=2 %s latency" % title, median([r[stat] for r in rounds[2]]), "us", anchor, base)

    # -- 4: balancer and memory -------------------------------------------------------------
    def section_balancer(self):
        s = "4. balancer (pure, in one process)"
        self.log("balancer: pick and rebuild for %s nodes" % (self.cfg["sizes"],))
        worker = self.workers.start("balancer", "bench.workers", "balancer",
                                    sizes=list(self.cfg["sizes"]), budget=self.cfg["balancer_budget"])
        try:
            out = worker.recv(600)
        finally:
            self.workers.stop(worker)
        self.report.raw["balancer"] = {str(k): v for k, v in out.items()}
        add = self.report.add
        first = min(out)
        bare_call_ns = None
        single = self.report.raw.get("single_thread", {}).get("bare")
        if single:
            bare_call_ns = median([r["mean_us"] for r in single]) * 1e3
        # Flat means no growth with the node count. Anchored at the second size (10),
        # not 1: with one node every balancer short-cuts and the ratio says nothing.
        anchor_n = sorted(out)[1] if len(out) > 1 else first
        for name in ("weighted_random", "round_robin", "least_inflight"):
            base = out[anchor_n][name + "_ns"]
            for n in sorted(out):
                value = out[n][name + "_ns"]
                note = None
                if n == max(out) and bare_call_ns:
                    note = "%s pick at %d nodes = %.1f%% of a bare call (%.0f us)" % (
                        name, n, 100.0 * value / bare_call_ns, bare_call_ns / 1e3)
                add(s, "%s pick, %d nodes" % (name, n), value, "ns", "same, %d nodes" % anchor_n, base,
                    target=("ratio<=", TARGETS["pick_flat"]) if n == max(out) and n > anchor_n else None,
                    note=note)
        base = out[first]["rebuild_us"]
        for n in sorted(out):
            add(s, "RoutingTable rebuild, %d nodes" % n, out[n]["rebuild_us"], "us",
                "same, %d node" % first, base)

    def section_idle(self):  # 8: idle connections (bench/idle.py)
        from bench.idle import run
        run(self)

    def section_memory(self):
        s = "4b. consumer watching many nodes"
        from kazoo.client import KazooClient
        from probe import naming
        from probe.naming import NodeSettings
        from probe.settings import load_settings
        settings = load_settings()
        many = self.cfg["mem_nodes"]
        appkeys = {1: "bench_%s_mem1" % self.run_id, many: "bench_%s_mem" % self.run_id}
        zk = KazooClient(hosts=settings.zookeeper.hosts)
        zk.start(10)
        try:
            self.log("memory: registering %d fake nodes" % many)
            for count, appkey in appkeys.items():
                zk.ensure_path(naming.appkey_path(settings.env, appkey))
                pending = []
                for i in range(count):
                    ip = "10.9.%d.%d" % (i // 250, i % 250 + 1)
                    path = naming.node_path(settings.env, appkey, SERVICE, ip, 9090)
                    pending.append(zk.create_async(path, NodeSettings(ip, 9090).to_bytes(), ephemeral=True))
                for result in pending:
                    result.get(timeout=30)
            runs = {}
            variants = [(1, None), (many, None)]
            if self.cfg["mem_snapshot_off"]:
                variants.append((many, False))
            for count, snapshot in variants:
                key = "%d%s" % (count, "" if snapshot is None else "_nosnapshot")
                snapshot_dir = None if snapshot is None else False
                self.log("memory: consumer watching %d nodes%s" % (
                    count, "" if snapshot is None else " (snapshot_dir=False)"))
                worker = self.workers.start("memory-%s" % key, "bench.workers", "memory",
                                            appkey=appkeys[count], expect=count,
                                            snapshot_dir=snapshot_dir)
                try:
                    runs[key] = worker.recv(320)
                finally:
                    self.workers.stop(worker)
        finally:
            zk.stop()
            zk.close()
        self.report.raw["memory"] = runs
        add = self.report.add
        mb = 1024.0 * 1024.0
        one, big = runs["1"], runs[str(many)]
        d1 = (one["rss_after"] - one["rss_before"]) / mb
        dn = (big["rss_after"] - big["rss_before"]) / mb
        anchor = "consumer of 1 node"
        add(s, "RSS growth of build_client, 1 node", d1, "MB", anchor, d1)
        add(s, "RSS growth of build_client, %d nodes" % many, dn, "MB", anchor, d1,
            note="%.1f KB per extra node; process RSS %.1f MB" % (
                (dn - d1) * 1024.0 / max(1, many - 1), big["rss_after"] / mb))
        add(s, "table build, 1 node", one["table_full_s"] * 1e3, "ms", anchor, one["table_full_s"] * 1e3)
        add(s, "table build, %d nodes" % many, big["table_full_s"] * 1e3, "ms", anchor,
            one["table_full_s"] * 1e3,
            note="build_client->len(table)==%d; %d table publishes" % (many, big["table_publishes"]))
        off = runs.get("%d_nosnapshot" % many)
        if off:
            add(s, "table build, %d nodes, snapshot_dir=False" % many, off["table_full_s"] * 1e3, "ms",
                "same with snapshots", big["table_full_s"] * 1e3)

    # -- 5: first call ------------------------------------------------------------------------
    def section_first_call(self):
        s = "5. build_client -> first successful call"
        info = self.ensure_provider()
        from probe.settings import load_settings
        settings = load_settings()
        results = {}
        for kind in ("bare", "probe", "seed"):
            self.log("first call: %s (%d tries)" % (kind, self.cfg["first_repeats"]))
            worker = self.workers.start("first-%s" % kind, "bench.workers", "first_call", kind=kind,
                                        appkey=self.appkey, host=info["host"], port=info["port"],
                                        config_path=settings.path, env=settings.env,
                                        repeats=self.cfg["first_repeats"])
            try:
                results[kind] = worker.recv(120)
            finally:
                self.workers.stop(worker)
        self.report.raw["first_call"] = results
        add = self.report.add
        anchor = "bare make_client+call"
        for stat, title in (("cold_ms", "cold process, incl. IDL parse"), ("warm_ms", "warm, median")):
            base = results["bare"][stat]
            add(s, "bare, %s" % title, base, "ms", anchor, base)
            add(s, "probe build_client, %s" % title, results["probe"][stat], "ms", anchor, base)
            add(s, "seed client, %s" % title, results["seed"][stat], "ms", anchor, base)

    # -- 6: propagation ----------------------------------------------------------------------
    def section_propagation(self):
        s = "6. admin set_weight -> N consumer processes routing by it"
        info = self.ensure_provider()
        address = "%s:%d" % (info["host"], info["port"])
        spec = Propagation(
            "propagation", ("bench.workers", "consumer"), "consumer",
            start_kwargs=lambda i: dict(appkey=self.appkey,
                                        snapshot_dir=os.path.join(self.scratch, "snap", str(i))),
            write=lambda weight: self.admin.set_weight(self.appkey, SERVICE, address, weight),
            arrived=lambda message, weight: message[0] == "table" and weight in message[2],
            what="weight", call_key="admin_call_ms", cpu_key="consumer_cpu_ms_per_update")
        # When the znode write itself returned (set_weight also writes Redis before it
        # and a MySQL audit row after it).
        weight = 100
        per_n = {}
        with timed_znode_writes(self.admin.zk.client) as written:
            for n in self.cfg["prop_ns"]:
                per_n[n], weight = measure_propagation(self, spec, n, self.cfg["prop_changes"],
                                                       weight, written)
        self.report.raw["propagation"] = {str(k): v for k, v in per_n.items()}
        report_propagation(
            self.report, s, per_n, "set_weight()",
            "time until the LAST of N consumers routes by the new table; negative = all "
            "had it before set_weight() returned (it writes a MySQL audit row after the znode)",
            "consumer CPU per table update", TARGETS["propagation_p99_ms"],
            spec.call_key, spec.cpu_key)

    def section_config(self):  # 7: config propagation (bench/configbench.py)
        from bench import configbench
        configbench.run(self)

    def section_gray(self):  # 10: gray failures (bench/graybench.py)
        from bench.graybench import run
        run(self)

    def section_tls(self):  # 9: RPC mutual TLS (bench/tlsbench.py)
        from bench import tlsbench
        tlsbench.run(self)

    def section_dialects(self):  # 11: framed / compact (bench/dialectbench.py)
        from bench import dialectbench
        dialectbench.run(self)

    def section_aio(self):  # 12: asyncio client and provider (bench/aiobench.py)
        from bench import aiobench
        aiobench.run(self)

    def section_fleet(self):  # 13: fleet scale (bench/fleetbench.py)
        from bench import fleetbench
        fleetbench.run(self)


def _paired_note(rounds, anchor_rounds):
    # A round can finish no call on a loaded machine: leave it out, do not divide by it.
    pairs = [p["cps"] / a["cps"] for p, a in zip(rounds, anchor_rounds) if a["cps"] > 0]
    if not pairs:
        return "no round of the anchor completed a call"
    return "round-by-round ratios %s (median %.2fx)" % (
        " ".join("%.2f" % x for x in pairs), median(pairs))


def _machine_cpu():
    """(busy CPU-seconds of the machine, steal, own CPU-seconds incl. reaped children)."""
    try:
        import resource
        busy, steal = machine_cpu_seconds()
        own = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            own += usage.ru_utime + usage.ru_stime
        return busy, steal, own
    except (OSError, ValueError):
        return None


def _machine_report(before, after, seconds):
    """How much of the machine other processes used while we measured."""
    if not before or not after or seconds <= 0:
        return None
    capacity = seconds * (os.cpu_count() or 1) / 100.0
    busy = after[0] - before[0]
    own = after[2] - before[2]
    return {"seconds": round(seconds, 1), "own_percent": round(own / capacity, 1),
            "other_percent": round(max(0.0, busy - own) / capacity, 1),
            "steal_percent": round((after[1] - before[1]) / capacity, 1),
            "loadavg_end": list(os.getloadavg())}


def _strip(result):
    return {k: v for k, v in result.items() if k != "samples"}


def _summary(report):
    judged = [r for r in report.rows if r["met"] is not None]
    missed = ["%s: %s" % (r["section"], r["name"]) for r in judged if not r["met"]]
    return {"judged": len(judged), "met": len(judged) - len(missed), "missed": missed,
            "all_met": not missed}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny counts; only crashes fail")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help="comma-separated sections: %s" % ",".join(SECTIONS))
    parser.add_argument("--out", default=os.path.join(HERE, "results.json"))
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin client and server of sections 1-2 to separate cores")
    args = parser.parse_args(argv)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error("unknown section(s): %s" % ", ".join(sorted(unknown)))
    cfg = SMOKE if args.smoke else FULL

    # SIGTERM (e.g. from CI) unwinds like Ctrl-C, through the cleanup below.
    signal.signal(signal.SIGTERM, lambda signum, frame: (_ for _ in ()).throw(KeyboardInterrupt()))

    report = Report()
    scratch = tempfile.mkdtemp(prefix="probe-bench-")
    state_dir = os.path.join(scratch, "stack")
    watchdog = Watchdog(state_dir, scratch)
    workers = Workers(watchdog)
    bench = Bench(cfg, args.smoke, scratch, workers, report, pin=not args.no_pin)
    started = time.time()
    machine_before = _machine_cpu()
    rc = 0
    stack = None
    try:
        from probe import settings as probe_settings
        from probe.dev.stack import Stack
        bench.log("starting the local stack in %s" % state_dir)
        stack = Stack(state_dir=state_dir, ports="free")
        stack.up()
        os.environ["PROBE_CONFIG"] = stack.config_path
        os.environ["PROBE_ENV"] = "dev"
        os.environ["PROBE_SNAPSHOT_DIR"] = os.path.join(scratch, "snapshots")
        os.environ["PROBE_ADVERTISE_HOST"] = "127.0.0.1"
        probe_settings.clear_cache()
        for name in SECTIONS:
            if name not in only:
                continue
            try:
                getattr(bench, "section_" + name)()
            except KeyboardInterrupt:
                raise
            except Exception:
                text = traceback.format_exc()
                report.errors.append({"section": name, "error": text})
                bench.log("section %s FAILED:\n%s" % (name, text))
                rc = 1
    except KeyboardInterrupt:
        report.errors.append({"section": None, "error": "interrupted"})
        bench.log("interrupted: cleaning up")
        rc = 130
    except Exception:
        text = traceback.format_exc()
        report.errors.append({"section": None, "error": text})
        bench.log("FAILED:\n%s" % text)
        rc = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            bench.close()
            workers.stop_all()
            if stack is not None:
                stack.down(wipe=True)
        except Exception:
            bench.log("cleanup: %s" % traceback.format_exc())
        watchdog.finish()
        shutil.rmtree(scratch, ignore_errors=True)

    machine = _machine_report(machine_before, _machine_cpu(), time.time() - started)
    results = {
        "meta": {"mode": "smoke" if args.smoke else "full", "sections": only, "machine": machine,
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                 "duration_s": round(time.time() - started, 1), "python": sys.version.split()[0],
                 "platform": platform.platform(), "cpus": os.cpu_count(), "config": cfg,
                 "idl": os.path.relpath(IDL, ROOT), "targets": TARGETS},
        "features": report.features,
        "summary": _summary(report),
        "rows": report.rows,
        "raw": report.raw,
        "errors": report.errors,
    }
    with open(args.out + ".tmp", "w") as handle:
        json.dump(results, handle, indent=1, default=str)
    os.replace(args.out + ".tmp", args.out)
    print()
    print("probe benchmark (%s mode, %.0f s, %d CPUs)" % (results["meta"]["mode"],
                                                          results["meta"]["duration_s"], os.cpu_count()))
    print_table(report)
    if machine:
        print("\nmachine during the run: this benchmark used %.0f%% of %d CPUs, other processes "
              "%.0f%% (steal %.0f%%)%s" % (machine["own_percent"], os.cpu_count(),
                                            machine["other_percent"], machine["steal_percent"],
                                            "  <- NOISY: figures are less reliable"
                                            if machine["other_percent"] > 10 else ""))
    summary = results["summary"]
    print("\ntargets met: %d of %d%s" % (summary["met"], summary["judged"],
                                        "" if args.smoke else
                                        "".join("\n  missed: %s" % m for m in summary["missed"])))
    if args.smoke:
        print("(smoke mode: counts too small to judge speed; only errors fail the run)")
    if report.errors:
        print("\nERRORS in: %s" % ", ".join(str(e["section"]) for e in report.errors))
    print("results: %s" % os.path.relpath(args.out, os.getcwd()))
    return rc


if __name__ == "__main__":
    sys.exit(main())
