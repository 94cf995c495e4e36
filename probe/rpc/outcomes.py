"""Call outcomes: the status of one call or attempt, shared by the provider, the
client, the stats in Redis and the metrics' `status` label."""

OK = "ok"
DECLARED_EXCEPTION = "exception"
APPLICATION_ERROR = "error"
TIMEOUT = "timeout"
CONNECTION_ERROR = "connection_error"

__all__ = ["OK", "DECLARED_EXCEPTION", "APPLICATION_ERROR", "TIMEOUT", "CONNECTION_ERROR"]
