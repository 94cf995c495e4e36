"""What a config value may be: the one validator the writer (`probe config set`, the
console, Admin) and every reader (LiveConfig, its backup file, `probe config get`)
use, so a value one side accepts the other serves.

A value is UTF-8 JSON text of at most MAX_VALUE_BYTES, not null, without NaN or
Infinity, nested at most MAX_DEPTH deep. The depth is counted before parsing,
without recursion: json's parser recurses once per level, so how deep it can go
depends on the stack of the thread that parses (a kazoo watch thread has less
room than the CLI), and a value near that edge would be accepted by one and
dropped by another.
"""

import json
from typing import Any, Tuple, Union

from ..errors import InvalidConfigValue

# ZooKeeper refuses a request larger than its jute.maxbuffer (1 MiB by default),
# path included: 1 KiB of that is left for the path and the request's header.
MAX_VALUE_BYTES = 1024 * 1024 - 1024
# Apache Thrift's and thriftpy2's recursion limit; no real config nests deeper.
MAX_DEPTH = 64


def _refuse_constant(name: str) -> Any:
    raise ValueError("%s is not JSON" % name)


def text_depth(text: str) -> int:
    """The deepest nesting of [ and { in JSON text, outside strings (no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
        elif char in "]}":
            depth -= 1
    return deepest


def value_depth(value: Any) -> int:
    """The deepest nesting of lists and dicts in a decoded value (no recursion)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, tuple)):
            children = item
        elif isinstance(item, dict):
            children = list(item.values())
        else:
            continue
        if depth > deepest:
            deepest = depth
            if deepest > MAX_DEPTH:
                return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _too_deep(depth: int) -> InvalidConfigValue:
    return InvalidConfigValue("config value is nested %d deep; the limit is %d levels of "
                              "[...] and {...}" % (depth, MAX_DEPTH))


def parse_value(raw: Union[str, bytes, bytearray]) -> Tuple[Any, str]:
    """(value, canonical text) of a JSON value given as text or bytes.

    :raises InvalidConfigValue: naming what is wrong: too big, not UTF-8, nested too
        deep, not JSON (NaN and Infinity are not JSON), or null.
    """
    if isinstance(raw, str):
        data = raw.encode("utf-8", "surrogatepass")
    elif isinstance(raw, (bytes, bytearray)):
        data = bytes(raw)
    else:
        raise InvalidConfigValue("config value must be JSON text, got %s" % type(raw).__name__)
    if len(data) > MAX_VALUE_BYTES:
        raise InvalidConfigValue("config value is %d bytes; the limit is %d bytes (1 MiB less "
                                 "1 KiB for the znode path): keep big data elsewhere and put its "
                                 "location in the config" % (len(data), MAX_VALUE_BYTES))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidConfigValue("config value is not UTF-8 text")
    depth = text_depth(text)
    if depth > MAX_DEPTH:
        raise _too_deep(depth)
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:  # cannot happen within MAX_DEPTH; kept as a guard
        raise _too_deep(depth)
    except ValueError as exc:
        raise InvalidConfigValue("config value %s is not valid JSON (%s): quote strings, e.g. "
                                 "'\"text\"', and write numbers, true/false/null, [...] or {...} "
                                 "as JSON" % (_preview(text), exc))
    return value, canonical_text(value)


def canonical_text(value: Any) -> str:
    """The one JSON spelling of `value` that probe stores and compares.

    :raises InvalidConfigValue: null, nested too deep, not JSON-able, or too big.
    """
    if value is None:
        # A callback's `new` is None for a deleted key: a null value would look the same.
        raise InvalidConfigValue("null is not a config value: delete the key instead "
                                 "(`probe config delete`)")
    depth = value_depth(value)
    if depth > MAX_DEPTH:
        raise _too_deep(depth)
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True,
                          allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidConfigValue("config value %s cannot be written as JSON: %s"
                                 % (_preview(repr(value)), exc))
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidConfigValue("config value holds text that is not valid Unicode (a lone "
                                 "surrogate)")
    if size > MAX_VALUE_BYTES:
        raise InvalidConfigValue("config value is larger than the limit of %d bytes as JSON: keep "
                                 "big data elsewhere and put its location in the config"
                                 % MAX_VALUE_BYTES)
    return text


def _preview(text: str, limit: int = 80) -> str:
    text = str(text)
    return repr(text if len(text) <= limit else text[:limit] + "...")
