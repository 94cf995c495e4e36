"""Login throttling: failed logins limited per user name and per client address.

Both tables are bounded (least recently touched entries are dropped first), so a
flood of made-up names or addresses costs a fixed amount of memory. The state is
per console process: a restart forgets it.
"""

import threading
import time
from collections import OrderedDict
from typing import Dict, List, Optional
from urllib.parse import urlsplit

MAX_NEXT_LENGTH = 1024


def throttle_key(username: str) -> str:
    """The name a login is throttled on: case-folded, as users are stored, so case
    variants of a locked name share its count."""
    return username.casefold() if isinstance(username, str) else ""


def same_site_path(target: object) -> Optional[str]:
    """`target` if it is a path on this site to go to after login, else None.

    Refused: anything not starting with one `/`, scheme-relative forms (`//host`),
    backslashes (browsers read them as `/`), and every control character or space
    (browsers drop tabs and newlines, so a tab between two slashes would become `//host`).
    """
    if not isinstance(target, str) or not target.startswith("/") or len(target) > MAX_NEXT_LENGTH:
        return None
    if target.startswith("//") or "\\" in target:
        return None
    if any(ord(char) <= 0x20 or 0x7f <= ord(char) <= 0x9f for char in target):
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not parts.path.startswith("/") or parts.path.startswith("//"):
        return None
    return target


class _Window(object):
    """Failures of one key within a fixed window that starts at its first failure."""

    __slots__ = ("started", "count")

    def __init__(self, started: float) -> None:
        self.started = started
        self.count = 0


class LoginThrottle(object):
    """Refuse logins for a name or an address after too many recent failures.

    :param per_user: failures a user name may have within `window` s
    :param per_address: failures one client address may have within `window` s
    :param window: seconds; a key is free again `window` s after its first failure
    :param max_entries: keys remembered per table (the oldest are forgotten)
    """

    def __init__(self, per_user: int = 5, per_address: int = 20, window: float = 300.0,
                 max_entries: int = 10000) -> None:
        self.limits = {"user": int(per_user), "address": int(per_address)}
        self.window = float(window)
        self.max_entries = int(max_entries)
        self._tables: Dict[str, "OrderedDict[str, _Window]"] = {"user": OrderedDict(),
                                                                "address": OrderedDict()}
        self._lock = threading.Lock()

    def retry_after(self, username: str, address: str, now: Optional[float] = None) -> float:
        """Seconds until a login for `username` from `address` is allowed (0: now)."""
        now = time.monotonic() if now is None else now
        wait = 0.0
        with self._lock:
            for kind, key in (("user", username), ("address", address)):
                entry = self._current(kind, key, now)
                if entry is not None and entry.count >= self.limits[kind]:
                    wait = max(wait, entry.started + self.window - now)
        return wait

    def failed(self, username: str, address: str, now: Optional[float] = None) -> List[str]:
        """Count a failure; returns the kinds ("user", "address") whose limit this
        failure reached (so the caller logs a lockout once, not every refusal)."""
        now = time.monotonic() if now is None else now
        reached: List[str] = []
        with self._lock:
            for kind, key in (("user", username), ("address", address)):
                table = self._tables[kind]
                entry = self._current(kind, key, now)
                if entry is None:
                    entry = table[key] = _Window(now)
                    while len(table) > self.max_entries:
                        table.popitem(last=False)
                table.move_to_end(key)
                entry.count += 1
                if entry.count == self.limits[kind]:
                    reached.append(kind)
        return reached

    def succeeded(self, username: str) -> None:
        """A good password clears the name's failures (not the address's)."""
        with self._lock:
            self._tables["user"].pop(username, None)

    def _current(self, kind: str, key: str, now: float) -> Optional[_Window]:
        table = self._tables[kind]
        entry = table.get(key)
        if entry is not None and now - entry.started >= self.window:
            del table[key]
            return None
        return entry

    def size(self) -> int:
        with self._lock:
            return sum(len(table) for table in self._tables.values())
