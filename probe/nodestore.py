"""Node settings in Redis: hash `thriftprobe_<env>`, field
`<appkey>|<env>|<service>|<ip>|<port>`, value the node settings JSON. Redis is the
durable truth that outlives a node's restarts; single server or cluster behind the
same calls (redis-py's RedisCluster; redis-py-cluster is end-of-life)."""

import logging

import redis
from redis.cluster import ClusterNode, RedisCluster

from . import naming
from .errors import ComponentUnavailable
from .naming import NodeSettings

log = logging.getLogger("probe.nodestore")

# What a Redis server or cluster raises when it is down or unreachable
# (RedisClusterException does not derive from RedisError).
REDIS_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException, OSError)


def connect_redis(redis_settings, timeout=3.0):
    """A redis-py client for a single server or a cluster, per the config."""
    common = dict(password=redis_settings.password, socket_connect_timeout=timeout,
                  socket_timeout=timeout)
    if redis_settings.cluster:
        nodes = [ClusterNode(host, port) for host, port in redis_settings.startup_nodes]
        try:
            return RedisCluster(startup_nodes=nodes, **common)
        except REDIS_ERRORS as exc:
            raise ComponentUnavailable("Redis cluster at %s is unreachable: %s"
                                       % (redis_settings.address, exc))
    return redis.Redis(host=redis_settings.host, port=redis_settings.port, **common)


class NodeStore(object):
    def __init__(self, redis_settings, env, timeout=3.0):
        self.settings = redis_settings
        self.env = env
        self.hash = naming.settings_hash(env)
        self.redis = connect_redis(redis_settings, timeout)

    def _unavailable(self, exc):
        return ComponentUnavailable("Redis at %s is unreachable: %s (start it with `probe stack "
                                    "up` or fix the redis section of the config)"
                                    % (self.settings.address, exc))

    def ping(self):
        try:
            self.redis.ping()
        except REDIS_ERRORS as exc:
            raise self._unavailable(exc)

    def get(self, field):
        """NodeSettings stored under `field`, None if absent. Malformed JSON is
        reported as ValueError so callers decide whether to overwrite it."""
        try:
            raw = self.redis.hget(self.hash, field)
        except REDIS_ERRORS as exc:
            raise self._unavailable(exc)
        if raw is None:
            return None
        return NodeSettings.from_json(raw)

    def get_or_create(self, field, default):
        """The stored settings, or `default` written atomically (HSETNX) if none."""
        try:
            if self.redis.hsetnx(self.hash, field, default.to_json()):
                log.info("stored default settings %s = %s", field, default.to_json())
                return default
            raw = self.redis.hget(self.hash, field)
        except REDIS_ERRORS as exc:
            raise self._unavailable(exc)
        try:
            stored = NodeSettings.from_json(raw)
        except ValueError as exc:
            log.warning("settings %s in %s are malformed (%s): replacing them with defaults",
                        field, self.hash, exc)
            self.put(field, default)
            return default
        # The address is the node's identity; weight and valid are the operator's.
        return stored._replace(host=default.host, port=default.port)

    def put(self, field, settings):
        try:
            self.redis.hset(self.hash, field, settings.to_json())
        except REDIS_ERRORS as exc:
            raise self._unavailable(exc)

    def all(self, appkey=None):
        """{field: raw json} for every node (of `appkey`, if given)."""
        pattern = "%s|*" % appkey if appkey else "*"
        try:
            return {self._text(k): self._text(v)
                    for k, v in self.redis.hscan_iter(self.hash, match=pattern, count=500)}
        except REDIS_ERRORS as exc:
            raise self._unavailable(exc)

    @staticmethod
    def _text(value):
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else value

    def close(self):
        try:
            self.redis.close()
        except Exception:
            pass
