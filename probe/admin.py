"""Governance operations, shared by the CLI and the web console.

A change to a node is validated completely before anything is written. Then Redis
(the durable truth) is written, then the live znode's data is `set` with a version
check, retried on conflict. A provider's znode is never deleted or re-created
here: a re-created node would belong to the admin's ZooKeeper session
(apache/dubbo#7124). A change to a node that is down stays in Redis and applies
when the node registers again. Every change is recorded in the audit table.
"""

import json
import logging

from kazoo.exceptions import (BadVersionError, KazooException, NodeExistsError, NoNodeError,
                              ZookeeperError)
from kazoo.handlers.threading import KazooTimeoutError

from . import naming
from .appkeys import AppkeyStore, current_user
from .configcenter import MAX_VALUE_BYTES, canonical_text, parse_value
from .configstore import ConfigHistory
from .errors import (ComponentUnavailable, ConfigConflict, InvalidConfigValue,
                     NodeSettingsConflict, ProbeError, UnknownConfigKey, UnknownNode)
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
        if getattr(self, "_config_history", None) is not None:
            self._config_history.close()
            self._config_history = None

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

    # -- config center -------------------------------------------------------------
    # Keys are persistent znodes /configs/<env>/<appkey>/<key> (data: the value as JSON);
    # MySQL table config_history keeps every change and is the durable copy.
    def set_config(self, appkey, key, value, by=None):
        """Set config `key` of `appkey` to the JSON-serializable `value`."""
        naming.check_appkey(appkey)
        naming.check_config_key(key)
        return self._write_config(appkey, key, canonical_text(value), "set", by)

    def set_config_json(self, appkey, key, text, by=None):
        """Set config `key` of `appkey` to the value written as JSON `text`."""
        naming.check_appkey(appkey)
        naming.check_config_key(key)
        return self._write_config(appkey, key, parse_value(text)[1], "set", by)

    def get_config(self, appkey, key):
        """The value of config `key`; UnknownConfigKey when it is not set."""
        naming.check_appkey(appkey)
        naming.check_config_key(key)
        self.appkeys.require(appkey)
        try:
            raw, _ = self.zk.client.get(naming.config_key_path(self.env, appkey, key))
        except NoNodeError:
            raise UnknownConfigKey("appkey %s has no config key %r in env %s (see `probe config "
                                   "list %s`)" % (appkey, key, self.env, appkey))
        return parse_value(raw)[0]

    def list_config(self, appkey):
        """{key: value} of every config key of `appkey` (a malformed znode shows as
        {"malformed": reason})."""
        naming.check_appkey(appkey)
        self.appkeys.require(appkey)
        result = {}
        parent = naming.config_appkey_path(self.env, appkey)
        for name, (raw, _) in sorted(read_children_with_data(self.zk, parent).items()):
            if naming.is_config_key(name):
                try:
                    result[name] = parse_value(raw)[0]
                except InvalidConfigValue as exc:
                    result[name] = {"malformed": str(exc)}
        return result

    def delete_config(self, appkey, key, by=None):
        naming.check_appkey(appkey)
        naming.check_config_key(key)
        return self._write_config(appkey, key, None, "delete", by)

    def config_history(self, appkey, key, limit=100):
        """The changes of config `key`, newest first: dicts with version, value,
        changed_by, changed_at, action, old_value and deleted."""
        naming.check_appkey(appkey)
        naming.check_config_key(key)
        self.appkeys.require(appkey)
        return [_history_entry(row) for row in
                self._config_store().history(self.env, appkey, key, limit)]

    def rollback_config(self, appkey, key, version, by=None):
        """Write the value of history `version` of `key` as a new change (a version that
        recorded a deletion deletes the key)."""
        naming.check_appkey(appkey)
        naming.check_config_key(key)
        if isinstance(version, str) and version.strip().isdigit():
            version = int(version)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise UnknownConfigKey("bad version %r: give a version number from `probe config "
                                   "history %s %s`" % (version, appkey, key))
        self.appkeys.require(appkey)
        row = self._config_store().version(self.env, appkey, key, version)
        if row is None:
            raise UnknownConfigKey("config key %r of %s (env %s) has no version %d: see `probe "
                                   "config history %s %s`" % (key, appkey, self.env, version,
                                                                appkey, key))
        return self._write_config(appkey, key, row["new_text"], "rollback", by,
                                  note="rollback to version %d" % version)

    def restore_config(self, appkey, by=None):
        """Write back, from MySQL history, every key whose znode is missing (ZooKeeper
        rebuilt from scratch or the znodes deleted by hand). Keys present in ZooKeeper
        are left alone, even when they differ from history (they are listed)."""
        naming.check_appkey(appkey)
        self.appkeys.require(appkey)
        store = self._config_store()
        wanted = {key: row["new_text"] for key, row in store.latest(self.env, appkey).items()
                  if row["new_text"] is not None and naming.is_config_key(key)}
        parent = naming.config_appkey_path(self.env, appkey)
        client = self.zk.client
        live = read_children_with_data(self.zk, parent)
        missing = sorted(key for key in wanted if key not in live)
        differs = sorted(key for key in wanted if key in live and
                         _znode_text(live[key][0]) != wanted[key])
        if missing:
            client.ensure_path(parent.rsplit("/", 1)[0])
            self._create_config_znodes(parent, missing, wanted, client.exists(parent) is None)
            for key in missing:
                with store.change(self.env, appkey, key) as record:
                    record("restore", None, wanted[key], by or current_user())
        log.info("config of %s/%s restored from MySQL: %d key(s) written back, %d differ from "
                 "history", self.env, appkey, len(missing), len(differs))
        return {"appkey": appkey, "env": self.env, "restored": missing, "differs": differs,
                "unchanged": sorted(set(wanted) - set(missing) - set(differs))}

    def _create_config_znodes(self, parent, keys, texts, with_parent, batch_bytes=512 * 1024):
        """Create the keys' znodes in as few ZooKeeper transactions as fit, so a
        watching process sees the config come back whole, not key by key."""
        client = self.zk.client
        batch, size = [], 0
        batches = []
        for key in keys:
            length = len(texts[key].encode("utf-8")) + len(key) + 64
            if batch and size + length > batch_bytes:
                batches.append(batch)
                batch, size = [], 0
            batch.append(key)
            size += length
        batches.append(batch)
        for index, batch in enumerate(batches):
            transaction = client.transaction()
            if with_parent and index == 0:
                transaction.create(parent, b"")
            for key in batch:
                transaction.create(parent + "/" + key, texts[key].encode("utf-8"))
            results = transaction.commit()
            if any(isinstance(result, Exception) for result in results):
                # Someone created some of them meanwhile: one by one, keeping theirs.
                if with_parent and index == 0:
                    client.ensure_path(parent)
                for key in batch:
                    try:
                        client.create(parent + "/" + key, texts[key].encode("utf-8"))
                    except NodeExistsError:
                        pass

    def _config_store(self):
        if getattr(self, "_config_history", None) is None:
            self.appkeys.ensure_schema()
            self._config_history = ConfigHistory(self.appkeys.connect, self.appkeys.address)
        return self._config_history

    def _write_config(self, appkey, key, text, action, by, note=None):
        """Compare-and-set one key's znode under the key's writer lock, recording the
        change in MySQL in the same step (rolled back if the znode write fails)."""
        self.appkeys.require(appkey)
        path = naming.config_key_path(self.env, appkey, key)
        client = self.zk.client
        by = by or current_user()
        # Bounded waits: the key's MySQL lock is held meanwhile.
        timeout = 2 * self.zk.session_timeout
        with self._config_store().change(self.env, appkey, key) as record:
            try:
                raw, stat = client.get_async(path).get(timeout=timeout)
            except NoNodeError:
                raw, stat = None, None
            except (KazooException, ZookeeperError, KazooTimeoutError) as exc:
                raise ComponentUnavailable("reading config key %r of %s from ZooKeeper at %s "
                                           "failed (%s): nothing was written; try again"
                                           % (key, appkey, self.zk.hosts, exc.__class__.__name__))
            old_text = None if stat is None else _znode_text(raw)
            result = {"appkey": appkey, "env": self.env, "key": key, "action": action,
                      "old": old_text, "new": text, "changed": False, "version": None}
            if text is None and stat is None:
                raise UnknownConfigKey("appkey %s has no config key %r in env %s: nothing to "
                                       "delete" % (appkey, key, self.env))
            if text == old_text:
                return result
            version = record(action, old_text, text, by)
            try:
                if text is None:
                    client.delete_async(path, version=stat.version).get(timeout=timeout)
                elif stat is None:
                    client.create_async(path, text.encode("utf-8"),
                                        makepath=True).get(timeout=timeout)
                else:
                    client.set_async(path, text.encode("utf-8"),
                                     version=stat.version).get(timeout=timeout)
            except (BadVersionError, NodeExistsError, NoNodeError):
                raise ConfigConflict("config key %r of %s (env %s) was changed at the same time "
                                     "by a writer outside probe: nothing was written; check "
                                     "`probe config get %s %s` and try again"
                                     % (key, appkey, self.env, appkey, key))
            except (KazooException, ZookeeperError, KazooTimeoutError) as exc:
                raise ComponentUnavailable("writing config key %r of %s to ZooKeeper at %s failed "
                                           "(%s): no history was recorded; check `probe config "
                                           "get %s %s` (a lost connection may still have applied "
                                           "it) and try again" % (key, appkey, self.zk.hosts,
                                                                  exc.__class__.__name__, appkey, key))
        result.update(changed=True, version=version)
        log.info("config %s/%s %s: %s by %s (version %d%s)", appkey, key, action,
                 "deleted" if text is None else "set", by, version, ", " + note if note else "")
        return result


def _znode_text(raw):
    """Znode data as text for history and comparison (untrusted: never fails)."""
    if raw is None:
        return None
    try:
        return parse_value(raw)[1]
    except InvalidConfigValue:
        return raw[:MAX_VALUE_BYTES].decode("utf-8", "replace")


def _history_entry(row):
    def value(text):
        if text is None:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return text  # not JSON (written outside probe): shown as it was
    return {"version": row["version"], "value": value(row["new_text"]),
            "changed_by": row["changed_by"], "changed_at": str(row["changed_at"]),
            "action": row["action"], "old_value": value(row["old_text"]),
            "deleted": row["new_text"] is None}


__all__ = ["Admin", "ProbeError"]
