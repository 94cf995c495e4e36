"""A provider's registration: its ephemeral znode, kept in place across session
loss, deletion by others and stale nodes of its own dead sessions."""

import logging
import threading
from typing import Any, Callable, Optional

from kazoo.exceptions import (BadVersionError, ConnectionDropped, ConnectionLoss,
                              KazooException, NoNodeError, NodeExistsError,
                              OperationTimeoutError, ZookeeperError)
from kazoo.handlers.threading import KazooTimeoutError

from .. import naming
from ..errors import ComponentUnavailable, InvalidNodeAddress
from ..naming import NodeSettings
from .session import ZooKeeper

log = logging.getLogger("probe.registry")  # the logger name users configure


class Registration(object):
    """A provider's ephemeral znode, kept in place for as long as it is open.

    Re-created on every new session, when someone deletes it, and when a dead
    session of ours still owns it (apache/dubbo#5125): then the stale node is
    deleted first. `reload()` returns the node's durable settings (from Redis) or
    None when they cannot be read; the last known data is used then.

    The node's host and port are its own, taken from its path (which the provider
    built from its own address): only the weight and switch are ever taken from
    Redis or from the znode's data, so neither can move the node elsewhere.
    """

    def __init__(self, zk: ZooKeeper, path: str, data: NodeSettings,
                 reload: Optional[Callable[[], Optional[NodeSettings]]] = None) -> None:
        identity = naming.parse_node_name(path.rsplit("/", 1)[-1])
        if identity is None:
            raise InvalidNodeAddress("cannot register %r: its last part is no node name "
                                     "<service>_<host>_<port>" % (path,))
        self.zk = zk
        self.path = path
        self.host, self.port = identity.ip, identity.port
        self.data = self._own(data)
        self._reload = reload
        self._lock = threading.Lock()
        self._closed = False
        self._foreign_seen = False
        self._delete_lock = threading.Lock()  # one delete at a time (loop or reconnect)
        self._delete_pending = False
        self._owner: Optional[int] = None  # the session that created (or kept) the node

    def _own(self, settings: NodeSettings) -> NodeSettings:
        """`settings` with this node's own address and dialect; InvalidNodeData if out
        of range. (What the node speaks is the process's to say, never the data's.)"""
        dialect = getattr(self, "data", settings)
        return settings._replace(host=self.host, port=self.port, transport=dialect.transport,
                                 protocol=dialect.protocol).check()

    def register(self) -> None:
        self._create()
        self.zk.on_new_session(self._recreate)
        self.zk.client.DataWatch(self.path, self._on_own_data)

    def close(self) -> bool:
        """Stop keeping the znode and delete it if this session owns it.

        True once that is settled: deleted, gone, not ours, or the session that
        could own it is gone (and the ephemeral node with it). False when
        ZooKeeper could not be asked (disconnected, ConnectionLoss, a timeout):
        the delete stays pending, and every later `close()` retries it, as does
        the session's reconnect. A session that reconnects within its timeout
        keeps its ephemeral node, so a delete given up on would leave a dead
        server registered for as long as the process lives."""
        with self._lock:
            first = not self._closed
            self._closed = True
        if first:
            self.zk.remove_callback(self._recreate)
        with self._delete_lock:
            if first:
                self._delete_pending = True
            if not self._delete_pending:
                return True
            if self._try_delete(first):
                self._delete_pending = False
                self.zk.remove_callback(self._retry_delete)
                return True
            if first:
                self.zk.on_reconnect(self._retry_delete)
                self.zk.on_new_session(self._retry_delete)
            return False

    @property
    def delete_pending(self) -> bool:
        return self._delete_pending

    def abandon_delete(self) -> None:
        """Give up a pending delete (the node is about to be registered again by
        this session): waits for a delete in flight, so none runs afterwards."""
        with self._delete_lock:
            self._delete_pending = False
        self.zk.remove_callback(self._retry_delete)

    def _retry_delete(self) -> None:
        if self.close():
            log.info("deleted %s once ZooKeeper was back", self.path)

    def _try_delete(self, first: bool) -> bool:
        """One owner-checked delete; True when settled, False to retry later."""
        session = self.zk.session_id  # None while disconnected
        if not self.zk.connected or session is None:
            if first:
                log.warning("ZooKeeper at %s is unreachable: deleting %s once it is back "
                            "(or it vanishes when the session expires)", self.zk.hosts, self.path)
            return False
        if self._owner is not None and session != self._owner:
            return True  # a new session: the one that owned the node expired, and the node too
        timeout = self.zk.session_timeout
        try:
            _, stat = self.zk.client.get_async(self.path).get(timeout=timeout)
            if stat.ephemeralOwner != session:
                return True  # someone else's node (or none of ours): never deleted here
            self.zk.client.delete_async(self.path, version=stat.version).get(timeout=timeout)
            return True
        except NoNodeError:
            return True
        except (ConnectionLoss, ConnectionDropped, OperationTimeoutError, KazooTimeoutError,
                BadVersionError) as exc:
            # BadVersionError: edited between the read and the delete; read it again.
            log.info("deregistering %s: %s; retrying", self.path, exc.__class__.__name__)
            return False
        except (KazooException, ZookeeperError) as exc:
            # The session ended (SessionExpiredError, the client closed), or an error
            # a retry cannot fix (NoAuthError): nothing more this process can do.
            log.info("deregistering %s: %s", self.path, exc.__class__.__name__)
            return True

    def _recreate(self) -> None:
        if self._reload is not None:
            fresh = self._reload()
            if fresh is not None:
                try:
                    self.data = self._own(fresh)
                except ValueError as exc:
                    log.warning("stored settings of %s are unusable (%s): keeping the last known",
                                self.path, exc)
        self._create()

    def _create(self) -> None:
        client = self.zk.client
        with self._lock:
            for _ in range(5):
                if self._closed:
                    return
                try:
                    client.create(self.path, self.data.to_bytes(), ephemeral=True, makepath=True)
                    self._owner = self.zk.session_id or self._owner
                    log.info("registered %s %s", self.path, self.data.to_json())
                    return
                except NodeExistsError:
                    try:
                        _, stat = client.get(self.path)
                    except NoNodeError:
                        continue
                    if stat.ephemeralOwner == self.zk.session_id:
                        self._owner = stat.ephemeralOwner
                        return
                    log.warning("%s is held by session %s (a dead one of ours, or another "
                                "process on the same address): replacing it",
                                self.path, hex(stat.ephemeralOwner))
                    try:
                        client.delete(self.path, version=stat.version)
                    except (NoNodeError, BadVersionError):
                        pass
            raise ComponentUnavailable("could not create %s in ZooKeeper at %s after 5 tries"
                                       % (self.path, self.zk.hosts))

    def _on_own_data(self, data: Optional[bytes], stat: Any, event: Any = None) -> Optional[bool]:
        if self._closed:
            return False
        if data is None:
            if self.zk.connected:
                log.warning("%s disappeared while serving: re-creating it", self.path)
                self.zk.submit(self._recreate)
            return None
        try:
            # Track operator edits so a re-created node keeps them even without Redis.
            seen = NodeSettings.from_json(data)
            if (seen.host, seen.port) != (self.host, self.port):
                raise ValueError("it names %s:%d" % (naming.describe_data(seen.host), seen.port))
            self.data = self._own(seen)
            self._foreign_seen = False
        except Exception as exc:  # anything: a kazoo watch must never die of bad data
            if not self._foreign_seen:  # once per episode, not once per hostile write
                log.warning("%s holds data that is not this node's (%s): a re-created node "
                            "gets %s", self.path, exc if isinstance(exc, ValueError)
                            else exc.__class__.__name__, self.data.to_json())
            self._foreign_seen = True
        return None


__all__ = ["Registration"]
