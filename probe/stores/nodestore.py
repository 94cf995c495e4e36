"""Node settings in Redis: hash `thriftprobe_<env>`, field
`<appkey>|<env>|<service>|<ip>|<port>`, value the node settings JSON. Redis is the
durable truth that outlives a node's restarts; single server or cluster behind the
same calls (redis-py's RedisCluster; redis-py-cluster is end-of-life).

Edits are compare-and-set (a Lua script on the one hash key, so it runs the same on
a single server and on a cluster, where WATCH/MULTI pipelines are only partly
supported): two concurrent edits of one node never lose either.

The stored JSON is untrusted like everything read back: it is parsed with
`NodeSettings.from_json`, and a node's host and port always come from the node
itself, never from this copy."""

import logging
from typing import Any, Dict, Optional, Union

import redis
from redis.cluster import ClusterNode, RedisCluster

from .. import naming
from ..errors import ComponentUnavailable, NodeSettingsConflict
from ..naming import NodeSettings
from ..settings import RedisSettings

log = logging.getLogger("probe.nodestore")

# KEYS[1] = hash, ARGV = field, expected value ('' = absent), new value ('' = delete).
_COMPARE_AND_SET = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current == false then current = '' end
if current ~= ARGV[2] then return 0 end
if ARGV[3] == '' then
    redis.call('HDEL', KEYS[1], ARGV[1])
else
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
end
return 1
"""

# What a Redis server or cluster raises when it is down or unreachable
# (RedisClusterException does not derive from RedisError).
REDIS_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException, OSError)


def redis_security_options(redis_settings: RedisSettings) -> Dict[str, Any]:
    """redis-py keyword arguments for the ACL user and TLS of `redis_settings`
    (the same for a single server and a cluster's nodes). With TLS the server's
    certificate and host name are always checked."""
    options: Dict[str, Any] = {}
    if getattr(redis_settings, "username", None):
        options["username"] = redis_settings.username
    if getattr(redis_settings, "ssl", False):
        options.update(ssl=True, ssl_cert_reqs="required", ssl_check_hostname=True,
                       ssl_ca_certs=redis_settings.ssl_ca_certs,
                       ssl_certfile=redis_settings.ssl_certfile,
                       ssl_keyfile=redis_settings.ssl_keyfile)
    return options


def connect_redis(redis_settings: RedisSettings,
                  timeout: float = 3.0) -> "Union[redis.Redis, RedisCluster]":
    """A redis-py client for a single server or a cluster, per the config."""
    common = dict(password=redis_settings.password, socket_connect_timeout=timeout,
                  socket_timeout=timeout, **redis_security_options(redis_settings))
    if redis_settings.cluster:
        nodes = [ClusterNode(host, port) for host, port in redis_settings.startup_nodes]
        try:
            return RedisCluster(startup_nodes=nodes, **common)
        except REDIS_ERRORS as exc:
            raise ComponentUnavailable("Redis cluster at %s is unreachable: %s"
                                       % (redis_settings.address, exc))
    return redis.Redis(host=redis_settings.host, port=redis_settings.port, **common)


class NodeStore(object):
    """Node settings of one env.

    :param redis_settings: the config's `RedisSettings`.
    :param env: the env name (the hash is `thriftprobe_<env>`).
    :param timeout: connect and socket timeout in seconds.
    """

    def __init__(self, redis_settings: RedisSettings, env: str, timeout: float = 3.0) -> None:
        self.settings = redis_settings
        self.env = env
        self.hash = naming.settings_hash(env)
        self.redis = connect_redis(redis_settings, timeout)
        self._compare_and_set = self.redis.register_script(_COMPARE_AND_SET)

    def _unavailable(self, exc: BaseException) -> ComponentUnavailable:
        return ComponentUnavailable("Redis at %s is unreachable: %s (start it with `probe stack "
                                    "up` or fix the redis section of the config)"
                                    % (self.settings.address, exc))

    def ping(self) -> None:
        try:
            self.redis.ping()
        except REDIS_ERRORS as exc:
            raise self._unavailable(exc)

    def get_raw(self, field: str) -> Optional[Union[bytes, str]]:
        """The raw bytes stored under `field`, None if absent."""
        try:
            return self.redis.hget(self.hash, field)
        except REDIS_ERRORS as exc:
            raise self._unavailable(exc)

    def get(self, field: str) -> Optional[NodeSettings]:
        """NodeSettings stored under `field`, None if absent. Malformed JSON is
        reported as InvalidNodeData (a ValueError) so callers decide whether to
        overwrite it."""
        raw = self.get_raw(field)
        if raw is None:
            return None
        return NodeSettings.from_json(raw)

    def compare_and_set(self, field: str, expected: Optional[Union[bytes, str]],
                        new: Optional[Union[bytes, str]]) -> bool:
        """Atomically set `field` to `new` (a JSON str or raw bytes as read; None deletes it) only if it
        still holds `expected` (raw bytes/str as read; None = absent). True if set."""
        try:
            done = self._compare_and_set(keys=[self.hash],
                                         args=[field, expected or "", new or ""])
        except REDIS_ERRORS as exc:
            raise self._unavailable(exc)
        return int(done) == 1

    def get_or_create(self, field: str, default: NodeSettings) -> NodeSettings:
        """The stored weight and switch with `default`'s host and port, or `default`
        written atomically (HSETNX) if nothing usable is stored.

        The address always comes from `default`, i.e. from the provider itself: the
        Redis copy cannot move a node elsewhere.
        """
        default = default.check()
        for _ in range(10):
            try:
                if self.redis.hsetnx(self.hash, field, default.to_json()):
                    log.info("stored default settings %s = %s", field, default.to_json())
                    return default
            except REDIS_ERRORS as exc:
                raise self._unavailable(exc)
            raw = self.get_raw(field)
            if raw is None:
                continue  # deleted meanwhile: HSETNX again
            try:
                stored = NodeSettings.from_json(raw)
            except ValueError as exc:
                log.warning("settings %s in %s are malformed (%s): replacing them with defaults",
                            field, self.hash, exc)
                if self.compare_and_set(field, raw, default.to_json()):
                    return default
                continue
            if (stored.host, stored.port) != (default.host, default.port):
                log.warning("settings %s in %s name %s:%d; the node is %s:%d: keeping only the "
                            "weight and switch", field, self.hash, naming.describe_data(stored.host),
                            stored.port, default.host, default.port)
            # The address is the node's identity; weight and valid are the operator's.
            return stored._replace(host=default.host, port=default.port)
        raise NodeSettingsConflict("Redis field %s in %s kept changing while a provider read "
                                   "it: try again" % (field, self.hash))

    def put(self, field: str, settings: NodeSettings) -> None:
        try:
            self.redis.hset(self.hash, field, settings.to_json())
        except REDIS_ERRORS as exc:
            raise self._unavailable(exc)

    def all(self, appkey: Optional[str] = None) -> Dict[str, str]:
        """{field: raw json} for every node (of `appkey`, if given)."""
        pattern = "%s|*" % appkey if appkey else "*"
        try:
            return {self._text(k): self._text(v)
                    for k, v in self.redis.hscan_iter(self.hash, match=pattern, count=500)}
        except REDIS_ERRORS as exc:
            raise self._unavailable(exc)

    @staticmethod
    def _text(value: Union[bytes, str]) -> str:
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else value

    def close(self) -> None:
        try:
            self.redis.close()
        except Exception:
            pass
