"""The one local JSON file writer and reader behind routing snapshots and config
backups: what a process serves while ZooKeeper is down.

- Writes are atomic (a temp file in the same folder, then a rename), with folders
  created 0700 and files 0600; a failed write leaves no temp file behind.
- Writes run off the update path: `SnapshotWriter.schedule(path, produce)` asks the
  process's one writer thread to call `produce()` a moment later and write what it
  returns, once per burst of changes however many came in.
- Reads trust nothing (ssh's StrictModes): the file and every folder from the
  configured root down to it must be owned by the current user and writable by
  nobody else, else the file is refused with one warning. A file larger than the
  limit is not read at all.
"""

import json
import logging
import os
import stat
import tempfile
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

from ..errors import UntrustedFile

log = logging.getLogger("probe.zk.snapshot")

WRITE_DELAY = 0.5  # seconds from a change to its write: one write per burst


def _check_owned(path: str, st: os.stat_result, what: str) -> None:
    uid = os.geteuid()
    if st.st_uid != uid:
        raise UntrustedFile("%s %s is owned by uid %d, not by this user (uid %d): not reading it "
                            "(delete it, or chown it to this user)" % (what, path, st.st_uid, uid))
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UntrustedFile("%s %s is writable by group or others (mode %o): not reading it "
                            "(chmod go-w it, or delete it)" % (what, path, stat.S_IMODE(st.st_mode)))


def check_trusted(path: str, root: Optional[str] = None) -> None:
    """Raise UntrustedFile unless every folder from `root` (default: the file's own
    folder) down to `path`'s folder is owned by this user and not writable by
    group or others. The file itself is checked by `read_json` on its open handle."""
    folder = os.path.dirname(os.path.abspath(path))
    chain = [folder]
    top = os.path.abspath(root) if root else folder
    if folder.startswith(top.rstrip("/") + "/"):
        while folder != top:
            folder = os.path.dirname(folder)
            chain.append(folder)
    for folder in reversed(chain):
        _check_owned(folder, os.lstat(folder), "folder")


def read_json(path: str, max_bytes: int, root: Optional[str] = None) -> Any:
    """The JSON document in `path`, after the trust checks. Raises FileNotFoundError
    when there is none, UntrustedFile when it may not be trusted, ValueError (or
    OSError) when it is too big or not JSON."""
    check_trusted(path, root)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as handle:
        st = os.fstat(handle.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise UntrustedFile("%s is not a regular file: not reading it" % path)
        _check_owned(path, st, "file")
        if st.st_size > max_bytes:
            raise ValueError("%d bytes, more than the %d allowed" % (st.st_size, max_bytes))
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError("more than the %d bytes allowed" % max_bytes)
    return json.loads(data.decode("utf-8"))


def _make_folders(folder: str) -> None:
    # os.makedirs gives `mode` to the last folder only: create each level 0700.
    missing = []
    while folder and not os.path.isdir(folder):
        missing.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass


def write_json(path: str, document: Any) -> None:
    """Write `document` to `path` atomically (0600, folders 0700). Raises OSError,
    TypeError or ValueError; no temp file is left behind either way."""
    folder = os.path.dirname(path)
    _make_folders(folder)
    handle, tmp = tempfile.mkstemp(dir=folder, prefix=".probe-", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            # No fsync: the rename alone means a reader sees the old file or the new
            # one, and 50 processes fsyncing on every change cost the machine.
            json.dump(document, out, ensure_ascii=False, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class SnapshotWriter(object):
    """One daemon thread that writes files a moment after they were asked for.

    `schedule(path, produce)` is cheap and never blocks on the disk: the latest
    `produce` per path wins and is called on the writer thread when its delay is
    up; returning None skips the write (say, while the data is stale). Threading:
    any thread may schedule or flush; `produce` runs on the writer thread (or on the
    flushing thread).
    """

    def __init__(self, delay: float = WRITE_DELAY) -> None:
        self.delay = float(delay)
        self.writes = 0
        self._due: Dict[str, Tuple[float, Callable[[], Any]]] = {}
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._warned: Dict[str, str] = {}

    def schedule(self, path: str, produce: Callable[[], Any]) -> None:
        with self._cond:
            due = self._due.get(path)
            self._due[path] = (due[0] if due else time.monotonic() + self.delay, produce)
            if self._thread is None or not self._thread.is_alive():
                # (Re)started lazily: a forked child has no writer thread of its own.
                self._thread = threading.Thread(target=self._loop, name="probe-snapshot-writer",
                                                daemon=True)
                self._thread.start()
            if due is None:
                self._cond.notify()  # a pending write keeps its time: no need to wake

    def flush(self, path: str) -> None:
        """Write `path` now if a write is pending (on the calling thread)."""
        with self._cond:
            entry = self._due.pop(path, None)
        if entry is not None:
            self._write(path, entry[1])

    def cancel(self, path: str) -> None:
        with self._cond:
            self._due.pop(path, None)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._due:
                    self._cond.wait()
                now = time.monotonic()
                path, (due, produce) = min(self._due.items(), key=lambda item: item[1][0])
                if due > now:
                    self._cond.wait(due - now)
                    continue
                del self._due[path]
            self._write(path, produce)

    def _write(self, path: str, produce: Callable[[], Any]) -> None:
        try:
            document = produce()
            if document is None:
                return
            write_json(path, document)
            self.writes += 1
            self._warned.pop(path, None)
        except Exception as exc:  # OSError, a value JSON cannot hold: warn, keep serving
            text = "%s: %s" % (exc.__class__.__name__, exc)
            if self._warned.get(path) != text:  # once per distinct failure, not per change
                self._warned[path] = text
                log.warning("cannot write %s: %s", path, text)


_writer: Optional[SnapshotWriter] = None
_writer_lock = threading.Lock()


def writer() -> SnapshotWriter:
    """The process's one snapshot/backup writer."""
    global _writer
    with _writer_lock:
        if _writer is None:
            _writer = SnapshotWriter()
        return _writer


__all__ = ["SnapshotWriter", "writer", "read_json", "write_json", "check_trusted", "WRITE_DELAY"]
