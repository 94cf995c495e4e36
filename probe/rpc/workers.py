"""Pre-forked worker processes that share one listening socket.

Python threads share one core; a provider with `workers=N` forks N processes after
binding, and the kernel spreads accepted connections over them. The parent keeps the
one ZooKeeper registration and orchestrates shutdown, so workers ignore SIGINT and
SIGTERM (a Ctrl-C or a systemd stop reaches the whole process group) and drain only
when the parent says so (SIGUSR1) or when the parent is gone.

Fork before any thread starts in the parent: kazoo's threads and sockets do not
survive a fork, so the parent connects to ZooKeeper only after forking.
"""

import logging
import os
import signal
import threading
import time
from typing import Callable, Dict, Optional

log = logging.getLogger("probe.workers")

DRAIN_SIGNAL = signal.SIGUSR1


class WorkerPool(object):
    """`count` children each running `body()`; a child that dies unexpectedly is
    replaced. `body` returns when the worker has drained; the child then exits."""

    def __init__(self, count: int, body: Callable[[int], object], name: str = "worker") -> None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError("workers must be a whole number >= 1, got %r" % (count,))
        self.count = count
        self.body = body
        self.name = name
        self.pids: Dict[int, int] = {}  # pid -> slot index
        self.respawned = 0
        self._stopping = False
        self._lock = threading.Lock()
        self._supervisor: Optional[threading.Thread] = None

    def start(self) -> None:
        for index in range(self.count):
            self._spawn(index)

    def supervise(self) -> None:
        """Start replacing dead workers (call once the parent may run threads)."""
        self._supervisor = threading.Thread(target=self._supervise, name="probe-workers",
                                            daemon=True)
        self._supervisor.start()

    def _spawn(self, index: int) -> int:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _ignore_group_signals()
                self.body(index)
            except BaseException:
                log.exception("%s %d failed", self.name, index)
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        with self._lock:
            self.pids[pid] = index
        log.info("started %s %d as pid %d", self.name, index, pid)
        return pid

    def _supervise(self) -> None:
        while not self._stopping:
            time.sleep(0.2)
            with self._lock:
                pids = list(self.pids.items())
            for pid, index in pids:
                try:
                    done, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done, status = pid, 0
                if not done:
                    continue
                with self._lock:
                    self.pids.pop(pid, None)
                    if self._stopping:
                        continue
                log.warning("%s %d (pid %d) died with status %d: starting a new one",
                            self.name, index, pid, status)
                self.respawned += 1
                self._spawn(index)

    def stop(self, timeout: float) -> None:
        """Tell every worker to drain, wait up to `timeout` s, then kill what is left."""
        with self._lock:
            self._stopping = True
            pids = list(self.pids)
        for pid in pids:
            _signal(pid, DRAIN_SIGNAL)
        deadline = time.monotonic() + timeout
        remaining = set(pids)
        while remaining and time.monotonic() < deadline:
            for pid in list(remaining):
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid
                if done:
                    remaining.discard(pid)
            time.sleep(0.02)
        for pid in remaining:
            log.warning("%s pid %d did not drain within %.1f s: killing it", self.name, pid, timeout)
            _signal(pid, signal.SIGKILL)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        with self._lock:
            self.pids.clear()


_drain_asked = threading.Event()


def wait_for_drain_order(poll: float = 0.2) -> None:
    """In a worker: block until the parent asks for a drain or disappears."""
    parent = os.getppid()
    while not _drain_asked.wait(poll):
        if os.getppid() != parent:
            log.warning("parent process %d is gone: draining", parent)
            return


def _ignore_group_signals() -> None:
    # First thing in a child: the drain order may come at any moment, and SIGUSR1's
    # default action would kill the worker instead of draining it.
    signal.signal(DRAIN_SIGNAL, lambda signum, frame: _drain_asked.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
