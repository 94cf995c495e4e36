"""Where a reply ends in the bytes of an asyncio client connection, checked against
a size limit before anything is decoded: probe.rpc.messagelimits' scanners (the ones
the providers use for requests), accepting REPLY and EXCEPTION messages instead
of calls. The provider side uses `probe.rpc.messagelimits.scanner_for` as it is.
"""

from typing import Any

from ..rpc.messagelimits import REPLIES, CompactScanner, FramedScanner, MessageScanner


class BinaryReplyScanner(MessageScanner):
    """A binary-protocol reply (REPLY or EXCEPTION)."""

    __slots__ = ()
    message_types = REPLIES


class CompactReplyScanner(CompactScanner):
    """A compact-protocol reply (REPLY or EXCEPTION)."""

    __slots__ = ()
    message_types = REPLIES


def reply_scanner(transport: str, protocol: str, max_bytes: int, max_depth: int = 64) -> Any:
    """The scanner for the replies of a node speaking `transport` + `protocol`
    (names checked by probe.naming before a node is routed)."""
    inner_class = CompactReplyScanner if protocol == "compact" else BinaryReplyScanner
    inner = inner_class(max_bytes, max_depth)
    if transport != "framed":
        return inner
    framed = FramedScanner(max_bytes, max_depth)
    framed.inner = inner  # set before the first scan: it would pick a request scanner
    return framed


__all__ = ["reply_scanner", "BinaryReplyScanner", "CompactReplyScanner"]
