"""Call metrics: every call counted and timed per (appkey, service, method, node,
status), on the provider ("server") and on the consumer ("client") side.

One module per job:

- `options`     -- the metrics options of a provider or a client, checked.
- `recorder`    -- `Recorder`: per-thread recording, the only part on the call path.
- `sink`        -- `RedisSink` (the fleet view in Redis, probe.stores.stats) and `Pump`,
                   the one background thread that writes it.
- `snapshots`   -- what a process counted, mergeable across pre-fork workers.
- `exposition`  -- the Prometheus collector and the /metrics HTTP servers.
- `state`       -- `MetricsState`: everything the above share in a process, in one
                   object created on first use (`process_state()`); `fresh_state()`
                   gives tests an empty one.

The functions below act on the process's state. Importing probe.metrics creates
nothing and installs no hook.
"""

from typing import TYPE_CHECKING, Optional

from ..stores.stats import DEFAULT_TTL
from .exposition import MetricsEndpoint, ProbeCollector
from .options import (DEFAULT_METRICS_ADDR, DEFAULT_SLOW_CALL_MS, DEFAULT_STATS_INTERVAL,
                      LOCAL_METRICS_ADDR, MAX_STATS_INTERVAL, METRICS_ADDR_ENV, METRICS_PORT_ENV,
                      OPTION_NAMES, MetricsOptions, MetricsSetup, bind_address, metrics_options,
                      pop_options, setup)
from .recorder import Recorder, server_hook
from .sink import RedisSink, redis_settings_or_none
from .snapshots import Snapshot, merge, read_snapshots, write_snapshot
from .state import METRICS_DIR_ENV, MetricsState, fresh_state, process_state

if TYPE_CHECKING:
    from ..settings import RedisSettings


def get_recorder(side: str, appkey: str, service: str, node: Optional[str] = None,
                 slow_call_ms: float = DEFAULT_SLOW_CALL_MS) -> Recorder:
    """The process's recorder for these labels (`MetricsState.get_recorder`)."""
    return process_state().get_recorder(side, appkey, service, node, slow_call_ms)


def attach(recorder: Recorder, redis_settings: Optional["RedisSettings"] = None,
           env: Optional[str] = None, stats_interval: float = DEFAULT_STATS_INTERVAL,
           stats_ttl: float = DEFAULT_TTL) -> Recorder:
    """Expose `recorder` and flush it to Redis (`MetricsState.attach`)."""
    return process_state().attach(recorder, redis_settings, env, stats_interval, stats_ttl)


def detach(recorder: Recorder, redis_settings: Optional["RedisSettings"] = None,
           env: Optional[str] = None) -> None:
    """Undo one `attach` (`MetricsState.detach`)."""
    process_state().detach(recorder, redis_settings, env)


def flush_now() -> bool:
    """Write every pending stat now; never raises; True when every write succeeded."""
    return process_state().flush_now()


def snapshot(other_processes: bool = False) -> Snapshot:
    """This process's snapshot (`MetricsState.snapshot`)."""
    return process_state().snapshot(other_processes)


def enable_multiprocess(directory: str, wipe: bool = True) -> None:
    """Share snapshots with forked workers through `directory` (call before forking)."""
    process_state().enable_multiprocess(directory, wipe)


def disable_multiprocess() -> None:
    """Stop sharing snapshots."""
    process_state().disable_multiprocess()


def serve(port: int, addr: Optional[str] = DEFAULT_METRICS_ADDR) -> MetricsEndpoint:
    """Serve /metrics on addr:port (0 picks a free port; addr None: PROBE_METRICS_ADDR,
    else 127.0.0.1) and return its `MetricsEndpoint`; close it when done. A provider
    and a client of one process asking for the same port share one server."""
    return process_state().serve(port, bind_address(addr))


__all__ = [
    "DEFAULT_METRICS_ADDR", "DEFAULT_SLOW_CALL_MS", "DEFAULT_STATS_INTERVAL", "DEFAULT_TTL",
    "LOCAL_METRICS_ADDR", "MAX_STATS_INTERVAL", "METRICS_ADDR_ENV", "METRICS_DIR_ENV",
    "METRICS_PORT_ENV", "OPTION_NAMES", "MetricsEndpoint", "MetricsOptions", "MetricsSetup", "MetricsState",
    "ProbeCollector", "Recorder", "RedisSink", "attach", "detach", "disable_multiprocess",
    "enable_multiprocess", "flush_now", "fresh_state", "get_recorder", "merge",
    "metrics_options", "pop_options", "process_state", "read_snapshots", "redis_settings_or_none",
    "serve", "server_hook", "Snapshot", "snapshot", "write_snapshot",
]
