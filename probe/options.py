"""Numeric option checks shared by every public entry point.

`check_number` is the one place that refuses a bad number (a bool, a string, NaN,
out of range) with a message naming the option, its value, the range and the unit.
"""

from numbers import Real
from typing import Callable, Optional, Union

from .errors import ProbeError

Number = Union[int, float]

# The one default wait for MySQL, Redis and ZooKeeper to answer a connect.
DEFAULT_CONNECT_TIMEOUT_MS = 3000


def check_number(name: str, value: object, minimum: Optional[Number] = None, unit: str = "", *,
                 maximum: Optional[Number] = None, integer: bool = False,
                 allow_equal: bool = True,
                 error: Callable[[str], Exception] = ProbeError) -> Number:
    """`value` if it is a number (a whole one with `integer`) within the range, else
    `error` naming the option, e.g. "bad read_timeout_s 0: give a number > 0 (s)".

    `minimum` is inclusive unless `allow_equal` is False; `maximum` is inclusive.
    `error` builds the exception from the message (a ProbeError subclass, usually).
    A bool is never a number here (True == 1 in Python); NaN is refused too.
    """
    kinds = (int,) if integer else (int, float, Real)
    if isinstance(value, bool) or not isinstance(value, kinds) or value != value \
            or (minimum is not None and (value < minimum or (value == minimum and not allow_equal))) \
            or (maximum is not None and value > maximum):
        raise error("bad %s %r: give %s%s" % (name, value, _wanted(minimum, maximum, integer,
                                                                   allow_equal),
                                              " (%s)" % unit if unit else ""))
    return value  # type: ignore[return-value]


def _wanted(minimum: Optional[Number], maximum: Optional[Number], integer: bool,
            allow_equal: bool) -> str:
    kind = "a whole number" if integer else "a number"
    if minimum is not None and maximum is not None and allow_equal:
        return "%s from %g to %g" % (kind, minimum, maximum)
    parts = []
    if minimum is not None:
        parts.append("%s %g" % (">=" if allow_equal else ">", minimum))
    if maximum is not None:
        parts.append("<= %g" % maximum)
    return kind + (" " + " and ".join(parts) if parts else "")


__all__ = ["DEFAULT_CONNECT_TIMEOUT_MS", "check_number"]
