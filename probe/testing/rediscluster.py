"""`RedisClusterStack`: Redis servers joined into one cluster on loopback ports.

Named apart from redis-py's `redis.cluster.RedisCluster` (the client that
probe.stores.nodestore uses to talk to such a cluster).
"""

import os
import subprocess
import time
from typing import Dict, List

from ..dev.stack import (LOOPBACK, StackError, _ephemeral_ports, _exchange, _find_binary,
                            _free_ports, _port_in_use, _RedisServer, _start_servers,
                            _stop_servers)

CLUSTER_BUS_OFFSET = 10000  # Redis listens for its cluster bus on port + 10000


def _free_cluster_ports(count: int) -> List[int]:
    """Free ports p with p + CLUSTER_BUS_OFFSET free too (and below 65536)."""
    ports = []  # type: List[int]
    below = _ephemeral_ports()[0] - CLUSTER_BUS_OFFSET  # the bus ports stay below it too
    for _ in range(200):
        for port in _free_ports(count * 4, avoid=ports, below=below):
            bus = port + CLUSTER_BUS_OFFSET
            if not _port_in_use(bus) and len(ports) < count:
                ports.append(port)
        if len(ports) == count:
            return ports
    raise StackError("found no %d free port pairs (p, p+%d) for a Redis cluster"
                     % (count, CLUSTER_BUS_OFFSET))


class _RedisClusterNode(_RedisServer):
    name = "redis-cluster-node"

    def ports(self) -> List[int]:
        return [self.port, self.port + CLUSTER_BUS_OFFSET]

    def command(self) -> List[str]:
        return super().command() + [
            "--cluster-enabled", "yes",
            "--cluster-config-file", os.path.join(self.data_dir, "nodes.conf"),
            "--cluster-node-timeout", "2000",
        ]


class RedisClusterStack:
    """`size` Redis servers joined into one cluster (all masters) on free loopback
    ports, for testing probe's ``cluster: 1`` settings store. Not kept across runs:
    `up()` starts and joins them, `down()` stops them.

    :param state_dir: folder for the nodes' data and logs.
    :param size: number of master nodes (a cluster needs at least 3).
    """

    def __init__(self, state_dir: str, size: int = 3) -> None:
        self.state_dir = os.path.abspath(os.path.expanduser(state_dir))
        ports = _free_cluster_ports(size)
        self._nodes = [_RedisClusterNode(os.path.join(self.state_dir, "node%d" % i), port)
                       for i, port in enumerate(ports)]

    @property
    def startup_nodes(self) -> List[Dict[str, object]]:
        """The ``redis.<env>.startup_nodes`` entries of probe's config."""
        return [{"host": LOOPBACK, "port": node.port} for node in self._nodes]

    def up(self, timeout: float = 60) -> None:
        """Start the nodes, join them, wait for ``cluster_state:ok``."""
        for node in self._nodes:
            node.prepare()
        _start_servers(self._nodes, timeout, "the Redis cluster in %s" % self.state_dir)
        cli = _find_binary(["redis-cli"])
        if cli is None:
            self.down()
            raise StackError("redis-cli is not installed: apt-get install redis-tools")
        addresses = ["%s:%d" % (LOOPBACK, node.port) for node in self._nodes]
        done = subprocess.run([cli, "--cluster", "create"] + addresses +
                              ["--cluster-replicas", "0", "--cluster-yes"],
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            self.down()
            raise StackError("redis-cli --cluster create failed: %s" % done.stdout[-500:])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = _exchange(self._nodes[0].port, b"CLUSTER INFO\r\n",
                             lambda data: b"cluster_state" in data and data.endswith(b"\r\n"))
            if b"cluster_state:ok" in info:
                return
            time.sleep(0.1)
        self.down()
        raise StackError("the Redis cluster in %s did not reach cluster_state:ok"
                         % self.state_dir)

    def down(self) -> None:
        _stop_servers(self._nodes)
