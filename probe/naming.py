"""The one place that builds and parses names: znode paths, node names, the Redis
hash and field of a node's settings, and the node settings JSON itself.

Everything outside this module asks it for a name instead of formatting one, so a
weight edit and the provider it targets always agree on the key.
"""

import json
import re
from typing import NamedTuple

from .errors import InvalidAppkey, InvalidNodeAddress, InvalidServiceName, InvalidWeight

SERVICES_ROOT = "/services"
SETTINGS_HASH_PREFIX = "thriftprobe_"
STATS_KEY_PREFIX = "thriftprobe_stats_"
FIELD_SEPARATOR = "|"

DEFAULT_WEIGHT = 10
MAX_WEIGHT = 1000

_SERVICE_NAME = re.compile(r"^\w+$", re.ASCII)
# An appkey becomes a znode path segment and a part of a '|'-separated field.
_APPKEY = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
_ENV = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


def check_service_name(service_name):
    if not isinstance(service_name, str) or not _SERVICE_NAME.match(service_name):
        raise InvalidServiceName(
            "bad service_name %r: use letters, digits and underscores only "
            "(it must match ^\\w+$), e.g. 'DemoService'" % (service_name,))
    return service_name


def check_appkey(appkey):
    if not isinstance(appkey, str) or not _APPKEY.match(appkey) or appkey in (".", ".."):
        raise InvalidAppkey(
            "bad appkey %r: use 1-128 letters, digits, '_', '.' or '-', "
            "e.g. 'hello_www'" % (appkey,))
    return appkey


def check_env(env):
    if not isinstance(env, str) or not _ENV.match(env):
        raise InvalidAppkey("bad env name %r: use letters, digits, '_' or '-'" % (env,))
    return env


def check_weight(weight):
    """Weights are whole numbers 0..MAX_WEIGHT; bools and floats are refused."""
    if isinstance(weight, str):
        if not re.match(r"^\s*\d+\s*$", weight):
            raise InvalidWeight("bad weight %r: give a whole number from 0 to %d" % (weight, MAX_WEIGHT))
        weight = int(weight)
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= MAX_WEIGHT:
        raise InvalidWeight("bad weight %r: give a whole number from 0 to %d" % (weight, MAX_WEIGHT))
    return weight


def parse_address(address):
    """'ip:port' (or '[v6]:port') -> (ip, port)."""
    text = str(address).strip()
    match = re.match(r"^\[([0-9A-Fa-f:.]+)\]:(\d{1,5})$", text) or \
        re.match(r"^([A-Za-z0-9.\-]+):(\d{1,5})$", text)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise InvalidNodeAddress(
            "bad node address %r: expected ip:port, e.g. 10.0.0.5:8081" % (address,))
    return match.group(1), int(match.group(2))


def appkey_path(env, appkey):
    return "%s/%s/%s" % (SERVICES_ROOT, env, appkey)


def node_name(service, ip, port):
    return "%s_%s_%d" % (service, ip, int(port))


def node_path(env, appkey, service, ip, port):
    return "%s/%s" % (appkey_path(env, appkey), node_name(service, ip, port))


class NodeName(NamedTuple):
    service: str
    ip: str
    port: int


def parse_node_name(name):
    """'Demo_Service_10.0.0.1_8081' -> NodeName; None when it is not a node name.

    Service names may hold underscores and IPs never do, so split from the right.
    """
    parts = name.rsplit("_", 2)
    if len(parts) != 3 or not parts[2].isdigit() or not _SERVICE_NAME.match(parts[0]):
        return None
    return NodeName(parts[0], parts[1], int(parts[2]))


def is_node_of(name, service):
    """True when the znode name is a node of `service` (not of 'DemoService2')."""
    parsed = parse_node_name(name)
    return parsed is not None and parsed.service == service


def settings_hash(env):
    return SETTINGS_HASH_PREFIX + env


def settings_field(appkey, env, service, ip, port):
    return FIELD_SEPARATOR.join((appkey, env, service, ip, str(int(port))))


class SettingsField(NamedTuple):
    appkey: str
    env: str
    service: str
    ip: str
    port: int


def parse_settings_field(field):
    if isinstance(field, bytes):
        field = field.decode("utf-8", "replace")
    parts = field.split(FIELD_SEPARATOR)
    if len(parts) != 5 or not parts[4].isdigit():
        return None
    return SettingsField(parts[0], parts[1], parts[2], parts[3], int(parts[4]))


class NodeSettings(NamedTuple):
    """A node's governance settings: the JSON kept in Redis and in its znode."""
    host: str
    port: int
    weight: int = DEFAULT_WEIGHT
    valid: int = 1

    def to_json(self):
        return json.dumps({"host": self.host, "port": self.port,
                           "weight": self.weight, "valid": self.valid})

    def to_bytes(self):
        return self.to_json().encode("utf-8")

    @classmethod
    def from_json(cls, raw):
        """Parse and type-check; raises ValueError describing what is wrong."""
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8")
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("node data is not a JSON object")
        host, port = data.get("host"), data.get("port")
        weight, valid = data.get("weight", DEFAULT_WEIGHT), data.get("valid", 1)
        if not isinstance(host, str) or not host:
            raise ValueError("node data has no string 'host'")
        for key, value in (("port", port), ("weight", weight), ("valid", valid)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError("node data field %r is not an integer: %r" % (key, value))
        if not 0 < port < 65536:
            raise ValueError("node data port out of range: %r" % port)
        if weight < 0:
            raise ValueError("node data weight is negative: %r" % weight)
        return cls(host, port, weight, 1 if valid == 1 else 0)


# -- call statistics in Redis (written by probe.metrics, read by probe.stats) --
def stats_key(env, appkey, side, slot):
    return "%s%s:%s:%s:%d" % (STATS_KEY_PREFIX, env, appkey, side, slot)


def stats_pattern(env, appkey):
    """A SCAN pattern for every stats key of an appkey (tests, cleanup tools)."""
    return "%s%s:%s:*" % (STATS_KEY_PREFIX, env, appkey)


def stats_field(service, method, node, status, writer):
    return "|".join((service, method, node, status, writer))


def parse_stats_field(field):
    """-> (service, method, node, status, writer), or None when malformed."""
    if isinstance(field, bytes):
        field = field.decode("utf-8", "replace")
    parts = field.split("|")
    return tuple(parts) if len(parts) == 5 else None


# -- the config center: /configs/<env>/<appkey>/<key> ---------------------------
from .errors import InvalidConfigKey  # noqa: E402  (kept with the section it serves)

CONFIGS_ROOT = "/configs"
CONFIG_BACKUP_SUFFIX = ".json"
_CONFIG_KEY = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")


def is_config_key(key):
    return isinstance(key, str) and bool(_CONFIG_KEY.match(key)) and key not in (".", "..")


def check_config_key(key):
    if not is_config_key(key):
        raise InvalidConfigKey(
            "bad config key %r: use 1-128 letters, digits, '_', '.' or '-' (it must match "
            "^[A-Za-z0-9_.-]{1,128}$), e.g. 'db.pool_size'" % (key,))
    return key


def config_appkey_path(env, appkey):
    return "%s/%s/%s" % (CONFIGS_ROOT, env, appkey)


def config_key_path(env, appkey, key):
    return "%s/%s" % (config_appkey_path(env, appkey), key)


def config_backup_file(backup_dir, env, appkey):
    return "%s/%s/%s%s" % (backup_dir.rstrip("/"), env, appkey, CONFIG_BACKUP_SUFFIX)
