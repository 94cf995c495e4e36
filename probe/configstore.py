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

import pymysql

from .appkeys import close_quietly
from .errors import ComponentUnavailable, ConfigConflict

log = logging.getLogger("probe.configstore")

LOCK_TIMEOUT = 10  # seconds a writer waits for another writer of the same key

# One change of a key: version, action, old_text, new_text, changed_by, changed_at.
HistoryRow = Dict[str, Any]
# record(action, old_text, new_text, by) -> the version it wrote.
Recorder = Callable[[str, Optional[str], Optional[str], str], int]


class ConfigHistory(object):
    """One MySQL connection (its own: a named lock belongs to a connection).

    :param connect: a callable returning a new PyMySQL connection
        (`AppkeyStore.connect`, so TLS and timeouts are configured in one place).
    :param address: how to name the server in errors.
    """

    def __init__(self, connect: Callable[[], Any], address: str) -> None:
        self._connect = connect
        self.address = address
        self._connection: Any = None

    def close(self) -> None:
        connection, self._connection = self._connection, None
        close_quietly(connection)

    def _cursor(self) -> Any:
        if self._connection is not None:
            try:
                self._connection.ping(reconnect=False)
            except pymysql.MySQLError:
                self.close()
        if self._connection is None:
            self._connection = self._connect()
        return self._connection.cursor()

    def _query(self, sql: str, args: Optional[Sequence[object]] = None) -> Any:
        try:
            with self._cursor() as cursor:
                cursor.execute(sql, args)
                return cursor.fetchall()
        except (pymysql.err.OperationalError, pymysql.err.InterfaceError) as exc:
            self.close()
            raise ComponentUnavailable("MySQL at %s failed: %s" % (self.address, exc))

    # -- writing ----------------------------------------------------------------------
    @contextlib.contextmanager
    def change(self, env: str, appkey: str, key: str) -> Iterator[Recorder]:
        """Hold the key's writer lock and an open transaction; yields `record(action,
        old_text, new_text, by) -> version`. The row commits when the block ends
        without an exception, and is rolled back otherwise."""
        name = "probe_cfg_" + hashlib.sha1(("%s/%s/%s" % (env, appkey, key)).encode()).hexdigest()
        rows = self._query("SELECT GET_LOCK(%s, %s)", (name, LOCK_TIMEOUT))
        if not rows or rows[0][0] != 1:
            raise ConfigConflict("another writer has held config key %r of %s (env %s) for %d s: "
                                 "nothing was written; try again" % (key, appkey, env, LOCK_TIMEOUT))
        connection = self._connection
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
        except (pymysql.err.OperationalError, pymysql.err.InterfaceError) as exc:
            self.close()
            raise ComponentUnavailable("MySQL at %s failed while recording the change of %r: %s"
                                       % (self.address, key, exc))
        finally:
            if self._connection is not None:
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
