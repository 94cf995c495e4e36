"""The config center's history in MySQL (table `config_history`): every change of a
config key with its version, old and new value, who and when. It is the durable
copy of the config: a ZooKeeper rebuilt from scratch is refilled from it.

Writers of one key are serialized by a MySQL named lock (GET_LOCK), held while the
znode is written, so versions follow the order of the znode writes.
"""

import contextlib
import hashlib
import logging
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from ..errors import ComponentUnavailable, ConfigConflict
from ..settings import MysqlSettings
from .mysql import CONNECTION_ERRORS, MysqlAccess

log = logging.getLogger("probe.configstore")

LOCK_TIMEOUT = 10  # seconds a writer waits for another writer of the same key

# One change of a key: version, action, old_text, new_text, changed_by, changed_at.
HistoryRow = Dict[str, Any]
# record(action, old_text, new_text, by) -> the version it wrote.
Recorder = Callable[[str, Optional[str], Optional[str], str], int]


class ConfigHistory(object):
    """One MySQL connection of its own (a named lock belongs to a connection), under
    probe's MySQL access policy (`probe.stores.mysql.MysqlAccess`).

    :param mysql_settings: the config's `MysqlSettings`.
    :param connect_timeout_s: seconds to wait for the server to answer a connect.
    """

    def __init__(self, mysql_settings: MysqlSettings, connect_timeout_s: float = 3.0) -> None:
        self.db = MysqlAccess(mysql_settings, connect_timeout_s)
        self.address = self.db.address

    def close(self) -> None:
        self.db.close()

    def _query(self, sql: str, args: Optional[Sequence[object]] = None) -> Any:
        return self.db.execute(sql, args, fetch=True)

    # -- writing ----------------------------------------------------------------------
    @contextlib.contextmanager
    def change(self, env: str, appkey: str, key: str) -> Iterator[Recorder]:
        """Hold the key's writer lock and an open transaction; yields `record(action,
        old_text, new_text, by) -> version`. The row commits when the block ends
        without an exception, and is rolled back otherwise."""
        name = "probe_cfg_" + hashlib.sha1(("%s/%s/%s" % (env, appkey, key)).encode()).hexdigest()
        # One change at a time on this connection: its transaction is the change's.
        with self.db.lock:
            with self._locked_change(name, env, appkey, key) as record:
                yield record

    @contextlib.contextmanager
    def _locked_change(self, name: str, env: str, appkey: str, key: str) -> Iterator[Recorder]:
        rows = self._query("SELECT GET_LOCK(%s, %s)", (name, LOCK_TIMEOUT))
        if not rows or rows[0][0] != 1:
            raise ConfigConflict("another writer has held config key %r of %s (env %s) for %d s: "
                                 "nothing was written; try again" % (key, appkey, env, LOCK_TIMEOUT))
        connection = self.db.connection
        if connection is None:  # cannot happen after GET_LOCK answered; never half-record
            raise ComponentUnavailable("MySQL at %s dropped the connection holding the lock of "
                                       "%r: nothing was written; try again" % (self.address, key))
        try:
            connection.begin()

            def record(action: str, old_text: Optional[str], new_text: Optional[str],
                       by: str) -> int:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT COALESCE(MAX(version), 0) FROM config_history WHERE "
                                   "env = %s AND appkey = %s AND config_key = %s",
                                   (env, appkey, key))
                    version = int(cursor.fetchone()[0]) + 1
                    cursor.execute("INSERT INTO config_history (env, appkey, config_key, version, "
                                   "action, old_value, new_value, changed_by) VALUES "
                                   "(%s, %s, %s, %s, %s, %s, %s, %s)",
                                   (env, appkey, key, version, action, old_text, new_text, by))
                return version
            try:
                yield record
            except BaseException:
                connection.rollback()
                raise
            connection.commit()
        except CONNECTION_ERRORS as exc:
            self.db.drop()
            raise ComponentUnavailable("MySQL at %s failed while recording the change of %r: %s"
                                       % (self.address, key, exc))
        finally:
            if self.db.connection is not None:
                try:
                    self._query("SELECT RELEASE_LOCK(%s)", (name,))
                except ComponentUnavailable:
                    pass  # the lock went with the connection

    # -- reading ------------------------------------------------------------------------
    def history(self, env: str, appkey: str, key: str, limit: int = 100) -> List[HistoryRow]:
        rows = self._query("SELECT version, action, old_value, new_value, changed_by, changed_at "
                           "FROM config_history WHERE env = %s AND appkey = %s AND config_key = %s "
                           "ORDER BY version DESC LIMIT %s", (env, appkey, key, int(limit)))
        return [_row(r) for r in rows]

    def version(self, env: str, appkey: str, key: str, version: int) -> Optional[HistoryRow]:
        rows = self._query("SELECT version, action, old_value, new_value, changed_by, changed_at "
                           "FROM config_history WHERE env = %s AND appkey = %s AND config_key = %s "
                           "AND version = %s", (env, appkey, key, int(version)))
        return _row(rows[0]) if rows else None

    def latest(self, env: str, appkey: str) -> Dict[str, HistoryRow]:
        """{key: newest row} of every key the appkey ever had (deleted ones included)."""
        rows = self._query(
            "SELECT h.config_key, h.version, h.action, h.old_value, h.new_value, h.changed_by, "
            "h.changed_at FROM config_history h JOIN (SELECT config_key, MAX(version) AS v FROM "
            "config_history WHERE env = %s AND appkey = %s GROUP BY config_key) m "
            "ON h.config_key = m.config_key AND h.version = m.v "
            "WHERE h.env = %s AND h.appkey = %s", (env, appkey, env, appkey))
        return {r[0]: _row(r[1:]) for r in rows}


def _row(r: Sequence[Any]) -> HistoryRow:
    version, action, old_text, new_text, by, at = r
    return {"version": int(version), "action": action, "old_text": old_text,
            "new_text": new_text, "changed_by": by, "changed_at": at}
