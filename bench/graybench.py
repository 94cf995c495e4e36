"""Section "gray": gray failures of one of two nodes, four calling threads, one
default `build_client` (weighted random, node health and retry budget on) calling
the non-idempotent whoami(), as ratios from this run:

- calls/s during a hang of one node (SIGSTOP, 3.5 s, shorter than its ZooKeeper
  session) vs the calls/s just before; calls failed per calling thread per hang
- the share of calls a node 50 ms slower than its peer gets, measured 2 s after it
  slowed (over the next second)
- the error rate over the first 2.5 s of an error storm (every call of one node
  raises)
- extra attempts when every node fails (both killed, znodes still registered:
  connect refused, retried for any method) vs the retry budget, 20% + 10/s
- client CPU per healthy call beside bare thriftpy2: section 1d of the same run
"""

import os
import signal
import threading
import time

from bench.common import IDL, SERVICE

THREADS = 4
FULL = dict(before=1.5, hang=3.5, slow_after=2.0, slow_window=1.0, storm=2.5, all_fail=2.0)
SMOKE = dict(before=0.3, hang=0.8, slow_after=0.5, slow_window=0.3, storm=0.5, all_fail=0.3)
TARGETS = {"hang_cps": 0.5, "hang_failed_per_thread": 3.0, "slow_share": 0.2,
           "storm_error_rate": 0.05}


class _Load(object):
    """THREADS threads calling whoami() until stopped; per-thread counts (no lock on
    the call path) and every attempt's node through the client's observe hook."""

    def __init__(self, client):
        self.client = client
        self.ok = [0] * THREADS
        self.failed = [0] * THREADS
        self.attempts = []  # (perf_counter at the end, node name); list.append is atomic
        client.observe = self._observe
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(THREADS)]

    def _observe(self, method, node, status, seconds):
        self.attempts.append((time.perf_counter(), node))

    def _run(self, index):
        call = self.client.whoami
        ok, failed = self.ok, self.failed
        while not self._stop.is_set():
            try:
                call()
                ok[index] += 1
            except Exception:
                failed[index] += 1

    def counts(self):
        return sum(self.ok), sum(self.failed)

    def attempts_between(self, start, end):
        return [node for at, node in list(self.attempts) if start <= at < end]

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


def _client(appkey):
    from probe.client import build_client
    client = build_client(IDL, appkey, SERVICE, metrics=False)
    deadline = time.monotonic() + 20
    while len(client.watcher.table) < 2:
        if time.monotonic() > deadline:
            raise RuntimeError("the client never routed to both gray providers")
        time.sleep(0.02)
    return client


def _set(worker, **mode):
    worker.conn.send(mode)
    worker.recv(10)


def run(bench):
    """Report the gray-failure rows on `bench.report`."""
    section = "10. gray failures: one of two nodes sick, 4 threads, default build_client"
    cfg = SMOKE if bench.smoke else FULL
    add = bench.report.add
    appkey = "gray_%s" % bench.run_id
    bench.admin.add_appkey(appkey, "benchmark: gray failures")
    (a, a_info), (b, b_info) = _gray(bench, appkey, "a"), _gray(bench, appkey, "b")
    raw = bench.report.raw.setdefault("gray", {})
    try:
        # -- a hang -----------------------------------------------------------------
        bench.log("gray: SIGSTOP one node for %.1f s" % cfg["hang"])
        client = _client(appkey)
        try:
            with _Load(client) as load:
                time.sleep(0.3)
                ok0, _ = load.counts()
                time.sleep(cfg["before"])
                ok1, failed1 = load.counts()
                os.kill(a_info["pid"], signal.SIGSTOP)
                try:
                    time.sleep(cfg["hang"])
                    ok2, failed2 = load.counts()
                finally:
                    os.kill(a_info["pid"], signal.SIGCONT)
            before = (ok1 - ok0) / cfg["before"]
            during = (ok2 - ok1) / cfg["hang"]
            failed = failed2 - failed1
            ejections = client.health.ejections
        finally:
            client.close()
        raw["hang"] = {"cps_before": before, "cps_during": during, "failed": failed,
                       "ejections": ejections}
        add(section, "calls/s during a %.1f s hang of one node" % cfg["hang"], during, "calls/s",
            "calls/s before the hang", before, target=("ratio>=", TARGETS["hang_cps"]))
        add(section, "calls failed per calling thread per hang", failed / float(THREADS), "calls",
            target=("value<", TARGETS["hang_failed_per_thread"] + 1e-9),
            note="%d failed in all over %d threads; %d ejection(s)" % (failed, THREADS, ejections))

        # -- a slow node ---------------------------------------------------------------
        bench.log("gray: one node 50 ms slower")
        client = _client(appkey)
        try:
            with _Load(client) as load:
                time.sleep(0.5)
                _set(a, mode="slow", delay=0.05)
                slowed = time.perf_counter()
                time.sleep(cfg["slow_after"] + cfg["slow_window"])
                window = load.attempts_between(slowed + cfg["slow_after"],
                                               slowed + cfg["slow_after"] + cfg["slow_window"])
            _set(a, mode="ok")
            slow_node = _node_name(a_info)
            share = window.count(slow_node) / float(max(len(window), 1))
        finally:
            client.close()
        raw["slow"] = {"share": share, "calls": len(window)}
        add(section, "share of calls to a node 50 ms slower, %.1f s after it slowed"
            % cfg["slow_after"], 100.0 * share, "%", "an even split", 50.0,
            target=("value<", 100.0 * TARGETS["slow_share"] + 1e-9),
            note="%d attempts in the %.1f s window" % (len(window), cfg["slow_window"]))

        # -- an error storm ---------------------------------------------------------------
        bench.log("gray: every call of one node raises")
        client = _client(appkey)
        try:
            with _Load(client) as load:
                time.sleep(0.5)
                ok1, failed1 = load.counts()
                _set(a, mode="raise")
                time.sleep(cfg["storm"])
                ok2, failed2 = load.counts()
            _set(a, mode="ok")
        finally:
            client.close()
        calls = (ok2 - ok1) + (failed2 - failed1)
        rate = (failed2 - failed1) / float(max(calls, 1))
        raw["storm"] = {"calls": calls, "failed": failed2 - failed1}
        add(section, "error rate over the first %.1f s of an error storm on one node"
            % cfg["storm"], 100.0 * rate, "%", "the node's share of calls", 50.0,
            target=("value<", 100.0 * TARGETS["storm_error_rate"] + 1e-9),
            note="%d of %d calls failed" % (failed2 - failed1, calls))

        # -- every node fails -------------------------------------------------------------
        bench.log("gray: both nodes killed while still registered")
        client = _client(appkey)
        try:
            for worker, info in ((a, a_info), (b, b_info)):
                os.kill(info["pid"], signal.SIGKILL)
            started = time.perf_counter()
            with _Load(client) as load:
                time.sleep(cfg["all_fail"])
            elapsed = time.perf_counter() - started  # the threads have stopped: all counted
            ok, failed = load.counts()
            attempts = len(load.attempts)
            calls = ok + failed
            panic = client.health.panics
        finally:
            client.close()
        extra = attempts - calls
        allowed = 0.2 * calls + 10 * elapsed
        raw["all_fail"] = {"calls": calls, "attempts": attempts, "seconds": elapsed,
                           "panics": panic}
        add(section, "extra attempts, every node failing", 100.0 * extra / float(max(calls, 1)),
            "%", "the budget: 20% + 10/s", 100.0 * allowed / float(max(calls, 1)),
            target=("ratio<=", 1.0 + 10.0 / max(allowed, 1.0)),
            note="%d extra attempts for %d calls in %.1f s (budget %.0f + 10 banked); panic "
                 "mode entered %d time(s)" % (extra, calls, elapsed, allowed, panic))

        # -- the healthy call path's price --------------------------------------------------
        cpu = [row for row in bench.report.rows
               if row["name"] == "probe - bare client CPU per call (metrics on)"]
        if cpu:
            add(section, "client CPU per healthy call beside bare thriftpy2 (from 1d)",
                cpu[0]["value"], "us", target=("value<", 1.0))
        else:
            bench.report.na(section, "client CPU per healthy call beside bare thriftpy2",
                            "run section client_cpu in the same run (--only ...,client_cpu)")
    finally:
        bench.workers.stop_many([a, b])


def _gray(bench, appkey, name):
    worker = bench.workers.start("gray-" + name, "bench.workers", "gray_provider",
                                 appkey=appkey, label=name)
    return worker, worker.recv(60)


def _node_name(info):
    from probe import naming
    return naming.node_name(SERVICE, info["host"], info["port"])
