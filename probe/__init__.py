"""probe: service governance for thrift RPC on ZooKeeper, Redis and MySQL.

``probe.load_thrift(path)`` gives the IDL module probe's clients and providers use
(the same struct and exception classes); ``probe.client.build_client`` and
``probe.server.start_service`` are the consumer and provider entry points.
"""

from .idl import load_thrift

__version__ = "0.1.0"

__all__ = ["load_thrift"]
