"""The process's ZooKeeper session: one per process and set of hosts, restarted
when it is stuck, with callbacks on a new session and on every reconnect.

Threading: kazoo runs state listeners on its connection thread and watch callbacks
on its event thread. Neither may block on ZooKeeper from a state listener (it
deadlocks, kazoo#355/#405), so every piece of recovery work (re-register, resync)
is queued to the session's own worker thread.
"""

import logging
import queue
import random
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import NoNodeError
from kazoo.retry import KazooRetry

from . import acl as zkacl
from ..errors import ComponentUnavailable

if TYPE_CHECKING:
    from ..settings import ZooKeeperSettings

log = logging.getLogger("probe.registry")  # the logger name users configure


class ZooKeeper(object):
    """A kazoo session that heals itself.

    - On LOST followed by CONNECTED (a new session), every callback registered with
      `on_new_session` runs on the worker thread, after a little jitter, so that
      registrations are re-created and watchers resync.
    - A client that stays SUSPENDED for longer than twice the session timeout is
      restarted with a fresh session. This covers a ZooKeeper rebuilt from scratch:
      it refuses clients that have seen a higher zxid, so kazoo alone would stay
      SUSPENDED for ever and never report LOST. Restarting relies on kazoo's
      `stop()` failing every request still queued with ConnectionLoss, so no
      recovery task waits on one for ever (tests/test_client_api.py pins this).

    Only kazoo's public API is used: the state comes from a listener, never from
    the client's private attributes.
    """

    def __init__(self, hosts: str, session_timeout: float = 6.0,
                 auth: Optional[str] = None, tls: Optional[Any] = None) -> None:
        self.hosts = hosts
        self.session_timeout = float(session_timeout)
        # Digest credentials "user:password": every znode this session creates gets
        # zkacl.znode_acl(auth) (kazoo's default_acl, also for makepath/ensure_path).
        # `tls` (settings.ZooKeeperTls): kazoo's use_ssl, so the digest never crosses
        # the wire in clear.
        self.share_key = (hosts, zkacl.digest_id(auth) if auth else None, tls)
        tls_options = tls.kazoo_options() if tls is not None else {}
        self.client = KazooClient(
            hosts=hosts, timeout=self.session_timeout,
            connection_retry=KazooRetry(max_tries=-1, delay=0.05, backoff=1.5, max_delay=1.0),
            command_retry=KazooRetry(max_tries=3, delay=0.05, backoff=2, max_delay=0.5),
            logger=zkacl.kazoo_logger("probe.registry.kazoo"), **zkacl.kazoo_auth_options(auth),
            **tls_options)
        self._callbacks: List[Callable[[], object]] = []
        self._reconnect_callbacks: List[Callable[[], object]] = []
        self._callbacks_lock = threading.Lock()
        self._was_suspended = False
        self._work: "queue.Queue[Optional[Callable[[], object]]]" = queue.Queue()
        self._need_resync = True
        self._suspended_since: Optional[float] = None
        self._stopped = threading.Event()
        self._connected = threading.Event()  # set while the listener last saw CONNECTED
        self._worker: Optional[threading.Thread] = None
        self.client.add_listener(self._on_state)

    # -- lifecycle ---------------------------------------------------------
    def start(self, timeout: float = 3.0, keep_trying: bool = False) -> bool:
        """Connect within `timeout` seconds or raise ComponentUnavailable. With
        `keep_trying`, a failed start leaves the client connecting in the background."""
        self._ensure_worker()
        event = self.client.start_async()
        event.wait(timeout)
        if self.client.connected:
            return True
        if keep_trying:
            self._suspended_since = time.monotonic()
            return False
        self.stop()
        raise ComponentUnavailable(
            "ZooKeeper at %s did not answer within %.1f s: start it (`probe stack up` for "
            "the local stack) or fix zkserver in the config" % (self.hosts, timeout))

    def stop(self) -> None:
        self._stopped.set()
        self._work.put(None)
        try:
            self.client.stop()
            self.client.close()
        except Exception:  # closing a half-open client must not mask the real error
            log.debug("error while closing ZooKeeper client", exc_info=True)

    @property
    def connected(self) -> bool:
        return self.client.connected

    def wait_connected(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the session to be CONNECTED."""
        return self._connected.wait(timeout)

    @property
    def session_id(self) -> Optional[int]:
        client_id = self.client.client_id
        return client_id[0] if client_id else None

    def on_new_session(self, callback: Callable[[], object]) -> None:
        with self._callbacks_lock:
            self._callbacks.append(callback)

    def on_reconnect(self, callback: Callable[[], object]) -> None:
        """`callback()` runs (on the worker, after jitter) when a suspended session
        reconnects: watches survived, but a full re-read costs little and catches
        anything a recipe missed."""
        with self._callbacks_lock:
            self._reconnect_callbacks.append(callback)

    def remove_callback(self, callback: Callable[[], object]) -> None:
        with self._callbacks_lock:
            for callbacks in (self._callbacks, self._reconnect_callbacks):
                if callback in callbacks:
                    callbacks.remove(callback)

    def submit(self, task: Callable[[], object]) -> None:
        """Run `task()` on the worker thread (never on a kazoo thread)."""
        self._work.put(task)

    # -- internals ---------------------------------------------------------
    def _on_state(self, state: Any) -> None:
        # kazoo's connection thread: record and hand off, never call ZooKeeper here.
        if state == KazooState.CONNECTED:
            self._connected.set()
            self._suspended_since = None
            if self._need_resync:
                self._need_resync = False
                self._work.put(self._run_session_callbacks)
            elif self._was_suspended:
                self._work.put(self._run_reconnect_callbacks)
            self._was_suspended = False
        elif state == KazooState.SUSPENDED:
            self._connected.clear()
            self._was_suspended = True
            if self._suspended_since is None:
                self._suspended_since = time.monotonic()
        elif state == KazooState.LOST:
            self._connected.clear()
            self._need_resync = True
            if self._suspended_since is None:
                self._suspended_since = time.monotonic()

    def _run_session_callbacks(self) -> None:
        self._jitter()
        with self._callbacks_lock:
            callbacks = list(self._callbacks)
        log.info("ZooKeeper session %s at %s: (re)registering and resyncing %d watcher(s)",
                 hex(self.session_id or 0), self.hosts, len(callbacks))
        for callback in callbacks:
            self._run(callback)

    def _run_reconnect_callbacks(self) -> None:
        self._jitter()
        with self._callbacks_lock:
            callbacks = list(self._reconnect_callbacks)
        for callback in callbacks:
            self._run(callback)

    def _jitter(self) -> None:
        # Spreads a fleet's resync after an outage instead of a storm (kazoo#664).
        time.sleep(random.uniform(0, min(0.2, self.session_timeout / 20.0)))

    def _run(self, task: Callable[[], object]) -> None:
        try:
            task()
        except Exception:
            log.exception("ZooKeeper task %r failed; it will run again on the next session", task)

    def _ensure_worker(self) -> None:
        if self._worker is None:
            # Two threads: recovery tasks may block on ZooKeeper, so the watchdog that
            # notices a stuck session must not wait behind them.
            self._worker = threading.Thread(target=self._work_loop, name="probe-zookeeper",
                                            daemon=True)
            self._worker.start()
            threading.Thread(target=self._watchdog_loop, name="probe-zookeeper-watchdog",
                             daemon=True).start()

    def _work_loop(self) -> None:
        while not self._stopped.is_set():
            task = self._work.get()
            if task is None:
                return
            self._run(task)

    def _watchdog_loop(self) -> None:
        while not self._stopped.wait(0.25):
            self._check_stuck()

    def _check_stuck(self) -> None:
        since = self._suspended_since
        if since is None or self._stopped.is_set():
            return
        if time.monotonic() - since > 2 * self.session_timeout:
            log.warning("ZooKeeper at %s unreachable for %.1f s (longer than twice the "
                        "session timeout); starting a fresh session",
                        self.hosts, time.monotonic() - since)
            self._suspended_since = time.monotonic()
            self._need_resync = True
            try:
                # stop() fails the requests still queued with ConnectionLoss.
                self.client.stop()
                self.client.start_async()
            except Exception:
                log.exception("restarting the ZooKeeper client failed; will try again")


_shared: Dict[Tuple[Any, ...], List[Any]] = {}  # share key -> [ZooKeeper, users]
_shared_lock = threading.Lock()


def shared_zookeeper(zk_settings: "ZooKeeperSettings", timeout: float = 3.0,
                     keep_trying: bool = False) -> ZooKeeper:
    """The process's one ZooKeeper session for these hosts, started on first use.
    Pair every call with `release_zookeeper`."""
    auth = getattr(zk_settings, "auth", None)
    tls = getattr(zk_settings, "tls", None)
    key = (zk_settings.hosts, zkacl.digest_id(auth) if auth else None, tls)
    with _shared_lock:
        entry = _shared.get(key)
        if entry is not None and not keep_trying and not entry[0].connected:
            # Shared with a consumer that started during an outage: a provider must
            # not register on a session that is not there.
            if not entry[0].wait_connected(timeout):
                raise ComponentUnavailable("ZooKeeper at %s did not answer within %.1f s"
                                           % (zk_settings.hosts, timeout))
        if entry is None:
            zk = ZooKeeper(zk_settings.hosts, zk_settings.session_timeout, auth=auth, tls=tls)
            if zk.start(timeout, keep_trying=keep_trying):
                try:
                    zkacl.check_credentials(zk.client, auth, zk_settings.hosts)
                except Exception:
                    zk.stop()
                    raise
            entry = _shared[key] = [zk, 0]
        entry[1] += 1
        return entry[0]


def release_zookeeper(zk: ZooKeeper) -> None:
    with _shared_lock:
        entry = _shared.get(zk.share_key)
        if entry is None or entry[0] is not zk:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _shared[zk.share_key]
    zk.stop()


def read_children_with_data(zk: ZooKeeper, parent: str) -> Dict[str, Tuple[bytes, Any]]:
    """{name: (raw bytes, stat)} for every child of `parent` (admin views)."""
    result: Dict[str, Tuple[bytes, Any]] = {}
    try:
        children = zk.client.get_children(parent)
    except NoNodeError:
        return result
    for name in children:
        try:
            result[name] = zk.client.get(parent + "/" + name)
        except NoNodeError:
            continue
    return result


__all__ = ["ZooKeeper", "shared_zookeeper", "release_zookeeper", "read_children_with_data"]
