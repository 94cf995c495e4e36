"""Governance of appkeys: register, list and remove them (MySQL `serviceapp`, each
change audited), read the audit log, and put the configured digest ACL on an open
registry (`secure_registry`)."""

import logging
from typing import Dict, List, Optional

from .. import naming
from ..zk import acl as zkacl
from ..errors import ComponentUnavailable, InvalidArgument, ProbeError
from ..options import check_number
from .backends import MAX_ROWS, Backends
from .nodes import ZOOKEEPER_ERRORS
from .results import AppkeyRow, AuditEntry

log = logging.getLogger("probe.admin")


class AppkeyOps(object):
    """Appkeys, the audit log and registry ACLs over shared `Backends`."""

    def __init__(self, backends: Backends) -> None:
        self.backends = backends

    def add(self, appkey: str, description: str = "", by: Optional[str] = None) -> bool:
        """Register `appkey` (True if added); recorded in the audit table as `by`."""
        naming.check_description(description)
        if by is not None:
            naming.check_changed_by(by)
        return self.backends.appkeys.add(naming.check_appkey(appkey), description,
                                         env=self.backends.env, by=by)

    def remove(self, appkey: str, by: Optional[str] = None) -> bool:
        """Remove `appkey` (True if it was there); recorded in the audit table as `by`."""
        if by is not None:
            naming.check_changed_by(by)
        return self.backends.appkeys.remove(naming.check_appkey(appkey), env=self.backends.env,
                                            by=by)

    def list(self) -> List[AppkeyRow]:
        """Every appkey, by name."""
        return [AppkeyRow(**row) for row in self.backends.appkeys.list()]

    def require(self, appkey: str) -> None:
        """UnknownAppkey unless `appkey` is registered (InvalidAppkey if malformed)."""
        self.backends.appkeys.require(naming.check_appkey(appkey))

    def audit(self, appkey: Optional[str] = None, limit: int = 100) -> List[AuditEntry]:
        """Governance changes, newest first (of one appkey, if given)."""
        if appkey is not None:
            naming.check_appkey(appkey)
        check_number("audit limit", limit, 1, integer=True, error=InvalidArgument)
        rows = self.backends.appkeys.audit(appkey, min(limit, MAX_ROWS))
        return [AuditEntry(**row) for row in rows]

    def secure_registry(self) -> Dict[str, int]:
        """Migrate an open registry to `zkserver.<env>.auth`: give the roots `/services`
        and `/configs`, and every znode under `/services/<env>` and `/configs/<env>`,
        the ACL of `probe.zk.acl.znode_acl` (that digest user ALL, world READ).
        Safe to repeat; live providers keep their nodes. Returns {tree: znodes changed}.

        :raises ProbeError: the config has no `zkserver.<env>.auth`.
        :raises ZooKeeperAuthFailed: a znode's ACL does not let these credentials
            change it.
        """
        settings, env = self.backends.settings, self.backends.env
        auth = settings.zookeeper.auth
        if not auth:
            raise ProbeError("config %s has no 'zkserver.%s.auth': add auth: \"user:password\" "
                             "first, then run this again" % (settings.path, env))
        zk = self.backends.zk
        changed = {}
        try:
            for root in zkacl.PROTECTED_ROOTS:
                tree = "%s/%s" % (root, naming.check_env(env))
                changed[tree] = zkacl.secure_tree(zk.client, auth, tree)
                changed[root] = zkacl.secure_tree(zk.client, auth, root, recursive=False)
        except ZOOKEEPER_ERRORS as exc:
            raise ComponentUnavailable("ZooKeeper at %s failed while setting ACLs (%s): run "
                                       "the command again" % (zk.hosts, exc.__class__.__name__))
        log.info("registry ACLs set for user %r: %s", zkacl.split_auth(auth)[0], changed)
        return changed


__all__ = ["AppkeyOps"]
