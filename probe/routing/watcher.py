"""A consumer's view of one service: its nodes mirrored from ZooKeeper (by the
mirror engine, probe.zk.mirror) into an immutable routing table, swapped on every
change, with a disk snapshot for starts during an outage."""

import json
import logging
import os
import threading
import time
from typing import Any, Callable, Dict, List, Literal, Optional, Set, Union

from .. import naming
from .balancer import Node, RoutingTable
from ..naming import NodeSettings
from ..zk.session import ZooKeeper
from ..zk import snapshot
from ..zk.mirror import ChildrenMirror, Entry

log = logging.getLogger("probe.registry")  # the logger name users configure


# Seconds a starting consumer waits for a complete first listing before it routes
# on what it has (the reads so far, or the snapshot): a 2,000-node service.
STARTUP_GRACE = 0.2
SNAPSHOT_DELAY = snapshot.WRITE_DELAY  # seconds between a routing change and its snapshot write
# A snapshot holds ~150 bytes per node; a file far bigger is not read at all.
MAX_SNAPSHOT_BYTES = 8 * 1024 * 1024


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


__all__ = ["ServiceWatcher", "snapshot_file", "default_snapshot_dir"]
