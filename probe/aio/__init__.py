"""asyncio API: ``from probe.aio import build_client, start_service``.

- ``client = await build_client(thrift_path, appkey, service_name, ...)``: the
  service's methods are coroutines; ``await client.close()``.
- ``await start_service(thrift_path, appkey, service_name, handler, port=8081, ...)``
  serves ``async def`` handler methods on the running loop until cancelled or
  SIGTERM/SIGINT.

Same routing, balancers, node health, failover, timeouts, metrics, limits and TLS
as the threaded API (probe.client, probe.server). ZooKeeper watches stay on kazoo's
threads (kazoo has no asyncio: kazoo#185); the loop only reads the routing table
they swap in.
"""

from .client import AsyncProbeClient, build_client
from .pool import ConnectionLost, ReplyTimeout
from .server import AsyncProvider, AsyncThriftServer, start_service

__all__ = ["build_client", "start_service", "AsyncProbeClient", "AsyncProvider",
           "AsyncThriftServer", "ConnectionLost", "ReplyTimeout"]
