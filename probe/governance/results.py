"""Typed results of governance operations.

Each result is a frozen dataclass with typed attributes (`change.live`), and also a
read-only mapping of the same fields (`change["live"]`, `dict(change)`), because
callers of the earlier dict results (scripts, tests, `--json` output) index them by
name. `as_dict()` gives a plain, JSON-ready dict.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Iterator, List, Optional, cast


class Record(Mapping):
    """A dataclass that reads as a mapping of its fields (compared like a dict)."""

    __slots__ = ()

    def __getitem__(self, key: str) -> Any:
        if key not in self._names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    @classmethod
    def _names(cls) -> List[str]:
        names = cls.__dict__.get("_field_names")
        if names is None:
            names = [f.name for f in fields(cast(Any, cls))]
            setattr(cls, "_field_names", names)
        return names

    def as_dict(self) -> Dict[str, Any]:
        """A plain dict of the fields (nested records too), ready for `json.dumps`."""
        return {name: _plain(getattr(self, name)) for name in self._names()}


def _plain(value: Any) -> Any:
    if isinstance(value, Record):
        return value.as_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


# eq=False: Mapping's __eq__ compares with dicts and records alike.
@dataclass(frozen=True, eq=False)
class NodeRow(Record):
    """One node of `Admin.nodes`: live in ZooKeeper, stored in Redis, or both.

    `registered_at` is the live znode's creation time (epoch seconds), None when
    the node is down; `problem` says why live and stored data disagree or are unusable.
    `transport`/`protocol` are the node's dialect (None when its data is unusable);
    `ejected_by` counts the consumer processes that have the node ejected now and
    `ejected_reasons` says why, as they report it.
    """

    service: str
    address: str
    live: bool
    weight: Optional[int]
    valid: Optional[int]
    stored: bool
    problem: Optional[str]
    registered_at: Optional[float] = None
    transport: Optional[str] = None
    protocol: Optional[str] = None
    ejected_by: int = 0
    ejected_reasons: List[str] = field(default_factory=list)


@dataclass(frozen=True, eq=False)
class NodeChange(Record):
    """A weight or switch edit: `key` went from `old` to `new`; `live` is whether the
    running node's znode carries it now (else it waits in Redis for the node)."""

    appkey: str
    service: str
    address: str
    key: str
    old: Any
    new: Any
    live: bool
    settings: Dict[str, Any]


@dataclass(frozen=True, eq=False)
class AppkeyRow(Record):
    """A registered appkey (`created_at` as the database wrote it)."""

    appkey: str
    description: str
    created_at: str


@dataclass(frozen=True, eq=False)
class AuditEntry(Record):
    """One governance change from the audit log, newest first: `old` and `new` are the
    values as text (an appkey change has no service or node)."""

    changed_at: str
    changed_by: str
    env: str
    appkey: str
    service: str
    node: str
    action: str
    old: Optional[str]
    new: Optional[str]


@dataclass(frozen=True, eq=False)
class ConfigChange(Record):
    """A config write: `changed` is False when the key already held that value;
    `version` is its history version (None when unchanged); `new` None means deleted."""

    appkey: str
    env: str
    key: str
    action: str
    old: Optional[str]
    new: Optional[str]
    changed: bool
    version: Optional[int]


@dataclass(frozen=True, eq=False)
class ConfigVersion(Record):
    """One entry of a config key's history, newest first (values parsed from JSON)."""

    version: int
    value: Any
    changed_by: str
    changed_at: str
    action: str
    old_value: Any
    deleted: bool


@dataclass(frozen=True, eq=False)
class ConfigRestore(Record):
    """What `restore_config` wrote back from history (`restored`), left alone because
    ZooKeeper holds another value (`differs`), and found as it should be (`unchanged`)."""

    appkey: str
    env: str
    restored: List[str]
    differs: List[str]
    unchanged: List[str]


__all__ = ["AppkeyRow", "AuditEntry", "ConfigChange", "ConfigRestore", "ConfigVersion", "NodeChange", "NodeRow", "Record"]
