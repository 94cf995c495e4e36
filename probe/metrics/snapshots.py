"""Snapshots: what one process has counted, in a form that adds up across processes.

A snapshot is {"calls": {(side, appkey, service, method, node, status): cell},
"inflight": {(side, appkey, service, node): n}}. Pre-fork workers each write theirs
to <dir>/<pid>.json; the process serving /metrics adds the files to its own.
"""

import json
import os
import threading
from typing import Any, Dict, List, Optional, Tuple

from .recorder import add_cell

# {"calls": {(side, appkey, service, method, node, status): cell},
#  "inflight": {(side, appkey, service, node): n}}
Snapshot = Dict[str, Dict[Tuple[Any, ...], Any]]


def merge(*snapshots: Snapshot) -> Snapshot:
    """Add snapshots up: counts, sums and buckets add; so do in-flight gauges."""
    calls: Dict[Tuple[Any, ...], Any] = {}
    inflight: Dict[Tuple[Any, ...], Any] = {}
    for snap in snapshots:
        for key, cell in snap.get("calls", {}).items():
            add_cell(calls, tuple(key), cell)
        for key, count in snap.get("inflight", {}).items():
            inflight[tuple(key)] = inflight.get(tuple(key), 0) + count
    # Node health lives in consumer processes only (never pre-forked): the first
    # snapshot holding it (the own process's) is passed through as it is.
    merged = {"calls": calls, "inflight": inflight}
    health = next((snap["health"] for snap in snapshots if snap.get("health")), None)
    if health:
        merged["health"] = health
    return merged


def write_snapshot(directory: str, snap: Snapshot, pid: Optional[int] = None) -> str:
    """Write `snap` to <directory>/<pid>.json (default pid: this process's) atomically."""
    pid = os.getpid() if pid is None else pid
    data = {"pid": pid, "calls": [list(key) + [cell] for key, cell in snap["calls"].items()],
            "inflight": [list(key) + [count] for key, count in snap["inflight"].items()]}
    path = os.path.join(directory, "%d.json" % pid)
    temporary = "%s.%d.tmp" % (path, threading.get_ident())
    with open(temporary, "w") as handle:
        json.dump(data, handle, separators=(",", ":"))
    os.replace(temporary, path)
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_snapshots(directory: str, exclude_pid: Optional[int] = None) -> List[Snapshot]:
    """The snapshots in `directory`; a dead process keeps its counts, not its gauges."""
    snaps: List[Snapshot] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return snaps
    for name in names:
        stem = name[:-5]
        if not name.endswith(".json") or not (stem.isascii() and stem.isdigit()) \
                or int(stem) == exclude_pid:
            continue
        pid = int(name[:-5])
        try:
            with open(os.path.join(directory, name)) as handle:
                data = json.load(handle)
            snaps.append({
                "calls": {tuple(row[:-1]): row[-1] for row in data.get("calls", ())},
                "inflight": {tuple(row[:-1]): row[-1] for row in data.get("inflight", ())}
                if _pid_alive(pid) else {}})
        except (OSError, ValueError, TypeError, AttributeError):
            continue  # being replaced, or half-written by a crash: the next scrape reads it
    return snaps


def wipe_snapshots(directory: str) -> None:
    """Remove the snapshot files of a previous run from `directory`."""
    for name in os.listdir(directory):
        if name.endswith(".json") or name.endswith(".tmp"):
            try:
                os.remove(os.path.join(directory, name))
            except OSError:
                pass
