"""Section "idle": what idle connections cost a probe provider.

Opens N idle TCP connections (5,000 in a full run) to a probe provider in its own
process and reports the provider's thread count and RSS before and with them open,
and the latency of calls from a bare thriftpy2 client made while they are open.
"""

import resource
import socket
import time

from bench.common import latency_summary

FULL_IDLE = 5000
SMOKE_IDLE = 200


def _status(pid, field):
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _open_fds(pid):
    import os
    return len(os.listdir("/proc/%d/fd" % pid))


def _raise_fd_limit(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _calls(host, port, count):
    import thriftpy2
    from thriftpy2.rpc import make_client
    from bench.common import IDL, SERVICE
    service = getattr(thriftpy2.load(IDL, module_name="demo_thrift"), SERVICE)
    client = make_client(service, host, port, timeout=5000)
    samples = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            client.say()
            samples.append(time.perf_counter() - started)
    finally:
        client.close()
    return latency_summary(samples)


def run(bench):
    """Report rows of the idle-connection section on `bench.report`."""
    section = "8. provider with idle connections open"
    count = SMOKE_IDLE if bench.smoke else FULL_IDLE
    limit = _raise_fd_limit(count + 512)
    if limit < count + 64:
        bench.report.na(section, "idle connections", "open-file limit %d is below %d" % (limit, count))
        return
    info = bench.ensure_provider()
    pid, host, port = info["pid"], "127.0.0.1", info["port"]
    before = _calls(host, port, 200)
    threads0, rss0, fds0 = _status(pid, "Threads"), _status(pid, "VmRSS"), _open_fds(pid)
    bench.log("idle: opening %d idle connections to the provider" % count)
    idle = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.connect((host, port))
            idle.append(sock)
        deadline = time.monotonic() + 60
        while _open_fds(pid) < fds0 + count and time.monotonic() < deadline:
            time.sleep(0.05)
        accepted = _open_fds(pid) - fds0
        time.sleep(0.5)
        threads1, rss1 = _status(pid, "Threads"), _status(pid, "VmRSS")
        during = _calls(host, port, 200)
    finally:
        for sock in idle:
            sock.close()
    add = bench.report.add
    anchor = "no idle connections"
    add(section, "idle connections accepted", accepted, "conns",
        note="of %d opened" % count)
    add(section, "provider threads", threads1, "threads", anchor, threads0,
        note="%d before the idle connections" % threads0)
    add(section, "provider RSS", rss1 / 1024.0, "MB", anchor, rss0 / 1024.0,
        note="%.2f KiB per idle connection" % ((rss1 - rss0) / max(1, accepted)))
    add(section, "say() p50 while they are open", during["p50_us"], "us", anchor, before["p50_us"])
    add(section, "say() p99 while they are open", during["p99_us"], "us", anchor, before["p99_us"])
    bench.report.raw["idle"] = {"count": count, "accepted": accepted, "threads": [threads0, threads1],
                                "rss_kib": [rss0, rss1], "before": before, "during": during}
