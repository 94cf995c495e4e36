"""Call outcomes: the status of one call or attempt, shared by the provider, the
client, the stats in Redis and the metrics' `status` label."""

OK = "ok"
DECLARED_EXCEPTION = "exception"
APPLICATION_ERROR = "error"
TIMEOUT = "timeout"
CONNECTION_ERROR = "connection_error"
#: The provider answered "overloaded, not executed" (probe.rpc.overload): nothing ran.
OVERLOADED = "overloaded"
#: The request could not be written to a pooled connection: nothing reached the node.
NOT_SENT = "not_sent"
#: The caller cancelled the call (asyncio: task.cancel(), wait_for): no verdict on the node.
CANCELLED = "cancelled"

__all__ = ["OK", "DECLARED_EXCEPTION", "APPLICATION_ERROR", "TIMEOUT", "CONNECTION_ERROR",
           "OVERLOADED", "NOT_SENT", "CANCELLED"]
