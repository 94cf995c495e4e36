"""The connections governance works over: MySQL (appkeys, audit, config history),
Redis (node settings, call stats) and ZooKeeper, each opened on first need and
closed together. Every governance noun (nodes, appkeys, config) shares one
`Backends`, so one Admin holds one connection to each component.
"""

import threading
from typing import Any, Optional

from ..stores.appkeys import AppkeyStore
from ..stores.confighistory import ConfigHistory
from ..stores.nodestore import NodeStore
from ..zk.session import ZooKeeper, release_zookeeper, shared_zookeeper
from ..settings import Settings

# The most rows one read of the audit log or of a key's history returns (a larger
# limit is read as this one; a limit below 1 is refused).
MAX_ROWS = 10000


class Backends(object):
    """Lazily opened stores for one config and env.

    :param settings: the loaded config (`probe.settings.load_settings`).
    :param timeout_s: seconds to wait for MySQL, Redis and ZooKeeper.

    Opening is serialised by a lock, so concurrent first uses (the console's
    request threads) open each component once.
    """

    def __init__(self, settings: Settings, timeout_s: float) -> None:
        self.settings = settings
        self.env: str = settings.env
        self.timeout_s = float(timeout_s)
        self._lock = threading.RLock()
        self._appkeys: Optional[AppkeyStore] = None
        self._nodestore: Optional[NodeStore] = None
        self._zk: Optional[ZooKeeper] = None
        self._config_history: Optional[ConfigHistory] = None

    @property
    def appkeys(self) -> AppkeyStore:
        """The MySQL store of appkeys and the audit log."""
        with self._lock:
            if self._appkeys is None:
                self._appkeys = AppkeyStore(self.settings.mysql, self.timeout_s)
            return self._appkeys

    @property
    def nodestore(self) -> NodeStore:
        """The Redis store of node settings (its `redis` client also reads call stats)."""
        with self._lock:
            if self._nodestore is None:
                self._nodestore = NodeStore(self.settings.redis, self.env, self.timeout_s)
            return self._nodestore

    @property
    def redis(self) -> Any:
        """The redis-py client (single server or cluster) for reading call stats."""
        return self.nodestore.redis

    @property
    def zk(self) -> ZooKeeper:
        """The shared ZooKeeper session of this config (connected on first use)."""
        with self._lock:
            if self._zk is None:
                self._zk = shared_zookeeper(self.settings.zookeeper, timeout=self.timeout_s)
            return self._zk

    @property
    def config_history(self) -> ConfigHistory:
        """The config center's MySQL history (its own connection: it holds named locks)."""
        with self._lock:
            if self._config_history is None:
                self.appkeys.ensure_schema()
                self._config_history = ConfigHistory(self.settings.mysql, self.timeout_s)
            return self._config_history

    def open(self) -> None:
        """Open MySQL, Redis and ZooKeeper now (raises if one is down; retried on the
        next call)."""
        with self._lock:
            self.appkeys
            self.nodestore
            self.zk

    def close(self) -> None:
        with self._lock:
            appkeys, self._appkeys = self._appkeys, None
            zk, self._zk = self._zk, None
            nodestore, self._nodestore = self._nodestore, None
            history, self._config_history = self._config_history, None
        if appkeys is not None:
            appkeys.close()
        if zk is not None:
            release_zookeeper(zk)
        if nodestore is not None:
            nodestore.close()
        if history is not None:
            history.close()
