"""Governance operations, shared by the CLI and the web console.

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

import json
import logging

from kazoo.exceptions import (BadVersionError, KazooException, NodeExistsError, NoNodeError,
                              ZookeeperError)
from kazoo.handlers.threading import KazooTimeoutError

from . import naming, zkacl
from .appkeys import AppkeyStore, current_user
from .configcenter import MAX_VALUE_BYTES, canonical_text, parse_value
from .configstore import ConfigHistory
from .errors import (ComponentUnavailable, ConfigConflict, InvalidArgument, InvalidConfigValue,
                     NodeSettingsConflict, ProbeError, UnknownConfigKey, UnknownNode)
from .naming import NodeSettings
from .nodestore import NodeStore
from .registry import read_children_with_data, release_zookeeper, shared_zookeeper
from .settings import load_settings
from .stats import read_node_health

log = logging.getLogger("probe.admin")

DEFAULT_CONNECT_TIMEOUT_MS = 3000
_ZOOKEEPER_ERRORS = (KazooException, ZookeeperError, KazooTimeoutError)
_CAS_ATTEMPTS = 50


class Admin(object):
    """Operations for one config file and env. ZooKeeper is connected on first need.

    :param config_path: the config YAML (default: PROBE_CONFIG or the packaged one).
    :param env: the env name (default: PROBE_ENV or the hostname rules).
    :param connect_timeout: milliseconds to wait for MySQL, Redis and ZooKeeper.
    """

    def __init__(self, config_path=None, env=None, connect_timeout=DEFAULT_CONNECT_TIMEOUT_MS):
        if isinstance(connect_timeout, bool) or not isinstance(connect_timeout, (int, float)) \
                or not 0 < connect_timeout <= 600000:
            raise ProbeError("bad connect_timeout %r: give milliseconds from 1 to 600000, "
                             "e.g. 3000" % (connect_timeout,))
        self.settings = load_settings(config_path, env)
        self.env = self.settings.env
        self.connect_timeout = connect_timeout
        self._timeout = connect_timeout / 1000.0  # the stores and kazoo take seconds
        self._appkeys = None
        self._nodestore = None
        self._zk = None

    @property
    def appkeys(self):
        if self._appkeys is None:
            self._appkeys = AppkeyStore(self.settings.mysql, self._timeout)
        return self._appkeys

    @property
    def nodestore(self):
        if self._nodestore is None:
            self._nodestore = NodeStore(self.settings.redis, self.env, self._timeout)
        return self._nodestore

    @property
    def zk(self):
        if self._zk is None:
            self._zk = shared_zookeeper(self.settings.zookeeper, timeout=self._timeout)
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
    def add_appkey(self, appkey, description="", by=None):
        """Register `appkey` (True if added); recorded in the audit table as `by`."""
        naming.check_description(description)
        if by is not None:
            naming.check_changed_by(by)
        return self.appkeys.add(naming.check_appkey(appkey), description, env=self.env, by=by)

    def remove_appkey(self, appkey, by=None):
        """Remove `appkey` (True if it was there); recorded in the audit table as `by`."""
        if by is not None:
            naming.check_changed_by(by)
        return self.appkeys.remove(naming.check_appkey(appkey), env=self.env, by=by)

    def list_appkeys(self):
        return self.appkeys.list()

    # -- registry ACLs -------------------------------------------------------
    def secure_registry(self):
        """Migrate an open registry to `zkserver.<env>.auth`: give the roots `/services`
        and `/configs`, and every znode under `/services/<env>` and `/configs/<env>`,
        the ACL of `probe.zkacl.znode_acl` (that digest user ALL, world READ).
        Safe to repeat; live providers keep their nodes. Returns {tree: znodes changed}.

        :raises ProbeError: the config has no `zkserver.<env>.auth`.
        :raises ZooKeeperAuthFailed: a znode's ACL does not let these credentials
            change it.
        """
        auth = self.settings.zookeeper.auth
        if not auth:
            raise ProbeError("config %s has no 'zkserver.%s.auth': add auth: \"user:password\" "
                             "first, then run this again" % (self.settings.path, self.env))
        changed = {}
        try:
            for root in zkacl.PROTECTED_ROOTS:
                tree = "%s/%s" % (root, naming.check_env(self.env))
                changed[tree] = zkacl.secure_tree(self.zk.client, auth, tree)
                changed[root] = zkacl.secure_tree(self.zk.client, auth, root, recursive=False)
        except _ZOOKEEPER_ERRORS as exc:
            raise ComponentUnavailable("ZooKeeper at %s failed while setting ACLs (%s): run "
                                       "the command again" % (self.zk.hosts, exc.__class__.__name__))
        log.info("registry ACLs set for user %r: %s", zkacl.split_auth(auth)[0], changed)
        return changed

    # -- nodes ---------------------------------------------------------------
    def nodes(self, appkey, service=None):
        """Every node of `appkey` (and `service`) that is live or has stored settings:
        dicts with service, address, live, weight, valid, source and any mismatch,
        plus `ejected_by` (consumer processes that have the node ejected now) and
        `ejected_reasons` (why, as they report it)."""
        naming.check_appkey(appkey)
        if service is not None:
            naming.check_service_name(service)
        live = {}
        for name, (raw, stat) in read_children_with_data(self.zk, naming.appkey_path(self.env, appkey)).items():
            parsed = naming.parse_node_name(name)
            if parsed is None or (service and parsed.service != service):
                continue
            try:
                live[(parsed.service, parsed.ip, parsed.port)] = naming.parse_node_data(name, raw)
            except ValueError as exc:
                live[(parsed.service, parsed.ip, parsed.port)] = exc
        stored = {}
        for field, raw in self.nodestore.all(appkey).items():
            parsed = naming.parse_settings_field(field)
            if parsed is None or parsed.appkey != appkey or parsed.env != self.env \
                    or (service and parsed.service != service):
                continue
            try:
                kept = NodeSettings.from_json(raw)
            except ValueError as exc:
                kept = exc
            # The address is the field's; a copy naming another one is only noted.
            stored[(parsed.service, parsed.ip, parsed.port)] = kept
        rows = []
        for key in sorted(set(live) | set(stored), key=lambda k: (k[0], k[1], k[2])):
            svc, ip, port = key
            now_live, kept = live.get(key), stored.get(key)
            shown = now_live if isinstance(now_live, NodeSettings) else kept
            row = {"service": svc, "address": "%s:%d" % (ip, port), "live": key in live,
                   "weight": getattr(shown, "weight", None), "valid": getattr(shown, "valid", None),
                   "stored": isinstance(kept, NodeSettings), "problem": None}
            if isinstance(shown, NodeSettings):
                row["transport"], row["protocol"] = shown.dialect
            if isinstance(now_live, ValueError):
                row["problem"] = "unusable znode data, skipped by consumers: %s" % now_live
            elif isinstance(kept, ValueError):
                row["problem"] = "malformed Redis settings: %s" % kept
            elif isinstance(kept, NodeSettings) and (kept.host, kept.port) != (ip, port):
                row["problem"] = "Redis settings name another address (ignored): %s:%d" % (
                    naming.describe_data(kept.host, 40), kept.port)
            elif isinstance(now_live, NodeSettings) and isinstance(kept, NodeSettings) and \
                    (now_live.weight, now_live.valid) != (kept.weight, kept.valid):
                row["problem"] = "live differs from Redis (weight %s/%s valid %s/%s)" % (
                    now_live.weight, kept.weight, now_live.valid, kept.valid)
            rows.append(row)
        # Node health as consumers see it (their stats flushes report ejected nodes).
        ejected = read_node_health(self.nodestore.redis, self.env, appkey)
        for row in rows:
            reasons = ejected.get((row["service"], row["address"]), [])
            row["ejected_by"] = len(reasons)
            row["ejected_reasons"] = sorted(set(reasons))
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
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10000:
            raise InvalidArgument("bad audit limit %r: give a whole number 1..10000" % (limit,))
        return self.appkeys.audit(appkey, limit)

    def _change(self, appkey, service, address, key, value, create, by):
        """Validate everything, then audit row (open) → Redis → live znode → commit."""
        naming.check_appkey(appkey)
        naming.check_service_name(service)
        ip, port = naming.parse_address(address)
        if by is not None:
            naming.check_changed_by(by)
        field = naming.settings_field(appkey, self.env, service, ip, port)
        path = naming.node_path(self.env, appkey, service, ip, port)
        name = naming.node_name(service, ip, port)
        node = "%s:%d" % (ip, port)
        self.appkeys.require(appkey)
        try:
            live_raw, _ = self.zk.client.get(path)
        except NoNodeError:
            live_raw = None
        except _ZOOKEEPER_ERRORS as exc:
            raise ComponentUnavailable("ZooKeeper at %s failed reading %s: %s; nothing was "
                                       "changed" % (self.zk.hosts, path, exc.__class__.__name__))
        for _ in range(_CAS_ATTEMPTS):
            stored_raw = self.nodestore.get_raw(field)
            if stored_raw is None and live_raw is None and not create:
                raise UnknownNode("no node %s of %s/%s in env %s: it is neither registered in "
                                  "ZooKeeper nor stored in Redis (check `probe nodes %s`, or pass "
                                  "--create to store settings for a node that will start later)"
                                  % (node, appkey, service, self.env, appkey))
            base = _parse_or_none(lambda: NodeSettings.from_json(stored_raw)) \
                if stored_raw is not None else None
            if base is None and live_raw is not None:
                base = _parse_or_none(lambda: naming.parse_node_data(name, live_raw))
            # The address is the node's identity, never taken from stored data.
            base = (base or NodeSettings(ip, port))._replace(host=ip, port=port)
            old_value = getattr(base, key)
            updated = base._replace(**{key: value})
            pending = self.appkeys.begin_change(self.env, appkey, service, node, key,
                                                old_value, value, by)
            try:
                swapped = self.nodestore.compare_and_set(field, stored_raw, updated.to_json())
            except BaseException:
                pending.rollback()
                raise
            if not swapped:
                pending.rollback()  # another edit got in between: read again
                continue
            live_error = None
            try:
                applied_live = self._update_live(path, name, field, key, value)
            except (ProbeError,) + _ZOOKEEPER_ERRORS as exc:
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
                % (key, value, node, self.zk.hosts, live_error.__class__.__name__))
        return {"appkey": appkey, "service": service, "address": node,
                "key": key, "old": old_value, "new": value, "live": applied_live,
                "settings": updated._asdict()}

    def _update_live(self, path, name, field, key, value, attempts=20):
        """Bring a live znode's weight and switch in line with Redis, version-checked.
        False if the node is not registered (the change then waits in Redis).

        Redis is read after the znode: whichever edit wrote the znode version read
        here had already written Redis, so the znode never goes back to an older
        value when two edits race (each sets only data that Redis already holds).
        """
        client = self.zk.client
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
            durable = _parse_or_none(lambda: self.nodestore.get(field))
            if durable is not None:
                target = current._replace(weight=durable.weight, valid=durable.valid)
            else:
                target = current._replace(**{key: value})
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

    def _undo(self, field, written, before, path, name, key, old_value):
        """Take back a change whose audit row could not be committed: the Redis
        field goes back to `before` if it still holds `written`, and the live node
        follows Redis again."""
        try:
            if not self.nodestore.compare_and_set(field, written, before):
                log.error("undoing %s: Redis field %s changed meanwhile; left as it is", key, field)
            self._update_live(path, name, field, key, old_value)
        except (ProbeError,) + _ZOOKEEPER_ERRORS:
            log.error("undoing %s of %s failed: Redis or ZooKeeper may hold the change without "
                      "an audit row", key, field, exc_info=True)

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
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10000:
            raise InvalidArgument("bad history limit %r: give a whole number 1..10000" % (limit,))
        self.appkeys.require(appkey)
        return [_history_entry(row) for row in
                self._config_store().history(self.env, appkey, key, limit)]

    def rollback_config(self, appkey, key, version, by=None):
        """Write the value of history `version` of `key` as a new change (a version that
        recorded a deletion deletes the key)."""
        naming.check_appkey(appkey)
        naming.check_config_key(key)
        if isinstance(version, str) and version.strip().isascii() and version.strip().isdigit():
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
        by = naming.check_changed_by(by or current_user())
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
        by = naming.check_changed_by(by or current_user())
        self.appkeys.require(appkey)
        path = naming.config_key_path(self.env, appkey, key)
        client = self.zk.client
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


def _parse_or_none(read):
    """`read()`, or None when the data it parses is malformed."""
    try:
        return read()
    except ValueError:
        return None


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
