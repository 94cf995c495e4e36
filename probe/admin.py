"""Governance operations, shared by the CLI and the web console.

A change to a node is validated completely before anything is written. Then Redis
(the durable truth) is written, then the live znode's data is `set` with a version
check, retried on conflict. A provider's znode is never deleted or re-created
here: a re-created node would belong to the admin's ZooKeeper session
(apache/dubbo#7124). A change to a node that is down stays in Redis and applies
when the node registers again. Every change is recorded in the audit table.
"""

import logging

from kazoo.exceptions import BadVersionError, NoNodeError

from . import naming
from .appkeys import AppkeyStore
from .errors import NodeSettingsConflict, ProbeError, UnknownNode
from .naming import NodeSettings
from .nodestore import NodeStore
from .registry import read_children_with_data, release_zookeeper, shared_zookeeper
from .settings import load_settings

log = logging.getLogger("probe.admin")


class Admin(object):
    """Operations for one config file and env. ZooKeeper is connected on first need."""

    def __init__(self, config_path=None, env=None, connect_timeout=3.0):
        self.settings = load_settings(config_path, env)
        self.env = self.settings.env
        self.connect_timeout = connect_timeout
        self._appkeys = None
        self._nodestore = None
        self._zk = None

    @property
    def appkeys(self):
        if self._appkeys is None:
            self._appkeys = AppkeyStore(self.settings.mysql, self.connect_timeout)
        return self._appkeys

    @property
    def nodestore(self):
        if self._nodestore is None:
            self._nodestore = NodeStore(self.settings.redis, self.env, self.connect_timeout)
        return self._nodestore

    @property
    def zk(self):
        if self._zk is None:
            self._zk = shared_zookeeper(self.settings.zookeeper, timeout=self.connect_timeout)
        return self._zk

    def close(self):
        if self._appkeys is not None:
            self._appkeys.close()
            self._appkeys = None
        if self._zk is not None:
            release_zookeeper(self._zk)
            self._zk = None
        if self._nodestore is not None:
            self._nodestore.close()
            self._nodestore = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # -- appkeys -----------------------------------------------------------------
    def add_appkey(self, appkey, description=""):
        return self.appkeys.add(naming.check_appkey(appkey), description)

    def remove_appkey(self, appkey):
        return self.appkeys.remove(naming.check_appkey(appkey))

    def list_appkeys(self):
        return self.appkeys.list()

    # -- nodes ---------------------------------------------------------------
    def nodes(self, appkey, service=None):
        """Every node of `appkey` (and `service`) that is live or has stored settings:
        dicts with service, address, live, weight, valid, source and any mismatch."""
        naming.check_appkey(appkey)
        if service is not None:
            naming.check_service_name(service)
        live = {}
        for name, (raw, stat) in read_children_with_data(self.zk, naming.appkey_path(self.env, appkey)).items():
            parsed = naming.parse_node_name(name)
            if parsed is None or (service and parsed.service != service):
                continue
            try:
                live[(parsed.service, parsed.ip, parsed.port)] = NodeSettings.from_json(raw)
            except ValueError as exc:
                live[(parsed.service, parsed.ip, parsed.port)] = exc
        stored = {}
        for field, raw in self.nodestore.all(appkey).items():
            parsed = naming.parse_settings_field(field)
            if parsed is None or parsed.appkey != appkey or parsed.env != self.env \
                    or (service and parsed.service != service):
                continue
            try:
                stored[(parsed.service, parsed.ip, parsed.port)] = NodeSettings.from_json(raw)
            except ValueError as exc:
                stored[(parsed.service, parsed.ip, parsed.port)] = exc
        rows = []
        for key in sorted(set(live) | set(stored), key=lambda k: (k[0], k[1], k[2])):
            svc, ip, port = key
            now_live, kept = live.get(key), stored.get(key)
            shown = now_live if isinstance(now_live, NodeSettings) else kept
            row = {"service": svc, "address": "%s:%d" % (ip, port), "live": key in live,
                   "weight": getattr(shown, "weight", None), "valid": getattr(shown, "valid", None),
                   "stored": isinstance(kept, NodeSettings), "problem": None}
            if isinstance(now_live, ValueError):
                row["problem"] = "malformed znode data: %s" % now_live
            elif isinstance(kept, ValueError):
                row["problem"] = "malformed Redis settings: %s" % kept
            elif isinstance(now_live, NodeSettings) and isinstance(kept, NodeSettings) and \
                    (now_live.weight, now_live.valid) != (kept.weight, kept.valid):
                row["problem"] = "live differs from Redis (weight %s/%s valid %s/%s)" % (
                    now_live.weight, kept.weight, now_live.valid, kept.valid)
            rows.append(row)
        return rows

    def set_weight(self, appkey, service, address, weight, create=False, by=None):
        weight = naming.check_weight(weight)
        return self._change(appkey, service, address, "weight", weight, create, by)

    def disable(self, appkey, service, address, create=False, by=None):
        return self._change(appkey, service, address, "valid", 0, create, by)

    def enable(self, appkey, service, address, create=False, by=None):
        return self._change(appkey, service, address, "valid", 1, create, by)

    def audit(self, appkey=None, limit=100):
        if appkey is not None:
            naming.check_appkey(appkey)
        return self.appkeys.audit(appkey, limit)

    def _change(self, appkey, service, address, key, value, create, by):
        """Validate everything, then Redis, then the live znode, then the audit row."""
        naming.check_appkey(appkey)
        naming.check_service_name(service)
        ip, port = naming.parse_address(address)
        self.appkeys.require(appkey)
        field = naming.settings_field(appkey, self.env, service, ip, port)
        path = naming.node_path(self.env, appkey, service, ip, port)
        try:
            stored = self.nodestore.get(field)
        except ValueError:
            stored = None  # malformed: the edit below replaces it
        try:
            live_raw, _ = self.zk.client.get(path)
        except NoNodeError:
            live_raw = None
        if stored is None and live_raw is None and not create:
            raise UnknownNode("no node %s:%d of %s/%s in env %s: it is neither registered in "
                              "ZooKeeper nor stored in Redis (check `probe nodes %s`, or pass "
                              "--create to store settings for a node that will start later)"
                              % (ip, port, appkey, service, self.env, appkey))
        base = stored
        if base is None and live_raw is not None:
            try:
                base = NodeSettings.from_json(live_raw)
            except ValueError:
                base = None
        base = base or NodeSettings(ip, port)
        old_value = getattr(base, key)
        updated = base._replace(**{key: value})
        self.nodestore.put(field, updated)
        applied_live = self._update_live(path, key, value)
        self.appkeys.record_change(self.env, appkey, service, "%s:%d" % (ip, port), key,
                                   str(old_value), str(value), by)
        log.info("%s %s:%d of %s/%s: %s %s -> %s (live: %s)", "set", ip, port, appkey, service,
                 key, old_value, value, applied_live)
        return {"appkey": appkey, "service": service, "address": "%s:%d" % (ip, port),
                "key": key, "old": old_value, "new": value, "live": applied_live,
                "settings": updated._asdict()}

    def _update_live(self, path, key, value, attempts=20):
        """Set one key of a live znode's JSON with a version check. False if the
        node is not registered (the change then waits in Redis)."""
        client = self.zk.client
        for _ in range(attempts):
            try:
                raw, stat = client.get(path)
            except NoNodeError:
                return False
            try:
                current = NodeSettings.from_json(raw)
            except ValueError:
                log.warning("%s holds malformed data %r: leaving it to its provider", path, raw)
                return False
            try:
                client.set(path, current._replace(**{key: value}).to_bytes(), version=stat.version)
                return True
            except BadVersionError:
                continue
            except NoNodeError:
                return False
        raise NodeSettingsConflict("%s kept changing during %d attempts to set %s=%s; Redis "
                                   "holds the new value, try again" % (path, attempts, key, value))


__all__ = ["Admin", "ProbeError"]
