"""Tools for the fault suite (and the reliability tests): provider processes, a
counting load generator, fresh ZooKeeper inspection sessions."""

import os
import signal
import subprocess
import sys
import threading
import time

from kazoo.client import KazooClient

from conftest import ADVERTISED_HOST, ROOT, wait_for

RESULTS = []  # (scenario, attempted, failed), printed at the end of the run


def fresh_zk(hosts=None):
    """A brand-new inspection session (an old one would be stuck after a wipe)."""
    from probe.settings import load_settings
    client = KazooClient(hosts=hosts or load_settings().zookeeper.hosts, timeout=10)
    client.start(20)
    return client


class ProviderProcess(object):
    def __init__(self, appkey, name, port, log_dir):
        self.appkey, self.name, self.port = appkey, name, port
        self.log_path = os.path.join(log_dir, "%s-%s-%d.log" % (appkey, name, port))
        self.process = None

    def start(self, zk=None):
        log = open(self.log_path, "a")
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tests", "provider_main.py"), self.appkey, self.name,
             str(self.port)], stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
        log.close()
        if zk is not None:
            self.wait_registered(zk)
        return self

    def path(self, ip=ADVERTISED_HOST):
        return "/services/dev/%s/DemoService_%s_%d" % (self.appkey, ip, self.port)

    def wait_registered(self, zk, timeout=20):
        path = self.path()

        def registered():
            if self.process.poll() is not None:
                raise AssertionError("provider %s exited: %s" % (self.name, self.log()))
            return zk.exists(path)
        wait_for(registered, timeout, message="%s registered" % path)

    def terminate(self):
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)

    def kill(self):
        self.process.kill()
        self.process.wait(10)

    def log(self):
        with open(self.log_path) as handle:
            return handle.read()[-3000:]

    def cleanup(self):
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


class Load(object):
    """`threads` threads calling `call(client)` in a loop, counting every attempt
    and every failure, until stopped."""

    def __init__(self, client, threads=4, call=None):
        self.client = client
        self.call = call or (lambda c: c.whoami())
        self.attempted = 0
        self.failed = 0
        self.errors = []
        self.seen = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self):
        while not self._stop.is_set():
            try:
                answer = self.call(self.client)
                ok = True
            except Exception as exc:
                answer, ok = exc, False
            with self._lock:
                self.attempted += 1
                if ok:
                    self.seen[answer] = self.seen.get(answer, 0) + 1
                else:
                    self.failed += 1
                    if len(self.errors) < 20:
                        self.errors.append(repr(answer))
            time.sleep(0.001)

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def reset_seen(self):
        with self._lock:
            self.seen = {}

    def wait_calls(self, count, timeout=30):
        """Wait until `count` calls have been answered since the last reset_seen()."""
        def answered():
            with self._lock:
                return sum(self.seen.values()) >= count
        wait_for(answered, timeout, message="%d answered calls" % count)

    def wait_seen(self, names, timeout=30):
        wait_for(lambda: all(self.seen.get(n) for n in names), timeout, message="calls to %s" % names)

    def report(self, scenario):
        RESULTS.append((scenario, self.attempted, self.failed))
        assert self.attempted > 0
        assert self.failed == 0, "%s: %d of %d calls failed: %s" % (scenario, self.failed,
                                                                  self.attempted, self.errors)
