"""The named errors probe raises. Every message says what was wrong, with which
value, and what to do about it."""

from typing import Optional, cast

from thriftpy2.transport import TTransportException


class ProbeError(Exception):
    """Base class of every error probe raises on purpose."""


class ConfigError(ProbeError):
    """The configuration file is missing, unreadable or lacks a required key."""


class InvalidServiceName(ProbeError):
    """A service name is not made of letters, digits and underscores."""


class InvalidAppkey(ProbeError):
    """An appkey is empty or holds characters that cannot go into a znode path."""


class InvalidEnv(ProbeError):
    """An env name is empty, too long or holds characters other than letters,
    digits, '_' and '-'."""


class ThriftFileError(ProbeError):
    """A thrift IDL file is missing, does not parse, or lacks the service."""


class UnknownAppkey(ProbeError):
    """The appkey is not registered in the MySQL table `serviceapp`."""


class SchemaMissing(ProbeError):
    """MySQL is reachable but probe's tables are not there yet."""


class ComponentUnavailable(ProbeError):
    """MySQL, Redis or ZooKeeper could not be reached."""


class NoAvailableNode(ProbeError):
    """No live, enabled node with a positive weight serves the service."""


class NodeUnreachable(ProbeError):
    """A chosen node refused or timed out the connection (and no retry was left)."""


class InvalidNodeAddress(ProbeError):
    """An `ip:port` argument does not parse."""


class InvalidHost(InvalidNodeAddress):
    """A host (an advertise_host, the host part of a node name or address) is not a
    host name or an IP literal: an '_' would hide the node, a '/' nest znodes."""


class InvalidNodeData(ProbeError, ValueError):
    """Node settings JSON (znode data, the Redis copy, a snapshot entry) is
    malformed, out of range, or names another address than its node."""


class InvalidWeight(ProbeError):
    """A weight is not an integer within the allowed range."""


class UnknownNode(ProbeError):
    """No such node is registered or stored for the appkey and service."""


class NodeSettingsConflict(ProbeError):
    """A node's live data kept changing under an admin edit."""


class InvalidConfigKey(ProbeError):
    """A config key is empty, too long, or holds characters a znode name cannot."""


class InvalidConfigValue(ProbeError):
    """A config value is not valid JSON, or is larger than the limit."""


class UnknownConfigKey(ProbeError):
    """The appkey has no such config key (or no such version in its history)."""


class ConfigConflict(ProbeError):
    """Another writer changed the config key at the same time; nothing was written."""


class ConfigUnavailable(ProbeError):
    """Live config cannot start: ZooKeeper is unreachable and there is no local backup."""


class ZooKeeperAuthFailed(ComponentUnavailable):
    """ZooKeeper refused the configured `zkserver.<env>.auth` credentials, or they
    do not match the ACL of the registry's znodes (a wrong user or password)."""


class InvalidHealthPolicy(ProbeError, ValueError):
    """A node-health, retry-budget or per-method timeout option is out of range or of
    the wrong type."""


class NodeCallFailed(ProbeError, TTransportException):
    """A call failed after its request left for a node (a timeout, a reset, the peer
    closing): the message names the node, the service and the method. A thrift
    `TTransportException` too (same `type`), so code catching that still works; the
    original error is its `__cause__`."""

    def __init__(self, node: str, service: str, method: str, cause: BaseException,
                 kind: Optional[int] = None) -> None:
        if kind is None:
            kind = getattr(cause, "type", TTransportException.UNKNOWN)
        if not isinstance(kind, int):
            kind = TTransportException.UNKNOWN
        reason = getattr(cause, "message", None) or str(cause) or type(cause).__name__
        message = "%s.%s failed on node %s after the request was sent: %s" % (
            service, method, node, reason)
        TTransportException.__init__(self, type=kind, message=message)
        self.node = node
        self.service = service
        self.method = method
        self.__cause__ = cause

    def __str__(self) -> str:
        return cast(str, self.message)  # always set, by __init__


class RegisterError(ProbeError):
    """A `probe register` argument is unusable (a check method, an interval, ...);
    nothing was written."""


class InvalidArgument(ProbeError):
    """A command-line or API argument is not a number, or out of its range."""


class UntrustedFile(ProbeError):
    """A local snapshot or backup file (or a folder above it) is not owned by the
    current user, or others may write it: it is not read (ssh's StrictModes)."""
