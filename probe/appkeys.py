"""Appkeys in MySQL (table `serviceapp`, appkey UNIQUE) and the governance audit log."""

import getpass
import logging
import os

import pymysql

from .errors import ComponentUnavailable, UnknownAppkey
from .naming import check_appkey

log = logging.getLogger("probe.appkeys")

SCHEMA_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "schema.sql")


class AppkeyStore(object):
    """Short-lived MySQL access: probe touches MySQL at provider start and from admin
    tools only, never on the call path, so each operation opens its own connection."""

    def __init__(self, mysql_settings, connect_timeout=3.0):
        self.settings = mysql_settings
        self.connect_timeout = connect_timeout

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

    def _run(self, sql, args=None, fetch=False):
        connection = self.connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql, args)
                return cursor.fetchall() if fetch else cursor.rowcount
        except pymysql.err.ProgrammingError as exc:
            if exc.args and exc.args[0] == 1146:  # table doesn't exist
                raise UnknownAppkey("MySQL at %s has no probe tables yet: run `probe appkey add "
                                    "<appkey>` (it creates the schema)" % self.address)
            raise
        finally:
            connection.close()

    def ensure_schema(self):
        with open(SCHEMA_FILE, encoding="utf-8") as handle:
            statements = [s.strip() for s in handle.read().split(";")]
        connection = self.connect()
        try:
            with connection.cursor() as cursor:
                for statement in statements:
                    body = "\n".join(l for l in statement.splitlines() if not l.strip().startswith("--"))
                    if body.strip():
                        cursor.execute(body)
        finally:
            connection.close()

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
