"""Governance of the config center: set, read, list, delete, roll back and restore
an appkey's config keys.

Keys are persistent znodes /configs/<env>/<appkey>/<key> (data: the value as JSON);
MySQL table config_history keeps every change and is the durable copy. A write is a
compare-and-set of the key's znode under the key's MySQL writer lock, recorded in
history in the same step (rolled back if the znode write fails).
"""

import json
import logging
from typing import Any, Dict, List, Optional, Union

from kazoo.exceptions import BadVersionError, NodeExistsError, NoNodeError

from .. import naming
from ..stores.appkeys import current_user
from ..configcenter.values import MAX_VALUE_BYTES, canonical_text, parse_value
from ..errors import (ComponentUnavailable, ConfigConflict, InvalidArgument, InvalidConfigValue,
                      UnknownConfigKey)
from ..options import check_number
from ..zk.session import read_children_with_data
from .backends import MAX_ROWS, Backends
from .nodes import ZOOKEEPER_ERRORS
from .results import ConfigChange, ConfigRestore, ConfigVersion

log = logging.getLogger("probe.admin")

BATCH_BYTES = 512 * 1024  # data per ZooKeeper transaction when restoring keys


class ConfigOps(object):
    """Config keys of appkeys over shared `Backends`."""

    def __init__(self, backends: Backends) -> None:
        self.backends = backends

    @property
    def env(self) -> str:
        return self.backends.env

    def _require(self, appkey: str, key: Optional[str] = None) -> None:
        naming.check_appkey(appkey)
        if key is not None:
            naming.check_config_key(key)

    def set(self, appkey: str, key: str, value: Any, by: Optional[str] = None) -> ConfigChange:
        """Set config `key` of `appkey` to the JSON-serializable `value`."""
        self._require(appkey, key)
        return self._write(appkey, key, canonical_text(value), "set", by)

    def set_json(self, appkey: str, key: str, text: Union[str, bytes],
                 by: Optional[str] = None) -> ConfigChange:
        """Set config `key` of `appkey` to the value written as JSON `text`."""
        self._require(appkey, key)
        return self._write(appkey, key, parse_value(text)[1], "set", by)

    def get(self, appkey: str, key: str) -> Any:
        """The value of config `key`; UnknownConfigKey when it is not set."""
        self._require(appkey, key)
        self.backends.appkeys.require(appkey)
        try:
            raw, _ = self.backends.zk.client.get(naming.config_key_path(self.env, appkey, key))
        except NoNodeError:
            raise UnknownConfigKey("appkey %s has no config key %r in env %s (see `probe config "
                                   "list %s`)" % (appkey, key, self.env, appkey))
        return parse_value(raw)[0]

    def list(self, appkey: str) -> Dict[str, Any]:
        """{key: value} of every config key of `appkey` (a malformed znode shows as
        {"malformed": reason})."""
        self._require(appkey)
        self.backends.appkeys.require(appkey)
        result = {}
        parent = naming.config_appkey_path(self.env, appkey)
        for name, (raw, _) in sorted(read_children_with_data(self.backends.zk, parent).items()):
            if naming.is_config_key(name):
                try:
                    result[name] = parse_value(raw)[0]
                except InvalidConfigValue as exc:
                    result[name] = {"malformed": str(exc)}
        return result

    def delete(self, appkey: str, key: str, by: Optional[str] = None) -> ConfigChange:
        self._require(appkey, key)
        return self._write(appkey, key, None, "delete", by)

    def history(self, appkey: str, key: str, limit: int = 100) -> List[ConfigVersion]:
        """The changes of config `key`, newest first."""
        self._require(appkey, key)
        check_number("history limit", limit, 1, integer=True, error=InvalidArgument)
        self.backends.appkeys.require(appkey)
        return [_history_entry(row) for row in self.backends.config_history.history(
            self.env, appkey, key, min(limit, MAX_ROWS))]

    def rollback(self, appkey: str, key: str, version: Any, by: Optional[str] = None) -> ConfigChange:
        """Write the value of history `version` of `key` as a new change (a version that
        recorded a deletion deletes the key)."""
        self._require(appkey, key)
        if isinstance(version, str) and version.strip().isascii() and version.strip().isdigit():
            version = int(version)
        version = check_number("version", version, 1, integer=True, error=_BadVersion(appkey, key))
        self.backends.appkeys.require(appkey)
        row = self.backends.config_history.version(self.env, appkey, key, version)
        if row is None:
            raise UnknownConfigKey("config key %r of %s (env %s) has no version %d: see `probe "
                                   "config history %s %s`" % (key, appkey, self.env, version,
                                                                appkey, key))
        return self._write(appkey, key, row["new_text"], "rollback", by,
                           note="rollback to version %d" % version)

    def restore(self, appkey: str, by: Optional[str] = None) -> ConfigRestore:
        """Write back, from MySQL history, every key whose znode is missing (ZooKeeper
        rebuilt from scratch or the znodes deleted by hand). Keys present in ZooKeeper
        are left alone, even when they differ from history (they are listed)."""
        self._require(appkey)
        by = naming.check_changed_by(by or current_user())
        self.backends.appkeys.require(appkey)
        store = self.backends.config_history
        wanted = {key: row["new_text"] for key, row in store.latest(self.env, appkey).items()
                  if row["new_text"] is not None and naming.is_config_key(key)}
        parent = naming.config_appkey_path(self.env, appkey)
        client = self.backends.zk.client
        live = read_children_with_data(self.backends.zk, parent)
        missing = sorted(key for key in wanted if key not in live)
        differs = sorted(key for key in wanted if key in live and
                         _znode_text(live[key][0]) != wanted[key])
        if missing:
            client.ensure_path(parent.rsplit("/", 1)[0])
            self._create_znodes(parent, missing, wanted, client.exists(parent) is None)
            for key in missing:
                with store.change(self.env, appkey, key) as record:
                    record("restore", None, wanted[key], by)
        log.info("config of %s/%s restored from MySQL: %d key(s) written back, %d differ from "
                 "history", self.env, appkey, len(missing), len(differs))
        return ConfigRestore(appkey=appkey, env=self.env, restored=missing, differs=differs,
                             unchanged=sorted(set(wanted) - set(missing) - set(differs)))

    def _create_znodes(self, parent: str, keys: List[str], texts: Dict[str, str],
                       with_parent: bool) -> None:
        """Create the keys' znodes in as few ZooKeeper transactions as fit, so a
        watching process sees the config come back whole, not key by key."""
        client = self.backends.zk.client
        batch: List[str] = []
        batches = []
        size = 0
        for key in keys:
            length = len(texts[key].encode("utf-8")) + len(key) + 64
            if batch and size + length > BATCH_BYTES:
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

    def _write(self, appkey: str, key: str, text: Optional[str], action: str,
               by: Optional[str], note: Optional[str] = None) -> ConfigChange:
        """Compare-and-set one key's znode under the key's writer lock, recording the
        change in MySQL in the same step (rolled back if the znode write fails)."""
        by = naming.check_changed_by(by or current_user())
        self.backends.appkeys.require(appkey)
        path = naming.config_key_path(self.env, appkey, key)
        zk = self.backends.zk
        client = zk.client
        # Bounded waits: the key's MySQL lock is held meanwhile.
        timeout = 2 * zk.session_timeout
        with self.backends.config_history.change(self.env, appkey, key) as record:
            try:
                raw, stat = client.get_async(path).get(timeout=timeout)
            except NoNodeError:
                raw, stat = None, None
            except ZOOKEEPER_ERRORS as exc:
                raise ComponentUnavailable("reading config key %r of %s from ZooKeeper at %s "
                                           "failed (%s): nothing was written; try again"
                                           % (key, appkey, zk.hosts, exc.__class__.__name__))
            old_text = None if stat is None else _znode_text(raw)
            if text is None and stat is None:
                raise UnknownConfigKey("appkey %s has no config key %r in env %s: nothing to "
                                       "delete" % (appkey, key, self.env))
            if text == old_text:
                return ConfigChange(appkey=appkey, env=self.env, key=key, action=action,
                                    old=old_text, new=text, changed=False, version=None)
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
            except ZOOKEEPER_ERRORS as exc:
                raise ComponentUnavailable("writing config key %r of %s to ZooKeeper at %s failed "
                                           "(%s): no history was recorded; check `probe config "
                                           "get %s %s` (a lost connection may still have applied "
                                           "it) and try again" % (key, appkey, zk.hosts,
                                                                  exc.__class__.__name__, appkey, key))
        log.info("config %s/%s %s: %s by %s (version %d%s)", appkey, key, action,
                 "deleted" if text is None else "set", by, version, ", " + note if note else "")
        return ConfigChange(appkey=appkey, env=self.env, key=key, action=action, old=old_text,
                            new=text, changed=True, version=version)


def _BadVersion(appkey: str, key: str) -> Any:
    """An UnknownConfigKey factory whose message points at the key's history."""
    def make(message: str) -> UnknownConfigKey:
        return UnknownConfigKey("%s, a version number from `probe config history %s %s`"
                                % (message, appkey, key))
    return make


def _znode_text(raw: Optional[bytes]) -> Optional[str]:
    """Znode data as text for history and comparison (untrusted: never fails)."""
    if raw is None:
        return None
    try:
        return parse_value(raw)[1]
    except InvalidConfigValue:
        return raw[:MAX_VALUE_BYTES].decode("utf-8", "replace")


def _history_entry(row: Dict[str, Any]) -> ConfigVersion:
    def value(text: Optional[str]) -> Any:
        if text is None:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return text  # not JSON (written outside probe): shown as it was
    return ConfigVersion(version=row["version"], value=value(row["new_text"]),
                         changed_by=row["changed_by"], changed_at=str(row["changed_at"]),
                         action=row["action"], old_value=value(row["old_text"]),
                         deleted=row["new_text"] is None)


__all__ = ["ConfigOps"]
