"""Live configuration: an appkey's config keys, read from memory, kept current by
ZooKeeper watches, checked by a periodic full resync, and backed up to a local file.

    cfg = live_config("hello_www")
    pool_size = cfg.get("db.pool_size", 10)

Each key is a persistent znode `/configs/<env>/<appkey>/<key>` whose data is the
value as UTF-8 JSON. `LiveConfig` keeps them in a dict that is never changed once
published: a write builds a new dict and swaps the reference, so a read is a plain
dict lookup, without a lock and without ZooKeeper.

Threading: kazoo calls the watches on its event thread; they only parse, compare
and publish (under a lock that readers never take). Callbacks registered with
`on_change` and the backup file writes run on the config's own dispatch thread
("probe-config-<appkey>"), in the order of the changes; the periodic resync runs on
a second thread ("probe-config-sync-<appkey>"), never on a kazoo thread.
"""

import json
import logging
import os
import queue
import random
import tempfile
import threading
import time
from collections.abc import Mapping

from kazoo.client import KazooState
from kazoo.exceptions import KazooException, NoNodeError, ZookeeperError
from kazoo.handlers.threading import KazooTimeoutError

from . import naming
from .errors import ComponentUnavailable, ConfigUnavailable, InvalidConfigValue
from .governance.configvalue import MAX_VALUE_BYTES, canonical_text, parse_value
from .registry import release_zookeeper, shared_zookeeper
from .settings import load_settings

log = logging.getLogger("probe.configcenter")

MAX_KEYS = 10000                 # keys watched per appkey; more are ignored, with a warning
MAX_BACKUP_BYTES = 256 * 1024 * 1024
DEFAULT_RESYNC_INTERVAL = 15 * 60.0   # seconds
RESYNC_RETRY_DELAY = 1.0  # seconds before a resync that could not finish runs again
BACKUP_DELAY = 0.5  # seconds from a change to its backup write (one write per burst)
_ZK_ERRORS = (KazooException, ZookeeperError, KazooTimeoutError)


# -- values: one validator for writers and readers (probe.governance.configvalue) --
__all__ = ["MAX_VALUE_BYTES", "parse_value", "canonical_text", "LiveConfig", "live_config"]


def default_backup_dir():
    return os.environ.get("PROBE_CONFIG_BACKUP_DIR") or os.path.join(
        os.path.expanduser("~"), ".probe", "configs")


# -- the live mapping ------------------------------------------------------------

class LiveConfig(Mapping):
    """A read-only mapping key -> JSON value of one appkey, always current.

    :param zk: the process's shared `probe.registry.ZooKeeper` session.
    :param env: env name.
    :param appkey: the appkey whose config this is.
    :param backup_file: local backup path, or None for no backup.
    :param resync_interval: seconds between full re-reads that catch what a watch missed.

    `stale` is True while the values come from the local backup, or are held because
    ZooKeeper lost the appkey's config (rebuilt from scratch: run `probe config
    restore <appkey>`), and False once ZooKeeper's own listing is in.
    """

    def __init__(self, zk, env, appkey, backup_file=None, resync_interval=DEFAULT_RESYNC_INTERVAL,
                 release=None):
        self.zk = zk
        self.env = env
        self.appkey = appkey
        self.parent = naming.config_appkey_path(env, appkey)
        self.backup_file = backup_file
        self.resync_interval = float(resync_interval)
        self.stale = False
        self.resyncs = 0
        self._resync_retry_pending = False
        self._values = {}          # published; never mutated, replaced whole
        self._entries = {}         # key -> canonical text of the published value
        self._bad = {}             # key -> raw data already warned about
        self._callbacks = ()       # replaced whole, like _values
        self._lock = threading.RLock()  # writers only: watches, resync, close
        self._generation = 0       # bumped to retire every watch (new session, close)
        self._session = None
        self._watched = set()      # keys with a DataWatch of the current generation
        self._children_generation = None  # generation whose ChildrenWatch runs
        self._recipes = {}         # kazoo watch recipes of the current generation, by path
        self._watch_events = 0     # counts watch deliveries, so a resync can tell it raced one
        self._protect_until = 0.0
        self._parent_present = None  # does /configs/<env>/<appkey> exist (None: not known yet)
        self._events = queue.Queue()   # for the dispatch thread: changes to call back on
        self._tasks = queue.Queue()    # for the sync thread: re-reads
        self._closed = False
        self._release = release
        self._dispatcher = threading.Thread(target=self._dispatch_loop, daemon=True,
                                            name="probe-config-%s" % appkey)
        self._syncer = threading.Thread(target=self._sync_loop, daemon=True,
                                        name="probe-config-sync-%s" % appkey)

    # -- mapping (the read path: no lock, no I/O) ------------------------------------
    def __getitem__(self, key):
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)

    def __contains__(self, key):
        return key in self._values

    def get(self, key, default=None):
        return self._values.get(key, default)

    def snapshot(self):
        """The current values as one consistent dict (do not modify it)."""
        return self._values

    def __repr__(self):
        return "LiveConfig(env=%r, appkey=%r, keys=%d, stale=%r)" % (
            self.env, self.appkey, len(self._values), self.stale)

    # -- callbacks -------------------------------------------------------------------
    def on_change(self, callback):
        """Call `callback(key, old, new)` once per change, on the config's own thread,
        in the order of the changes. `old` is None for a new key, `new` is None for a
        deleted one. A callback that raises is logged; the others still run.
        Returns `callback`, so it can be used as a decorator."""
        with self._lock:
            self._callbacks = self._callbacks + (callback,)
        return callback

    def remove_callback(self, callback):
        with self._lock:
            self._callbacks = tuple(c for c in self._callbacks if c is not callback)

    # -- lifecycle ---------------------------------------------------------------------
    def start(self, wait=True):
        self._dispatcher.start()
        self.zk.client.add_listener(self._on_state)
        self.zk.on_new_session(self._on_new_session)
        self.zk.on_reconnect(self.resync)
        if self.zk.connected:
            try:
                self._establish()
                if self._parent_present is False:
                    # ZooKeeper answers but holds nothing (rebuilt?): a backup is better.
                    self._load_backup(reason="ZooKeeper at %s has no config for %s"
                                      % (self.zk.hosts, self.parent))
                self._syncer.start()
                return self
            except _ZK_ERRORS as exc:
                log.warning("reading config of %s from ZooKeeper failed (%s)", self.parent,
                            exc.__class__.__name__)
        if not self._load_backup():
            if wait:
                self.close()
                raise ConfigUnavailable(
                    "ZooKeeper at %s is unreachable and there is no local backup %s of the "
                    "config of appkey %r (env %s): start ZooKeeper, or pass wait=False to start "
                    "with an empty config that fills in when ZooKeeper answers"
                    % (self.zk.hosts, self.backup_file, self.appkey, self.env))
            with self._lock:
                self.stale = True
            log.warning("ZooKeeper at %s unreachable and no config backup for %s: starting "
                        "EMPTY and stale until ZooKeeper answers", self.zk.hosts, self.parent)
        self._syncer.start()
        return self

    def close(self):
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._generation += 1
            self._stop_recipes()
        self.zk.remove_callback(self._on_new_session)
        self.zk.remove_callback(self.resync)
        self.zk.client.remove_listener(self._on_state)
        self._tasks.put(None)
        self._events.put(None)
        if self._dispatcher.is_alive() and threading.current_thread() is not self._dispatcher:
            self._dispatcher.join(5.0)
        if self._release is not None:
            self._release(self.zk)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # -- session handling ----------------------------------------------------------------
    def _on_state(self, state):
        # kazoo's connection thread: no ZooKeeper calls here. Watches of a lost session
        # re-fire against a server that forgot them; retire them, keep the values, and
        # let the new session's watches (set up by _establish) speak.
        if state == KazooState.LOST:
            self._retire_watches()
        return None

    def _retire_watches(self):
        """Stop every watch of this config (a new generation sets up its own)."""
        with self._lock:
            self._generation += 1
            self._watched = set()
            self._children_generation = None
            if self._values:
                self._protect_until = time.monotonic() + self._protection()
            self._stop_recipes()

    def _stop_recipes(self):
        # kazoo's recipes have no public stop(): a retired one whose node never changes
        # again would stay a state listener for ever, re-reading its node on every
        # reconnect. (Lock held.)
        recipes, self._recipes = self._recipes, {}
        for recipe in recipes.values():
            self._stop_recipe(recipe)

    def _stop_recipe(self, recipe):
        recipe._stopped = True
        self.zk.client.remove_listener(recipe._session_watcher)

    def _keep_recipe(self, generation, recipe):
        with self._lock:
            if generation != self._generation:
                self._stop_recipe(recipe)
                return
            # A key deleted and set again gets a new DataWatch; the old one has stopped.
            slot = (type(recipe).__name__, recipe._path)
            old = self._recipes.get(slot)
            self._recipes[slot] = recipe
        if old is not None and old is not recipe:
            self._stop_recipe(old)

    def _protection(self):
        # As long as the registry keeps a node list after a new session: time for
        # an operator (or `probe config restore`) to bring a rebuilt ZooKeeper back.
        return 2 * self.zk.session_timeout + 5.0

    def _on_new_session(self):
        if self.zk.session_id is None or self.zk.session_id != self._session:
            self._establish()

    def _establish(self):
        """Watch the appkey's config afresh (new generation), reading everything now."""
        with self._lock:
            if self._closed:
                return
            self._session = self.zk.session_id
            self._generation += 1
            self._watched = set()
            self._children_generation = None
            self._stop_recipes()
            generation = self._generation
        # A DataWatch works on a missing node: the parent may not exist yet (no key
        # set so far) or no longer (ZooKeeper rebuilt). It starts the ChildrenWatch
        # when the parent is there.
        self._keep_recipe(generation, self.zk.client.DataWatch(
            self.parent, lambda data, stat, event=None: self._on_parent(generation, stat)))

    def _on_parent(self, generation, stat):
        with self._lock:
            if generation != self._generation:
                return False
            self._watch_events += 1
            if stat is not None and self._parent_present is False and self._values:
                # Back after a rebuild: a restore may still be writing the keys.
                self._protect_until = time.monotonic() + self._protection()
            self._parent_present = stat is not None
            if stat is None:
                self._parent_missing()
                return None
            if self._children_generation == generation:
                return None
            self._children_generation = generation
        self._keep_recipe(generation, self.zk.client.ChildrenWatch(
            self.parent, lambda children: self._on_children(generation, children)))
        return None

    def _parent_missing(self):
        """No /configs/<env>/<appkey> in ZooKeeper (with the lock held)."""
        self._children_generation = None
        if not self._values:
            self.stale = False  # nothing configured, nothing held: empty is the truth
            return
        if not self.stale:
            log.warning("ZooKeeper at %s has no config for %s (rebuilt from scratch?): keeping "
                        "the last %d key(s), marked stale. Run `probe config restore %s` to "
                        "write them back from MySQL history", self.zk.hosts, self.parent,
                        len(self._values), self.appkey)
        self.stale = True

    # -- watches -----------------------------------------------------------------------
    def _on_children(self, generation, children):
        with self._lock:
            if generation != self._generation:
                return False
            self._watch_events += 1
            listed = self._keys_of(children)
            gone = [key for key in self._values if key not in listed]
            if gone and time.monotonic() < self._protect_until:
                # A new session listing fewer keys right after a rebuild: the restore may
                # still be writing them. Keep them a while; a recheck decides later.
                self.stale = True
                self._later(self._protect_until - time.monotonic(), self.resync)
                gone = []
            else:
                self._protect_until = 0.0
                self.stale = False
            changes = [(key, self._values[key], None) for key in gone]
            for key in gone:
                self._entries.pop(key, None)
                self._bad.pop(key, None)
            self._watched &= listed
            new = sorted(listed - self._watched)
            self._watched |= set(new)
            if changes:
                values = dict(self._values)
                for key, _, _ in changes:
                    del values[key]
                self._publish(values, changes)
        for key in new:
            self._keep_recipe(generation, self.zk.client.DataWatch(
                naming.config_key_path(self.env, self.appkey, key),
                lambda data, stat, event=None, key=key: self._on_data(generation, key, data, stat)))
        return None

    def _keys_of(self, children):
        keys = set(c for c in children if naming.is_config_key(c))
        if len(keys) > MAX_KEYS:
            log.warning("%s has %d keys; watching the first %d only", self.parent, len(keys),
                        MAX_KEYS)
            keys = set(sorted(keys)[:MAX_KEYS])
        return keys

    def _on_data(self, generation, key, data, stat):
        with self._lock:
            if generation != self._generation:
                return False
            self._watch_events += 1
            if stat is None:
                # Deleted. A quick re-creation may have been listed already: recheck.
                self._watched.discard(key)
                self._apply({key: None})
                self._tasks.put(self._recheck_children)
                return False
            self._apply({key: data})
            return None

    def _recheck_children(self):
        with self._lock:
            generation = self._generation
        if self._closed or not self.zk.connected:
            return
        try:
            children = self.zk.client.get_children_async(self.parent).get(
                timeout=self.zk.session_timeout)
        except NoNodeError:
            return
        except _ZK_ERRORS:
            return  # the resync will see it
        self._on_children(generation, children)

    # -- applying changes (lock held by the caller or taken here) -------------------------
    def _apply(self, updates, replace_all=False):
        """`updates`: key -> raw znode data, or None for a deleted key. With
        `replace_all`, keys not in `updates` are deleted. Returns the number of keys
        that changed."""
        with self._lock:
            values = dict(self._values)
            entries = self._entries
            changes = []
            if replace_all:
                for key in list(values):
                    if key not in updates:
                        changes.append((key, values.pop(key), None))
                        entries.pop(key, None)
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

    def _decode(self, key, raw):
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

    def _publish(self, values, changes):
        self._values = values
        # With the callbacks registered now: one registered later does not hear of
        # changes made before it (such as the first load).
        self._events.put((changes, self._callbacks))

    # -- resync ----------------------------------------------------------------------------
    def resync(self, attempts=3):
        """Re-read every key from ZooKeeper and make the mapping equal to it. Catches
        any change a watch missed; when it finds one, the watches are set up again."""
        for _ in range(attempts):
            with self._lock:
                if self._closed:
                    return False
                generation, seen_events = self._generation, self._watch_events
            if not self.zk.connected:
                return False
            fresh = self._read_all()
            if fresh is False:
                return self._resync_again()
            with self._lock:
                if generation != self._generation or self._closed:
                    return False
                if seen_events != self._watch_events:
                    continue  # a watch delivered something meanwhile: read again
                self.resyncs += 1
                self._parent_present = fresh is not None
                if fresh is None:
                    self._parent_missing()
                    return True
                if time.monotonic() < self._protect_until and set(self._values) - set(fresh):
                    self.stale = True
                    updates = dict(fresh)
                    missed = self._apply(updates)
                    self._later(self._protect_until - time.monotonic(), self.resync)
                else:
                    self._protect_until = 0.0
                    missed = self._apply(fresh, replace_all=True)
                    self.stale = False
                rewatch = missed or self._children_generation != generation \
                    or set(fresh) - self._watched
            if missed:
                log.warning("resync of %s found %d change(s) the watches missed: watching "
                            "it afresh", self.parent, missed)
            if rewatch:
                self._establish()
            return True
        log.info("resync of %s kept racing the watches; trying again in %.0f s", self.parent,
                 RESYNC_RETRY_DELAY)
        return self._resync_again()

    def _resync_again(self):
        """A resync that could not finish (a read failed, or watches kept racing it)
        runs again shortly, once: the one after a reconnect must not wait for the
        next interval. False, for the resync that gave up."""
        with self._lock:
            if self._closed or self._resync_retry_pending:
                return False
            self._resync_retry_pending = True

        def again():
            with self._lock:
                self._resync_retry_pending = False
            self.resync()
        self._later(RESYNC_RETRY_DELAY, again)
        return False

    def _read_all(self):
        """{key: raw data} from ZooKeeper; None when the parent is missing; False on error."""
        client, timeout = self.zk.client, self.zk.session_timeout
        try:
            children = client.get_children_async(self.parent).get(timeout=timeout)
        except NoNodeError:
            return None
        except _ZK_ERRORS as exc:
            log.info("resync of %s failed (%s); will try again", self.parent,
                     exc.__class__.__name__)
            return False
        keys = sorted(self._keys_of(children))
        pending = [(key, client.get_async(naming.config_key_path(self.env, self.appkey, key)))
                   for key in keys]
        fresh = {}
        for key, result in pending:
            try:
                fresh[key] = result.get(timeout=timeout)[0]
            except NoNodeError:
                continue
            except _ZK_ERRORS as exc:
                log.info("resync of %s failed at %s (%s)", self.parent, key,
                         exc.__class__.__name__)
                return False
        return fresh

    def _next_resync(self):
        # +-10% jitter: a fleet started together does not resync together.
        return time.monotonic() + self.resync_interval * random.uniform(0.9, 1.1)

    def _sync_loop(self):
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

    def _later(self, delay, task):
        timer = threading.Timer(max(delay, 0.05), lambda: None if self._closed
                                else self._tasks.put(task))
        timer.daemon = True
        timer.start()

    # -- dispatch: callbacks and the backup, on the config's own thread -----------------------
    def _dispatch_loop(self):
        # The backup is written a moment after a change, once for a whole burst, by
        # this thread: N processes writing files at the instant of a change would
        # slow down the last of them to see it.
        backup_due = None
        while True:
            wait = None if backup_due is None else max(0.0, backup_due - time.monotonic())
            try:
                item = self._events.get(timeout=wait)
            except queue.Empty:
                backup_due = None
                self._write_backup()
                continue
            if item is None:
                if backup_due is not None:
                    self._write_backup()  # a change not yet in the backup
                return
            changes, callbacks = item
            for key, old, new in changes:
                self._call_back(callbacks, key, old, new)
            if backup_due is None and self.backup_file:
                backup_due = time.monotonic() + BACKUP_DELAY

    def _call_back(self, callbacks, key, old, new):
        for callback in callbacks:
            try:
                callback(key, old, new)
            except Exception:
                log.exception("config callback %r failed on %s/%s", callback, self.parent, key)

    # -- local backup ------------------------------------------------------------------------
    def _write_backup(self):
        values = self._values
        if not self.backup_file or self.stale:
            return
        try:
            directory = os.path.dirname(self.backup_file)
            os.makedirs(directory, mode=0o700, exist_ok=True)
            handle, tmp = tempfile.mkstemp(dir=directory, prefix=".config-")
            try:
                with os.fdopen(handle, "w", encoding="utf-8") as out:
                    # No fsync: the rename alone means a reader sees the old file or the
                    # new one, and 50 processes fsyncing on every change cost the machine.
                    json.dump({"env": self.env, "appkey": self.appkey, "written_at": time.time(),
                               "values": values}, out, ensure_ascii=False)
                os.replace(tmp, self.backup_file)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
        except (OSError, TypeError, ValueError) as exc:
            log.warning("cannot write config backup %s: %s", self.backup_file, exc)

    def _load_backup(self, reason=None):
        """Serve the local backup (stale); False when there is none usable."""
        if not self.backup_file:
            return False
        try:
            if os.path.getsize(self.backup_file) > MAX_BACKUP_BYTES:
                raise ValueError("larger than %d bytes" % MAX_BACKUP_BYTES)
            with open(self.backup_file, encoding="utf-8") as handle:
                saved = json.load(handle)
            values = saved["values"]
            if not isinstance(values, dict):
                raise ValueError("'values' is not an object")
        except FileNotFoundError:
            return False
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            log.warning("config backup %s is unusable (%s)", self.backup_file, exc)
            return False
        updates = {}
        for key, value in values.items():
            if naming.is_config_key(key):
                try:
                    updates[key] = canonical_text(value).encode("utf-8")
                except InvalidConfigValue:
                    continue
        with self._lock:
            if self._values:
                return True  # ZooKeeper answered meanwhile
            self.stale = True
            self._apply(updates)
        written = saved.get("written_at") if isinstance(saved, dict) else None
        log.warning("%s: serving the config of %s from the local backup %s (%d key(s), "
                    "written %s), STALE until ZooKeeper answers with it",
                    reason or "ZooKeeper at %s unreachable" % self.zk.hosts, self.parent,
                    self.backup_file, len(updates),
                    "%.0f s ago" % (time.time() - written) if isinstance(written, (int, float))
                    else "at an unknown time")
        return True


def live_config(appkey, env=None, config_path=None, backup_dir=None, wait=True, timeout=3.0,
                resync_interval=DEFAULT_RESYNC_INTERVAL):
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
    cfg = LiveConfig(zk, settings.env, appkey, backup_file, resync_interval,
                     release=release_zookeeper)
    return cfg.start(wait=wait)


__all__ = ["live_config", "LiveConfig", "parse_value", "canonical_text", "MAX_VALUE_BYTES",
           "DEFAULT_RESYNC_INTERVAL"]
