"""The config center plane: `live_config` (a live, read-only view of an appkey's
config, mirrored from ZooKeeper with a local backup) and the one validator of what
a config value may be (`values`), used by the writer and every reader alike.

`from probe.configcenter import live_config` is the documented entry point."""

from .live import LiveConfig, live_config
from .values import MAX_VALUE_BYTES, canonical_text, parse_value

__all__ = ["live_config", "LiveConfig", "parse_value", "canonical_text", "MAX_VALUE_BYTES"]
