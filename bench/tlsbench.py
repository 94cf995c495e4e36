"""Section "tls": what RPC mutual TLS (`rpc_tls.<env>`) costs a probe call.

Two probe providers in their own processes, one plain and one with `rpc_tls.dev`
(certificates made by probe.dev.certs in the run's scratch folder), and one client
process with a probe client for each. Single thread, paired alternating rounds:
say() over a pooled connection (the steady state), and say() on a new connection
every call (max_idle=0: TCP connect plus, for TLS, a full mutual handshake).
"""

import os
import time

import yaml

from bench.common import IDL, SERVICE, median
from bench.workers import _handler, _timed_single, _wait_for_stop

SECTION = "9. RPC mutual TLS"
ENV = "dev"


def run(bench):
    """Report the rows of the TLS section on `bench.report`."""
    from probe.dev.certs import make_stack_certs
    certs = make_stack_certs(os.path.join(bench.scratch, "rpc-certs"))
    with open(os.environ["PROBE_CONFIG"]) as handle:
        config = yaml.safe_load(handle)
    config.pop("rpc_tls", None)
    plain_config = os.path.join(bench.scratch, "config-plain.yml")
    with open(plain_config, "w") as out:
        yaml.safe_dump(config, out)
    config["rpc_tls"] = {ENV: {"ca": certs.rpc_ca, "cert": certs.rpc_provider.cert,
                               "key": certs.rpc_provider.key}}
    tls_config = os.path.join(bench.scratch, "config-tls.yml")
    with open(tls_config, "w") as out:
        yaml.safe_dump(config, out)

    appkeys = {"plain": "bench_%s_plain" % bench.run_id, "tls": "bench_%s_tls" % bench.run_id}
    configs = {"plain": plain_config, "tls": tls_config}
    started = []
    try:
        for kind in ("plain", "tls"):
            bench.admin.add_appkey(appkeys[kind], "benchmark")
            worker = bench.workers.start("provider-" + kind, "bench.tlsbench", "provider",
                                         appkey=appkeys[kind], config_path=configs[kind])
            started.append(worker)
            worker.recv(60)
        cfg = bench.cfg
        client = bench.workers.start(
            "client-tls", "bench.tlsbench", "client", appkeys=appkeys, configs=configs,
            rounds=cfg["rounds"],
            seconds=cfg["seconds"], warmup=cfg["warmup"],
            reconnect_calls=30 if bench.smoke else 600)
        started.append(client)
        out = client.recv(600)
    finally:
        bench.workers.stop_many(started)
    bench.report.raw["tls"] = out
    add = bench.report.add
    plain, tls = out["pooled"]["plain"], out["pooled"]["tls"]
    pairs = [t["cps"] / p["cps"] for p, t in zip(plain, tls) if p["cps"] > 0]
    note = "round-by-round ratios %s" % " ".join("%.2f" % x for x in pairs)
    add(SECTION, "say() calls/s over mutual TLS, pooled", median([r["cps"] for r in tls]),
        "calls/s", "same, plaintext", median([r["cps"] for r in plain]),
        ratio_value=median(pairs) if pairs else None, note=note)
    add(SECTION, "client CPU per call over TLS", median([r["client_cpu_us_per_call"] for r in tls]),
        "us", "same, plaintext", median([r["client_cpu_us_per_call"] for r in plain]))
    add(SECTION, "say() p50 over TLS", median([r["p50_us"] for r in tls]), "us",
        "same, plaintext", median([r["p50_us"] for r in plain]))
    fresh = out["reconnect"]
    add(SECTION, "new connection + say() per second, TLS", fresh["tls"]["cps"], "calls/s",
        "same, plaintext", fresh["plain"]["cps"],
        note="max_idle=0: every call connects; with TLS a full mutual handshake (EC P-256)")


# -- worker processes -----------------------------------------------------------------

def provider(conn, appkey, config_path):
    from probe.server import start_service
    served = start_service(IDL, appkey, SERVICE, _handler(), port=0, block=False,
                           config_path=config_path, env=ENV, shutdown_grace=0)
    conn.send({"host": served.host, "port": served.port, "pid": os.getpid(),
               "tls": served.server.ssl_context is not None})
    try:
        _wait_for_stop(conn)
    finally:
        served.stop(grace=0)


def client(conn, appkeys, configs, rounds, seconds, warmup, reconnect_calls):
    from probe.client import build_client
    clients, fresh = {}, {}
    try:
        for kind in ("plain", "tls"):
            for into, max_idle in ((clients, 64), (fresh, 0)):
                into[kind] = build_client(IDL, appkeys[kind], SERVICE, 5000,
                                          config_path=configs[kind], env=ENV, snapshot_dir=False,
                                          metrics=False, max_idle=max_idle)
        deadline = time.monotonic() + 30
        for kind in ("plain", "tls"):
            while not len(clients[kind].watcher.table) or not len(fresh[kind].watcher.table):
                if time.monotonic() > deadline:
                    raise RuntimeError("the %s provider did not appear in the registry" % kind)
                time.sleep(0.02)
            clients[kind].say()
        pooled = {"plain": [], "tls": []}
        for index in range(rounds):
            order = ("plain", "tls") if index % 2 == 0 else ("tls", "plain")
            for kind in order:
                result = _timed_single(clients[kind].say, seconds, warmup)
                result.pop("samples", None)
                pooled[kind].append(result)
        reconnect = {}
        for kind in ("plain", "tls"):
            call = fresh[kind].say
            call()
            started = time.perf_counter()
            for _ in range(reconnect_calls):
                call()
            elapsed = time.perf_counter() - started
            reconnect[kind] = {"calls": reconnect_calls, "seconds": elapsed,
                               "cps": reconnect_calls / elapsed}
        conn.send({"pooled": pooled, "reconnect": reconnect})
        _wait_for_stop(conn)
    finally:
        for client_ in list(clients.values()) + list(fresh.values()):
            client_.close()
