"""Appkeys in MySQL (table `serviceapp`, appkey UNIQUE) and the governance audit log."""

import getpass
import logging
import os
from typing import Any, Dict, List, Optional

import pymysql

from .. import naming
from ..errors import ComponentUnavailable, UnknownAppkey
from ..naming import check_appkey
from ..options import check_number
from ..settings import MysqlSettings
from .mysql import MysqlAccess, close_quietly, mysql_tls_options  # noqa: F401 (re-exported)

log = logging.getLogger("probe.appkeys")

MAX_AUDIT_VALUE_LENGTH = 1024  # governance_audit.old_value / new_value
MAX_ACTION_LENGTH = 32         # governance_audit.action
_INSERT_AUDIT = ("INSERT INTO governance_audit (changed_by, env, appkey, service, node, action, "
                 "old_value, new_value) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)")


class AppkeyStore(object):
    """MySQL access for provider start and admin tools (never the call path).

    One connection per store (`probe.stores.mysql.MysqlAccess`: opened on first
    use, re-opened if the server dropped it): PyMySQL builds a TLS context on every
    connect (tens of ms), and an admin change needs several statements.

    :param mysql_settings: the config's `MysqlSettings`.
    :param timeout: connect timeout in seconds.
    """

    def __init__(self, mysql_settings: MysqlSettings, timeout: float = 3.0) -> None:
        self.settings = mysql_settings
        self.timeout = float(timeout)
        self.db = MysqlAccess(mysql_settings, self.timeout)

    @property
    def address(self) -> str:
        return self.db.address

    @property
    def _connection(self) -> Any:
        return self.db.connection

    def connect(self) -> Any:
        """A new PyMySQL connection, configured as every probe connection is."""
        return self.db.connect()

    def close(self) -> None:
        self.db.close()

    def _run(self, sql: str, args: Any = None, fetch: bool = False) -> Any:
        return self.db.execute(sql, args, fetch)

    def ensure_schema(self, force: bool = False) -> None:
        """Create probe's tables if missing (once per process and database)."""
        self.db.ensure_schema(force)

    def exists(self, appkey: str) -> bool:
        rows = self._run("SELECT 1 FROM serviceapp WHERE appkey = %s", (appkey,), fetch=True)
        return bool(rows)

    def require(self, appkey: str) -> None:
        """Raise UnknownAppkey unless `appkey` is registered (SchemaMissing if
        probe's tables are not there at all)."""
        if not self.exists(check_appkey(appkey)):
            raise UnknownAppkey("appkey %r is not registered in MySQL table serviceapp at %s: "
                                "add it with `probe appkey add %s`" % (appkey, self.address, appkey))

    def add(self, appkey: str, description: str = "", env: Optional[str] = None,
            by: Optional[str] = None) -> bool:
        """Register `appkey`; True if added, False if it was already there. With
        `env`, an audit row (action ``appkey add``, who: `by` or the OS user) is
        written in the same transaction: both land or neither."""
        check_appkey(appkey)
        description = naming.check_description(description)
        return self.db.with_schema(lambda: self._audited(
            "INSERT IGNORE INTO serviceapp (appkey, description) VALUES (%s, %s)",
            (appkey, description), env, appkey, "appkey add", None, description, by))

    def remove(self, appkey: str, env: Optional[str] = None, by: Optional[str] = None) -> bool:
        """Remove `appkey`; True if it was there. With `env`, audited as ``add``."""
        check_appkey(appkey)
        return self.db.with_schema(lambda: self._audited(
            "DELETE FROM serviceapp WHERE appkey = %s", (appkey,),
            env, appkey, "appkey remove", None, "", by))

    def _audited(self, statement: str, args: Any, env: Optional[str], appkey: str, action: str,
                 old_value: Optional[str], new_value: str, by: Optional[str]) -> bool:
        """Run `statement`; if it changed a row and `env` is given, insert the audit
        row in the same transaction. Returns whether a row changed."""
        row = None
        if env is not None:
            # An appkey change has no service or node: those columns stay empty.
            row = (naming.check_changed_by(by or current_user()), naming.check_env(env), appkey,
                   "", "", action, old_value, new_value)

        def work(cursor: Any) -> bool:
            connection: Any = self.db.connection  # open while `run` calls this
            connection.begin()
            try:
                changed = cursor.execute(statement, args) == 1
                if changed and row is not None:
                    cursor.execute(_INSERT_AUDIT, row)
                connection.commit()
            except BaseException:
                self.db.rollback_locked()
                raise
            return changed
        return self.db.run(work)

    def list(self) -> List[Dict[str, Any]]:
        rows = self.db.with_schema(lambda: self._run(
            "SELECT appkey, description, created_at FROM serviceapp ORDER BY appkey", fetch=True))
        return [{"appkey": r[0], "description": r[1], "created_at": str(r[2])} for r in rows]

    # -- audit --------------------------------------------------------------
    def begin_change(self, env: str, appkey: str, service: str, node: str, action: str,
                     old_value: object, new_value: object,
                     by: Optional[str] = None) -> "PendingChange":
        """Insert a change's audit row in an open transaction and return it as a
        `PendingChange`: `commit()` once the change is applied, `rollback()` if it
        was not. Inserting first means a MySQL that is down, a missing table or a
        value the columns cannot hold refuses the change before anything else is
        written. The store's connection is held (locked) until commit or rollback.
        """
        row = (naming.check_changed_by(by or current_user()), naming.check_env(env),
               check_appkey(appkey), naming.check_service_name(service),
               naming.check_text(node, "node", 300),
               naming.check_text(action, "action", MAX_ACTION_LENGTH),
               None if old_value is None else
               naming.check_text(str(old_value), "old value", MAX_AUDIT_VALUE_LENGTH),
               naming.check_text(str(new_value), "new value", MAX_AUDIT_VALUE_LENGTH))
        self.ensure_schema()
        self.db.lock.acquire()
        try:
            def work(cursor: Any) -> None:
                connection: Any = self.db.connection  # open while `run_locked` calls this
                connection.begin()
                cursor.execute(_INSERT_AUDIT, row)
            try:
                self.db.run_locked(work)
            except BaseException:
                self.db.rollback_locked()
                raise
        except BaseException:
            self.db.lock.release()
            raise
        return PendingChange(self.db)

    def audit(self, appkey: Optional[str] = None, limit: int = 100) -> List[Dict[str, Any]]:
        check_number("audit limit", limit, 1, maximum=100000, integer=True)
        sql = ("SELECT changed_at, changed_by, env, appkey, service, node, action, old_value, "
               "new_value FROM governance_audit")
        args: List[Any] = []
        if appkey:
            sql += " WHERE appkey = %s"
            args.append(check_appkey(appkey))
        sql += " ORDER BY id DESC LIMIT %s"
        args.append(limit)
        keys = ("changed_at", "changed_by", "env", "appkey", "service", "node", "action", "old", "new")
        rows = self.db.with_schema(lambda: self._run(sql, args, fetch=True))
        return [dict(zip(keys, (str(r[0]),) + tuple(r[1:]))) for r in rows]


class PendingChange(object):
    """An audit row inserted in an open transaction (see `AppkeyStore.begin_change`).
    Exactly one of `commit()` / `rollback()` must be called; both release the store."""

    def __init__(self, db: MysqlAccess) -> None:
        self._db = db
        self._open = True

    def commit(self) -> None:
        """Commit the row; ComponentUnavailable if MySQL failed meanwhile (the row
        is then not stored)."""
        db = self._db
        if not self._open:
            return
        self._open = False
        try:
            if db.connection is None:
                raise pymysql.err.InterfaceError("connection closed before the commit")
            db.connection.commit()
        except pymysql.MySQLError as exc:
            db.drop()
            raise ComponentUnavailable("MySQL at %s failed while committing an audit row: %s"
                                       % (db.address, exc))
        finally:
            db.lock.release()

    def rollback(self) -> None:
        db = self._db
        if not self._open:
            return
        self._open = False
        try:
            db.rollback_locked()
        finally:
            db.lock.release()


def current_user() -> str:
    try:
        name = getpass.getuser()
    except Exception:
        name = None
    if isinstance(name, str) and 0 < len(name) <= naming.MAX_CHANGED_BY_LENGTH and name.isprintable():
        return name
    return "uid-%d" % os.getuid()
