"""ZooKeeper: one session per process, provider registrations that survive session
loss, and consumer watchers that keep a service's routing table current.

Threading: kazoo runs state listeners on its connection thread and watch callbacks
on its event thread. Neither may block on ZooKeeper from a state listener (it
deadlocks, kazoo#355/#405), so every piece of recovery work (re-register, resync)
is queued to the session's own worker thread.
"""

import json
import logging
import os
import queue
import random
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Literal, Optional, Set, Tuple, Union

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import (BadVersionError, KazooException, NoNodeError,
                              NodeExistsError, ZookeeperError)
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.retry import KazooRetry

from . import naming
from .zk import acl as zkacl
from .routing.balancer import Node, RoutingTable
from .errors import ComponentUnavailable, InvalidNodeAddress
from .naming import NodeSettings
from .zk import snapshot
from .zk.mirror import ChildrenMirror, Entry

if TYPE_CHECKING:
    from .settings import ZooKeeperSettings

log = logging.getLogger("probe.registry")


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


# Seconds a starting consumer waits for a complete first listing before it routes
# on what it has (the reads so far, or the snapshot): a 2,000-node service.
STARTUP_GRACE = 0.2
SNAPSHOT_DELAY = snapshot.WRITE_DELAY  # seconds between a routing change and its snapshot write
# A snapshot holds ~150 bytes per node; a file far bigger is not read at all.
MAX_SNAPSHOT_BYTES = 8 * 1024 * 1024

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


class Registration(object):
    """A provider's ephemeral znode, kept in place for as long as it is open.

    Re-created on every new session, when someone deletes it, and when a dead
    session of ours still owns it (apache/dubbo#5125): then the stale node is
    deleted first. `reload()` returns the node's durable settings (from Redis) or
    None when they cannot be read; the last known data is used then.

    The node's host and port are its own, taken from its path (which the provider
    built from its own address): only the weight and switch are ever taken from
    Redis or from the znode's data, so neither can move the node elsewhere.
    """

    def __init__(self, zk: ZooKeeper, path: str, data: NodeSettings,
                 reload: Optional[Callable[[], Optional[NodeSettings]]] = None) -> None:
        identity = naming.parse_node_name(path.rsplit("/", 1)[-1])
        if identity is None:
            raise InvalidNodeAddress("cannot register %r: its last part is no node name "
                                     "<service>_<host>_<port>" % (path,))
        self.zk = zk
        self.path = path
        self.host, self.port = identity.ip, identity.port
        self.data = self._own(data)
        self._reload = reload
        self._lock = threading.Lock()
        self._closed = False
        self._foreign_seen = False

    def _own(self, settings: NodeSettings) -> NodeSettings:
        """`settings` with this node's own address and dialect; InvalidNodeData if out
        of range. (What the node speaks is the process's to say, never the data's.)"""
        dialect = getattr(self, "data", settings)
        return settings._replace(host=self.host, port=self.port, transport=dialect.transport,
                                 protocol=dialect.protocol).check()

    def register(self) -> None:
        self._create()
        self.zk.on_new_session(self._recreate)
        self.zk.client.DataWatch(self.path, self._on_own_data)

    def close(self) -> None:
        """Delete the znode (only if this session owns it) and stop keeping it."""
        with self._lock:
            self._closed = True
        self.zk.remove_callback(self._recreate)
        if not self.zk.connected:
            # Nothing to wait for: the node goes when the session ends or expires.
            log.warning("ZooKeeper at %s is unreachable: %s will vanish when the session "
                        "expires", self.zk.hosts, self.path)
            return
        timeout = self.zk.session_timeout
        try:
            _, stat = self.zk.client.get_async(self.path).get(timeout=timeout)
            if stat.ephemeralOwner == self.zk.session_id:
                self.zk.client.delete_async(self.path, version=-1).get(timeout=timeout)
        except (NoNodeError, KazooException, ZookeeperError, KazooTimeoutError) as exc:
            log.info("deregistering %s: %s", self.path, exc.__class__.__name__)

    def _recreate(self) -> None:
        if self._reload is not None:
            fresh = self._reload()
            if fresh is not None:
                try:
                    self.data = self._own(fresh)
                except ValueError as exc:
                    log.warning("stored settings of %s are unusable (%s): keeping the last known",
                                self.path, exc)
        self._create()

    def _create(self) -> None:
        client = self.zk.client
        with self._lock:
            for _ in range(5):
                if self._closed:
                    return
                try:
                    client.create(self.path, self.data.to_bytes(), ephemeral=True, makepath=True)
                    log.info("registered %s %s", self.path, self.data.to_json())
                    return
                except NodeExistsError:
                    try:
                        _, stat = client.get(self.path)
                    except NoNodeError:
                        continue
                    if stat.ephemeralOwner == self.zk.session_id:
                        return
                    log.warning("%s is held by session %s (a dead one of ours, or another "
                                "process on the same address): replacing it",
                                self.path, hex(stat.ephemeralOwner))
                    try:
                        client.delete(self.path, version=stat.version)
                    except (NoNodeError, BadVersionError):
                        pass
            raise ComponentUnavailable("could not create %s in ZooKeeper at %s after 5 tries"
                                       % (self.path, self.zk.hosts))

    def _on_own_data(self, data: Optional[bytes], stat: Any, event: Any = None) -> Optional[bool]:
        if self._closed:
            return False
        if data is None:
            if self.zk.connected:
                log.warning("%s disappeared while serving: re-creating it", self.path)
                self.zk.submit(self._recreate)
            return None
        try:
            # Track operator edits so a re-created node keeps them even without Redis.
            seen = NodeSettings.from_json(data)
            if (seen.host, seen.port) != (self.host, self.port):
                raise ValueError("it names %s:%d" % (naming.describe_data(seen.host), seen.port))
            self.data = self._own(seen)
            self._foreign_seen = False
        except Exception as exc:  # anything: a kazoo watch must never die of bad data
            if not self._foreign_seen:  # once per episode, not once per hostile write
                log.warning("%s holds data that is not this node's (%s): a re-created node "
                            "gets %s", self.path, exc if isinstance(exc, ValueError)
                            else exc.__class__.__name__, self.data.to_json())
            self._foreign_seen = True
        return None


class ServiceWatcher(object):
    """Keeps `table`, an immutable RoutingTable of one service's nodes, current.

    Sits on the mirror engine (`probe.zk.mirror.ChildrenMirror`) over
    /services/<env>/<appkey>: one children watch on the appkey and one data watch
    per node of the service. A change costs in proportion to what changed: a
    listing is diffed against the last one, only new nodes are read, and the table
    is derived from the last one (`RoutingTable.updated`), one swap per batch.
    While ZooKeeper is unreachable the last table stays in use. The node list is
    also written to a snapshot file (off the update path, by the process's one
    snapshot writer) so a consumer that starts during an outage can still route.
    """

    def __init__(self, zk: ZooKeeper, env: str, appkey: str, service: str, warmup: float = 0.0,
                 snapshot_dir: Union[str, Literal[False], None] = None,
                 on_change: Optional[Callable[[RoutingTable], object]] = None) -> None:
        self.zk = zk
        self.env = env
        self.appkey = appkey
        self.service = service
        self.parent = naming.appkey_path(env, appkey)
        self.describe = "env=%s appkey=%s service=%s" % (env, appkey, service)
        self.warmup = float(warmup or 0.0)
        self.snapshot_root = None if snapshot_dir is False else (snapshot_dir or default_snapshot_dir())
        self.snapshot_path = snapshot_file(snapshot_dir, env, appkey, service)
        self.on_change = on_change
        self.table = RoutingTable(describe=self.describe)
        self.updates = 0
        self._from_snapshot = False
        self._nodes: Dict[str, Node] = {}
        self._skipped: Dict[str, str] = {}  # znode name -> why it is skipped (warned once)
        self._publish_failed = False
        self._lock = threading.RLock()
        self._routable = threading.Condition(self._lock)  # notified on every publish
        self._closed = False
        prefix = service + "_"
        self._mirror = ChildrenMirror(
            zk, self.parent, lambda name: name.startswith(prefix) and naming.is_node_of(name, service),
            self._apply, describe=self.describe)
        self.empty_protection = self._mirror.empty_protection

    @property
    def stale(self) -> bool:
        """True while routing on a snapshot, or on nodes a fresh session did not list."""
        return self._from_snapshot or self._mirror.stale

    @property
    def resyncs(self) -> int:
        """Complete re-reads of the service applied (the first one included)."""
        return max(self._mirror.resyncs - 1, 0)

    @property
    def mirror(self) -> ChildrenMirror:
        return self._mirror

    def start(self) -> None:
        """Watch, and return once the table is complete or can route.

        Connected: wait for the first listing and all its data. A big service
        (thousands of nodes) takes longer than STARTUP_GRACE; past it, return as
        soon as the table holds a routable node, from the reads so far or from the
        snapshot (stale, reconciled when the listing completes). Not connected:
        route on the snapshot until ZooKeeper answers."""
        if not self.zk.connected:
            self._load_snapshot()
            self._mirror.start()
            return
        self._mirror.start()
        if self._mirror.wait_ready(STARTUP_GRACE):
            return
        with self._lock:
            if not self._nodes:
                self._load_snapshot(reason="the first listing of %d+ node(s) is still being read"
                                    % self._mirror.reads)
        deadline = time.monotonic() + self.zk.session_timeout
        with self._routable:
            self._routable.wait_for(lambda: self._mirror.ready or len(self.table.nodes) > 0,
                                    max(deadline - time.monotonic(), 0.0))

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._mirror.close()
        if self.snapshot_path:
            snapshot.writer().flush(self.snapshot_path)

    def refresh(self) -> None:
        """Rebuild the table from the nodes already known (warm-up progress)."""
        with self._lock:
            self._publish(RoutingTable(self._nodes.values(), warmup=self.warmup,
                                       describe=self.describe), write_snapshot=False)

    def resync(self) -> None:
        """Re-read the whole service from ZooKeeper (the watches stay) and apply it
        before returning (up to the session timeout)."""
        self._mirror.resync(wait=self.zk.session_timeout)

    # -- applying the mirror's batches (its lock held; never blocks) -------------------
    def _apply(self, upserts: Dict[str, Entry], removed: Set[str], full: bool) -> None:
        with self._lock:
            if self._closed:
                return
            changed: List[Node] = []
            gone = list(removed)
            for name in removed:
                self._nodes.pop(name, None)
                self._skipped.pop(name, None)
            for name, (data, stat) in upserts.items():
                try:
                    settings = naming.parse_node_data(name, data)
                except ValueError as exc:
                    self._skip(name, str(exc))
                    if self._nodes.pop(name, None) is not None:
                        gone.append(name)
                    continue
                if self._skipped.pop(name, None) is not None:
                    log.info("node %s/%s holds usable data again: routing to it", self.parent, name)
                node = _node(name, settings, stat)
                if self._nodes.get(name) != node:
                    self._nodes[name] = node
                    changed.append(node)
            if full and self._from_snapshot:
                # The listing is complete: a snapshot node it did not find is gone.
                known = self._mirror.known()
                for name in [n for n in self._nodes if n not in known]:
                    del self._nodes[name]
                    gone.append(name)
                self._from_snapshot = False
            if not (changed or gone) and not (full and self.updates == 0):
                return
            try:
                table = self.table.updated(changed, gone, warmup=self.warmup)
            except Exception:
                # Nodes are checked before they get here, so this is a bug: rebuild
                # from scratch, so one failure never freezes the table.
                if not self._publish_failed:
                    log.exception("updating the routing table of %s failed; rebuilding it",
                                  self.describe)
                self._publish_failed = True
                table = RoutingTable(self._nodes.values(), warmup=self.warmup,
                                     describe=self.describe)
            self._publish(table)

    def _skip(self, name: str, why: str) -> None:
        """Leave znode `name` out of the table; warn once until it is fixed or gone
        (a writer that keeps changing bad data must not flood the log)."""
        if name not in self._skipped:
            log.warning("skipping node %s/%s of %s: malformed or foreign data: %s (fix or "
                        "delete the znode; its provider re-writes it when it registers again)",
                        self.parent, name, self.service, why)
        self._skipped[name] = why

    def _publish(self, table: RoutingTable, write_snapshot: bool = True) -> None:
        self.table = table
        self.updates += 1
        self._routable.notify_all()
        if self.on_change is not None:
            try:
                self.on_change(table)
            except Exception:
                log.exception("on_change callback of %s failed", self.describe)
        if write_snapshot and self.snapshot_path and not self._closed:
            # Written a moment later by the process's one writer thread, once per
            # burst: the file only has to be recent.
            snapshot.writer().schedule(self.snapshot_path, self._snapshot_document)

    # -- snapshot ----------------------------------------------------------
    def _snapshot_document(self) -> Optional[Dict[str, Any]]:
        if self.stale:
            return None
        return {"written_at": time.time(), "nodes": [node._asdict() for node in self.table.all_nodes]}

    def _load_snapshot(self, reason: Optional[str] = None) -> None:
        if not self.snapshot_path:
            return
        try:
            saved = snapshot.read_json(self.snapshot_path, MAX_SNAPSHOT_BYTES, self.snapshot_root)
            if not isinstance(saved, dict) or not isinstance(saved.get("nodes"), list):
                raise ValueError("no list of nodes")
        except Exception as exc:  # OSError, UntrustedFile, bad UTF-8, RecursionError, ...
            if reason is None or not isinstance(exc, FileNotFoundError):
                log.warning("%s and no usable routing snapshot for %s (%s: %s)",
                            reason or "ZooKeeper unreachable", self.describe,
                            exc.__class__.__name__, str(exc)[:300])
            return
        nodes: Dict[str, Node] = {}
        skipped = 0
        for entry in saved["nodes"]:
            try:
                node = _snapshot_node(entry, self.service)
            except Exception:  # each entry is checked like znode data; bad ones are left out
                skipped += 1
                continue
            nodes[node.name] = node
        if skipped:
            log.warning("routing snapshot %s: skipped %d unusable node entr%s (bad data, or an "
                        "address that differs from the node name)", self.snapshot_path, skipped,
                        "y" if skipped == 1 else "ies")
        if not nodes:
            return
        written_at = saved.get("written_at")
        if isinstance(written_at, bool) or not isinstance(written_at, (int, float)) \
                or written_at != written_at:
            written_at = 0.0
        with self._lock:
            if self._nodes or self.updates:
                return  # ZooKeeper's own data is in (or some of it): it wins
            self._nodes = nodes
            self._from_snapshot = True
            if reason is None:
                self._mirror.hold(nodes)
            self._publish(RoutingTable(nodes.values(), warmup=self.warmup, describe=self.describe),
                          write_snapshot=False)
        log.warning("%s: routing %s on a STALE snapshot of %d node(s) written %.0f s ago (%s)",
                    reason or "ZooKeeper unreachable", self.describe, len(nodes),
                    time.time() - written_at, self.snapshot_path)


def _snapshot_node(entry: object, service: str) -> Node:
    """A routing-table node from one snapshot entry, checked as znode data is.
    Raises ValueError (or TypeError/KeyError for a wrong shape)."""
    if not isinstance(entry, dict):
        raise ValueError("not an object")
    name = entry["name"]
    if not naming.is_node_of(name, service):
        raise ValueError("not a node of %s" % service)
    fields: Dict[str, Any] = {key: entry[key] for key in ("host", "port", "weight", "valid")}
    for key in ("transport", "protocol"):  # absent in snapshots written before dialects
        if key in entry:
            fields[key] = entry[key]
    settings = naming.parse_node_data(name, json.dumps(fields))
    registered_at = entry.get("registered_at", 0.0)
    if isinstance(registered_at, bool) or not isinstance(registered_at, (int, float)) \
            or not 0 <= registered_at < 1e11:
        raise ValueError("bad registered_at")
    return Node(name, settings.host, settings.port, settings.weight, settings.valid,
                float(registered_at), *settings.dialect)


def _node(name: str, settings: NodeSettings, stat: Any) -> Node:
    """The routing-table entry for znode `name` holding `settings` (warm-up counts
    from the znode's creation time)."""
    return Node(name, settings.host, settings.port, settings.weight, settings.valid,
                stat.ctime / 1000.0, *settings.dialect)


def default_snapshot_dir() -> str:
    return os.environ.get("PROBE_SNAPSHOT_DIR") or os.path.join(
        os.path.expanduser("~"), ".probe", "snapshots")


def snapshot_file(snapshot_dir: Union[str, Literal[False], None], env: str, appkey: str,
                  service: str) -> Optional[str]:
    if snapshot_dir is False:
        return None
    return os.path.join(snapshot_dir or default_snapshot_dir(), env, appkey, service + ".json")


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


__all__ = ["ZooKeeper", "shared_zookeeper", "release_zookeeper", "Registration",
           "ServiceWatcher"]
