"""Appkeys in MySQL (table `serviceapp`, appkey UNIQUE) and the governance audit log."""

import getpass
import logging
import os
import threading

import pymysql

from .errors import ComponentUnavailable, UnknownAppkey
from .naming import check_appkey

log = logging.getLogger("probe.appkeys")

SCHEMA_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "schema.sql")


class AppkeyStore(object):
    """MySQL access for provider start and admin tools (never the call path).

    One connection per store, opened on first use and re-opened if the server
    dropped it: PyMySQL builds a TLS context on every connect (tens of ms), and an
    admin change needs several statements.
    """

    def __init__(self, mysql_settings, connect_timeout=3.0):
        self.settings = mysql_settings
        self.connect_timeout = connect_timeout
        self._connection = None
        self._lock = threading.Lock()

    @property
    def address(self):
        return "%s:%d/%s" % (self.settings.host, self.settings.port, self.settings.database)

    def connect(self):
        s = self.settings
        try:
            return pymysql.connect(host=s.host, port=s.port, user=s.username, password=s.password,
                                   database=s.database, connect_timeout=self.connect_timeout,
                                   read_timeout=10, write_timeout=10, autocommit=True,
                                   charset="utf8mb4")
        except pymysql.MySQLError as exc:
            raise ComponentUnavailable(
                "MySQL at %s is unreachable as user %r: %s (start it with `probe stack up` "
                "or fix the mysql section of the config)" % (self.address, s.username, exc))

    def _cursor_run(self, work):
        """Run `work(cursor)` on the store's connection, reconnecting once if the
        kept connection turns out to be dead."""
        with self._lock:
            for attempt in (1, 2):
                if self._connection is None:
                    self._connection = self.connect()
                try:
                    with self._connection.cursor() as cursor:
                        return work(cursor)
                except (pymysql.err.OperationalError, pymysql.err.InterfaceError) as exc:
                    self.close()
                    if attempt == 2:
                        raise ComponentUnavailable("MySQL at %s failed: %s" % (self.address, exc))

    def close(self):
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()
            except Exception:  # already broken: nothing left to release
                pass

    def _run(self, sql, args=None, fetch=False):
        def work(cursor):
            cursor.execute(sql, args)
            return cursor.fetchall() if fetch else cursor.rowcount
        try:
            return self._cursor_run(work)
        except pymysql.err.ProgrammingError as exc:
            if exc.args and exc.args[0] == 1146:  # table doesn't exist
                raise UnknownAppkey("MySQL at %s has no probe tables yet: run `probe appkey add "
                                    "<appkey>` (it creates the schema)" % self.address)
            raise

    def ensure_schema(self):
        with open(SCHEMA_FILE, encoding="utf-8") as handle:
            statements = [s.strip() for s in handle.read().split(";")]
        bodies = ["\n".join(l for l in statement.splitlines() if not l.strip().startswith("--"))
                  for statement in statements]

        def work(cursor):
            for body in bodies:
                if body.strip():
                    cursor.execute(body)
        self._cursor_run(work)

    def exists(self, appkey):
        rows = self._run("SELECT 1 FROM serviceapp WHERE appkey = %s", (appkey,), fetch=True)
        return bool(rows)

    def require(self, appkey):
        """Raise UnknownAppkey unless `appkey` is registered."""
        if not self.exists(appkey):
            raise UnknownAppkey("appkey %r is not registered in MySQL table serviceapp at %s: "
                                "add it with `probe appkey add %s`" % (appkey, self.address, appkey))

    def add(self, appkey, description=""):
        """Register `appkey`; True if added, False if it was already there."""
        check_appkey(appkey)
        self.ensure_schema()
        return self._run("INSERT IGNORE INTO serviceapp (appkey, description) VALUES (%s, %s)",
                         (appkey, description or "")) == 1

    def remove(self, appkey):
        check_appkey(appkey)
        self.ensure_schema()
        return self._run("DELETE FROM serviceapp WHERE appkey = %s", (appkey,)) == 1

    def list(self):
        self.ensure_schema()
        rows = self._run("SELECT appkey, description, created_at FROM serviceapp ORDER BY appkey",
                         fetch=True)
        return [{"appkey": r[0], "description": r[1], "created_at": str(r[2])} for r in rows]

    # -- audit --------------------------------------------------------------
    def record_change(self, env, appkey, service, node, action, old_value, new_value, by=None):
        self._run("INSERT INTO governance_audit (changed_by, env, appkey, service, node, action, "
                  "old_value, new_value) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                  (by or current_user(), env, appkey, service, node, action, old_value, new_value))

    def audit(self, appkey=None, limit=100):
        self.ensure_schema()
        sql = ("SELECT changed_at, changed_by, env, appkey, service, node, action, old_value, "
               "new_value FROM governance_audit")
        args = []
        if appkey:
            sql += " WHERE appkey = %s"
            args.append(appkey)
        sql += " ORDER BY id DESC LIMIT %s"
        args.append(int(limit))
        keys = ("changed_at", "changed_by", "env", "appkey", "service", "node", "action", "old", "new")
        return [dict(zip(keys, (str(r[0]),) + tuple(r[1:])))
                for r in self._run(sql, args, fetch=True)]


def current_user():
    try:
        return getpass.getuser()
    except Exception:
        return "uid-%d" % os.getuid()
