"""Options of providers and clients as small typed value objects, and the one
numeric check behind every option.

httpx's `Timeout` and `Limits` are the model: a frozen object per group of knobs,
each field with its unit in its name (`_s` seconds, `_ms` milliseconds, `_bytes`),
validated once, when it is made. `start_service` and `build_client` take them
(`limits=ProviderLimits(...)`, `timeouts=ProviderTimeouts(...)`,
`metrics=MetricsOptions(...)`, `retry=RetryPolicy(...)`, `ejection=EjectionPolicy(...)`)
beside the flat keywords they group, which keep working; an option given both
ways is a TypeError.

`check_number` is the one place that refuses a bad number (a bool, a string, NaN,
out of range) with a message naming the option, its value, the range and the unit.
"""

from dataclasses import dataclass, fields
from typing import (Any, Callable, ClassVar, Dict, Iterable, Mapping, Optional, Tuple, Type, TypeVar, Union,
                    cast)

from .errors import ProbeError

Number = Union[int, float]
V = TypeVar("V", bound="_Options")

# The one default wait for MySQL, Redis and ZooKeeper to answer a connect.
DEFAULT_CONNECT_TIMEOUT_MS = 3000
DEFAULT_CONNECT_TIMEOUT_S = DEFAULT_CONNECT_TIMEOUT_MS / 1000.0

# Defaults of the provider limits.
# 10,000 connections: an idle one costs an fd and a few KB, no thread, so this is
# far above any real consumer fleet yet bounds what a flood can hold.
DEFAULT_MAX_CONNECTIONS = 10000
# 300 s: pooled clients reuse connections far more often than that, and notice a
# closed one before use; a connection abandoned behind a dead NAT is freed in minutes.
DEFAULT_IDLE_TIMEOUT = 300.0
# 10 s for one message to arrive in full: a 4 MiB message at 400 KB/s.
DEFAULT_READ_TIMEOUT = 10.0
# 4 MiB, gRPC's default receive limit and in the range of Apache Thrift's
# TConfiguration frame limit (~16 MB): RPC arguments are small, bulk data goes elsewhere.
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# 64 threads run handlers at once (Dubbo uses 200, Thrift's THsHaServer 5): enough
# for handlers that block on a database, bounded so a flood cannot exhaust threads.
DEFAULT_WORKER_THREADS = 64

# Metrics defaults (probe.metrics.options uses the same).
DEFAULT_STATS_INTERVAL = 5.0
MAX_STATS_INTERVAL = 10.0  # at least one write per 10-s stats slot
DEFAULT_STATS_TTL = 3600
DEFAULT_SLOW_CALL_MS = 1000.0


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
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value != value \
            or (minimum is not None and (value < minimum or (value == minimum and not allow_equal))) \
            or (maximum is not None and value > maximum):
        raise error("bad %s %s: give %s%s" % (name, _shown(value),
                                              _wanted(minimum, maximum, integer, allow_equal),
                                              " (%s)" % unit if unit else ""))
    return value


def _shown(value: object, limit: int = 64) -> str:
    """The value as the message shows it: its repr, cut short (input is untrusted)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return "<%d-bit number>" % value.bit_length()
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


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


# A field's rule: (minimum, maximum, unit, whole number, minimum allowed).
Rule = Tuple[Optional[Number], Optional[Number], str, bool, bool]


class _Options(object):
    """A frozen group of options: checked when made; `resolve` merges the flat
    keywords an entry point still takes."""

    RULES: ClassVar[Dict[str, Rule]] = {}
    # The flat keyword of each field, where its name differs (e.g. idle_timeout).
    KEYWORDS: ClassVar[Dict[str, str]] = {}
    OPTION: ClassVar[str] = ""  # the entry point's keyword for the whole object
    OPTIONAL: ClassVar[Tuple[str, ...]] = ()  # fields that may be None

    def __post_init__(self) -> None:
        for name, value in self._check_all(lambda field: field).items():
            object.__setattr__(self, name, value)
        self._check_rest()

    def _check_all(self, label: Callable[[str], str]) -> Dict[str, Any]:
        checked = {}
        for name, (low, high, unit, integer, allow_equal) in self.RULES.items():
            value = getattr(self, name)
            if value is None and name in self.OPTIONAL:
                continue
            value = check_number(label(name), value, low, unit, maximum=high, integer=integer,
                                 allow_equal=allow_equal)
            checked[name] = value if integer else float(value)
        return checked

    @classmethod
    def keyword_of(cls, field: str) -> str:
        return cls.KEYWORDS.get(field, field)

    @classmethod
    def resolve(cls: Type[V], given: Optional[V], **keywords: Any) -> V:
        """The options in effect: `given` (an instance, or None) or else the flat
        `keywords` (keyword name -> value). A keyword not at its default beside
        `given` is a TypeError: an option is given one way."""
        defaults = {cls.keyword_of(f.name): (f.name, f.default) for f in fields(cast(Any, cls))}
        if given is not None:
            if not isinstance(given, cls):
                raise TypeError("%s must be a probe.options.%s, got %s"
                                % (cls.OPTION, cls.__name__, _shown(given)))
            twice = sorted(name for name, value in keywords.items()
                           if not _same(value, defaults[name][1]))
            if twice:
                raise TypeError("%s given twice: as keyword(s) and in %s=%s(...); give each "
                                "option one way, e.g. %s(%s=...)"
                                % (", ".join(twice), cls.OPTION, cls.__name__, cls.__name__,
                                   defaults[twice[0]][0]))
            return given
        values = {defaults[name][0]: value for name, value in keywords.items()}
        made = cls.__new__(cls)
        for name, value in values.items():
            object.__setattr__(made, name, value)
        for f in fields(cast(Any, cls)):
            if f.name not in values:
                object.__setattr__(made, f.name, f.default)
        # Checked under the keywords' own names, as the caller wrote them.
        for name, value in made._check_all(cls.keyword_of).items():
            object.__setattr__(made, name, value)
        made._check_rest()
        return made

    def _check_rest(self) -> None:
        """Checks beyond numbers (overridden where a group has them)."""


def _same(value: Any, default: Any) -> bool:
    try:
        return type(value) is not bool and bool(value == default) or value is default
    except Exception:  # an odd object's __eq__: treat it as given
        return False


@dataclass(frozen=True)
class ProviderLimits(_Options):
    """What one provider process lets its callers hold (`start_service(limits=...)`).

    :param max_connections: open connections at once; beyond it a new one is
        accepted and closed at once.
    :param idle_timeout_s: seconds a connection may stay quiet between calls.
    :param read_timeout_s: seconds one message may take to arrive in full (and a
        reply to be taken by the peer).
    :param max_message_bytes: the largest message, or declared string, binary or
        container size, a call may have.
    :param worker_threads: threads running calls at once.
    :param max_inflight: calls running at once, all methods together (None: no cap);
        a call beyond it gets the "overloaded, not executed" reply at once.
    :param max_inflight_per_method: the same cap per method: an int for every
        method, or ``{method: calls}`` for the methods named (None: no cap). Both
        caps are checked against the service's methods when the provider is made.
    """

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT
    read_timeout_s: float = DEFAULT_READ_TIMEOUT
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    worker_threads: int = DEFAULT_WORKER_THREADS
    max_inflight: Optional[int] = None
    max_inflight_per_method: Union[None, int, Mapping[str, int]] = None

    RULES: ClassVar[Dict[str, Rule]] = {
        "max_connections": (1, 1000000, "open connections at once", True, True),
        "idle_timeout_s": (0.01, 86400 * 365, "seconds", False, True),
        "read_timeout_s": (0.01, 3600, "seconds", False, True),
        "max_message_bytes": (64, 2 ** 31 - 1, "bytes in one message, string or container",
                              True, True),
        "worker_threads": (1, 4096, "threads running calls at once", True, True),
    }
    KEYWORDS: ClassVar[Dict[str, str]] = {"idle_timeout_s": "idle_timeout",
                                          "read_timeout_s": "read_timeout"}
    OPTION: ClassVar[str] = "limits"


@dataclass(frozen=True)
class ProviderTimeouts(_Options):
    """A provider's waits at start and stop (`start_service(timeouts=...)`).

    :param connect_timeout_ms: milliseconds to reach MySQL, Redis and ZooKeeper at start.
    :param session_timeout_s: the ZooKeeper session timeout (None: the config's).
    :param shutdown_grace_s: seconds between deregistering and closing the port, so
        consumers move away first.
    :param drain_timeout_s: seconds calls in flight get to finish at stop.
    """

    connect_timeout_ms: float = DEFAULT_CONNECT_TIMEOUT_MS
    session_timeout_s: Optional[float] = None
    shutdown_grace_s: float = 1.0
    drain_timeout_s: float = 10.0

    RULES: ClassVar[Dict[str, Rule]] = {
        "connect_timeout_ms": (10, 600000, "MILLISECONDS to reach MySQL, Redis and ZooKeeper "
                                           "at start (3000 = 3 s)", False, True),
        "session_timeout_s": (0.1, 3600, "seconds", False, True),
        "shutdown_grace_s": (0, 3600, "seconds", False, True),
        "drain_timeout_s": (0, 3600, "seconds", False, True),
    }
    OPTIONAL: ClassVar[Tuple[str, ...]] = ("session_timeout_s",)
    KEYWORDS: ClassVar[Dict[str, str]] = {"connect_timeout_ms": "connect_timeout",
                                          "session_timeout_s": "session_timeout",
                                          "shutdown_grace_s": "shutdown_grace",
                                          "drain_timeout_s": "drain_timeout"}
    OPTION: ClassVar[str] = "timeouts"


@dataclass(frozen=True)
class MetricsOptions(_Options):
    """Call metrics of a provider or client (`metrics=MetricsOptions(...)`; `metrics=False`
    records none).

    :param enabled: False records no call metrics at all.
    :param port: serve Prometheus /metrics on this port (0: a free one); None: none
        (a provider then reads PROBE_METRICS_PORT).
    :param addr: the address /metrics binds; None: PROBE_METRICS_ADDR, else 127.0.0.1.
    :param stats_interval_s: seconds between two flushes of call stats to Redis (<= 10).
    :param stats_ttl_s: seconds the flushed stats are kept in Redis.
    :param slow_call_ms: calls at least this long are logged on probe.metrics.
    """

    enabled: bool = True
    port: Optional[int] = None
    addr: Optional[str] = None
    stats_interval_s: float = DEFAULT_STATS_INTERVAL
    stats_ttl_s: int = DEFAULT_STATS_TTL
    slow_call_ms: float = DEFAULT_SLOW_CALL_MS

    RULES: ClassVar[Dict[str, Rule]] = {
        "port": (0, 65535, "", True, True),
        "stats_interval_s": (0, MAX_STATS_INTERVAL, "seconds", False, False),
        "stats_ttl_s": (0, None, "seconds", False, False),
        "slow_call_ms": (0, None, "ms", False, False),
    }
    OPTIONAL: ClassVar[Tuple[str, ...]] = ("port",)
    KEYWORDS: ClassVar[Dict[str, str]] = {"enabled": "metrics", "port": "metrics_port",
                                          "addr": "metrics_addr",
                                          "stats_interval_s": "stats_interval",
                                          "stats_ttl_s": "stats_ttl"}
    OPTION: ClassVar[str] = "metrics"

    def _check_rest(self) -> None:
        object.__setattr__(self, "stats_ttl_s", int(self.stats_ttl_s))
        if not isinstance(self.enabled, bool):
            raise ProbeError("bad metrics %s: give True, False or a MetricsOptions"
                             % _shown(self.enabled))
        if self.addr is not None:
            from .metrics.options import bind_address
            bind_address(self.addr)


@dataclass(frozen=True)
class RetryPolicy(_Options):
    """When a client's failed call moves to another node (`build_client(retry=...)`).

    :param retries: how many times a failed call may move to another node.
    :param idempotent: True, or the method names (a name or a list) that may be
        retried after the request was sent (checked against the service when the
        client is built); default none.
    """

    retries: int = 2
    idempotent: Union[bool, str, Iterable[str]] = False

    RULES: ClassVar[Dict[str, Rule]] = {"retries": (0, None, "", True, True)}
    OPTION: ClassVar[str] = "retry"


@dataclass(frozen=True)
class EjectionPolicy(_Options):
    """When a client stops picking a node it cannot connect to (`build_client(ejection=...)`).

    :param eject_after: consecutive connect failures that make a node skipped.
    :param eject_backoff_s: seconds a node is first skipped; doubles up to 30.
    """

    eject_after: int = 3
    eject_backoff_s: float = 1.0

    RULES: ClassVar[Dict[str, Rule]] = {"eject_after": (1, None, "", True, True),
                                        "eject_backoff_s": (0, None, "seconds", False, False)}
    KEYWORDS: ClassVar[Dict[str, str]] = {"eject_backoff_s": "eject_backoff"}
    OPTION: ClassVar[str] = "ejection"


__all__ = ["DEFAULT_CONNECT_TIMEOUT_MS", "DEFAULT_CONNECT_TIMEOUT_S", "EjectionPolicy",
           "MetricsOptions", "ProviderLimits", "ProviderTimeouts", "RetryPolicy", "check_number"]
