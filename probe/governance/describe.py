"""Governance results as people read them: the one place that turns results into
sentences and tables, for both the `probe` command and the web console."""

import json
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Tuple

from .results import ConfigChange, ConfigRestore, NodeChange, NodeRow

Columns = Sequence[Tuple[str, str]]

NODE_COLUMNS: Columns = (("service", "SERVICE"), ("address", "ADDRESS"), ("state", "STATE"),
                         ("weight", "WEIGHT"), ("switch", "SWITCH"), ("dialect", "DIALECT"),
                         ("health", "HEALTH"), ("problem", "NOTE"))
APPKEY_COLUMNS: Columns = (("appkey", "APPKEY"), ("description", "DESCRIPTION"),
                           ("created_at", "CREATED"))
AUDIT_COLUMNS: Columns = (("changed_at", "WHEN"), ("changed_by", "WHO"), ("appkey", "APPKEY"),
                          ("service", "SERVICE"), ("node", "NODE"), ("action", "WHAT"),
                          ("old", "OLD"), ("new", "NEW"))
STATS_COLUMNS: Columns = (("service", "SERVICE"), ("method", "METHOD"), ("node", "NODE"),
                          ("calls", "CALLS"), ("errors", "ERRORS"), ("p50_ms", "P50_MS"),
                          ("p99_ms", "P99_MS"), ("mean_ms", "MEAN_MS"), ("statuses", "STATUSES"))
HISTORY_COLUMNS: Columns = (("version", "VERSION"), ("changed_at", "WHEN"),
                            ("changed_by", "WHO"), ("action", "ACTION"), ("value", "VALUE"))


def table(rows: Iterable[Mapping[str, Any]], columns: Columns) -> str:
    """Rows as left-aligned columns under their titles ("(none)" without rows)."""
    rows = list(rows)
    if not rows:
        return "(none)"
    widths = [max(len(str(title)), *(len(_cell(row.get(key))) for row in rows))
              for key, title in columns]
    lines = ["  ".join(str(title).ljust(width) for (_, title), width in zip(columns, widths)).rstrip()]
    for row in rows:
        lines.append("  ".join(_cell(row.get(key)).ljust(width)
                               for (key, _), width in zip(columns, widths)).rstrip())
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


def node_state(row: NodeRow) -> str:
    """"up" for a node registered in ZooKeeper, "down" for one only stored in Redis."""
    return "up" if row.live else "down"


def node_switch(valid: Optional[int]) -> str:
    """"enabled", "disabled", or the raw value of a malformed switch ("" unknown)."""
    if valid is None:
        return ""
    return {1: "enabled", 0: "disabled"}.get(valid, str(valid))


def node_dialect(row: NodeRow) -> str:
    """"buffered+binary" (transport+protocol), "" when the node's data is unusable."""
    return "%s+%s" % (row.transport, row.protocol) if row.transport is not None else ""


def node_health(row: NodeRow) -> str:
    """"ok", or "ejected by 2 consumer(s): why; why" as consumers report it."""
    if not row.ejected_by:
        return "ok"
    return "ejected by %d consumer(s): %s" % (row.ejected_by, "; ".join(row.ejected_reasons))


def node_rows(rows: Iterable[NodeRow]) -> List[dict]:
    """Node rows with `state`, `switch`, `dialect` and `health` in words, for `NODE_COLUMNS`."""
    return [dict(row.as_dict(), state=node_state(row), switch=node_switch(row.valid),
                 dialect=node_dialect(row), health=node_health(row))
            for row in rows]


def node_change(change: NodeChange, with_appkey: bool = True) -> str:
    """"<appkey> <service> <ip:port>: weight 10 -> 25 (applied to the live node)"."""
    return "%s%s %s: %s %s -> %s (%s)" % (
        change.appkey + " " if with_appkey else "", change.service, change.address, change.key,
        change.old, change.new, "applied to the live node" if change.live
        else "stored in Redis; applies when the node registers")


def appkey_added(appkey: str, added: bool) -> str:
    return "appkey %s %s" % (appkey, "added" if added else "already registered")


def appkey_removed(appkey: str, removed: bool) -> str:
    return "appkey %s %s" % (appkey, "removed" if removed else "was not registered")


def clip(text: str, limit: int = 60) -> str:
    """`text` cut to `limit` characters, ending in "..." when cut."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def config_change_line(change: ConfigChange) -> str:
    """The CLI's line: "<appkey> <key>: set to 10, version 3" or "...: unchanged"."""
    if not change.changed:
        return "%s %s: unchanged" % (change.appkey, change.key)
    return "%s %s: %s, version %s" % (change.appkey, change.key,
                                      "deleted" if change.new is None else "set to " +
                                      clip(change.new), change.version)


def config_change_sentence(change: ConfigChange, value_limit: int = 200) -> str:
    """The console's sentence: "config key <key> set to 10 (version 3)"."""
    if not change.changed:
        return "config key %s unchanged (it already holds that value)" % change.key
    if change.new is None:
        what = "deleted"
    elif len(change.new) <= value_limit:
        what = "set to " + change.new
    else:
        what = "set"
    return "config key %s %s (version %s)" % (change.key, what, change.version)


def config_restore(done: ConfigRestore) -> str:
    return "config of %s (env %s): %d key(s) restored from MySQL history%s%s" % (
        done.appkey, done.env, len(done.restored),
        "".join("\n  restored %s" % key for key in done.restored),
        "".join("\n  left alone (differs from history) %s" % key for key in done.differs))


def config_value(value: Any) -> str:
    """A config value as the JSON text an operator reads and edits."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def history_rows(entries: Iterable[Mapping[str, Any]]) -> List[dict]:
    """History entries with `value` as clipped JSON text ("(deleted)"), for HISTORY_COLUMNS."""
    return [dict(entry, value="(deleted)" if entry["deleted"] else clip(json.dumps(entry["value"])))
            for entry in entries]


def ms(value: Optional[float]) -> str:
    """Three significant digits or so: percentiles come from buckets anyway."""
    if value is None:
        return "-"
    return "%.3f" % value if value < 1 else "%.1f" % value if value < 100 else "%.0f" % value


def stats_rows(rows: Iterable[Mapping[str, Any]]) -> List[dict]:
    """`probe.stores.stats.read_stats` rows with the latencies as text, for STATS_COLUMNS."""
    return [dict(row, **{key: ms(row.get(key)) for key in ("p50_ms", "p99_ms", "mean_ms")})
            for row in rows]


__all__ = ["APPKEY_COLUMNS", "AUDIT_COLUMNS", "HISTORY_COLUMNS", "NODE_COLUMNS", "STATS_COLUMNS",
           "appkey_added", "appkey_removed", "clip", "config_change_line",
           "config_change_sentence", "config_restore", "config_value", "history_rows", "ms",
           "node_change", "node_dialect", "node_health", "node_rows", "node_state", "node_switch", "stats_rows", "table"]
