"""Where one message ends in the bytes of an asyncio connection, checked against the
limits before anything is decoded: the provider's requests (probe.messagelimits'
scanners, picked by the connection's first byte) and the client's replies (the
same scanners, accepting REPLY and EXCEPTION messages instead of calls).

A scanner has ``scan(buf)`` (the offset past the message, or NEED_MORE),
``reset()``, ``compact`` (the protocol inside) and ``framed`` (a 4-byte length
comes first).
"""

from struct import Struct
from typing import Any

from ..messagelimits import NEED_MORE, VERSION_1, VERSION_MASK, MessageRejected, MessageScanner

REPLY, EXCEPTION = 2, 3
_i32 = Struct("!i").unpack_from


class _Binary(MessageScanner):
    """A request in the binary protocol, unframed."""

    __slots__ = ()
    compact = False
    framed = False


class _BinaryReply(_Binary):
    """A reply in the binary protocol: a REPLY or EXCEPTION message."""

    __slots__ = ()

    @staticmethod
    def _check_version(word: int) -> None:
        if word & VERSION_MASK != VERSION_1:
            raise MessageRejected("not a strict thrift binary-protocol reply (first word "
                                  "0x%08x)" % (word & 0xffffffff))
        if word & 0xff not in (REPLY, EXCEPTION):
            raise MessageRejected("message type %d is not a REPLY or EXCEPTION" % (word & 0xff))


class _Framed(object):
    """A message inside a frame (4-byte big-endian length, then the message); the
    length is refused the moment its 4 bytes are in if it is above the limit."""

    __slots__ = ("max_bytes", "inner")
    framed = True
    compact = False

    def __init__(self, max_bytes: int, inner: Any) -> None:
        self.max_bytes = max_bytes
        self.inner = inner

    def reset(self) -> None:
        self.inner.reset()

    def scan(self, buf: Any) -> int:
        n = len(buf)
        if n < 4:
            return NEED_MORE
        length = _i32(buf, 0)[0]
        if length <= 0 or length > self.max_bytes:
            raise MessageRejected("a frame declares %d bytes, not within 1..max_message_bytes=%d"
                                  % (length, self.max_bytes))
        if n < 4 + length:
            return NEED_MORE
        self.inner.reset()
        with memoryview(buf) as view:
            with view[4:4 + length] as frame:
                end = self.inner.scan(frame)
        if end != length:
            raise MessageRejected("a frame of %d bytes holds %s" % (
                length, "an incomplete message" if end == NEED_MORE else
                "a message of %d bytes" % end))
        return 4 + length


def scanner_for(first_byte: int, max_bytes: int, max_depth: int = 64) -> Any:
    """The request scanner for a connection whose first byte is `first_byte`:
    0x80 unframed binary, a frame length's high byte (< 0x80) framed."""
    if first_byte == 0x80:
        return _Binary(max_bytes, max_depth)
    if first_byte < 0x80:
        return _Framed(max_bytes, _Binary(max_bytes, max_depth))
    raise MessageRejected("not a thrift binary message (first byte 0x%02x)" % first_byte)


def reply_scanner(transport: str, protocol: str, max_bytes: int, max_depth: int = 64) -> Any:
    """The scanner for replies of a node speaking `transport` + `protocol`."""
    if protocol != "binary":
        raise MessageRejected("protocol %r is not supported by the asyncio client yet" % protocol)
    inner = _BinaryReply(max_bytes, max_depth)
    return _Framed(max_bytes, inner) if transport == "framed" else inner


__all__ = ["NEED_MORE", "MessageRejected", "scanner_for", "reply_scanner"]
