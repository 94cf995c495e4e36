"""Section "dialects": what framed transport and the compact protocol cost, on both
sides, each beside bare thriftpy2 speaking the same dialect.

- Client: one probe provider (it accepts every dialect on its port) advertising
  each non-default dialect under its own appkey; in one client process, per
  dialect, a probe client and a bare thriftpy2 client (`make_client` with the same
  transport and protocol factories) alternate say() rounds against it: calls/s
  and client CPU per call (process CPU over the round).
- Provider: per dialect, the probe provider and a bare thriftpy2 `make_server`
  with the same factories, each in its own process; one bare client process per
  dialect alternates rounds between them: the servers' calls/s.
"""

import os
import socket
import threading
import time

from bench.common import IDL, SERVICE, median

# The targets of bench/run.py's TARGETS, same names (that module is the driver's
# __main__; importing it from here would load it twice).
TARGETS = {"client_single": 1.0, "client_cpu_extra_us": 1.0, "server": 1.0}
from bench.workers import _bare_service, _free_port, _handler, _timed_single, _wait_for_stop

SECTION = "11. Dialects (framed / compact)"
DIALECTS = (("buffered", "binary"), ("framed", "binary"), ("buffered", "compact"),
            ("framed", "compact"))


def _factories(transport, protocol):
    from thriftpy2.protocol import TBinaryProtocolFactory, TCompactProtocolFactory
    from thriftpy2.transport import TBufferedTransportFactory, TFramedTransportFactory
    return ({"buffered": TBufferedTransportFactory, "framed": TFramedTransportFactory}[transport](),
            {"binary": TBinaryProtocolFactory, "compact": TCompactProtocolFactory}[protocol]())


def run(bench):
    """Report the rows of the dialects section on `bench.report`."""
    cfg = bench.cfg
    appkeys = {}
    started = []
    # Smoke mode runs framed + compact only (both code paths, a quarter of the processes).
    dialects = DIALECTS[-1:] if bench.smoke else DIALECTS
    try:
        for transport, protocol in dialects:
            key = "bench_%s_%s_%s" % (bench.run_id, transport[:2], protocol[:2])
            bench.admin.add_appkey(key, "benchmark")
            worker = bench.workers.start("provider-%s-%s" % (transport, protocol),
                                         "bench.dialectbench", "provider", kind="probe",
                                         appkey=key, transport=transport, protocol=protocol)
            started.append(worker)
            probe_info = worker.recv(60)
            bare = bench.workers.start("bare-%s-%s" % (transport, protocol), "bench.dialectbench",
                                       "provider", kind="bare", transport=transport,
                                       protocol=protocol)
            started.append(bare)
            bare_info = bare.recv(60)
            appkeys["%s+%s" % (transport, protocol)] = (key, probe_info, bare_info)
        client = bench.workers.start("client-dialects", "bench.dialectbench", "client",
                                     targets=appkeys, rounds=cfg["rounds"], seconds=cfg["seconds"],
                                     warmup=cfg["warmup"])
        started.append(client)
        out = client.recv(1200)
    finally:
        bench.workers.stop_many(started)
    bench.report.raw["dialects"] = out
    add = bench.report.add
    for name, result in out.items():
        probe, bare = result["client"]["probe"], result["client"]["bare"]
        pairs = [p["cps"] / b["cps"] for p, b in zip(probe, bare) if b["cps"] > 0]
        note = "round-by-round ratios %s" % " ".join("%.2f" % x for x in pairs)
        add(SECTION, "%s: probe client say() calls/s" % name, median([r["cps"] for r in probe]),
            "calls/s", "bare thriftpy2, same dialect", median([r["cps"] for r in bare]),
            ratio_value=median(pairs) if pairs else None, note=note,
            target=("ratio>=", TARGETS["client_single"]))
        probe_cpu = median([r["client_cpu_us_per_call"] for r in probe])
        bare_cpu = median([r["client_cpu_us_per_call"] for r in bare])
        add(SECTION, "%s: probe client CPU per call" % name, probe_cpu, "us",
            "bare thriftpy2, same dialect", bare_cpu)
        add(SECTION, "%s: client CPU per call over bare" % name, probe_cpu - bare_cpu, "us",
            target=("value<", TARGETS["client_cpu_extra_us"]),
            note="process CPU per call, probe minus bare, medians of paired rounds")
        served_probe, served_bare = result["server"]["probe"], result["server"]["bare"]
        pairs = [p["cps"] / b["cps"] for p, b in zip(served_probe, served_bare) if b["cps"] > 0]
        add(SECTION, "%s: probe provider say() calls/s" % name,
            median([r["cps"] for r in served_probe]), "calls/s",
            "bare make_server, same factories", median([r["cps"] for r in served_bare]),
            ratio_value=median(pairs) if pairs else None, target=("ratio>=", TARGETS["server"]),
            note="one bare client; round-by-round ratios %s" % " ".join("%.2f" % x for x in pairs))


# -- worker processes -----------------------------------------------------------------

def provider(conn, kind, transport, protocol, appkey=None):
    """kind 'probe': start_service advertising the dialect; 'bare': make_server with
    that dialect's factories."""
    handler = _handler()
    if kind == "probe":
        from probe.server import start_service
        served = start_service(IDL, appkey, SERVICE, handler, port=0, block=False,
                               shutdown_grace=0, transport=transport, protocol=protocol)
        conn.send({"host": served.host, "port": served.port, "pid": os.getpid()})
        try:
            _wait_for_stop(conn)
        finally:
            served.stop(grace=0)
        return
    from thriftpy2.rpc import make_server
    trans_factory, proto_factory = _factories(transport, protocol)
    port = _free_port()
    # client_timeout=None: thriftpy2 drops a connection idle for 3 s by default, and
    # the anchor's client waits out the other rounds between its own.
    server = make_server(_bare_service(), handler, "127.0.0.1", port, proto_factory=proto_factory,
                         trans_factory=trans_factory, client_timeout=None)
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


def client(conn, targets, rounds, seconds, warmup):
    from thriftpy2.rpc import make_client
    from probe.client import build_client
    out = {}
    for name, (appkey, probe_info, bare_info) in targets.items():
        transport, protocol = name.split("+")
        trans_factory, proto_factory = _factories(transport, protocol)
        governed = build_client(IDL, appkey, SERVICE, 5000, snapshot_dir=False)
        deadline = time.monotonic() + 30
        while not len(governed.watcher.table):
            if time.monotonic() > deadline:
                raise RuntimeError("the %s provider did not appear in the registry" % name)
            time.sleep(0.02)
        node = governed.watcher.table.nodes[0]
        if (node.transport, node.protocol) != (transport, protocol):
            raise RuntimeError("node %s advertises %s+%s, not %s" % (
                node.name, node.transport, node.protocol, name))
        bare = make_client(_bare_service(), probe_info["host"], probe_info["port"], timeout=5000,
                           trans_factory=trans_factory, proto_factory=proto_factory)
        to_bare_server = make_client(_bare_service(), bare_info["host"], bare_info["port"],
                                     timeout=5000, trans_factory=trans_factory,
                                     proto_factory=proto_factory)
        try:
            client_rounds = {"probe": [], "bare": []}
            server_rounds = {"probe": [], "bare": []}
            calls = {("client", "probe"): governed.say, ("client", "bare"): bare.say,
                     ("server", "probe"): bare.say, ("server", "bare"): to_bare_server.say}
            for index in range(rounds):
                order = ("probe", "bare") if index % 2 == 0 else ("bare", "probe")
                for side, into in (("client", client_rounds), ("server", server_rounds)):
                    for kind in order:
                        result = _timed_single(calls[(side, kind)], seconds, warmup)
                        result.pop("samples", None)
                        into[kind].append(result)
            out[name] = {"client": client_rounds, "server": server_rounds}
        finally:
            governed.close()
            bare.close()
            to_bare_server.close()
    conn.send(out)
    _wait_for_stop(conn)
