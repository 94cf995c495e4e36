"""The one MySQL access policy of probe: how to connect (TLS, timeouts, utf8mb4,
autocommit), when to reconnect (a kept connection found dead is dropped and the
work run once more on a new one), and how errors read (an unreachable or failing
server is `ComponentUnavailable`, a missing probe table is `SchemaMissing`).

Appkeys and the audit log (`probe.stores.appkeys`), console users and sessions
(`probe.console.users`) and the config history (`probe.stores.confighistory`) each keep one
`MysqlAccess`, never the call path.
"""

import os
import threading
from typing import Any, Callable, Optional, Sequence, Set, Tuple, TypeVar

import pymysql

from ..errors import ComponentUnavailable, SchemaMissing
from ..settings import MysqlSettings

SCHEMA_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "config", "schema.sql")
NO_SUCH_TABLE = 1146  # MySQL/MariaDB error number of a missing table
READ_TIMEOUT_S = 10
WRITE_TIMEOUT_S = 10

# The errors of a connection that is gone (server restarted, idle timeout, network).
CONNECTION_ERRORS = (pymysql.err.OperationalError, pymysql.err.InterfaceError)

# Databases whose schema this process has already created or checked, so the DDL
# runs once per process and database, not on every call.
_schema_ready: Set[Tuple[str, int, str]] = set()
_schema_lock = threading.Lock()

T = TypeVar("T")


def mysql_tls_options(mysql_settings: MysqlSettings) -> dict:
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


def close_quietly(connection: Any) -> None:
    """Close a PyMySQL connection (or None) that may already be broken."""
    if connection is not None:
        try:
            connection.close()
        except Exception:  # already broken: nothing left to release
            pass


def _schema_statements() -> Sequence[str]:
    with open(SCHEMA_FILE, encoding="utf-8") as handle:
        statements = [s.strip() for s in handle.read().split(";")]
    bodies = ["\n".join(line for line in statement.splitlines()
                        if not line.strip().startswith("--")) for statement in statements]
    return [body for body in bodies if body.strip()]


class MysqlAccess(object):
    """One kept MySQL connection under the access policy, serialised by a lock.

    :param mysql_settings: the config's `MysqlSettings`.
    :param connect_timeout_s: seconds to wait for the server to answer a connect.

    Threading: `run` holds the (reentrant) lock for the whole unit of work; a caller
    that keeps a transaction open across calls takes `lock` itself and uses
    `run_locked`.
    """

    def __init__(self, mysql_settings: MysqlSettings, connect_timeout_s: float = 3.0) -> None:
        self.settings = mysql_settings
        self.connect_timeout_s = float(connect_timeout_s)
        self.connection: Optional[Any] = None
        self.lock = threading.RLock()

    @property
    def address(self) -> str:
        """host:port/database, for messages."""
        return "%s:%d/%s" % (self.settings.host, self.settings.port, self.settings.database)

    @property
    def schema_key(self) -> Tuple[str, int, str]:
        return (self.settings.host, self.settings.port, self.settings.database)

    def connect(self) -> Any:
        """A new PyMySQL connection (the caller owns it); ComponentUnavailable if the
        server cannot be reached or refuses the user."""
        s = self.settings
        try:
            return pymysql.connect(host=s.host, port=s.port, user=s.username, password=s.password,
                                   database=s.database, connect_timeout=self.connect_timeout_s,
                                   read_timeout=READ_TIMEOUT_S, write_timeout=WRITE_TIMEOUT_S,
                                   autocommit=True, charset="utf8mb4", **mysql_tls_options(s))
        except (pymysql.MySQLError, OSError) as exc:  # ssl.SSLError is an OSError
            raise ComponentUnavailable(
                "MySQL at %s is unreachable as user %r: %s (start it with `probe stack up` "
                "or fix the mysql section of the config)" % (self.address, s.username, exc))

    def run(self, work: Callable[[Any], T]) -> T:
        """`work(cursor)` on the kept connection, reconnecting once if it was dead."""
        with self.lock:
            return self.run_locked(work)

    def run_locked(self, work: Callable[[Any], T]) -> T:
        """`run` for a caller that already holds `lock`."""
        for attempt in (1, 2):
            if self.connection is None:
                self.connection = self.connect()
            try:
                with self.connection.cursor() as cursor:
                    return work(cursor)
            except CONNECTION_ERRORS as exc:
                self.drop()
                if attempt == 2:
                    raise ComponentUnavailable("MySQL at %s failed: %s" % (self.address, exc))
            except pymysql.err.ProgrammingError as exc:
                raise self.translate(exc)
        raise AssertionError("unreachable")

    def execute(self, sql: str, args: Any = None, fetch: bool = False) -> Any:
        """One statement: its rows with `fetch`, else the affected row count."""
        def work(cursor: Any) -> Any:
            cursor.execute(sql, args)
            return cursor.fetchall() if fetch else cursor.rowcount
        return self.run(work)

    def translate(self, exc: Exception) -> Exception:
        """The named error for a PyMySQL error (returned, for the caller to raise)."""
        if isinstance(exc, pymysql.err.ProgrammingError) and exc.args and exc.args[0] == NO_SUCH_TABLE:
            with _schema_lock:
                _schema_ready.discard(self.schema_key)
            return SchemaMissing("MySQL at %s has no probe tables (%s): create them with "
                                 "`probe appkey add <appkey>`, or run probe/config/schema.sql"
                                 % (self.address, exc.args[1] if len(exc.args) > 1 else exc))
        if isinstance(exc, CONNECTION_ERRORS):
            self.drop()
            return ComponentUnavailable("MySQL at %s failed: %s" % (self.address, exc))
        return exc

    def rollback_locked(self) -> None:
        """Roll the open transaction back; a connection that cannot is dropped (MySQL
        rolls back when the connection goes)."""
        if self.connection is not None:
            try:
                self.connection.rollback()
            except Exception:
                self.drop()

    def drop(self) -> None:
        """Forget the kept connection (closing it quietly)."""
        connection, self.connection = self.connection, None
        close_quietly(connection)

    def close(self) -> None:
        with self.lock:
            self.drop()

    # -- schema --------------------------------------------------------------------
    def ensure_schema(self, force: bool = False) -> None:
        """Create probe's tables if missing: once per process and database (the DDL
        is IF NOT EXISTS, but there is no need to send it on every call)."""
        with _schema_lock:
            if not force and self.schema_key in _schema_ready:
                return
        bodies = _schema_statements()

        def work(cursor: Any) -> None:
            for body in bodies:
                cursor.execute(body)
        self.run(work)
        with _schema_lock:
            _schema_ready.add(self.schema_key)

    def with_schema(self, call: Callable[[], T]) -> T:
        """`call()` after making sure the tables exist; if they vanished since (a
        wiped database), create them once more and retry."""
        self.ensure_schema()
        try:
            return call()
        except SchemaMissing:
            self.ensure_schema(force=True)
            return call()


__all__ = ["CONNECTION_ERRORS", "MysqlAccess", "close_quietly", "mysql_tls_options"]
