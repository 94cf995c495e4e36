"""ZooKeeper digest credentials and the ACL of every znode probe creates.

With `zkserver.<env>.auth: "user:password"` each znode probe creates (the
`/services/...` registry, the `/configs/...` config center, and their parents)
carries the same ACL, built by `znode_acl`: that digest identity may do anything,
everyone else may only read. Consumers route without credentials; nobody without
them can add, change or remove a node.

ZooKeeper's digest scheme never refuses a password: a wrong one just gives the
session another identity. So `check_credentials` compares the identity with the
ACL the registry already carries, and a session that could not write there fails
at start with `ZooKeeperAuthFailed`, before anything is registered.
"""

import logging
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Tuple

from kazoo.exceptions import NoAuthError, NoNodeError
from kazoo.protocol.serialization import Auth
from kazoo.security import ACL, Id, Permissions, make_acl, make_digest_acl_credential

from .. import naming
from ..errors import ZooKeeperAuthFailed

if TYPE_CHECKING:
    from kazoo.client import KazooClient

log = logging.getLogger("probe.zkacl")

# The trees probe creates znodes in: the registry and the config center.
PROTECTED_ROOTS = (naming.SERVICES_ROOT, "/configs")
_WRITE_PERMS = Permissions.WRITE | Permissions.CREATE | Permissions.DELETE


def split_auth(auth: str) -> Tuple[str, str]:
    """("user", "password") from "user:password"."""
    user, _, password = auth.partition(":")
    return user, password


def digest_id(auth: str) -> str:
    """The identity ZooKeeper gives a session that added `auth`: "user:base64(sha1)"."""
    return make_digest_acl_credential(*split_auth(auth))


def znode_acl(auth: Optional[str]) -> Optional[List[ACL]]:
    """The ACL of every znode probe creates with credentials `auth` ("user:password"):
    that digest identity ALL, world READ. None without credentials (ZooKeeper's
    open default). Any code that creates znodes uses this, or a kazoo session made
    by `kazoo_auth_options`, whose default ACL it is."""
    if not auth:
        return None
    return [ACL(Permissions.ALL, Id("digest", digest_id(auth))),
            make_acl("world", "anyone", read=True)]


class HideAuthPackets(logging.Filter):
    """kazoo logs every request it sends at DEBUG, the digest Auth packet (with the
    password) included: such a record shows the scheme only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(arg, Auth) for arg in record.args):
            record.args = tuple("Auth(scheme=%r, auth=<hidden>)" % arg.scheme
                                if isinstance(arg, Auth) else arg for arg in record.args)
        return True


_HIDE_AUTH = HideAuthPackets()


def kazoo_logger(name: str) -> logging.Logger:
    """The logger for a KazooClient that may carry credentials: `name`, filtered so
    no log line shows them."""
    logger = logging.getLogger(name)
    if _HIDE_AUTH not in logger.filters:
        logger.addFilter(_HIDE_AUTH)
    return logger


def kazoo_auth_options(auth: Optional[str]) -> Dict[str, Any]:
    """KazooClient keyword arguments for credentials `auth` (none without them)."""
    if not auth:
        return {}
    return {"auth_data": [("digest", auth)], "default_acl": znode_acl(auth)}


def granted(acls: Optional[Iterable[ACL]], auth: Optional[str]) -> int:
    """The permission bits `acls` give a session holding `auth` (or none)."""
    mine = digest_id(auth) if auth else None
    bits = 0
    for acl in acls or ():
        scheme, ident = acl.id.scheme, acl.id.id
        if (scheme == "world" and ident == "anyone") or (scheme == "digest" and ident == mine):
            bits |= acl.perms
    return bits


def check_credentials(client: "KazooClient", auth: Optional[str], where: str) -> None:
    """Raise ZooKeeperAuthFailed unless `auth` may write under every existing root
    of PROTECTED_ROOTS. A root that does not exist yet is created later with our
    ACL; an open root (world ALL, an unmigrated registry) is fine too.

    :param client: a connected KazooClient that added `auth`.
    :param where: the ZooKeeper hosts, for the message.
    """
    if not auth:
        return
    user = split_auth(auth)[0]
    for root in PROTECTED_ROOTS:
        try:
            acls, _ = client.get_acls(root)
        except NoNodeError:
            continue
        if granted(acls, auth) & _WRITE_PERMS:
            continue
        # The ACL is the server's data: show a few short names, never all of it.
        users = sorted(set(acl.id.id.split(":", 1)[0][:64] for acl in acls
                           if acl.id.scheme == "digest"))[:5]
        known = user in users
        raise ZooKeeperAuthFailed(
            "ZooKeeper at %s: the credentials of user %r in zkserver.auth %s %s (it lets %s "
            "write): fix the %s in the config (nothing was registered or changed)"
            % (where, user, "do not match the ACL of" if known else "are not in the ACL of",
               root, ", ".join("digest user %r" % u for u in users) or "nobody",
               "password" if known else "user and password"))


def secure_tree(client: "KazooClient", auth: str, root: str, recursive: bool = True) -> int:
    """Set `znode_acl(auth)` on `root` and (`recursive`) every znode below it
    (migrating an open registry). Returns the number of znodes changed. The session
    must have ADMIN permission on each (an open registry's world ALL grants it).

    :raises ZooKeeperAuthFailed: a znode's current ACL does not let us change it.
    """
    acl = znode_acl(auth)
    if acl is None:
        raise ValueError("no credentials: set zkserver.<env>.auth first")
    changed = 0
    pending = [root]
    while pending:
        path = pending.pop()
        try:
            current, _ = client.get_acls(path)
            children = client.get_children(path) if recursive else []
        except NoNodeError:
            continue
        if sorted(current) != sorted(acl):
            try:
                client.set_acls(path, acl)
            except NoNodeError:
                continue
            except NoAuthError:
                raise ZooKeeperAuthFailed(
                    "cannot set the ACL of %s: its ACL does not grant ADMIN to user %r or to "
                    "everyone (set it with the credentials it names, or a ZooKeeper superuser)"
                    % (path, split_auth(auth)[0]))
            changed += 1
        pending.extend(path.rstrip("/") + "/" + child for child in children)
    return changed
