"""Governance operations, shared by the CLI and the web console: a thin façade over
probe.governance, split there by noun.

- `probe.governance.nodes.NodeOps`: list nodes, change weights and switches (the
  node-change saga: audit row → Redis → live znode → commit);
- `probe.governance.appkeys.AppkeyOps`: appkeys, the audit log, registry ACLs;
- `probe.governance.config.ConfigOps`: the config center's keys and history;
- `probe.governance.describe`: the results as sentences and tables for people.

Results are typed (`probe.governance.results`) and read as mappings too
(`change["live"]`), as the dicts they replace did.
"""

from typing import Any, Dict, List, Optional, Union

from .errors import ProbeError
from .governance.appkeys import AppkeyOps
from .governance.backends import Backends
from .governance.config import ConfigOps
from .governance.nodes import NodeOps
from .governance.results import (AppkeyRow, AuditEntry, ConfigChange, ConfigRestore, ConfigVersion,
                                 NodeChange, NodeRow)
from .options import DEFAULT_CONNECT_TIMEOUT_MS, check_number
from .settings import load_settings
from .stores.stats import read_stats


class Admin(object):
    """Operations for one config file and env. Connections open on first need.

    :param config_path: the config YAML (default: PROBE_CONFIG or the packaged one).
    :param env: the env name (default: PROBE_ENV or the hostname rules).
    :param connect_timeout: milliseconds to wait for MySQL, Redis and ZooKeeper.

    The nouns are attributes too: `admin.node_ops`, `admin.appkey_ops`,
    `admin.config_ops` (all over the same connections).
    """

    def __init__(self, config_path: Optional[str] = None, env: Optional[str] = None,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_MS) -> None:
        check_number("connect_timeout", connect_timeout, 1, "ms", maximum=600000)
        self.settings = load_settings(config_path, env)
        self.env: str = self.settings.env
        self.connect_timeout = connect_timeout
        self._timeout = connect_timeout / 1000.0  # the stores and kazoo take seconds
        self.backends = Backends(self.settings, self._timeout)
        self.node_ops = NodeOps(self.backends, update_live=self._update_live)
        self.appkey_ops = AppkeyOps(self.backends)
        self.config_ops = ConfigOps(self.backends)

    # The stores, for tools that need them directly (opened on first use).
    @property
    def appkeys(self) -> Any:
        return self.backends.appkeys

    @property
    def nodestore(self) -> Any:
        return self.backends.nodestore

    @property
    def zk(self) -> Any:
        return self.backends.zk

    def open(self) -> None:
        """Connect MySQL, Redis and ZooKeeper now (raises if one is down)."""
        self.backends.open()

    def close(self) -> None:
        self.backends.close()

    def __enter__(self) -> "Admin":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- appkeys -----------------------------------------------------------------
    def add_appkey(self, appkey: str, description: str = "", by: Optional[str] = None) -> bool:
        """Register `appkey` (True if added); recorded in the audit table as `by`."""
        return self.appkey_ops.add(appkey, description, by)

    def remove_appkey(self, appkey: str, by: Optional[str] = None) -> bool:
        """Remove `appkey` (True if it was there); recorded in the audit table as `by`."""
        return self.appkey_ops.remove(appkey, by)

    def list_appkeys(self) -> List[AppkeyRow]:
        return self.appkey_ops.list()

    def require_appkey(self, appkey: str) -> None:
        """UnknownAppkey unless `appkey` is registered."""
        self.appkey_ops.require(appkey)

    def audit(self, appkey: Optional[str] = None, limit: int = 100) -> List[AuditEntry]:
        return self.appkey_ops.audit(appkey, limit)

    def secure_registry(self) -> Dict[str, int]:
        """Put `zkserver.<env>.auth`'s ACL on an open registry ({tree: znodes changed});
        see `AppkeyOps.secure_registry`."""
        return self.appkey_ops.secure_registry()

    # -- nodes ---------------------------------------------------------------
    def nodes(self, appkey: str, service: Optional[str] = None) -> List[NodeRow]:
        """Every node of `appkey` (and `service`) that is live or has stored settings:
        service, address, live, weight, valid, stored, problem, registered_at, the
        dialect (transport, protocol), `ejected_by` (consumer processes that have the
        node ejected now) and `ejected_reasons` (why, as they report it)."""
        return self.node_ops.nodes(appkey, service)

    def set_weight(self, appkey: str, service: str, address: str, weight: Any,
                   create: bool = False, by: Optional[str] = None) -> NodeChange:
        return self.node_ops.set_weight(appkey, service, address, weight, create, by)

    def disable(self, appkey: str, service: str, address: str, create: bool = False,
                by: Optional[str] = None) -> NodeChange:
        return self.node_ops.set_valid(appkey, service, address, False, create, by)

    def enable(self, appkey: str, service: str, address: str, create: bool = False,
               by: Optional[str] = None) -> NodeChange:
        return self.node_ops.set_valid(appkey, service, address, True, create, by)

    def _update_live(self, path: str, name: str, field: str, key: str, value: int,
                     attempts: int = 20) -> bool:
        # The step of a node change that writes the live znode (a seam for tests
        # that inject faults; see NodeOps.update_live).
        return self.node_ops.update_live(path, name, field, key, value, attempts)

    # -- call stats ----------------------------------------------------------
    def stats(self, appkey: str, service: Optional[str] = None, minutes: float = 5,
              side: str = "server") -> List[Dict[str, Any]]:
        """Calls, errors and latency per (service, method, node): `probe.stores.stats.read_stats`."""
        return read_stats(self.backends.redis, self.env, appkey, service, minutes=minutes, side=side)

    def node_figures(self, appkey: str, now: float, window: float = 20.0) -> Dict[Any, Dict[str, Any]]:
        """Live calls/s, error rate and p99 per (service, address): see probe.metrics.figures."""
        from .metrics.figures import node_figures
        return node_figures(self.backends.redis, self.env, appkey, now, window)

    def service_series(self, appkey: str, service: str, now: float) -> Dict[str, Any]:
        """A service's calls/s and p99 per minute over the last hour."""
        from .metrics.figures import service_series
        return service_series(self.backends.redis, self.env, appkey, service, now)

    # -- config center -------------------------------------------------------------
    def set_config(self, appkey: str, key: str, value: Any, by: Optional[str] = None) -> ConfigChange:
        """Set config `key` of `appkey` to the JSON-serializable `value`."""
        return self.config_ops.set(appkey, key, value, by)

    def set_config_json(self, appkey: str, key: str, text: Union[str, bytes],
                        by: Optional[str] = None) -> ConfigChange:
        """Set config `key` of `appkey` to the value written as JSON `text`."""
        return self.config_ops.set_json(appkey, key, text, by)

    def get_config(self, appkey: str, key: str) -> Any:
        """The value of config `key`; UnknownConfigKey when it is not set."""
        return self.config_ops.get(appkey, key)

    def list_config(self, appkey: str) -> Dict[str, Any]:
        """{key: value} of every config key of `appkey`."""
        return self.config_ops.list(appkey)

    def delete_config(self, appkey: str, key: str, by: Optional[str] = None) -> ConfigChange:
        return self.config_ops.delete(appkey, key, by)

    def config_history(self, appkey: str, key: str, limit: int = 100) -> List[ConfigVersion]:
        """The changes of config `key`, newest first: version, value, changed_by,
        changed_at, action, old_value and deleted."""
        return self.config_ops.history(appkey, key, limit)

    def rollback_config(self, appkey: str, key: str, version: Any,
                        by: Optional[str] = None) -> ConfigChange:
        """Write the value of history `version` of `key` as a new change."""
        return self.config_ops.rollback(appkey, key, version, by)

    def restore_config(self, appkey: str, by: Optional[str] = None) -> ConfigRestore:
        """Write back, from MySQL history, every key whose znode is missing."""
        return self.config_ops.restore(appkey, by)


__all__ = ["Admin", "ProbeError"]
