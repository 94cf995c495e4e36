"""Live configuration: an appkey's config keys, read from memory, kept current by
ZooKeeper watches, checked by a periodic full resync, and backed up to a local file.

    cfg = live_config("hello_www")
    pool_size = cfg.get("db.pool_size", 10)

Each key is a persistent znode `/configs/<env>/<appkey>/<key>` whose data is the
value as UTF-8 JSON. `LiveConfig` keeps them in a dict that is never changed once
published: a write builds a new dict and swaps the reference, so a read is a plain
dict lookup, without a lock and without ZooKeeper.

Watching is the mirror engine's job (`probe.zk.mirror`, shared with the routing
watcher); the local backup is written and read by `probe.zk.snapshot`.

Threading: kazoo threads hand the mirror's batches to `_apply_batch`, which only
parses, compares and publishes (under a lock that readers never take). Callbacks
registered with `on_change` run on the config's own dispatch thread
("probe-config-<appkey>"), in the order of the changes; the backup is written by the
process's snapshot writer thread; the periodic resync runs on a second thread
("probe-config-sync-<appkey>"), never on a kazoo thread.
"""

import json
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterator, List, Literal, Optional, Set, Tuple, Union

from .. import naming
from ..errors import ComponentUnavailable, ConfigUnavailable, InvalidConfigValue
from .values import MAX_VALUE_BYTES, canonical_text, parse_value
from ..zk.session import ZooKeeper, release_zookeeper, shared_zookeeper
from ..settings import load_settings
from ..zk import snapshot
from ..zk.mirror import ChildrenMirror, Entry

# on_change callbacks: callback(key, old, new)
Callback = Callable[[str, Any, Any], Any]
# (key, old value or None, new value or None)
Change = Tuple[str, Any, Any]

log = logging.getLogger("probe.configcenter")

MAX_KEYS = 10000                 # keys watched per appkey; more are ignored, with a warning
MAX_BACKUP_BYTES = 256 * 1024 * 1024
DEFAULT_RESYNC_INTERVAL = 15 * 60.0   # seconds
BACKUP_DELAY = snapshot.WRITE_DELAY  # seconds from a change to its backup write (one per burst)


# -- values: one validator for writers and readers (probe.configcenter.values) --
__all__ = ["MAX_VALUE_BYTES", "parse_value", "canonical_text", "LiveConfig", "live_config"]


def default_backup_dir() -> str:
    return os.environ.get("PROBE_CONFIG_BACKUP_DIR") or os.path.join(
        os.path.expanduser("~"), ".probe", "configs")


# -- the live mapping ------------------------------------------------------------

class LiveConfig(Mapping):
    """A read-only mapping key -> JSON value of one appkey, always current.

    :param zk: the process's shared `probe.zk.session.ZooKeeper` session.
    :param env: env name.
    :param appkey: the appkey whose config this is.
    :param backup_file: local backup path, or None for no backup.
    :param resync_interval: seconds between full re-reads that catch what a watch missed.
    :param backup_root: the backup folder the file lives under: it and every folder
        below it must be this user's and not writable by others, or the backup is
        not read (default: the file's own folder).

    Sits on the mirror engine (`probe.zk.mirror.ChildrenMirror`) over
    /configs/<env>/<appkey>, like the routing watcher does over a service.

    `stale` is True while the values come from the local backup, or are held because
    ZooKeeper lost the appkey's config (rebuilt from scratch: run `probe config
    restore <appkey>`), and False once ZooKeeper's own listing is in.
    """

    def __init__(self, zk: ZooKeeper, env: str, appkey: str, backup_file: Optional[str] = None,
                 resync_interval: float = DEFAULT_RESYNC_INTERVAL,
                 release: Optional[Callable[[ZooKeeper], None]] = None,
                 backup_root: Optional[str] = None) -> None:
        self.zk = zk
        self.env = env
        self.appkey = appkey
        self.parent = naming.config_appkey_path(env, appkey)
        self.backup_file = backup_file
        self.backup_root = backup_root
        self.resync_interval = float(resync_interval)
        self._unconfirmed = False  # serving the backup (or nothing) until ZooKeeper answers
        self._values: Dict[str, Any] = {}  # published; never mutated, replaced whole
        self._entries: Dict[str, str] = {}  # key -> canonical text of the published value
        self._bad: Dict[str, Tuple[int, int]] = {}  # key -> raw data already warned about
        self._callbacks: Tuple[Callback, ...] = ()  # replaced whole, like _values
        self._lock = threading.RLock()  # writers only: the mirror's batches, close
        self._events: "queue.Queue[Optional[Tuple[List[Change], Tuple[Callback, ...]]]]" = \
            queue.Queue()  # for the dispatch thread: changes to call back on
        # for the sync thread: re-reads
        self._tasks: "queue.Queue[Optional[Callable[[], Any]]]" = queue.Queue()
        self._closed = False
        self._release = release
        self._mirror = ChildrenMirror(
            zk, self.parent, naming.is_config_key, self._apply_batch,
            describe="config of %s" % self.parent, protect_partial=True,
            hold_missing_parent=True, max_children=MAX_KEYS)
        self._dispatcher = threading.Thread(target=self._dispatch_loop, daemon=True,
                                            name="probe-config-%s" % appkey)
        self._syncer = threading.Thread(target=self._sync_loop, daemon=True,
                                        name="probe-config-sync-%s" % appkey)

    @property
    def stale(self) -> bool:
        return self._unconfirmed or self._mirror.stale

    @property
    def resyncs(self) -> int:
        """Complete re-reads applied after the first one."""
        return max(self._mirror.resyncs - 1, 0)

    # -- mapping (the read path: no lock, no I/O) ------------------------------------
    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def get(self, key: str, default: Any = None) -> Any:
        return self._values.get(key, default)

    def snapshot(self) -> Dict[str, Any]:
        """The current values as one consistent dict (do not modify it)."""
        return self._values

    def __repr__(self) -> str:
        return "LiveConfig(env=%r, appkey=%r, keys=%d, stale=%r)" % (
            self.env, self.appkey, len(self._values), self.stale)

    # -- callbacks -------------------------------------------------------------------
    def on_change(self, callback: Callback) -> Callback:
        """Call `callback(key, old, new)` once per change, on the config's own thread,
        in the order of the changes. `old` is None for a new key, `new` is None for a
        deleted one. A callback that raises is logged; the others still run.
        Returns `callback`, so it can be used as a decorator."""
        with self._lock:
            self._callbacks = self._callbacks + (callback,)
        return callback

    def remove_callback(self, callback: Callback) -> None:
        with self._lock:
            self._callbacks = tuple(c for c in self._callbacks if c is not callback)

    # -- lifecycle ---------------------------------------------------------------------
    def start(self, wait: bool = True) -> "LiveConfig":
        self._dispatcher.start()
        connected = self.zk.connected
        if connected and self._mirror.start(wait=self.zk.session_timeout):
            if self._mirror.parent_present is False:
                # ZooKeeper answers but holds nothing (rebuilt?): a backup is better.
                self._load_backup(reason="ZooKeeper at %s has no config for %s"
                                  % (self.zk.hosts, self.parent))
            self._syncer.start()
            return self
        if connected:
            log.warning("reading config of %s from ZooKeeper did not finish within %.1f s",
                        self.parent, self.zk.session_timeout)
        else:
            self._mirror.start()
        with self._lock:
            confirmed = self._mirror.ready
            if not confirmed:
                self._unconfirmed = True
        if not confirmed and not self._load_backup():
            if wait:
                self.close()
                raise ConfigUnavailable(
                    "ZooKeeper at %s is unreachable and there is no local backup %s of the "
                    "config of appkey %r (env %s): start ZooKeeper, or pass wait=False to start "
                    "with an empty config that fills in when ZooKeeper answers"
                    % (self.zk.hosts, self.backup_file, self.appkey, self.env))
            log.warning("ZooKeeper at %s unreachable and no config backup for %s: starting "
                        "EMPTY and stale until ZooKeeper answers", self.zk.hosts, self.parent)
        self._syncer.start()
        return self

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._mirror.close()
        self._tasks.put(None)
        self._events.put(None)
        if self._dispatcher.is_alive() and threading.current_thread() is not self._dispatcher:
            self._dispatcher.join(5.0)
        if self.backup_file:
            snapshot.writer().flush(self.backup_file)  # a change not yet in the backup
        if self._release is not None:
            self._release(self.zk)

    def __enter__(self) -> "LiveConfig":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _retire_watches(self) -> None:
        """Act as if every watch of this config had died (tests: the resync must
        find what they miss)."""
        self._mirror.retire()

    # -- the mirror's batches (its lock held; never blocks) -----------------------------
    def _apply_batch(self, upserts: Dict[str, Entry], removed: Set[str], full: bool) -> None:
        updates: Dict[str, Optional[bytes]] = {key: entry[0] for key, entry in upserts.items()}
        for key in removed:
            updates[key] = None
        with self._lock:
            if full and self._mirror.parent_present:
                self._unconfirmed = False
            if self._closed:
                return
            self._apply(updates)

    # -- applying changes (lock held by the caller or taken here) -------------------------
    def _apply(self, updates: Dict[str, Optional[bytes]]) -> int:
        """`updates`: key -> raw znode data, or None for a deleted key. Returns the
        number of keys that changed."""
        with self._lock:
            values = dict(self._values)
            entries = self._entries
            changes: List[Change] = []
            for key, raw in updates.items():
                if raw is None:
                    if key in values:
                        changes.append((key, values.pop(key), None))
                        entries.pop(key, None)
                    self._bad.pop(key, None)
                    continue
                parsed = self._decode(key, raw)
                if parsed is None:
                    continue  # malformed: the last good value (if any) stays
                value, text = parsed
                if entries.get(key) == text:
                    continue
                old = values.get(key)
                values[key] = value
                entries[key] = text
                changes.append((key, old, value))
            if changes:
                self._publish(values, changes)
            return len(changes)

    def _decode(self, key: str, raw: bytes) -> Optional[Tuple[Any, str]]:
        """(value, canonical text) of untrusted znode data, or None (warned once per
        distinct bad data, so a hostile writer cannot flood the log)."""
        try:
            value, text = parse_value(raw)
            self._bad.pop(key, None)
            return value, text
        except InvalidConfigValue as exc:
            fingerprint = (len(raw), hash(bytes(raw[:4096])))
            if self._bad.get(key) != fingerprint:
                self._bad[key] = fingerprint
                log.warning("ignoring config %s/%s: %s; %s", self.parent, key, exc,
                            "keeping its last good value" if key in self._values else
                            "the key stays absent")
            return None

    def _publish(self, values: Dict[str, Any], changes: List[Change]) -> None:
        self._values = values
        # With the callbacks registered now: one registered later does not hear of
        # changes made before it (such as the first load).
        self._events.put((changes, self._callbacks))
        if self.backup_file and not self._closed:
            # Written a moment later, once per burst, by the process's one writer:
            # N processes writing files at the instant of a change would slow down
            # the last of them to see it.
            snapshot.writer().schedule(self.backup_file, self._backup_document)

    # -- resync ----------------------------------------------------------------------------
    def resync(self) -> bool:
        """Re-read every key from ZooKeeper and make the mapping equal to it (the
        read also sets every watch up again). True once applied."""
        if self._closed or not self.zk.connected:
            return False
        return self._mirror.resync(wait=self.zk.session_timeout)

    def _next_resync(self) -> float:
        # +-10% jitter: a fleet started together does not resync together.
        return time.monotonic() + self.resync_interval * random.uniform(0.9, 1.1)

    def _sync_loop(self) -> None:
        due = self._next_resync()
        while not self._closed:
            try:
                task = self._tasks.get(timeout=max(0.0, due - time.monotonic()))
            except queue.Empty:
                task, due = self.resync, self._next_resync()
            if task is None:
                return
            try:
                task()
            except Exception:
                log.exception("config task %r of %s failed", task, self.parent)

    # -- dispatch: callbacks, on the config's own thread ---------------------------------------
    def _dispatch_loop(self) -> None:
        while True:
            item = self._events.get()
            if item is None:
                return
            changes, callbacks = item
            for key, old, new in changes:
                self._call_back(callbacks, key, old, new)

    def _call_back(self, callbacks: Tuple[Callback, ...], key: str, old: Any, new: Any) -> None:
        for callback in callbacks:
            try:
                callback(key, old, new)
            except Exception:
                log.exception("config callback %r failed on %s/%s", callback, self.parent, key)

    # -- local backup ------------------------------------------------------------------------
    def _backup_document(self) -> Optional[Dict[str, Any]]:
        if self.stale:
            return None
        return {"env": self.env, "appkey": self.appkey, "written_at": time.time(),
                "values": self._values}

    def _load_backup(self, reason: Optional[str] = None) -> bool:
        """Serve the local backup (stale); False when there is none usable."""
        if not self.backup_file:
            return False
        try:
            saved = snapshot.read_json(self.backup_file, MAX_BACKUP_BYTES, self.backup_root)
            values = saved["values"]
            if not isinstance(values, dict):
                raise ValueError("'values' is not an object")
        except FileNotFoundError:
            return False
        except Exception as exc:  # OSError, UntrustedFile, bad JSON or shape, RecursionError
            log.warning("config backup %s is unusable (%s: %s)", self.backup_file,
                        exc.__class__.__name__, str(exc)[:300])
            return False
        updates: Dict[str, Optional[bytes]] = {}
        for key, value in values.items():
            if naming.is_config_key(key):
                try:
                    updates[key] = canonical_text(value).encode("utf-8")
                except InvalidConfigValue:
                    continue
        with self._lock:
            if self._values:
                return True  # ZooKeeper answered meanwhile
            self._unconfirmed = True
            self._mirror.hold(updates)
            self._apply(updates)
        written = saved.get("written_at") if isinstance(saved, dict) else None
        log.warning("%s: serving the config of %s from the local backup %s (%d key(s), "
                    "written %s), STALE until ZooKeeper answers with it",
                    reason or "ZooKeeper at %s unreachable" % self.zk.hosts, self.parent,
                    self.backup_file, len(updates),
                    "%.0f s ago" % (time.time() - written) if isinstance(written, (int, float))
                    else "at an unknown time")
        return True


def live_config(appkey: str, env: Optional[str] = None, config_path: Optional[str] = None,
                backup_dir: Union[str, Literal[False], None] = None, wait: bool = True,
                timeout: float = 3.0,
                resync_interval: float = DEFAULT_RESYNC_INTERVAL) -> LiveConfig:
    """A `LiveConfig` for `appkey`: a read-only mapping key -> JSON value, always current.

    :param appkey: the appkey whose config to read.
    :param env: env name (default: PROBE_ENV or the config's hostname rules).
    :param config_path: probe's YAML config (default: PROBE_CONFIG or the packaged one).
    :param backup_dir: folder of the local backups (default: PROBE_CONFIG_BACKUP_DIR or
        ~/.probe/configs); False for no backup.
    :param wait: when ZooKeeper does not answer within `timeout` and there is no backup:
        raise ConfigUnavailable (True), or start empty and stale (False).
    :param timeout: seconds to wait for ZooKeeper at start.
    :param resync_interval: seconds between full re-reads (default 15 minutes).
    """
    naming.check_appkey(appkey)
    settings = load_settings(config_path, env)
    if backup_dir is False:
        backup_file = None
    else:
        backup_file = naming.config_backup_file(backup_dir or default_backup_dir(),
                                                settings.env, appkey)
    try:
        zk = shared_zookeeper(settings.zookeeper, timeout=timeout, keep_trying=True)
    except ComponentUnavailable as exc:  # only when the session cannot even be created
        raise ConfigUnavailable(str(exc))
    if not zk.connected:
        # The process's session already existed and is reconnecting (a ZooKeeper
        # restart a moment ago): `timeout` applies to it as to a new one.
        zk.wait_connected(timeout)
    cfg = LiveConfig(zk, settings.env, appkey, backup_file, resync_interval,
                     release=release_zookeeper,
                     backup_root=None if backup_file is None else (backup_dir or default_backup_dir()))
    return cfg.start(wait=wait)


__all__ = ["live_config", "LiveConfig", "parse_value", "canonical_text", "MAX_VALUE_BYTES",
           "DEFAULT_RESYNC_INTERVAL"]
