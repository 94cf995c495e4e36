"""The one place that builds and parses names: znode paths, node names, the Redis
hash and field of a node's settings, and the node settings JSON itself.

Everything outside this module asks it for a name instead of formatting one, so a
weight edit and the provider it targets always agree on the key. The builders
check every part first: a host with an `_` would make a node invisible (node names
are split on `_`), a `/` would nest znodes, a `|` would shift a Redis field.

Every pattern here is a full-string match on ASCII (`re.fullmatch`, `[0-9]`), so
a trailing newline or a non-ASCII digit never slips through, and every length fits
the MySQL columns of probe/config/schema.sql.
"""

import ipaddress
import json
import re
from typing import Any, Dict, NamedTuple, NoReturn, Optional, Tuple, Type, Union, cast

from .errors import (InvalidAppkey, InvalidEnv, InvalidHost, InvalidNodeAddress, InvalidNodeData,
                     InvalidServiceName, InvalidWeight, ProbeError)
from .options import check_number

SERVICES_ROOT = "/services"
SETTINGS_HASH_PREFIX = "thriftprobe_"
STATS_KEY_PREFIX = "thriftprobe_stats_"
HEALTH_KEY_PREFIX = "thriftprobe_health_"
FIELD_SEPARATOR = "|"

DEFAULT_WEIGHT = 10
MAX_WEIGHT = 1000

# Lengths of the MySQL columns these values are stored in (schema.sql).
MAX_SERVICE_LENGTH = 128    # governance_audit.service
MAX_APPKEY_LENGTH = 128     # serviceapp.appkey, governance_audit.appkey
MAX_ENV_LENGTH = 64         # governance_audit.env
MAX_HOST_LENGTH = 253       # a DNS name; governance_audit.node holds host:port (300)
MAX_CHANGED_BY_LENGTH = 128  # governance_audit.changed_by
MAX_DESCRIPTION_LENGTH = 255  # serviceapp.description
# Node data is ~80 bytes of JSON; anything far bigger is refused before parsing.
MAX_NODE_DATA_BYTES = 4096

# A node's dialect (node data fields "transport" and "protocol"; absent means the
# first of each, so every znode written before dialects existed stays valid).
TRANSPORTS = ("buffered", "framed")
PROTOCOLS = ("binary", "compact")
_OWN_FIELDS = frozenset(("host", "port", "weight", "valid", "transport", "protocol"))

_SERVICE_NAME = re.compile(r"[A-Za-z0-9_]{1,%d}" % MAX_SERVICE_LENGTH)
# An appkey becomes a znode path segment and a part of a '|'-separated field.
_APPKEY = re.compile(r"[A-Za-z0-9_.\-]{1,%d}" % MAX_APPKEY_LENGTH)
_ENV = re.compile(r"[A-Za-z0-9_\-]{1,%d}" % MAX_ENV_LENGTH)
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?")
_PORT = re.compile(r"[0-9]{1,5}")
_WEIGHT = re.compile(r"[0-9]{1,4}")
_ADDRESS = re.compile(r"\[([0-9A-Fa-f:.]{2,45})\]:([0-9]{1,5})|([A-Za-z0-9.\-]{1,253}):([0-9]{1,5})")


def check_service_name(service_name: object) -> str:
    if not isinstance(service_name, str) or not _SERVICE_NAME.fullmatch(service_name):
        raise InvalidServiceName(
            "bad service_name %r: use 1-%d letters, digits and underscores (ASCII), "
            "e.g. 'DemoService'" % (_short(service_name), MAX_SERVICE_LENGTH))
    return service_name


def check_appkey(appkey: object) -> str:
    if not isinstance(appkey, str) or not _APPKEY.fullmatch(appkey) or appkey in (".", ".."):
        raise InvalidAppkey(
            "bad appkey %r: use 1-%d letters, digits, '_', '.' or '-' (ASCII), "
            "e.g. 'hello_www'" % (_short(appkey), MAX_APPKEY_LENGTH))
    return appkey


def check_env(env: object) -> str:
    if not isinstance(env, str) or not _ENV.fullmatch(env):
        raise InvalidEnv("bad env name %r: use 1-%d letters, digits, '_' or '-' (ASCII), "
                         "e.g. 'dev' or 'prod'" % (_short(env), MAX_ENV_LENGTH))
    return env


def is_valid_host(host: object) -> bool:
    """True for a DNS host name (RFC 1123 labels, ASCII) or an IPv4/IPv6 literal.

    Refused: '_' (node names are split on it), '/', '|', ':' outside an IPv6
    literal, IPv6 zone ids ('%eth0'), an all-numeric name that is no IPv4 address
    ('999.1.1.1'), anything over 253 characters.
    """
    if not isinstance(host, str) or not 0 < len(host) <= MAX_HOST_LENGTH:
        return False
    if ":" in host:
        if "%" in host:
            return False
        try:
            return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
        except ValueError:
            return False
    labels = host.split(".")
    if not all(_HOST_LABEL.fullmatch(label) for label in labels):
        return False
    if labels[-1].isascii() and labels[-1].isdigit():
        # Looks like an IPv4 address, so it must be one (no numeric top-level domain).
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
    return True


def check_host(host: object, what: str = "host") -> str:
    """`host` if it is a host name or an IP literal, else InvalidHost."""
    if not isinstance(host, str) or not is_valid_host(host):
        raise InvalidHost(
            "bad %s %r: give a host name (letters, digits, '-' and '.', at most %d characters; "
            "no '_' or '/') or an IP address, e.g. 10.0.0.5 or node1.example.com"
            % (what, _short(host), MAX_HOST_LENGTH))
    return host


def check_port(port: object) -> int:
    """A TCP port 1..65535, as an int or a string of ASCII digits."""
    if isinstance(port, str) and _PORT.fullmatch(port):
        port = int(port)
    return int(check_number("port", port, 1, maximum=65535, integer=True,
                            error=InvalidNodeAddress))


def check_weight(weight: object) -> int:
    """Weights are whole numbers 0..MAX_WEIGHT; bools, floats and non-ASCII digits
    are refused."""
    if isinstance(weight, str) and _WEIGHT.fullmatch(weight):
        weight = int(weight)
    return int(check_number("weight", weight, 0, maximum=MAX_WEIGHT, integer=True,
                            error=InvalidWeight))


def check_text(value: object, what: str, max_length: int,
               error: Type[ProbeError] = ProbeError) -> str:
    """Free text bound for a MySQL column: printable, 1..max_length characters."""
    if not isinstance(value, str) or not 0 < len(value) <= max_length or not value.isprintable():
        raise error("bad %s %r: give 1-%d printable characters (no newline or control "
                    "characters)" % (what, _short(value), max_length))
    return value


def check_changed_by(by: object) -> str:
    """Who made a change (the audit table's changed_by)."""
    return check_text(by, "changed-by name (--by)", MAX_CHANGED_BY_LENGTH)


def check_description(description: object) -> str:
    if description in (None, ""):
        return ""
    return check_text(description, "appkey description", MAX_DESCRIPTION_LENGTH)


def parse_address(address: object) -> Tuple[str, int]:
    """'ip:port', 'host:port' or '[v6]:port' -> (host, port)."""
    text = address if isinstance(address, str) else ""
    match = _ADDRESS.fullmatch(text)
    if match:
        host = match.group(1) or match.group(3)
        port = match.group(2) or match.group(4)
        if is_valid_host(host) and 0 < int(port) < 65536:
            return host, int(port)
    raise InvalidNodeAddress(
        "bad node address %r: expected ip:port as registered, e.g. 10.0.0.5:8081"
        % (_short(address),))


def _short(value: object, limit: int = 80) -> object:
    """A value cut short for an error message (hostile input can be huge)."""
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + "..."
    if isinstance(value, bytes) and len(value) > limit:
        return value[:limit] + b"..."
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return "<%d-bit number>" % value.bit_length()
    return value


def appkey_path(env: str, appkey: str) -> str:
    return "%s/%s/%s" % (SERVICES_ROOT, check_env(env), check_appkey(appkey))


def node_name(service: str, ip: str, port: Union[int, str]) -> str:
    """'DemoService_10.0.0.5_8081'; refuses (InvalidHost, ...) a part that would
    make the name unparsable or nest a znode."""
    return "%s_%s_%d" % (check_service_name(service), check_host(ip), check_port(port))


def node_path(env: str, appkey: str, service: str, ip: str, port: Union[int, str]) -> str:
    return "%s/%s" % (appkey_path(env, appkey), node_name(service, ip, port))


class NodeName(NamedTuple):
    service: str
    ip: str
    port: int


def parse_node_name(name: object) -> Optional["NodeName"]:
    """'Demo_Service_10.0.0.1_8081' -> NodeName; None when it is not a node name.

    Service names may hold underscores and hosts never do, so split from the right.
    """
    if not isinstance(name, str):
        return None
    parts = name.rsplit("_", 2)
    if len(parts) != 3 or not _PORT.fullmatch(parts[2]) or not 0 < int(parts[2]) < 65536 \
            or not _SERVICE_NAME.fullmatch(parts[0]) or not is_valid_host(parts[1]):
        return None
    return NodeName(parts[0], parts[1], int(parts[2]))


def is_node_of(name: object, service: str) -> bool:
    """True when the znode name is a node of `service` (not of 'DemoService2')."""
    parsed = parse_node_name(name)
    return parsed is not None and parsed.service == service


def settings_hash(env: str) -> str:
    return SETTINGS_HASH_PREFIX + check_env(env)


def settings_field(appkey: str, env: str, service: str, ip: str,
                   port: Union[int, str]) -> str:
    return FIELD_SEPARATOR.join((check_appkey(appkey), check_env(env), check_service_name(service),
                                 check_host(ip), str(check_port(port))))


class SettingsField(NamedTuple):
    appkey: str
    env: str
    service: str
    ip: str
    port: int


def parse_settings_field(field: object) -> Optional["SettingsField"]:
    """'<appkey>|<env>|<service>|<ip>|<port>' -> SettingsField; None if malformed."""
    if isinstance(field, bytes):
        field = field.decode("utf-8", "replace")
    if not isinstance(field, str):
        return None
    parts = field.split(FIELD_SEPARATOR)
    if len(parts) != 5:
        return None
    try:
        return SettingsField(check_appkey(parts[0]), check_env(parts[1]),
                             check_service_name(parts[2]), check_host(parts[3]),
                             check_port(parts[4]))
    except ProbeError:
        return None


class _NodeFields(NamedTuple):
    """A node's governance settings: the JSON kept in Redis and in its znode.

    `transport` / `protocol` are None when the data does not name them (buffered /
    binary then); `extra` holds every other field, in order, so that an edit of
    weight or switch writes back what it does not own untouched."""
    host: str
    port: int
    weight: int = DEFAULT_WEIGHT
    valid: int = 1
    transport: Optional[str] = None
    protocol: Optional[str] = None
    extra: Tuple[Tuple[str, Any], ...] = ()

    @property
    def dialect(self) -> Tuple[str, str]:
        """(transport, protocol) this node speaks."""
        return (self.transport or TRANSPORTS[0], self.protocol or PROTOCOLS[0])

    def to_json(self) -> str:
        data: Dict[str, Any] = {"host": self.host, "port": self.port, "weight": self.weight, "valid": self.valid}
        if self.transport is not None:
            data["transport"] = self.transport
        if self.protocol is not None:
            data["protocol"] = self.protocol
        for key, value in self.extra:
            data.setdefault(key, value)
        return json.dumps(data)

    def to_bytes(self) -> bytes:
        return self.to_json().encode("utf-8")

    def check(self) -> "NodeSettings":
        """`self` if every field is in range, else InvalidNodeData."""
        for key, value in (("port", self.port), ("weight", self.weight), ("valid", self.valid)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidNodeData("node data field %r is not an integer: %r" % (key, _short(value)))
        if not is_valid_host(self.host):
            raise InvalidNodeData("node data host %r is no host name or IP address"
                                  % (_short(self.host),))
        if not 0 < self.port < 65536:
            raise InvalidNodeData("node data port out of range 1..65535: %r" % (_short(self.port),))
        if not 0 <= self.weight <= MAX_WEIGHT:
            raise InvalidNodeData("node data weight out of range 0..%d: %r"
                                  % (MAX_WEIGHT, _short(self.weight)))
        if self.valid not in (0, 1):
            raise InvalidNodeData("node data valid must be 0 or 1, got %r" % (_short(self.valid),))
        if self.transport is not None and self.transport not in TRANSPORTS:
            raise InvalidNodeData("node data transport must be one of %s, got %r"
                                  % ("/".join(TRANSPORTS), _short(self.transport)))
        if self.protocol is not None and self.protocol not in PROTOCOLS:
            raise InvalidNodeData("node data protocol must be one of %s, got %r"
                                  % ("/".join(PROTOCOLS), _short(self.protocol)))
        return cast("NodeSettings", self)  # only NodeSettings instances are ever made

    @classmethod
    def from_json(cls, raw: object) -> "NodeSettings":
        """Parse and check untrusted JSON (znode data, Redis, a snapshot).

        Raises InvalidNodeData (a ValueError) for anything wrong, whatever the
        cause: oversized data (checked before parsing), bad UTF-8, deep nesting
        (RecursionError), huge numbers, a non-object, a field out of range, an
        unknown transport or protocol.
        """
        try:
            if isinstance(raw, str):
                raw = raw.encode("utf-8")
            if not isinstance(raw, (bytes, bytearray)):
                raise InvalidNodeData("node data is %s, not JSON text" % type(raw).__name__)
            if len(raw) > MAX_NODE_DATA_BYTES:
                raise InvalidNodeData("node data is %d bytes, more than the %d allowed"
                                      % (len(raw), MAX_NODE_DATA_BYTES))
            data = json.loads(bytes(raw).decode("utf-8"), parse_constant=_no_constant)
            if not isinstance(data, dict):
                raise InvalidNodeData("node data is not a JSON object")
            host = data.get("host")
            if not isinstance(host, str) or not host:
                raise InvalidNodeData("node data has no string 'host'")
            # Untrusted values: check() refuses any that is not an int in range.
            extra = tuple((key, value) for key, value in data.items() if key not in _OWN_FIELDS)
            return cls(host, cast(int, data.get("port")), data.get("weight", DEFAULT_WEIGHT),
                       data.get("valid", 1), data.get("transport"), data.get("protocol"),
                       extra).check()
        except InvalidNodeData:
            raise
        except Exception as exc:  # RecursionError, UnicodeDecodeError, ValueError, ...
            raise InvalidNodeData("node data does not parse: %s" % exc.__class__.__name__)


_METHOD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def is_method_name(name: object) -> bool:
    """A Thrift method name (an identifier of at most 128 characters)."""
    return isinstance(name, str) and _METHOD.fullmatch(name) is not None


def check_dialect(transport: str, protocol: str) -> Tuple[str, str]:
    """(transport, protocol) if both are known names, else InvalidNodeData naming them."""
    NodeSettings("127.0.0.1", 1, transport=transport, protocol=protocol).check()
    return transport, protocol


class NodeSettings(_NodeFields):
    __doc__ = cast(str, _NodeFields.__doc__)
    __slots__ = ()

    def _asdict(self) -> Dict[str, Any]:
        """The node data as a dict: what `to_json` writes (dialect fields only when
        set, then the fields probe does not own)."""
        return json.loads(self.to_json())


def _no_constant(name: str) -> NoReturn:
    raise InvalidNodeData("node data holds %s" % name)


def parse_node_data(name: object, raw: object) -> NodeSettings:
    """The settings of znode `name` holding `raw`, checked as a consumer must before
    routing to it: the name is a node name, the data parses, and the data's host and
    port are the name's (else a znode could send traffic anywhere while every
    listing shows the name's address). Raises InvalidNodeData."""
    parsed = parse_node_name(name)
    if parsed is None:
        raise InvalidNodeData("%r is not a node name <service>_<host>_<port>" % (_short(name),))
    settings = NodeSettings.from_json(raw)
    if (settings.host, settings.port) != (parsed.ip, parsed.port):
        raise InvalidNodeData("node data says %s:%d but the znode name says %s:%d"
                              % (_short(settings.host), settings.port, parsed.ip, parsed.port))
    return settings


def describe_data(raw: object, limit: int = 60) -> str:
    """A short, safe rendering of untrusted data for a log line."""
    return repr(_short(raw, limit))


# -- call statistics in Redis (written by probe.metrics, read by probe.stores.stats) --
def stats_key(env: str, appkey: str, side: str, slot: int) -> str:
    return "%s%s:%s:%s:%d" % (STATS_KEY_PREFIX, env, appkey, side, slot)


def stats_pattern(env: str, appkey: str) -> str:
    """A SCAN pattern for every stats key of an appkey (tests, cleanup tools)."""
    return "%s%s:%s:*" % (STATS_KEY_PREFIX, env, appkey)


def stats_field(service: str, method: str, node: str, status: str, writer: str) -> str:
    return "|".join((service, method, node, status, writer))


def parse_stats_field(field: Union[str, bytes]) -> Optional[Tuple[str, ...]]:
    """-> (service, method, node, status, writer), or None when malformed."""
    if isinstance(field, bytes):
        field = field.decode("utf-8", "replace")
    parts = field.split("|")
    return tuple(parts) if len(parts) == 5 else None


# -- node health as consumers see it (written by probe.metrics, read by probe.stores.stats) --
def health_key(env: str, appkey: str) -> str:
    """The Redis hash of the nodes an appkey's consumers have ejected."""
    return "%s%s:%s" % (HEALTH_KEY_PREFIX, env, appkey)


def health_field(service: str, node: str, writer: str) -> str:
    return "|".join((service, node, writer))


def parse_health_field(field: Union[str, bytes]) -> Optional[Tuple[str, ...]]:
    """-> (service, node, writer), or None when malformed."""
    if isinstance(field, bytes):
        field = field.decode("utf-8", "replace")
    parts = field.split("|")
    return tuple(parts) if len(parts) == 3 else None


# -- the config center: /configs/<env>/<appkey>/<key> ---------------------------
from .errors import InvalidConfigKey  # noqa: E402  (kept with the section it serves)

CONFIGS_ROOT = "/configs"
CONFIG_BACKUP_SUFFIX = ".json"
_CONFIG_KEY = re.compile(r"[A-Za-z0-9_.\-]{1,128}", re.ASCII)


def is_config_key(key: object) -> bool:
    return isinstance(key, str) and bool(_CONFIG_KEY.fullmatch(key)) and key not in (".", "..")


def check_config_key(key: object) -> str:
    if not isinstance(key, str) or not is_config_key(key):
        raise InvalidConfigKey(
            "bad config key %r: use 1-128 letters, digits, '_', '.' or '-' (it must match "
            "^[A-Za-z0-9_.-]{1,128}$), e.g. 'db.pool_size'" % (key,))
    return key


def config_appkey_path(env: str, appkey: str) -> str:
    return "%s/%s/%s" % (CONFIGS_ROOT, env, appkey)


def config_key_path(env: str, appkey: str, key: str) -> str:
    return "%s/%s" % (config_appkey_path(env, appkey), key)


def config_backup_file(backup_dir: str, env: str, appkey: str) -> str:
    return "%s/%s/%s%s" % (backup_dir.rstrip("/"), env, appkey, CONFIG_BACKUP_SUFFIX)
