"""probe: service governance for thrift RPC on ZooKeeper, Redis and MySQL."""

__version__ = "0.1.0"
