"""Console users and login sessions in MySQL (tables `console_users`, `console_sessions`).

Passwords are hashed with argon2id (argon2-cffi's defaults, RFC 9106 low-memory
profile). A session cookie is 32 random bytes; only its SHA-256 is stored, so the
table alone cannot be replayed. A session ends at its expiry, at logout, or when
its user is removed (every lookup joins the user, so a role change applies at once).
"""

import hashlib
import hmac
import logging
import re
import secrets
import time
from typing import Any, Optional, Tuple

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from ..errors import ProbeError
from ..settings import MysqlSettings
from ..stores.mysql import MysqlAccess

log = logging.getLogger("probe.console.users")

ROLES = ("viewer", "operator")
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024  # argon2 hashes any length; a bound keeps a login cheap
_USERNAME = re.compile(r"[A-Za-z0-9_.@\-]{1,64}", re.ASCII)
FLASH_LIMIT = 2000  # characters kept of a message shown after a redirect


class ConsoleUserError(ProbeError):
    """A console user name, password or role is not acceptable, or the user is unknown."""


def check_username(name: object) -> str:
    if not isinstance(name, str) or not _USERNAME.fullmatch(name):
        raise ConsoleUserError("bad user name %r: use 1-64 letters, digits, '_', '.', '@' or '-'"
                               % (name,))
    return name


def normalize_username(name: str) -> str:
    """The one identity of a user name: checked, then case-folded, so `Carol`, `CAROL`
    and `carol` are one user everywhere (MySQL's collation already matches them
    case-insensitively; the throttle and the sessions must agree with it)."""
    return check_username(name).casefold()


def check_role(role: object) -> str:
    if role not in ROLES:
        raise ConsoleUserError("bad role %r: use one of %s" % (role, ", ".join(ROLES)))
    return role


def check_password(password: object) -> str:
    if not isinstance(password, str) or len(password) < MIN_PASSWORD_LENGTH:
        raise ConsoleUserError("password too short: give at least %d characters" % MIN_PASSWORD_LENGTH)
    if len(password) > MAX_PASSWORD_LENGTH:
        raise ConsoleUserError("password too long: give at most %d characters" % MAX_PASSWORD_LENGTH)
    return password


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Session(object):
    """One logged-in browser: who, with which role, and the CSRF token of its forms."""

    __slots__ = ("token_hash", "username", "role", "csrf_token", "expires_at")

    def __init__(self, token_hash: str, username: str, role: Optional[str], csrf_token: str,
                 expires_at: int) -> None:
        self.token_hash = token_hash
        self.username = username
        self.role = role
        self.csrf_token = csrf_token
        self.expires_at = expires_at

    @property
    def can_change(self) -> bool:
        return self.role == "operator"

    def csrf_matches(self, presented: object) -> bool:
        return isinstance(presented, str) and bool(presented) and \
            hmac.compare_digest(presented.encode("utf-8", "replace"), self.csrf_token.encode("ascii"))


class UserStore(object):
    """Users and sessions over one MySQL connection, serialised by a lock (the console
    is small: a login or a page costs one or two statements)."""

    def __init__(self, mysql_settings: MysqlSettings, connect_timeout: float = 3.0) -> None:
        self._db = MysqlAccess(mysql_settings, connect_timeout)
        self._hasher = PasswordHasher()
        # Verified against when the user does not exist, so a login takes as long
        # for an unknown name as for a wrong password.
        self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))

    def ensure_schema(self) -> None:
        self._db.ensure_schema()

    def close(self) -> None:
        self._db.close()

    def _run(self, sql: str, args: Any = None, fetch: bool = False) -> Any:
        # Tables missing (a wiped database): created, then the statement runs again.
        return self._db.with_schema(lambda: self._db.execute(sql, args, fetch))

    # -- users --------------------------------------------------------------
    def add_user(self, username: str, password: str, role: str) -> bool:
        """Create a user or replace the password and role of an existing one.
        Returns True if the user is new."""
        username = normalize_username(username)
        check_role(role)
        check_password(password)
        self.ensure_schema()
        hashed = self._hasher.hash(password)
        changed = self._run("INSERT INTO console_users (username, password_hash, role) VALUES "
                            "(%s, %s, %s) ON DUPLICATE KEY UPDATE password_hash = VALUES(password_hash), "
                            "role = VALUES(role)", (username, hashed, role))
        if changed != 1:  # an existing user's password changed: their sessions end
            self._run("DELETE FROM console_sessions WHERE username = %s", (username,))
        return changed == 1

    def remove_user(self, username: str) -> bool:
        """Delete the user and end their sessions. True if the user existed."""
        username = normalize_username(username)
        self.ensure_schema()
        self._run("DELETE FROM console_sessions WHERE username = %s", (username,))
        return self._run("DELETE FROM console_users WHERE username = %s", (username,)) == 1

    def verify(self, username: object, password: object) -> Optional[str]:
        """The user's role if `password` is theirs, else None. Never says which part
        was wrong."""
        row = None
        if isinstance(username, str) and _USERNAME.fullmatch(username):
            username = username.casefold()
            rows = self._run("SELECT password_hash, role FROM console_users WHERE username = %s",
                             (username,), fetch=True)
            row = rows[0] if rows else None
        if not isinstance(password, str) or len(password) > MAX_PASSWORD_LENGTH:
            password = ""
        try:
            self._hasher.verify(row[0] if row else self._dummy_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        return row[1] if row else None

    # -- sessions -----------------------------------------------------------
    def create_session(self, username: str, ttl: float) -> Tuple[str, Session]:
        """A new session for `username` lasting `ttl` s: (cookie token, Session)."""
        username = normalize_username(username)
        now = int(time.time())
        self._run("DELETE FROM console_sessions WHERE expires_at < %s", (now,))
        token = secrets.token_urlsafe(32)
        session = Session(token_hash(token), username, None, secrets.token_urlsafe(32), now + int(ttl))
        self._run("INSERT INTO console_sessions (token_hash, username, csrf_token, created_at, "
                  "expires_at) VALUES (%s, %s, %s, %s, %s)",
                  (session.token_hash, username, session.csrf_token, now, session.expires_at))
        return token, session

    def session(self, token: object) -> Optional[Session]:
        """The live Session of a cookie token, or None (unknown, expired, user removed)."""
        if not isinstance(token, str) or not 20 <= len(token) <= 100:
            return None
        rows = self._run("SELECT s.token_hash, s.username, u.role, s.csrf_token, s.expires_at "
                         "FROM console_sessions s JOIN console_users u ON u.username = s.username "
                         "WHERE s.token_hash = %s AND s.expires_at >= %s",
                         (token_hash(token), int(time.time())), fetch=True)
        return Session(*rows[0]) if rows else None

    def end_session(self, session: Session) -> None:
        self._run("DELETE FROM console_sessions WHERE token_hash = %s", (session.token_hash,))

    def set_flash(self, session: Session, kind: str, text: str) -> None:
        """Keep one message for the session's next page (after a redirect)."""
        self._run("UPDATE console_sessions SET flash = %s WHERE token_hash = %s",
                  ("%s:%s" % (kind, text[:FLASH_LIMIT]), session.token_hash))

    def pop_flash(self, session: Session) -> Optional[Tuple[str, str]]:
        """(kind, text) of the kept message, or None; the message is shown once."""
        rows = self._run("SELECT flash FROM console_sessions WHERE token_hash = %s",
                         (session.token_hash,), fetch=True)
        if not rows or not rows[0][0]:
            return None
        self._run("UPDATE console_sessions SET flash = NULL WHERE token_hash = %s", (session.token_hash,))
        kind, _, text = rows[0][0].partition(":")
        return kind, text
