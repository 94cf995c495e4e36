"""Failover: what the threaded and the asyncio client decide after an attempt, kept
in one place; the I/O (sockets, the loop) stays in each client.

- `Retryable`: an attempt's failure that failover may cover.
- `bad_arguments`: the TypeError a call with wrong arguments raises.
- `fail_over`: after a failed attempt, retry elsewhere or give up (the attempt
  count, the idempotency rule, the retry budget with its overload exemption, the
  `tried` set, the log lines).
- `connect_failed`, `refused_handshake`, `call_failed`, `application_error`: an
  attempt's outcome classified, as (status, value, error) triples.

Only failure paths call these (the success path of a call stays a pick, a send
and a receive). A client passed in is read for `appkey`, `service_name`,
`retries`, `retry_budget`, `node_warnings`, and gets `budget_exhausted` counted.
"""

import logging
from typing import Any, Optional, Set, Tuple

from thriftpy2.transport import TTransportException

from ..errors import NodeCallFailed, NodeUnreachable
from ..rpc.outcomes import APPLICATION_ERROR, CONNECTION_ERROR, OK, OVERLOADED, TIMEOUT
from ..rpc.overload import is_overload_reply

#: (status, value, error): what one attempt gives its call loop.
Outcome = Tuple[str, Any, Any]


class Retryable(object):
    """An attempt's failure that failover may cover (returned, never raised):
    `before_send` says whether the call surely did not run (the request could not
    have reached the node, or the node answered "overloaded, not executed"),
    `error` is what the caller gets when it is not retried."""

    __slots__ = ("before_send", "error")

    def __init__(self, before_send: bool, error: BaseException) -> None:
        self.before_send = before_send
        self.error = error


def bad_arguments(service_name: str, method_name: str, exc: TypeError) -> TypeError:
    """The TypeError a call whose arguments do not fit its args struct raises."""
    return TypeError("%s.%s: %s" % (service_name, method_name, exc))


def fail_over(client: Any, log: logging.Logger, node: Any, method: Any, status: str,
              error: Retryable, attempt: int, tried: Optional[Set[str]],
              table: Any) -> Optional[Set[str]]:
    """After failed attempt number `attempt` (1, 2, ...) on `node`: raise the
    caller's error when the call may not move, else return the `tried` set for the
    next pick (None once every node of `table` failed once: any may be picked
    again)."""
    if attempt > client.retries or not (error.before_send or method.idempotent):
        raise error.error
    # An overload reply ran nothing: moving it elsewhere adds no work, so it does
    # not draw on the budget (`retries` still bounds it).
    budget = client.retry_budget
    if budget is not None and status != OVERLOADED and not budget.try_withdraw():
        client.budget_exhausted += 1
        log.debug("%s.%s failed on %s; the retry budget is spent: not retried",
                  client.service_name, method.name, node.name)
        raise error.error
    tried = (tried or set()) | {node.name}
    if len(tried) >= len(table.nodes):
        tried = None  # every node failed once: any may be picked again
    log.info("%s.%s failed on %s (%s); retrying elsewhere (%d/%d)", client.service_name,
             method.name, node.name, error.error, attempt, client.retries)
    return tried


def connect_failed(client: Any, node: Any, exc: BaseException) -> Outcome:
    """No connection to `node` could be made: nothing ran, any method may move."""
    return CONNECTION_ERROR, None, Retryable(True, NodeUnreachable("%s (node %s of %s/%s)" % (
        exc, node.name, client.appkey, client.service_name)))


def refused_handshake(client: Any, node: Any, reason: Optional[str] = None) -> Outcome:
    """TLS 1.3: the provider refused our certificate; the request never reached a
    handler. A connect failure, as a refused connection."""
    detail = "" if reason is None else ": %s" % (reason,)
    return CONNECTION_ERROR, None, Retryable(True, NodeUnreachable(
        "TLS handshake with %s:%d refused%s (node %s of %s/%s)" % (
            node.host, node.port, detail, node.name, client.appkey, client.service_name)))


def call_failed(client: Any, log: logging.Logger, node: Any, method: Any, exc: BaseException,
                timed_out: bool) -> Outcome:
    """The request left and no reply came (a timeout, a reset while waiting): a
    NodeCallFailed, warned about once in a while per node; only idempotent methods
    may move."""
    status = TIMEOUT if timed_out else CONNECTION_ERROR
    failed = NodeCallFailed(node.name, "%s/%s" % (client.appkey, client.service_name),
                            method.name, exc, TTransportException.TIMED_OUT if timed_out else None)
    if not client.node_warnings.warn(node.name, "%s (further failures on this node "
                                     "are not logged for a while)", failed):
        log.debug("%s", failed)
    return status, None, Retryable(False, failed)


def application_error(outcome: Outcome) -> Tuple[str, Optional[str], Outcome]:
    """A TApplicationException reply: (status, verdict for node health or None,
    the attempt's outcome). An overload reply ran nothing on the node: any method
    may go elsewhere. A handler that raised TApplicationException(UNKNOWN) itself
    gave an answer."""
    if is_overload_reply(outcome[2]):
        return OVERLOADED, None, (OVERLOADED, None, Retryable(True, outcome[2]))
    return APPLICATION_ERROR, (None if outcome[2].type else OK), outcome
