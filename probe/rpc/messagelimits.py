"""Check a thrift CALL against size and nesting limits before it is decoded, so a
hostile peer cannot make the provider allocate what it declares. Binary
(`MessageScanner`) and compact (`CompactScanner`) protocols, unframed or framed
(`FramedScanner`); `scanner_for` picks one from a connection's first byte.

thriftpy2 0.7.1's Cython protocol mallocs a string's declared length (and its
buffered transport grows its buffer to it, then asks the socket for that much)
before a single byte of the payload has arrived: a 4-byte prefix saying 1.5 GiB
costs 1.5 GiB of address space, and a payload dribbled in slowly is re-copied on
every read. Apache Thrift answered the same reports (CVE-2019-0205, CVE-2020-13949)
with TConfiguration's max message size and recursion limit. probe does the same
here, on the raw bytes: `MessageScanner` walks a message's structure as its bytes
arrive, checks every declared length and container size against what is left of
the budget, and says where the message ends. Only a complete, checked message is
handed to thriftpy2's decoder.

The scanner is resumable (its position and an explicit stack survive between
reads), so a message that arrives in many pieces is walked once in total, and a
declared length is refused the moment its 4 bytes are in, not when its payload is.
"""

from struct import Struct
from typing import List, Optional, Tuple, Union

#: What a scanner reads: the bytes of a connection as they arrive.
Buffer = Union[bytes, bytearray]

# Thrift binary-protocol type ids.
STOP, BOOL, BYTE, DOUBLE, I16, I32, I64, STRING, STRUCT, MAP, SET, LIST = (
    0, 2, 3, 4, 6, 8, 10, 11, 12, 13, 14, 15)
FIXED_SIZE = {BOOL: 1, BYTE: 1, DOUBLE: 8, I16: 2, I32: 4, I64: 8}
# The fewest bytes one value of a type can take: bounds a container's declared size.
MIN_SIZE = dict(FIXED_SIZE)
MIN_SIZE.update({STRING: 4, STRUCT: 1, MAP: 6, SET: 5, LIST: 5})

VERSION_MASK = -65536  # 0xffff0000 as a signed i32
VERSION_1 = -2147418112  # 0x80010000 as a signed i32
CALL, ONEWAY = 1, 4
REPLY, EXCEPTION = 2, 3
REQUESTS = (CALL, ONEWAY)   # what a provider accepts
REPLIES = (REPLY, EXCEPTION)
_TYPE_NAMES = {CALL: "CALL", REPLY: "REPLY", EXCEPTION: "EXCEPTION", ONEWAY: "ONEWAY"}  # what a client accepts (probe.aio reads replies with these scanners)

_i32 = Struct("!i").unpack_from
_two_i32 = Struct("!ii").unpack_from
_header = Struct("!bi").unpack_from     # list/set: element type, size
_map_header = Struct("!bbi").unpack_from  # map: key type, value type, size

# Frame kinds on the scanner's stack.
_VALUE, _FIELDS, _ITEMS, _ENTRIES = 0, 1, 2, 3

NEED_MORE = -1


class MessageRejected(Exception):
    """The bytes are not a message this provider accepts (too big, too deep, not
    a strict binary-protocol CALL). The connection must be closed."""


class MessageScanner(object):
    """Walks one message at a time in a growing buffer.

    :param max_bytes: the most bytes one message may take, and so the most any
        declared length or container size may claim.
    :param max_depth: how deep structs and containers may nest (the arguments
        struct counts as 1); thriftpy2 and Apache Thrift both default to 64.

    ``scan(buf)`` returns the offset just past the message that starts at
    ``buf[0]``, or ``NEED_MORE``; call it again when ``buf`` has grown. Call
    ``reset()`` before the next message.
    """

    __slots__ = ("max_bytes", "max_depth", "pos", "stack", "depth", "body")

    compact = False  # the protocol it scans (see CompactScanner)
    header = 0       # bytes before the message (FramedScanner: the frame length)
    message_types = REQUESTS  # the message types accepted (REPLIES: a client's scanner)

    def __init__(self, max_bytes: int, max_depth: int = 64) -> None:
        self.max_bytes = max_bytes
        self.max_depth = max_depth
        self.reset()

    def reset(self) -> None:
        self.pos = 0
        self.stack: Optional[List[List[int]]] = None  # None until the message header has been read
        self.depth = 0

    def scan(self, buf: Buffer) -> int:
        n = len(buf)
        limit = self.max_bytes
        if self.stack is None:  # the message header, inline: this runs for every call
            if n < 12:
                if n >= 4:
                    self._check_version(_i32(buf, 0)[0])
                return NEED_MORE
            word, name_length = _two_i32(buf, 0)
            if word & VERSION_MASK != VERSION_1 or (word & 0xff) not in self.message_types:
                self._check_version(word)
            if name_length < 0 or name_length > 1024 or name_length > limit - 12:
                _check_length(name_length, min(limit - 12, 1024), "a method name")
            if n < 12 + name_length:
                return NEED_MORE
            self.pos = 12 + name_length
            self.depth = 1
            self.stack = [[_FIELDS]]
        stack = self.stack
        pos = self.pos
        depth = self.depth
        max_depth = self.max_depth
        while stack:
            frame = stack[-1]
            kind = frame[0]
            if kind == _FIELDS:
                if pos >= n:
                    break
                ftype = buf[pos]
                if ftype == STOP:
                    pos += 1
                    stack.pop()
                    depth -= 1
                    continue
                if pos + 3 > n:
                    break
                pos += 3
                stack.append([_VALUE, ftype])
                continue
            if kind == _ITEMS or kind == _ENTRIES:
                if frame[1] == 0:
                    stack.pop()
                    depth -= 1
                    continue
                frame[1] -= 1
                if kind == _ITEMS:
                    stack.append([_VALUE, frame[2]])
                else:
                    stack.append([_VALUE, frame[2] if frame[1] % 2 else frame[3]])
                continue
            # _VALUE: one value of type frame[1]
            vtype = frame[1]
            size = FIXED_SIZE.get(vtype)
            if size is not None:
                if pos + size > n:
                    break
                pos += size
                stack.pop()
            elif vtype == STRING:
                if pos + 4 > n:
                    break
                length = _i32(buf, pos)[0]
                _check_length(length, limit - pos - 4, "a string/binary")
                if pos + 4 + length > n:
                    break
                pos += 4 + length
                stack.pop()
            elif vtype == STRUCT:
                depth += 1
                _check_depth(depth, max_depth)
                frame[0] = _FIELDS
            elif vtype == LIST or vtype == SET:
                if pos + 5 > n:
                    break
                etype, count = _header(buf, pos)
                body = _check_container(etype, count, 1, limit - pos - 5)
                fixed = FIXED_SIZE.get(etype)
                if fixed is not None:
                    if pos + 5 + body > n:
                        break
                    pos += 5 + body
                    stack.pop()
                else:
                    depth += 1
                    _check_depth(depth, max_depth)
                    pos += 5
                    stack[-1] = [_ITEMS, count, etype]
            elif vtype == MAP:
                if pos + 6 > n:
                    break
                ktype, vtype2, count = _map_header(buf, pos)
                if count == 0:  # an empty map may leave its types unset
                    pos += 6
                    stack.pop()
                    continue
                _check_container(ktype, count, 2, limit - pos - 6)
                _check_container(vtype2, count, 2, limit - pos - 6)
                kfixed, vfixed = FIXED_SIZE.get(ktype), FIXED_SIZE.get(vtype2)
                if kfixed is not None and vfixed is not None:
                    body = count * (kfixed + vfixed)
                    _check_length(body, limit - pos - 6, "a map")
                    if pos + 6 + body > n:
                        break
                    pos += 6 + body
                    stack.pop()
                else:
                    _check_length(count * (MIN_SIZE[ktype] + MIN_SIZE[vtype2]), limit - pos - 6,
                                  "a map")
                    depth += 1
                    _check_depth(depth, max_depth)
                    pos += 6
                    stack[-1] = [_ENTRIES, 2 * count, ktype, vtype2]
            else:
                raise MessageRejected("unknown thrift type id %d" % vtype)
        self.pos = pos
        self.depth = depth
        if pos > limit or (stack and n > limit):
            raise MessageRejected("a message longer than max_message_bytes=%d" % limit)
        return NEED_MORE if stack else pos

    def _check_version(self, word: int) -> None:
        if word & VERSION_MASK != VERSION_1:
            raise MessageRejected("not a strict thrift binary-protocol message (first word 0x%08x)"
                                  % (word & 0xffffffff))
        if word & 0xff not in self.message_types:
            raise MessageRejected("message type %d is not one of %s" % (
                word & 0xff, "/".join(_TYPE_NAMES[t] for t in self.message_types)))


def _check_length(length: int, room: int, what: str) -> None:
    if length < 0 or length > room:
        raise MessageRejected("%s declares %d bytes, more than the %d left of "
                              "max_message_bytes" % (what, length, max(room, 0)))


def _check_container(etype: int, count: int, per_item: int, room: int) -> int:
    """Byte size of a container of fixed-size items (0 for variable ones), after
    checking that even the smallest items of that type could fit in `room`."""
    smallest = MIN_SIZE.get(etype)
    if smallest is None:
        raise MessageRejected("unknown thrift type id %d in a container" % etype)
    if count < 0 or count * smallest > room // per_item:
        raise MessageRejected("a container declares %d items, more than fit in the %d bytes "
                              "left of max_message_bytes" % (count, max(room, 0)))
    return count * smallest


def _check_depth(depth: int, max_depth: int) -> None:
    if depth > max_depth:
        raise MessageRejected("structs and containers nested deeper than %d" % max_depth)


# -- the compact protocol -------------------------------------------------------------
# Compact-protocol type ids (a field header's or container header's low nibble).
(C_STOP, C_TRUE, C_FALSE, C_BYTE, C_I16, C_I32, C_I64, C_DOUBLE, C_BINARY, C_LIST, C_SET,
 C_MAP, C_STRUCT) = range(13)
COMPACT_PROTOCOL_ID = 0x82
COMPACT_VERSION = 1
_VARINT_BYTES = {C_I16: 3, C_I32: 5, C_I64: 10}  # the longest varint each may take
_MAX_VARINT = 10


def _varint(buf: Buffer, pos: int, n: int,
            longest: int = _MAX_VARINT) -> Optional[Tuple[int, int]]:
    """(value, position after it) of the unsigned varint at `pos`, or None when its
    last byte has not arrived; MessageRejected for one longer than `longest` bytes."""
    value = 0
    shift = 0
    start = pos
    while pos < n:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if pos - start >= longest:
            break
    if pos - start >= longest:
        raise MessageRejected("a varint longer than %d bytes" % longest)
    return None


class CompactScanner(object):
    """`MessageScanner` for the compact protocol: the same interface and limits
    (every declared length and container size against what is left of
    `max_bytes`, nesting against `max_depth`), resumable in the same way.

    A step that needs bytes not yet in moves nothing, so `scan` resumes there."""

    __slots__ = ("max_bytes", "max_depth", "pos", "stack", "depth")

    compact = True
    header = 0
    message_types = REQUESTS

    def __init__(self, max_bytes: int, max_depth: int = 64) -> None:
        self.max_bytes = max_bytes
        self.max_depth = max_depth
        self.reset()

    def reset(self) -> None:
        self.pos = 0
        self.stack: Optional[List[List[int]]] = None
        self.depth = 0

    def scan(self, buf: Buffer) -> int:
        n = len(buf)
        limit = self.max_bytes
        if self.stack is None:
            if n >= 1 and buf[0] != COMPACT_PROTOCOL_ID:
                raise MessageRejected("not a thrift compact-protocol message (first byte 0x%02x)"
                                      % buf[0])
            if n < 2:
                return NEED_MORE
            if buf[1] & 0x1F != COMPACT_VERSION or (buf[1] >> 5) not in self.message_types:
                raise MessageRejected("compact message header 0x%02x is not a version-1 %s"
                                      % (buf[1], "/".join(_TYPE_NAMES[t] for t in self.message_types)))
            seqid = _varint(buf, 2, n, 5)
            if seqid is None:
                return NEED_MORE
            name = _varint(buf, seqid[1], n, 5)
            if name is None:
                return NEED_MORE
            name_length, pos = name
            _check_length(name_length, min(limit - pos, 1024), "a method name")
            if n < pos + name_length:
                return NEED_MORE
            self.pos = pos + name_length
            self.depth = 1
            self.stack = [[_FIELDS]]
        stack = self.stack
        pos = self.pos
        depth = self.depth
        max_depth = self.max_depth
        while stack:
            frame = stack[-1]
            kind = frame[0]
            if kind == _FIELDS:
                if pos >= n:
                    break
                header = buf[pos]
                ftype = header & 0x0F
                if ftype == C_STOP:
                    pos += 1
                    stack.pop()
                    depth -= 1
                    continue
                if header >> 4:
                    after = pos + 1
                else:  # no delta: a zigzag i16 field id follows
                    fid = _varint(buf, pos + 1, n, 3)
                    if fid is None:
                        break
                    after = fid[1]
                if ftype == C_TRUE or ftype == C_FALSE:  # the value is in the type
                    pos = after
                    continue
                pos = after
                stack.append([_VALUE, ftype])
                continue
            if kind == _ITEMS or kind == _ENTRIES:
                if frame[1] == 0:
                    stack.pop()
                    depth -= 1
                    continue
                frame[1] -= 1
                if kind == _ITEMS:
                    stack.append([_VALUE, frame[2]])
                else:
                    stack.append([_VALUE, frame[2] if frame[1] % 2 else frame[3]])
                continue
            vtype = frame[1]
            if vtype == C_TRUE or vtype == C_FALSE or vtype == C_BYTE:
                if pos + 1 > n:
                    break
                pos += 1
                stack.pop()
            elif vtype in _VARINT_BYTES:
                value = _varint(buf, pos, n, _VARINT_BYTES[vtype])
                if value is None:
                    break
                pos = value[1]
                stack.pop()
            elif vtype == C_DOUBLE:
                if pos + 8 > n:
                    break
                pos += 8
                stack.pop()
            elif vtype == C_BINARY:
                length = _varint(buf, pos, n, 5)
                if length is None:
                    break
                _check_length(length[0], limit - length[1], "a string/binary")
                if length[1] + length[0] > n:
                    break
                pos = length[1] + length[0]
                stack.pop()
            elif vtype == C_STRUCT:
                depth += 1
                _check_depth(depth, max_depth)
                frame[0] = _FIELDS
            elif vtype == C_LIST or vtype == C_SET:
                if pos >= n:
                    break
                header = buf[pos]
                etype = header & 0x0F
                count = header >> 4
                after = pos + 1
                if count == 15:
                    size = _varint(buf, after, n, 5)
                    if size is None:
                        break
                    count, after = size
                _check_compact_container(etype, count, 1, limit - after)
                if count == 0:
                    pos = after
                    stack.pop()
                    continue
                depth += 1
                _check_depth(depth, max_depth)
                pos = after
                stack[-1] = [_ITEMS, count, etype]
            elif vtype == C_MAP:
                size = _varint(buf, pos, n, 5)
                if size is None:
                    break
                count, after = size
                if count == 0:  # an empty map has no type byte
                    pos = after
                    stack.pop()
                    continue
                if after >= n:
                    break
                types = buf[after]
                ktype, vtype2 = types >> 4, types & 0x0F
                _check_compact_container(ktype, count, 2, limit - after - 1)
                _check_compact_container(vtype2, count, 2, limit - after - 1)
                depth += 1
                _check_depth(depth, max_depth)
                pos = after + 1
                stack[-1] = [_ENTRIES, 2 * count, ktype, vtype2]
            else:
                raise MessageRejected("unknown compact type id %d" % vtype)
        self.pos = pos
        self.depth = depth
        if pos > limit or (stack and n > limit):
            raise MessageRejected("a message longer than max_message_bytes=%d" % limit)
        return NEED_MORE if stack else pos


# The fewest bytes one compact value of a type takes (a container's element).
_COMPACT_MIN_SIZE = {C_TRUE: 1, C_FALSE: 1, C_BYTE: 1, C_I16: 1, C_I32: 1, C_I64: 1,
                     C_DOUBLE: 8, C_BINARY: 1, C_LIST: 1, C_SET: 1, C_MAP: 1, C_STRUCT: 1}


def _check_compact_container(etype: int, count: int, per_item: int, room: int) -> None:
    smallest = _COMPACT_MIN_SIZE.get(etype)
    if smallest is None:
        raise MessageRejected("unknown compact type id %d in a container" % etype)
    if count * smallest > room // per_item:
        raise MessageRejected("a container declares %d items, more than fit in the %d bytes "
                              "left of max_message_bytes" % (count, max(room, 0)))


class FramedScanner(object):
    """A message inside a frame (a 4-byte big-endian length, then the message): the
    length is checked against `max_bytes` the moment its 4 bytes are in, before
    anything is allocated for the frame; the complete frame is then scanned by the
    scanner of its protocol (binary or compact, told by its first byte), which must
    end exactly at the frame's end. `header` is the prefix to strip (4)."""

    __slots__ = ("max_bytes", "max_depth", "inner")

    header = 4

    def __init__(self, max_bytes: int, max_depth: int = 64) -> None:
        self.max_bytes = max_bytes
        self.max_depth = max_depth
        self.inner: Optional["Scanner"] = None

    @property
    def compact(self) -> bool:
        return self.inner is not None and self.inner.compact

    def reset(self) -> None:
        if self.inner is not None:
            self.inner.reset()

    def scan(self, buf: Buffer) -> int:
        n = len(buf)
        if n < 4:
            return NEED_MORE
        length = _i32(buf, 0)[0]
        if length <= 0 or length > self.max_bytes:
            raise MessageRejected("a frame declares %d bytes, not within 1..max_message_bytes=%d"
                                  % (length, self.max_bytes))
        if n < 5:
            return NEED_MORE
        if self.inner is None:
            self.inner = scanner_for(buf[4], self.max_bytes, self.max_depth, framed_ok=False)
        if n < 4 + length:
            return NEED_MORE
        self.inner.reset()
        # A copy of the frame (at most max_bytes, as arrived): indexing bytes is
        # faster than a memoryview, and a bytearray `buf` stays growable.
        end = self.inner.scan(bytes(buf[4:4 + length]))
        if end != length:
            raise MessageRejected("a frame of %d bytes holds %s" % (
                length, "an incomplete message" if end == NEED_MORE else
                "a message of %d bytes" % end))
        return 4 + length


#: Any of the three scanners (scanner_for picks one).
Scanner = Union[MessageScanner, CompactScanner, FramedScanner]


def scanner_for(first_byte: int, max_bytes: int, max_depth: int = 64,
                framed_ok: bool = True) -> "Scanner":
    """The scanner for a connection whose first byte is `first_byte`: 0x80 unframed
    binary, 0x82 unframed compact, else a frame length (framed: its 5th byte says
    which protocol). MessageRejected for a byte no thrift dialect starts with."""
    if first_byte == 0x80:
        return MessageScanner(max_bytes, max_depth)
    if first_byte == COMPACT_PROTOCOL_ID:
        return CompactScanner(max_bytes, max_depth)
    if framed_ok and first_byte < 0x80:  # a frame length's high byte (lengths are < 2 GiB)
        return FramedScanner(max_bytes, max_depth)
    raise MessageRejected("not a thrift binary or compact message%s (first byte 0x%02x)"
                          % ("" if framed_ok else " in the frame", first_byte))
