"""Test harnesses for code that uses probe, shipped with it as kazoo ships
`kazoo.testing`: real server processes on free loopback ports that a test can
break on purpose.

- `FaultStack`: a `probe.dev.stack.Stack` whose components can be stopped, killed
  (SIGKILL, as a crash would) and started again, optionally with their data wiped.
- `ZooKeeperEnsemble`: a three-member (or `size`-member) ZooKeeper ensemble.
- `RedisClusterStack`: Redis servers joined into one cluster, for ``cluster: 1``.

Nothing in probe itself imports this package.
"""

from probe.testing.ensemble import ZooKeeperEnsemble
from probe.testing.rediscluster import RedisClusterStack
from probe.testing.stack import FaultStack

__all__ = ["FaultStack", "RedisClusterStack", "ZooKeeperEnsemble"]
