"""The ZooKeeper mirror engine: one znode's children and their data, kept current
in memory at a cost in proportion to what changed.

`ChildrenMirror(zk, parent, accept, apply)` lists `parent`'s children with a watch,
reads the data of the children `accept(name)` lets in (all at once, through kazoo's
async API), and hands every batch of changes to `apply(upserts, removed, full)`:

- A children event re-lists the parent (after `list_delay`, so a burst of events
  costs one listing) and diffs the names against the last listing in C (set
  difference): only new names are classified and read. No existing child's data
  is read again.
- A data event (changed, deleted, re-created) re-reads that one child with a new
  watch; the read's answer decides (NoNode: removed). Answers older than the last
  event of their child are dropped (each read carries a sequence number).
- Reads in flight are counted; a batch is applied once all of its reads are in,
  so a burst of events (a listing of 2,000 new nodes, a transaction editing 50)
  reaches `apply` as one call, and the owner swaps its table once. The one
  exception is the very first listing: it is handed over every `first_chunk`
  reads, so a consumer of a 2,000-node service can route before all are read.
- Sessions: on LOST every answer still in flight is retired (generations); on a new
  session (and on a reconnect) the whole subtree is listed and read again, after
  the session's jitter, with a retry after a failure. Right after a new session, a
  listing that drops names the mirror holds is not believed for `empty_protection`
  seconds (ZooKeeper rebuilt, providers not yet back: Dubbo's empty protection).

Only kazoo's public API is used: `get_children_async`/`get_async`/`exists_async`
with plain watch callables. Each watch callable is one bound method for the
mirror's whole life, so kazoo's per-path watcher sets never grow with events or
resyncs, and there is nothing to stop on close (a late event finds the mirror
closed and does nothing).

Threading: kazoo calls the watches on its event thread and the read answers on its
completion thread; both only take the mirror's lock, issue async requests and call
`apply` (with the lock held: `apply` must not block or call ZooKeeper). Retries
run from timer threads; the full listing after a new session from the session's
worker.
"""

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, FrozenSet, Iterable, Optional, Set, Tuple

from kazoo.client import KazooState
from kazoo.exceptions import KazooException, NoNodeError, ZookeeperError
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.protocol.states import EventType, WatchedEvent, ZnodeStat

log = logging.getLogger("probe.zk.mirror")

if TYPE_CHECKING:
    from .session import ZooKeeper

Entry = Tuple[bytes, ZnodeStat]
Apply = Callable[[Dict[str, Entry], Set[str], bool], None]

RETRY_DELAY = 0.5   # seconds before a failed listing or read is tried again
LIST_DELAY = 0.02   # seconds from a children event to its listing: one listing per burst
FIRST_CHUNK = 256   # reads per early batch of a first listing (later listings: one batch)
LIST_INTERVAL = 0.5  # seconds between two listings at least (re-listing N names is the O(N) part)
LIST_LAZY = 2.0  # the same, when every children event is a restart already seen (no new name)
_ZK_ERRORS = (KazooException, ZookeeperError, KazooTimeoutError)


class ChildrenMirror(object):
    """Mirror the children of `parent` accepted by `accept(name)`.

    :param zk: the process's `probe.zk.session.ZooKeeper` session.
    :param parent: the znode whose children are mirrored (it may not exist yet).
    :param accept: which child names to read and watch (pure, cheap).
    :param apply: `apply(upserts, removed, full)`: `upserts` maps names to (data,
        stat) read since the last call, `removed` names children gone; `full` is
        True when the batch comes from a complete re-read (start, new session,
        resync). Called with the mirror's lock held, never concurrently.
    :param empty_protection: seconds after a new session during which a listing
        that drops names is not believed (None: 2 x session timeout + 5 s).
    :param protect_partial: protect against any dropped name (config keys), not
        only against a listing with none of the accepted names (service nodes).
    :param hold_missing_parent: when the parent is gone (ZooKeeper rebuilt), keep
        every name held, stale, until it is back; then judge its listings with
        empty protection, so a restore writing keys one by one does not flap them.
    :param max_children: at most this many accepted children are mirrored (the
        first by name); more are ignored, with one warning per listing.
    """

    def __init__(self, zk: "ZooKeeper", parent: str, accept: Callable[[str], bool], apply: Apply, *,
                 describe: Optional[str] = None, empty_protection: Optional[float] = None,
                 protect_partial: bool = False, hold_missing_parent: bool = False,
                 max_children: Optional[int] = None, list_delay: float = LIST_DELAY,
                 list_interval: float = LIST_INTERVAL, list_lazy: float = LIST_LAZY,
                 first_chunk: int = FIRST_CHUNK,
                 on_stale: Optional[Callable[[bool], None]] = None) -> None:
        self.zk = zk
        self.parent = parent
        self.describe = describe or parent
        self._accept = accept
        self._apply = apply
        self._on_stale = on_stale
        self.empty_protection = (2 * zk.session_timeout + 5.0 if empty_protection is None
                                 else float(empty_protection))
        self.protect_partial = protect_partial
        self.hold_missing_parent = hold_missing_parent
        self.max_children = max_children
        self.list_delay = float(list_delay)
        self.list_interval = float(list_interval)
        self.list_lazy = max(float(list_lazy), self.list_interval)
        self.first_chunk = max(1, int(first_chunk))
        # Counters (tests and the bench read them).
        self.listings = 0      # children listings answered
        self.reads = 0         # child data reads answered
        self.batches = 0       # calls of apply
        self.resyncs = 0       # complete re-reads finished
        self.stale = False     # holding names a protected listing dropped
        self.parent_present: Optional[bool] = None
        self._lock = threading.RLock()
        self._applied = threading.Condition(self._lock)  # notified after each full batch
        self._closed = False
        self._generation = 0
        self._session: Optional[int] = None
        self._listed: Set[str] = set()    # every child name of the last listing
        self._present: Set[str] = set()   # accepted children known to exist (read)
        self._seq = 0
        self._epoch: Dict[str, int] = {}  # name -> sequence number of its latest read
        self._inflight = 0                # reads of this generation not answered yet
        self._upserts: Dict[str, Entry] = {}
        self._removed: Set[str] = set()
        self._full = False                # the pending batch completes a full listing
        self._listing_due = False
        self._listing_due_at = 0.0
        self._listed_at = 0.0             # monotonic time of the last listing sent
        self._child_events = 0            # children events since the last listing
        self._explained = 0               # of them, restarts seen through a child's own watch
        self._gone: Set[str] = set()      # deleted children with an exists watch on their path
        self._protect_until = 0.0
        self._ready = threading.Event()
        self._failure_logged = False
        self._deaf = False                # retired watches: ignore events until a full listing

    # -- lifecycle -------------------------------------------------------------------
    def start(self, wait: Optional[float] = None) -> bool:
        """Watch from now on; with `wait`, wait that many seconds for the first
        complete batch. True once it is in."""
        self.zk.client.add_listener(self._on_state)
        self.zk.on_new_session(self._on_new_session)
        self.zk.on_reconnect(self.resync)
        if self.zk.connected:
            self._new_generation()
            self._list(full=True)
        return self._ready.wait(wait) if wait else self._ready.is_set()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._generation += 1
        self.zk.remove_callback(self._on_new_session)
        self.zk.remove_callback(self.resync)
        self.zk.client.remove_listener(self._on_state)

    def wait_ready(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the first complete batch."""
        return self._ready.wait(timeout)

    @property
    def ready(self) -> bool:
        """True once a complete listing (with its data) has been applied."""
        return self._ready.is_set()

    def resync(self, wait: Optional[float] = None) -> bool:
        """List and read everything again (the watches stay); `apply` gets a full
        batch. With `wait`, wait up to that many seconds for it: True once applied.
        Runs on the session's worker after a reconnect (without waiting)."""
        with self._lock:
            target = self.resyncs + 1
        self._list(full=True)
        if not wait:
            return False
        with self._applied:
            return self._applied.wait_for(lambda: self.resyncs >= target or self._closed, wait)

    # -- sessions ----------------------------------------------------------------------
    def _on_state(self, state: Any) -> None:
        # kazoo's connection thread: no ZooKeeper calls here. kazoo fires every
        # watch of a lost session with a NONE event (ignored below); answers still
        # in flight belong to the old generation and are dropped.
        if state == KazooState.LOST:
            with self._lock:
                self._generation += 1
                self._inflight = 0
                if self._present:
                    self._protect_until = time.monotonic() + self.empty_protection

    def _on_new_session(self) -> None:
        # start() may already have listed on this very session (the first one).
        if self.zk.session_id is None or self.zk.session_id != self._session:
            self._new_generation()
            self._list(full=True)

    def _new_generation(self) -> None:
        with self._lock:
            self._session = self.zk.session_id
            self._generation += 1
            self._inflight = 0
            self._upserts, self._removed, self._full = {}, set(), False
            self._gone = set()  # the old session's watches are gone with it
            if self._present:
                self._protect_until = max(self._protect_until,
                                          time.monotonic() + self.empty_protection)

    # -- listing -----------------------------------------------------------------------
    def _list(self, full: bool) -> None:
        with self._lock:
            if self._closed:
                return
            generation = self._generation
            self._listing_due = False
            self._listed_at = time.monotonic()
            self._child_events = self._explained = 0
        try:
            result = self.zk.client.get_children_async(self.parent, watch=self._on_child_event)
        except _ZK_ERRORS + (RuntimeError,):  # the client is stopping: the next session lists
            self._later(lambda: self._list(full), generation)
            return
        result.rawlink(lambda answer: self._guard(self._listed_answer, generation, full, answer))

    def _listed_answer(self, generation: int, full: bool, answer: Any) -> None:
        try:
            children = answer.get()
        except NoNodeError:
            children = None
        except _ZK_ERRORS as exc:
            log.info("listing %s failed (%s): trying again", self.parent, exc.__class__.__name__)
            self._later(lambda: self._list(full), generation)
            return
        with self._lock:
            if generation != self._generation or self._closed:
                return
            self.listings += 1
            was_missing = self.parent_present is False
            self.parent_present = children is not None
            if full:
                self._deaf = False
            if children is None:
                # A missing parent ends no watch of ours: wait for it to appear.
                self._watch_parent(generation)
                if self.hold_missing_parent and self._present:
                    self._set_stale(True)
                    if full:
                        self._full = True
                    if not self._inflight:
                        self._flush()
                    return
                children = ()
            elif was_missing and self.hold_missing_parent and self._present:
                # Back after a rebuild: a restore may still be writing the keys.
                self._protect_until = time.monotonic() + self.empty_protection
            listed = set(children)
            new = listed - self._listed if not full else listed
            gone = self._listed - listed
            self._listed = listed
            if not full:
                new -= self._present
                new = {name for name in new if name not in self._epoch}
                self._gone -= listed  # listed again: the listing reads it
            accepted = {name for name in new if self._accept(name)}
            if self.max_children is not None and \
                    len(accepted | self._present) > self.max_children:
                keep = set(sorted(accepted | self._present)[:self.max_children])
                log.warning("%s has more than %d children; mirroring the first %d only",
                            self.describe, self.max_children, self.max_children)
                accepted &= keep
            protecting = time.monotonic() < self._protect_until
            dropped = (self._present - listed) if (full or protecting) else (gone & self._present)
            if dropped and protecting and (
                    self.protect_partial or not (accepted or (self._present & listed))):
                # Right after a new session: keep what we hold, mark it stale, and
                # believe the registry once the window is over.
                self._set_stale(True)
                log.warning("%s lists %d fewer name(s) than held right after a new ZooKeeper "
                            "session: keeping them for up to %.0f s", self.describe, len(dropped),
                            self._protect_until - time.monotonic())
                self._later(lambda: self._end_protection(generation), generation,
                            max(self._protect_until - time.monotonic(), 0.05))
                dropped = set()
            else:
                self._protect_until = 0.0
                self._set_stale(False)
            if full:
                self._full = True
            for name in dropped:
                self._read(generation, name)  # an answer of NoNode removes it
            for name in accepted:
                self._read(generation, name)
            if not self._inflight:
                self._flush()

    def _end_protection(self, generation: int) -> None:
        with self._lock:
            if generation != self._generation:
                return
            self._protect_until = 0.0
        self._list(full=True)

    def _watch_parent(self, generation: int) -> None:
        try:
            self.zk.client.exists_async(self.parent, watch=self._on_parent_event).rawlink(
                lambda answer: self._guard(self._parent_answer, generation, answer))
        except _ZK_ERRORS + (RuntimeError,):
            self._later(lambda: self._list(False), generation)

    def _parent_answer(self, generation: int, answer: Any) -> None:
        try:
            stat = answer.get()
        except _ZK_ERRORS:
            self._later(lambda: self._list(False), generation)
            return
        if stat is not None:  # created between the listing and this check
            self._list(self.hold_missing_parent)

    # -- watch events (kazoo's event thread) -----------------------------------------
    def _on_child_event(self, event: WatchedEvent) -> None:
        if event.type == EventType.NONE or self._closed or self._deaf:
            return  # the session's state, not a change (kazoo fires these on LOST)
        with self._lock:
            self._child_events += 1
            generation = self._generation
            now = time.monotonic()
            # ZooKeeper sends a child's own event before its parent's: when every
            # children event so far is a restart already seen through the child's
            # own watches, no name is new and the listing can wait (list_lazy).
            interval = (self.list_interval if self._child_events > self._explained
                        else self.list_lazy)
            due = max(now + self.list_delay, self._listed_at + interval)
            if self._listing_due and due >= self._listing_due_at:
                return
            self._listing_due = True
            self._listing_due_at = due
        self._later(lambda: self._due_listing(due), generation, due - now)

    def _due_listing(self, due: float) -> None:
        with self._lock:
            if not self._listing_due or self._listing_due_at != due:
                return  # listed meanwhile, or an earlier listing took this one's place
        self._list(False)

    def _on_parent_event(self, event: WatchedEvent) -> None:
        if event.type == EventType.CREATED and not self._closed:
            self._list(self.hold_missing_parent)

    def _on_data_event(self, event: WatchedEvent) -> None:
        if event.type == EventType.NONE or self._closed or self._deaf:
            return
        name = event.path.rsplit("/", 1)[-1]
        with self._lock:
            if event.type == EventType.CREATED:
                # Only a deleted child's exists watch says CREATED; if a listing
                # took the name meanwhile, its read (sent later) sees the creation.
                if name in self._gone:
                    self._gone.discard(name)
                    self._explained += 1
                    self._read(self._generation, name)
            elif name in self._present or name in self._epoch:
                if event.type == EventType.DELETED and name in self._present:
                    self._explained += 1
                self._read(self._generation, name)

    # -- reads -------------------------------------------------------------------------
    def _read(self, generation: int, name: str) -> None:
        """Read one child with a data watch (lock held)."""
        self._seq += 1
        seq = self._epoch[name] = self._seq
        self._inflight += 1
        try:
            result = self.zk.client.get_async(self.parent + "/" + name, watch=self._on_data_event)
        except _ZK_ERRORS + (RuntimeError,):
            self._inflight -= 1
            self._later(lambda: self._reread(name), generation)
            return
        result.rawlink(lambda answer: self._guard(self._read_answer, generation, name, seq, answer))

    def _reread(self, name: str) -> None:
        with self._lock:
            self._read(self._generation, name)

    def _read_answer(self, generation: int, name: str, seq: int, answer: Any) -> None:
        try:
            entry: Optional[Entry] = answer.get()
            failed = None
        except NoNodeError:
            entry, failed = None, None
        except _ZK_ERRORS as exc:
            entry, failed = None, exc
        with self._lock:
            if generation != self._generation or self._closed:
                return
            self._inflight -= 1
            self.reads += 1
            if self._epoch.get(name) == seq:
                if failed is not None:
                    log.info("reading %s/%s failed (%s): trying again", self.parent, name,
                             failed.__class__.__name__)
                    self._later(lambda: self._reread(name), generation)
                elif entry is None and self._keeps_last(name):
                    # Right after a new session, the last child held is gone (its
                    # provider's old session expired; it is registering again): keep
                    # it, stale, until it is back or the protection window ends.
                    del self._epoch[name]
                    self._set_stale(True)
                    self._watch_gone(generation, name)
                    self._later(lambda: self._end_protection(generation), generation,
                                max(self._protect_until - time.monotonic(), 0.05))
                elif entry is None:
                    del self._epoch[name]
                    self._listed.discard(name)
                    self._upserts.pop(name, None)
                    if name in self._present:
                        self._present.discard(name)
                        self._removed.add(name)
                        self._watch_gone(generation, name)
                else:
                    self._present.add(name)
                    self._removed.discard(name)
                    self._upserts[name] = entry
            if not self._inflight:
                self._flush()
            elif self._full and not self._ready.is_set() and len(self._upserts) >= self.first_chunk:
                # The first listing of a big parent: hand over what is read so far,
                # so the owner can route before the last of 2,000 reads is in.
                upserts, self._upserts = self._upserts, {}
                self.batches += 1
                self._apply(upserts, set(), False)

    def _keeps_last(self, name: str) -> bool:
        """Would removing `name` empty the mirror inside the protection window? (lock held)"""
        return (not self.protect_partial and self._present == {name}
                and time.monotonic() < self._protect_until)

    def _watch_gone(self, generation: int, name: str) -> None:
        """Watch a deleted child's path for its re-creation (lock held)."""
        if name in self._gone or len(self._gone) >= max(64, len(self._present)):
            return
        self._gone.add(name)
        try:
            result = self.zk.client.exists_async(self.parent + "/" + name,
                                                 watch=self._on_data_event)
        except _ZK_ERRORS + (RuntimeError,):
            self._gone.discard(name)
            return
        result.rawlink(lambda answer: self._guard(self._gone_answer, generation, name, answer))

    def _gone_answer(self, generation: int, name: str, answer: Any) -> None:
        try:
            stat = answer.get()
        except _ZK_ERRORS:
            stat = None
        with self._lock:
            if stat is not None and generation == self._generation and name in self._gone:
                self._gone.discard(name)  # created again before the watch was set
                self._read(generation, name)

    def _flush(self) -> None:
        """Hand the batch to `apply` (lock held; all its reads are in)."""
        full = self._full
        upserts, removed = self._upserts, self._removed
        self._upserts, self._removed, self._full = {}, set(), False
        if full:
            self.resyncs += 1
        if upserts or removed or full:
            self.batches += 1
            self._apply(upserts, removed, full)
        if full:
            self._ready.set()
            self._applied.notify_all()

    # -- helpers -----------------------------------------------------------------------
    def _set_stale(self, stale: bool) -> None:
        if stale != self.stale:
            self.stale = stale
            if self._on_stale is not None:
                self._on_stale(stale)

    def _guard(self, handler: Callable[..., None], *args: Any) -> None:
        # A kazoo callback that raises is lost for good: log (once) and go on.
        try:
            handler(*args)
        except Exception:
            if not self._failure_logged:
                self._failure_logged = True
                log.exception("updating %s failed; later updates still apply (further "
                              "failures are logged at DEBUG)", self.describe)
            else:
                log.debug("updating %s failed", self.describe, exc_info=True)

    def _later(self, task: Callable[[], None], generation: int, delay: float = RETRY_DELAY) -> None:
        def run() -> None:
            if not self._closed and generation == self._generation and self.zk.connected:
                self._guard(task)
        timer = threading.Timer(delay, run)
        timer.daemon = True
        timer.start()

    def retire(self) -> None:
        """Act as if every watch had died: drop answers in flight and ignore events
        until the next full listing (`resync`) sets the watches up again."""
        with self._lock:
            self._generation += 1
            self._inflight = 0
            self._upserts, self._removed, self._full = {}, set(), False
            self._deaf = True

    def hold(self, names: Iterable[str]) -> None:
        """Count `names` (say, from a snapshot) as present: a listing that lacks them
        is judged with empty protection, and each is read to be kept or removed."""
        with self._lock:
            self._present.update(names)

    def known(self) -> FrozenSet[str]:
        """The accepted children the mirror holds now."""
        with self._lock:
            return frozenset(self._present)


__all__ = ["ChildrenMirror", "Entry", "Apply"]
