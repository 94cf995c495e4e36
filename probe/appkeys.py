"""Appkeys in MySQL (table `serviceapp`, appkey UNIQUE) and the governance audit log."""

import getpass
import logging
import os
import threading

import pymysql

from . import naming
from .errors import ComponentUnavailable, ProbeError, SchemaMissing, UnknownAppkey
from .naming import check_appkey

log = logging.getLogger("probe.appkeys")

SCHEMA_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "schema.sql")
MAX_AUDIT_VALUE_LENGTH = 1024  # governance_audit.old_value / new_value
MAX_ACTION_LENGTH = 32         # governance_audit.action
_INSERT_AUDIT = ("INSERT INTO governance_audit (changed_by, env, appkey, service, node, action, "
                 "old_value, new_value) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)")
_NO_SUCH_TABLE = 1146

# Databases whose schema this process has already created or checked, so the DDL
# runs once per process and database, not on every call.
_schema_ready = set()
_schema_lock = threading.Lock()


def mysql_tls_options(mysql_settings):
    """PyMySQL keyword arguments for `mysql.<env>.ssl`: an SSLContext that checks the
    server's certificate against `ca` and its name, with the client's own `cert` and
    `key` if given. Empty without `ssl` (PyMySQL's default then)."""
    tls = getattr(mysql_settings, "ssl", None)
    if not tls:
        return {}
    import ssl
    context = ssl.create_default_context(cafile=tls.ca)
    if tls.cert:
        context.load_cert_chain(tls.cert, tls.key)
    return {"ssl": context}


def close_quietly(connection):
    """Close a PyMySQL connection (or None) that may already be broken."""
    if connection is not None:
        try:
            connection.close()
        except Exception:  # already broken: nothing left to release
            pass


class AppkeyStore(object):
    """MySQL access for provider start and admin tools (never the call path).

    One connection per store, opened on first use and re-opened if the server
    dropped it: PyMySQL builds a TLS context on every connect (tens of ms), and an
    admin change needs several statements.

    :param mysql_settings: the config's `MysqlSettings`.
    :param timeout: connect timeout in seconds.
    """

    def __init__(self, mysql_settings, timeout=3.0):
        self.settings = mysql_settings
        self.timeout = float(timeout)
        self._connection = None
        self._lock = threading.Lock()

    @property
    def address(self):
        return "%s:%d/%s" % (self.settings.host, self.settings.port, self.settings.database)

    def connect(self):
        s = self.settings
        try:
            return pymysql.connect(host=s.host, port=s.port, user=s.username, password=s.password,
                                   database=s.database, connect_timeout=self.timeout,
                                   read_timeout=10, write_timeout=10, autocommit=True,
                                   charset="utf8mb4", **mysql_tls_options(s))
        except (pymysql.MySQLError, OSError) as exc:  # ssl.SSLError is an OSError
            raise ComponentUnavailable(
                "MySQL at %s is unreachable as user %r: %s (start it with `probe stack up` "
                "or fix the mysql section of the config)" % (self.address, s.username, exc))

    def _cursor_run(self, work):
        """Run `work(cursor)` on the store's connection, reconnecting once if the
        kept connection turns out to be dead."""
        with self._lock:
            return self._cursor_run_locked(work)

    def _cursor_run_locked(self, work):
        for attempt in (1, 2):
            if self._connection is None:
                self._connection = self.connect()
            try:
                with self._connection.cursor() as cursor:
                    return work(cursor)
            except (pymysql.err.OperationalError, pymysql.err.InterfaceError) as exc:
                self._close_locked()
                if attempt == 2:
                    raise ComponentUnavailable("MySQL at %s failed: %s" % (self.address, exc))
            except pymysql.err.ProgrammingError as exc:
                raise self._translate(exc)

    def _translate(self, exc):
        if exc.args and exc.args[0] == _NO_SUCH_TABLE:
            with _schema_lock:
                _schema_ready.discard(self._schema_key)
            return SchemaMissing("MySQL at %s has no probe tables (%s): create them with "
                                 "`probe appkey add <appkey>`, or run probe/config/schema.sql"
                                 % (self.address, exc.args[1] if len(exc.args) > 1 else exc))
        return exc

    def close(self):
        with self._lock:
            self._close_locked()

    def _close_locked(self):
        connection, self._connection = self._connection, None
        close_quietly(connection)

    def _run(self, sql, args=None, fetch=False):
        def work(cursor):
            cursor.execute(sql, args)
            return cursor.fetchall() if fetch else cursor.rowcount
        return self._cursor_run(work)

    @property
    def _schema_key(self):
        return (self.settings.host, self.settings.port, self.settings.database)

    def ensure_schema(self, force=False):
        """Create probe's tables if missing: once per process and database (the DDL
        is IF NOT EXISTS, but there is no need to send it on every call)."""
        with _schema_lock:
            if not force and self._schema_key in _schema_ready:
                return
        with open(SCHEMA_FILE, encoding="utf-8") as handle:
            statements = [s.strip() for s in handle.read().split(";")]
        bodies = ["\n".join(l for l in statement.splitlines() if not l.strip().startswith("--"))
                  for statement in statements]

        def work(cursor):
            for body in bodies:
                if body.strip():
                    cursor.execute(body)
        self._cursor_run(work)
        with _schema_lock:
            _schema_ready.add(self._schema_key)

    def _with_schema(self, call):
        """`call()` after making sure the tables exist; if they vanished since (a
        wiped database), create them once more and retry."""
        self.ensure_schema()
        try:
            return call()
        except SchemaMissing:
            self.ensure_schema(force=True)
            return call()

    def exists(self, appkey):
        rows = self._run("SELECT 1 FROM serviceapp WHERE appkey = %s", (appkey,), fetch=True)
        return bool(rows)

    def require(self, appkey):
        """Raise UnknownAppkey unless `appkey` is registered (SchemaMissing if
        probe's tables are not there at all)."""
        if not self.exists(check_appkey(appkey)):
            raise UnknownAppkey("appkey %r is not registered in MySQL table serviceapp at %s: "
                                "add it with `probe appkey add %s`" % (appkey, self.address, appkey))

    def add(self, appkey, description="", env=None, by=None):
        """Register `appkey`; True if added, False if it was already there. With
        `env`, an audit row (action ``appkey add``, who: `by` or the OS user) is
        written in the same transaction: both land or neither."""
        check_appkey(appkey)
        description = naming.check_description(description)
        return self._with_schema(lambda: self._audited(
            "INSERT IGNORE INTO serviceapp (appkey, description) VALUES (%s, %s)",
            (appkey, description), env, appkey, "appkey add", None, description, by))

    def remove(self, appkey, env=None, by=None):
        """Remove `appkey`; True if it was there. With `env`, audited as ``add``."""
        check_appkey(appkey)
        return self._with_schema(lambda: self._audited(
            "DELETE FROM serviceapp WHERE appkey = %s", (appkey,),
            env, appkey, "appkey remove", None, "", by))

    def _audited(self, statement, args, env, appkey, action, old_value, new_value, by):
        """Run `statement`; if it changed a row and `env` is given, insert the audit
        row in the same transaction. Returns whether a row changed."""
        row = None
        if env is not None:
            # An appkey change has no service or node: those columns stay empty.
            row = (naming.check_changed_by(by or current_user()), naming.check_env(env), appkey,
                   "", "", action, old_value, new_value)

        def work(cursor):
            self._connection.begin()
            try:
                changed = cursor.execute(statement, args) == 1
                if changed and row is not None:
                    cursor.execute(_INSERT_AUDIT, row)
                self._connection.commit()
            except BaseException:
                self._rollback_locked()
                raise
            return changed
        return self._cursor_run(work)

    def list(self):
        rows = self._with_schema(lambda: self._run(
            "SELECT appkey, description, created_at FROM serviceapp ORDER BY appkey", fetch=True))
        return [{"appkey": r[0], "description": r[1], "created_at": str(r[2])} for r in rows]

    # -- audit --------------------------------------------------------------
    def begin_change(self, env, appkey, service, node, action, old_value, new_value, by=None):
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
        self._lock.acquire()
        try:
            def work(cursor):
                self._connection.begin()
                cursor.execute(_INSERT_AUDIT, row)
            try:
                self._cursor_run_locked(work)
            except BaseException:
                self._rollback_locked()
                raise
        except BaseException:
            self._lock.release()
            raise
        return PendingChange(self)

    def _rollback_locked(self):
        if self._connection is not None:
            try:
                self._connection.rollback()
            except Exception:
                # A connection that cannot roll back is dropped: MySQL rolls the
                # transaction back when the connection goes.
                self._close_locked()

    def audit(self, appkey=None, limit=100):
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= 100000:
            raise ProbeError("bad audit limit %r: give a whole number from 1 to 100000" % (limit,))
        sql = ("SELECT changed_at, changed_by, env, appkey, service, node, action, old_value, "
               "new_value FROM governance_audit")
        args = []
        if appkey:
            sql += " WHERE appkey = %s"
            args.append(check_appkey(appkey))
        sql += " ORDER BY id DESC LIMIT %s"
        args.append(limit)
        keys = ("changed_at", "changed_by", "env", "appkey", "service", "node", "action", "old", "new")
        rows = self._with_schema(lambda: self._run(sql, args, fetch=True))
        return [dict(zip(keys, (str(r[0]),) + tuple(r[1:]))) for r in rows]


class PendingChange(object):
    """An audit row inserted in an open transaction (see `AppkeyStore.begin_change`).
    Exactly one of `commit()` / `rollback()` must be called; both release the store."""

    def __init__(self, store):
        self._store = store
        self._open = True

    def commit(self):
        """Commit the row; ComponentUnavailable if MySQL failed meanwhile (the row
        is then not stored)."""
        store = self._store
        if not self._open:
            return
        self._open = False
        try:
            if store._connection is None:
                raise pymysql.err.InterfaceError("connection closed before the commit")
            store._connection.commit()
        except pymysql.MySQLError as exc:
            store._close_locked()
            raise ComponentUnavailable("MySQL at %s failed while committing an audit row: %s"
                                       % (store.address, exc))
        finally:
            store._lock.release()

    def rollback(self):
        store = self._store
        if not self._open:
            return
        self._open = False
        try:
            store._rollback_locked()
        finally:
            store._lock.release()


def current_user():
    try:
        name = getpass.getuser()
    except Exception:
        name = None
    if isinstance(name, str) and 0 < len(name) <= naming.MAX_CHANGED_BY_LENGTH and name.isprintable():
        return name
    return "uid-%d" % os.getuid()
