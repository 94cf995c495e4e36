"""The provider's in-flight caps and its "overloaded, not executed" reply.

A provider started with ``max_inflight`` (all calls) and/or
``max_inflight_per_method`` answers a call beyond the cap at once, without running
it, with this exact reply (a thrift EXCEPTION message):

    TApplicationException(type=INTERNAL_ERROR (6),
                          message="probe: overloaded, not executed: <Service>.<method> "
                                  "(<which cap> <N> reached)")

Any Apache Thrift client sees a TApplicationException whose message names
overload. A probe consumer recognises it by type 6 and the message prefix
``OVERLOAD_PREFIX`` (`is_overload_reply`) and retries the call on another node for
any method, idempotent or not, because nothing ran. A handler cannot forge it: a
TApplicationException a handler raises with that prefix reaches callers with the
prefix removed (`unforgeable`).
"""

import threading
from typing import Collection, Dict, Mapping, Optional, Tuple, Union, cast

from thriftpy2.thrift import TApplicationException

from ..errors import ProbeError

OVERLOAD_PREFIX = "probe: overloaded, not executed: "
OVERLOAD_TYPE = TApplicationException.INTERNAL_ERROR


def overload_reply(service: str, method: str, cap: str, limit: int) -> TApplicationException:
    """The reply to a call refused by a cap (`cap` names it, e.g. ``max_inflight``)."""
    return TApplicationException(OVERLOAD_TYPE, "%s%s.%s (%s %d reached)" % (
        OVERLOAD_PREFIX, service, method, cap, limit))


def is_overload_reply(error: object) -> bool:
    """True when `error` is a provider's "overloaded, not executed" reply."""
    return isinstance(error, TApplicationException) and error.type == OVERLOAD_TYPE \
        and isinstance(error.message, str) and error.message.startswith(OVERLOAD_PREFIX)


def unforgeable(error: TApplicationException) -> TApplicationException:
    """`error` as a handler raised it, unless it mimics an overload reply: then the
    same error without the prefix (a probe consumer would retry a call that ran)."""
    if is_overload_reply(error):
        return TApplicationException(error.type, cast(str, error.message)[len(OVERLOAD_PREFIX):])
    return error


class InflightLimiter(object):
    """Counts calls in flight per method and in all against their caps.

    :param max_inflight: calls running at once in all (None: no cap).
    :param per_method: method name -> its cap (methods not named have none).
    """

    __slots__ = ("max_inflight", "per_method", "_lock", "_total", "_counts", "refused")

    def __init__(self, max_inflight: Optional[int], per_method: Mapping[str, int]) -> None:
        self.max_inflight = max_inflight
        self.per_method = dict(per_method)
        self._lock = threading.Lock()
        self._total = 0
        self._counts = {name: 0 for name in self.per_method}
        self.refused = 0

    def enter(self, method: str) -> Optional[Tuple[str, int]]:
        """Admit one call of `method` (None) or refuse it: (the cap's name, its
        limit), the last arguments of `overload_reply`."""
        with self._lock:
            if self.max_inflight is not None and self._total >= self.max_inflight:
                self.refused += 1
                return ("max_inflight", self.max_inflight)
            limit = self.per_method.get(method)
            if limit is not None:
                if self._counts[method] >= limit:
                    self.refused += 1
                    return ("max_inflight_per_method", limit)
                self._counts[method] += 1
            self._total += 1
            return None

    def exit(self, method: str) -> None:
        """A call admitted by `enter` finished."""
        with self._lock:
            self._total -= 1
            if method in self._counts:
                self._counts[method] -= 1


def make_limiter(max_inflight: Optional[int],
                 max_inflight_per_method: Union[None, int, Mapping[str, int]],
                 methods: Collection[str]) -> Optional[InflightLimiter]:
    """Check the provider's in-flight options (a named ProbeError) and build their
    limiter; None when neither is set. An int `max_inflight_per_method` caps every
    method of `methods`; a mapping names its methods, which must exist."""
    def check(name: str, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000000:
            raise ProbeError("%s must be an integer in 1..1000000 (calls running at once), "
                             "got %r" % (name, value))
    if max_inflight is not None:
        check("max_inflight", max_inflight)
    per_method: Dict[str, int] = {}
    if max_inflight_per_method is not None:
        if isinstance(max_inflight_per_method, Mapping):
            if len(max_inflight_per_method) > 10000:
                raise ProbeError("max_inflight_per_method names too many methods")
            unknown = sorted(str(name)[:100] for name in max_inflight_per_method
                             if name not in methods)
            if unknown:
                raise ProbeError("max_inflight_per_method names unknown methods %s (the "
                                 "service has: %s)" % (", ".join(unknown[:10]),
                                                       ", ".join(sorted(methods))))
            for name, value in max_inflight_per_method.items():
                check("max_inflight_per_method[%r]" % name, value)
            per_method = dict(max_inflight_per_method)
        else:
            check("max_inflight_per_method", max_inflight_per_method)
            per_method = {name: max_inflight_per_method for name in methods}
    if max_inflight is None and not per_method:
        return None
    return InflightLimiter(max_inflight, per_method)


__all__ = ["OVERLOAD_PREFIX", "OVERLOAD_TYPE", "overload_reply", "is_overload_reply",
           "unforgeable", "InflightLimiter", "make_limiter"]
