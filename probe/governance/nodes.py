"""Governance of nodes: list an appkey's nodes (live joined with stored), and change
a node's weight or switch.

A change to a node is validated completely before anything is written. Then, in
this order:

1. its audit row is INSERTed in an open MySQL transaction (so MySQL being down, a
   missing table or a value too long for a column refuses the change while nothing
   is written yet);
2. Redis (the durable truth) is updated with a compare-and-set of that one field,
   retried if another edit got in between, so concurrent edits never lose one;
3. the live znode's data is `set` with a version check, copying the weight and
   switch from Redis (read after the znode, so the newest edit always wins there);
4. the audit row is committed. If the commit fails, the Redis field is set back
   (compare-and-set: only if it still holds this change) and the znode re-synced
   from Redis, and the change is reported as not made.

So a change lands with its audit row or not at all. If ZooKeeper fails at step 3,
the change is in Redis and audited, and the error says to run the edit again (it
re-syncs the live node) once ZooKeeper answers.

A provider's znode is never deleted or re-created here: a re-created node would
belong to the admin's ZooKeeper session (apache/dubbo#7124). A change to a node
that is down stays in Redis and applies when the node registers again.
"""

import logging
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, TypeVar, Union, cast

from kazoo.exceptions import BadVersionError, KazooException, NoNodeError, ZookeeperError
from kazoo.handlers.threading import KazooTimeoutError

from .. import naming
from ..errors import ComponentUnavailable, NodeSettingsConflict, ProbeError, UnknownNode
from ..naming import NodeSettings
from ..zk.session import read_children_with_data
from ..stores.stats import read_node_health
from .backends import Backends
from .results import NodeChange, NodeRow

log = logging.getLogger("probe.admin")

ZOOKEEPER_ERRORS = (KazooException, ZookeeperError, KazooTimeoutError)
_CAS_ATTEMPTS = 50
T = TypeVar("T")

_Key = Tuple[str, str, int]


class NodeOps(object):
    """Node listing and edits over shared `Backends` (thread-safe as its stores are).

    :param update_live: what brings a live znode in line with Redis during a change
        (default `update_live`); the Admin façade routes it through its own
        `_update_live`, the seam fault-injection tests override.
    """

    def __init__(self, backends: Backends,
                 update_live: Optional[Callable[..., bool]] = None) -> None:
        self.backends = backends
        self._update_live = update_live or self.update_live

    @property
    def env(self) -> str:
        return self.backends.env

    # -- reading -------------------------------------------------------------------
    def nodes(self, appkey: str, service: Optional[str] = None) -> List[NodeRow]:
        """Every node of `appkey` (and `service`) that is live or has stored settings,
        sorted by service and address, with any mismatch between the two noted."""
        naming.check_appkey(appkey)
        if service is not None:
            naming.check_service_name(service)
        live, created = self._live(appkey, service)
        stored = self._stored(appkey, service)
        # Node health as consumers see it (their stats flushes report ejected nodes).
        ejected = read_node_health(self.backends.redis, self.env, appkey)
        return [_row(key, live, stored, created.get(key), ejected)
                for key in sorted(set(live) | set(stored))]

    def _live(self, appkey: str, service: Optional[str]) -> Tuple[Dict[_Key, Any], Dict[_Key, float]]:
        live: Dict[_Key, Any] = {}
        created: Dict[_Key, float] = {}
        children = read_children_with_data(self.backends.zk, naming.appkey_path(self.env, appkey))
        for name, (raw, stat) in children.items():
            parsed = naming.parse_node_name(name)
            if parsed is None or (service and parsed.service != service):
                continue
            key = (parsed.service, parsed.ip, parsed.port)
            created[key] = stat.ctime / 1000.0
            try:
                live[key] = naming.parse_node_data(name, raw)
            except ValueError as exc:
                live[key] = exc
        return live, created

    def _stored(self, appkey: str, service: Optional[str]) -> Dict[_Key, Any]:
        stored: Dict[_Key, Any] = {}
        for field, raw in self.backends.nodestore.all(appkey).items():
            parsed = naming.parse_settings_field(field)
            if parsed is None or parsed.appkey != appkey or parsed.env != self.env \
                    or (service and parsed.service != service):
                continue
            try:
                kept: Any = NodeSettings.from_json(raw)
            except ValueError as exc:
                kept = exc
            # The address is the field's; a copy naming another one is only noted.
            stored[(parsed.service, parsed.ip, parsed.port)] = kept
        return stored

    # -- changing ------------------------------------------------------------------
    def set_weight(self, appkey: str, service: str, address: str, weight: Any,
                   create: bool = False, by: Optional[str] = None) -> NodeChange:
        """Set a node's weight (0..1000); see the module notes for the order of writes."""
        weight = naming.check_weight(weight)
        return self.change(appkey, service, address, "weight", weight, create, by)

    def set_valid(self, appkey: str, service: str, address: str, valid: bool,
                  create: bool = False, by: Optional[str] = None) -> NodeChange:
        """Switch a node on (`valid` True) or off."""
        return self.change(appkey, service, address, "valid", 1 if valid else 0, create, by)

    def change(self, appkey: str, service: str, address: str, key: str, value: int,
               create: bool, by: Optional[str]) -> NodeChange:
        """Validate everything, then audit row (open) → Redis → live znode → commit."""
        naming.check_appkey(appkey)
        naming.check_service_name(service)
        ip, port = naming.parse_address(address)
        if by is not None:
            naming.check_changed_by(by)
        backends = self.backends
        field = naming.settings_field(appkey, self.env, service, ip, port)
        path = naming.node_path(self.env, appkey, service, ip, port)
        name = naming.node_name(service, ip, port)
        node = "%s:%d" % (ip, port)
        backends.appkeys.require(appkey)
        zk = backends.zk
        try:
            live_raw, _ = zk.client.get(path)
        except NoNodeError:
            live_raw = None
        except ZOOKEEPER_ERRORS as exc:
            raise ComponentUnavailable("ZooKeeper at %s failed reading %s: %s; nothing was "
                                       "changed" % (zk.hosts, path, exc.__class__.__name__))
        for _ in range(_CAS_ATTEMPTS):
            stored_raw = backends.nodestore.get_raw(field)
            if stored_raw is None and live_raw is None and not create:
                raise UnknownNode("no node %s of %s/%s in env %s: it is neither registered in "
                                  "ZooKeeper nor stored in Redis (check `probe nodes %s`, or pass "
                                  "--create to store settings for a node that will start later)"
                                  % (node, appkey, service, self.env, appkey))
            base = parse_or_none(lambda: NodeSettings.from_json(stored_raw)) \
                if stored_raw is not None else None
            if base is None and live_raw is not None:
                base = parse_or_none(lambda: naming.parse_node_data(name, live_raw))
            # The address is the node's identity, never taken from stored data.
            base = (base or NodeSettings(ip, port))._replace(host=ip, port=port)
            old_value = getattr(base, key)
            updated = base._replace(**cast(Dict[str, Any], {key: value}))
            pending = backends.appkeys.begin_change(self.env, appkey, service, node, key,
                                                    old_value, value, by)
            try:
                swapped = backends.nodestore.compare_and_set(field, stored_raw, updated.to_json())
            except BaseException:
                pending.rollback()
                raise
            if not swapped:
                pending.rollback()  # another edit got in between: read again
                continue
            live_error = None
            try:
                applied_live = self._update_live(path, name, field, key, value)
            except (ProbeError,) + ZOOKEEPER_ERRORS as exc:
                applied_live, live_error = False, exc
            except BaseException:
                pending.commit()  # interrupted: Redis holds the change, so keep its row
                raise
            try:
                pending.commit()
            except ComponentUnavailable as exc:
                self._undo(field, updated.to_json(), stored_raw, path, name, key, old_value)
                raise ComponentUnavailable("%s; the change %s=%s of %s was undone in Redis and "
                                           "ZooKeeper: try again when MySQL answers"
                                           % (exc, key, value, node))
            break
        else:
            raise NodeSettingsConflict("Redis settings of %s kept changing during %d attempts to "
                                       "set %s=%s; nothing was changed, try again"
                                       % (node, _CAS_ATTEMPTS, key, value))
        log.info("set %s of %s/%s: %s %s -> %s (live: %s)", node, appkey, service, key,
                 old_value, value, applied_live)
        if live_error is not None:
            raise ComponentUnavailable(
                "%s=%s of %s is stored in Redis and audited, but updating the live node in "
                "ZooKeeper at %s failed (%s): run the same command again once ZooKeeper "
                "answers (it re-syncs the live node from Redis)"
                % (key, value, node, zk.hosts, live_error.__class__.__name__))
        return NodeChange(appkey=appkey, service=service, address=node, key=key, old=old_value,
                          new=value, live=applied_live, settings=updated._asdict())

    def update_live(self, path: str, name: str, field: str, key: str, value: int,
                    attempts: int = 20) -> bool:
        """Bring a live znode's weight and switch in line with Redis, version-checked.
        False if the node is not registered (the change then waits in Redis).

        Redis is read after the znode: whichever edit wrote the znode version read
        here had already written Redis, so the znode never goes back to an older
        value when two edits race (each sets only data that Redis already holds).
        """
        client = self.backends.zk.client
        for _ in range(attempts):
            try:
                raw, stat = client.get(path)
            except NoNodeError:
                return False
            try:
                current = naming.parse_node_data(name, raw)
            except ValueError as exc:
                log.warning("%s holds unusable data (%s): leaving it to its provider", path, exc)
                return False
            durable = parse_or_none(lambda: self.backends.nodestore.get(field))
            if durable is not None:
                target = current._replace(weight=durable.weight, valid=durable.valid)
            else:
                target = current._replace(**cast(Dict[str, Any], {key: value}))
            if target == current:
                return True
            try:
                client.set(path, target.to_bytes(), version=stat.version)
                return True
            except BadVersionError:
                continue
            except NoNodeError:
                return False
        raise NodeSettingsConflict("%s kept changing during %d attempts to set %s=%s; Redis "
                                   "holds the new value, try again" % (path, attempts, key, value))

    def _undo(self, field: str, written: str, before: Optional[Union[bytes, str]], path: str,
              name: str, key: str, old_value: Any) -> None:
        """Take back a change whose audit row could not be committed: the Redis
        field goes back to `before` if it still holds `written`, and the live node
        follows Redis again."""
        try:
            if not self.backends.nodestore.compare_and_set(field, written, before):
                log.error("undoing %s: Redis field %s changed meanwhile; left as it is", key, field)
            self._update_live(path, name, field, key, old_value)
        except (ProbeError,) + ZOOKEEPER_ERRORS:
            log.error("undoing %s of %s failed: Redis or ZooKeeper may hold the change without "
                      "an audit row", key, field, exc_info=True)


def _row(key: _Key, live: Dict[_Key, Any], stored: Dict[_Key, Any],
         registered_at: Optional[float],
         ejected: Optional[Mapping[Tuple[str, str], List[str]]] = None) -> NodeRow:
    svc, ip, port = key
    now_live, kept = live.get(key), stored.get(key)
    shown = now_live if isinstance(now_live, NodeSettings) else kept
    problem = None
    if isinstance(now_live, ValueError):
        problem = "unusable znode data, skipped by consumers: %s" % now_live
    elif isinstance(kept, ValueError):
        problem = "malformed Redis settings: %s" % kept
    elif isinstance(kept, NodeSettings) and (kept.host, kept.port) != (ip, port):
        problem = "Redis settings name another address (ignored): %s:%d" % (
            naming.describe_data(kept.host, 40), kept.port)
    elif isinstance(now_live, NodeSettings) and isinstance(kept, NodeSettings) and \
            (now_live.weight, now_live.valid) != (kept.weight, kept.valid):
        problem = "live differs from Redis (weight %s/%s valid %s/%s)" % (
            now_live.weight, kept.weight, now_live.valid, kept.valid)
    address = "%s:%d" % (ip, port)
    transport, protocol = shown.dialect if isinstance(shown, NodeSettings) else (None, None)
    reasons = (ejected or {}).get((svc, address), [])
    return NodeRow(service=svc, address=address, live=key in live,
                   weight=getattr(shown, "weight", None), valid=getattr(shown, "valid", None),
                   stored=isinstance(kept, NodeSettings), problem=problem,
                   registered_at=registered_at if key in live else None,
                   transport=transport, protocol=protocol,
                   ejected_by=len(reasons), ejected_reasons=sorted(set(reasons)))


def parse_or_none(read: Callable[[], T]) -> Optional[T]:
    """`read()`, or None when the data it parses is malformed."""
    try:
        return read()
    except ValueError:
        return None


__all__ = ["NodeOps", "ZOOKEEPER_ERRORS", "parse_or_none"]
