"""The metrics options of a provider or a client, checked before anything starts."""

import ipaddress
import os
from typing import Any, Dict, Mapping, NamedTuple, Optional, Union

from ..errors import ProbeError
from ..naming import is_valid_host
from ..options import (DEFAULT_SLOW_CALL_MS, DEFAULT_STATS_INTERVAL, MAX_STATS_INTERVAL,
                       MetricsOptions, check_number)
from ..stores.stats import DEFAULT_TTL
# None: PROBE_METRICS_ADDR if set, else LOCAL_METRICS_ADDR. /metrics names every
# appkey, service and node, so it stays on loopback unless someone widens it.
DEFAULT_METRICS_ADDR = None
LOCAL_METRICS_ADDR = "127.0.0.1"
METRICS_PORT_ENV = "PROBE_METRICS_PORT"
METRICS_ADDR_ENV = "PROBE_METRICS_ADDR"

# TLS for /metrics, through prometheus_client's own start_http_server options.
METRICS_CERTFILE_ENV = "PROBE_METRICS_CERTFILE"
METRICS_KEYFILE_ENV = "PROBE_METRICS_KEYFILE"
METRICS_CLIENT_CAFILE_ENV = "PROBE_METRICS_CLIENT_CAFILE"

OPTION_NAMES = ("metrics", "metrics_port", "metrics_addr", "stats_interval", "stats_ttl",
                "slow_call_ms")



class MetricsSetup(NamedTuple):
    """Metrics options with the environment applied: what a provider or client runs."""

    enabled: bool = True
    port: Optional[int] = None
    addr: str = LOCAL_METRICS_ADDR
    stats_interval: float = DEFAULT_STATS_INTERVAL
    stats_ttl: int = DEFAULT_TTL
    slow_call_ms: float = DEFAULT_SLOW_CALL_MS


def metrics_options(metrics: bool = True, metrics_port: Union[int, str, None] = None,
                    metrics_addr: Optional[str] = DEFAULT_METRICS_ADDR,
                    stats_interval: float = DEFAULT_STATS_INTERVAL, stats_ttl: float = DEFAULT_TTL,
                    slow_call_ms: float = DEFAULT_SLOW_CALL_MS,
                    port_from_env: bool = False) -> "MetricsSetup":
    """Check the metrics options of a provider or a client.

    :param metrics_port: serve /metrics on this port (0: a free one); None: none,
        or with `port_from_env` the PROBE_METRICS_PORT environment variable.
    :param metrics_addr: the address /metrics binds; None: PROBE_METRICS_ADDR, else
        127.0.0.1.
    :param stats_interval: seconds between two writes of the call stats (<= 10).
    :param stats_ttl: seconds a Redis stats slot is kept.
    :param slow_call_ms: calls at least this long are logged.
    :raises ProbeError: naming the bad option, its value and what to give.
    """
    if metrics_port is None and port_from_env:
        metrics_port = os.environ.get(METRICS_PORT_ENV) or None
    if metrics_port is not None:
        text = str(metrics_port).strip()
        ascii_digits = text.isascii() and text.isdigit()  # int() takes other scripts' digits
        if isinstance(metrics_port, bool) or not ascii_digits or not 0 <= int(text) < 65536:
            raise ProbeError("bad metrics_port %r (option or %s): give a port 0-65535"
                             % (metrics_port, METRICS_PORT_ENV))
        metrics_port = int(text)
        tls_options()  # a bad /metrics TLS setting fails now, before anything starts
    check_number("stats_interval", stats_interval, 0, "seconds", maximum=MAX_STATS_INTERVAL,
                 allow_equal=False)
    check_number("stats_ttl", stats_ttl, 0, "seconds", allow_equal=False)
    check_number("slow_call_ms", slow_call_ms, 0, "ms", allow_equal=False)
    return MetricsSetup(bool(metrics), metrics_port, bind_address(metrics_addr),
                          float(stats_interval), int(stats_ttl), float(slow_call_ms))


def setup(options: MetricsOptions, port_from_env: bool = False) -> MetricsSetup:
    """What `options` mean in this environment (PROBE_METRICS_PORT / _ADDR applied)."""
    return metrics_options(options.enabled, options.port, options.addr, options.stats_interval_s,
                           options.stats_ttl_s, options.slow_call_ms, port_from_env=port_from_env)


def bind_address(metrics_addr: Optional[str]) -> str:
    """The address /metrics binds: the option, else the environment, else loopback."""
    if metrics_addr is None:
        metrics_addr = os.environ.get(METRICS_ADDR_ENV) or LOCAL_METRICS_ADDR
    text = metrics_addr.strip() if isinstance(metrics_addr, str) else None
    if text:
        try:
            return str(ipaddress.ip_address(text))
        except ValueError:
            if is_valid_host(text.rstrip(".")):
                return text
    raise ProbeError("bad metrics_addr %r (option or %s): give an IP address or host name to "
                     "bind /metrics to, e.g. 127.0.0.1 (the default) or 0.0.0.0 for every "
                     "interface" % (metrics_addr, METRICS_ADDR_ENV))


def pop_options(options: Dict[str, Any]) -> "MetricsSetup":
    """Take the metrics options out of a **options dict (build_client) and check them."""
    return metrics_options(**{name: options.pop(name) for name in OPTION_NAMES if name in options})


def tls_options(environ: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """start_http_server keyword arguments for TLS on /metrics, from the environment:
    PROBE_METRICS_CERTFILE + PROBE_METRICS_KEYFILE serve HTTPS; with
    PROBE_METRICS_CLIENT_CAFILE too, a scraper must present a certificate signed by
    that CA. Nothing set: plain HTTP (on loopback unless metrics_addr widens it).

    :raises ProbeError: only one of cert and key is set, or a file is missing.
    """
    environ = os.environ if environ is None else environ
    names = (METRICS_CERTFILE_ENV, METRICS_KEYFILE_ENV, METRICS_CLIENT_CAFILE_ENV)
    certfile, keyfile, client_cafile = (environ.get(name) or None for name in names)
    if not (certfile or keyfile or client_cafile):
        return {}
    if not (certfile and keyfile):
        raise ProbeError("/metrics TLS needs both %s and %s (PEM files); %s alone is not "
                         "enough" % (METRICS_CERTFILE_ENV, METRICS_KEYFILE_ENV,
                                     METRICS_CERTFILE_ENV if certfile else
                                     METRICS_KEYFILE_ENV if keyfile else METRICS_CLIENT_CAFILE_ENV))
    for name, path in zip(names, (certfile, keyfile, client_cafile)):
        if path and not os.path.isfile(path):
            raise ProbeError("%s=%r is not a readable file: give the path of a PEM file"
                             % (name, path))
    options: Dict[str, Any] = {"certfile": certfile, "keyfile": keyfile}
    if client_cafile:
        options.update(client_cafile=client_cafile, client_auth_required=True)
    return options
