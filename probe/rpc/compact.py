"""A faster drop-in for thriftpy2's pure-Python compact protocol.

thriftpy2 0.7 has no Cython compact protocol, so every compact call pays a
Python-level encode and decode on both sides. :class:`FastCompactProtocol`
subclasses ``thriftpy2.protocol.TCompactProtocol`` and overrides only its hot
paths with equivalent, leaner code (same bytes on the wire, same values decoded,
the same exception types on bad input):

- the message header is written in one ``trans.write``, its constant parts
  (protocol id, version|type, name length and name) encoded once per name;
- varints: single-byte values come from a table, with no ``array`` round trip;
- ``write_struct`` / ``read_struct`` write or read a field header and a scalar
  value (string, binary, i16/i32/i64) inline, and leave booleans, doubles, bytes
  and containers to thriftpy2's own methods.

Everything else (skip, containers, maps, bools) is thriftpy2's code unchanged.
"""

from struct import Struct
from typing import Any, Dict, Tuple

from thriftpy2.protocol import TCompactProtocol
from thriftpy2.protocol.compact import BIN_TYPES, TTYPES, CompactType, check_integer_limits
from thriftpy2.protocol.exc import TProtocolException
from thriftpy2.thrift import TType

_UBYTE = Struct("!B")
_unpack_ubyte = _UBYTE.unpack
_ONE_BYTE = tuple(bytes((n,)) for n in range(256))
_STOP = b"\x00"
_PROTOCOL_ID = TCompactProtocol.PROTOCOL_ID
_VERSION = TCompactProtocol.VERSION
_TYPE_SHIFT = TCompactProtocol.TYPE_SHIFT_AMOUNT

_STRING = TType.STRING
_BINARY = TType.BINARY
_I16 = TType.I16
_I32 = TType.I32
_I64 = TType.I64
_BOOL = TType.BOOL
_STOP_TYPE = TType.STOP
_C_TRUE = CompactType.TRUE
_C_FALSE = CompactType.FALSE
_C_BINARY = CompactType.BINARY
_INT_BITS = {_I16: 16, _I32: 32, _I64: 64}
_C_INT = {_I16: CompactType.I16, _I32: CompactType.I32, _I64: CompactType.I64}

# Message-header constant parts per (name, message type); bounded, since a
# server also writes headers for names a peer sent (unknown-method replies).
_HEADER_CACHE_MAX = 1024
_headers: Dict[Tuple[Any, int], Tuple[bytes, bytes]] = {}


def varint(n: int) -> bytes:
    """thriftpy2's ``write_varint`` encoding of `n`, as bytes."""
    if 0 <= n < 0x80:
        return _ONE_BYTE[n]
    out = []
    while True:
        if n & ~0x7f == 0:
            out.append(n)
            break
        out.append((n & 0xff) | 0x80)
        n = n >> 7
    return bytes(out)


def read_varint(read: Any) -> int:
    """thriftpy2's ``read_varint``, given the transport's ``read``."""
    byte = ord(read(1))
    if byte < 0x80:
        return byte
    result = byte & 0x7f
    shift = 7
    while True:
        byte = ord(read(1))
        result |= (byte & 0x7f) << shift
        if byte >> 7 == 0:
            return result
        shift += 7


def _zig_zag(n: int, bits: int) -> int:
    check_integer_limits(n, bits)
    return (n << 1) ^ (n >> (bits - 1))


def _header_parts(name: Any, ttype: int) -> Tuple[bytes, bytes]:
    key = (name, ttype)
    parts = _headers.get(key)
    if parts is None:
        encoded = name if isinstance(name, bytes) else name.encode("utf-8")
        parts = (bytes((_PROTOCOL_ID, _VERSION | (ttype << _TYPE_SHIFT))),
                 varint(len(encoded)) + encoded)
        if len(_headers) < _HEADER_CACHE_MAX:
            _headers[key] = parts
    return parts


class FastCompactProtocol(TCompactProtocol):
    """``TCompactProtocol`` with faster message headers, varints and structs."""

    def write_message_begin(self, name: Any, ttype: int, seqid: int) -> None:
        prefix, suffix = _header_parts(name, ttype)
        self.trans.write(prefix + varint(seqid) + suffix)

    def _write_size(self, i32: int) -> None:
        self.trans.write(varint(i32))

    def _write_ubyte(self, byte: int) -> None:
        self.trans.write(_UBYTE.pack(byte))

    def _write_i16(self, i16: int) -> None:
        self.trans.write(varint(_zig_zag(i16, 16)))

    def _write_i32(self, i32: int) -> None:
        self.trans.write(varint(_zig_zag(i32, 32)))

    def _write_i64(self, i64: int) -> None:
        self.trans.write(varint(_zig_zag(i64, 64)))

    def _write_string(self, s: Any) -> None:
        if not isinstance(s, bytes):
            s = s.encode("utf-8")
        self.trans.write(varint(len(s)) + s)

    def write_struct(self, obj: Any) -> None:
        write = self.trans.write
        self._structs.append(self._last_fid)
        self._last_fid = 0
        thrift_spec = obj.thrift_spec
        for fid in thrift_spec:
            if fid is None:
                continue
            fspec = thrift_spec[fid]
            if len(fspec) == 3:
                ftype, fname, _ = fspec
                container_spec = None
            else:
                ftype, fname, container_spec, _ = fspec
            val = getattr(obj, fname, None)
            if val is None:
                continue
            if ftype == _STRING or ftype == _BINARY:
                if ftype == _STRING:
                    if not isinstance(val, bytes):
                        val = val.encode("utf-8")
                    size = varint(len(val))
                else:
                    size = varint(len(val))  # (thriftpy2 sizes a binary str before encoding it)
                    if isinstance(val, str):
                        val = val.encode()
                delta = fid - self._last_fid
                if 0 < delta <= 15:
                    head = _ONE_BYTE[delta << 4 | _C_BINARY]
                else:
                    head = _UBYTE.pack(_C_BINARY) + varint(_zig_zag(fid, 16))
                self._last_fid = fid
                write(head + size + val)
            elif ftype in _INT_BITS:
                value = varint(_zig_zag(val, _INT_BITS[ftype]))
                ctype = _C_INT[ftype]
                delta = fid - self._last_fid
                if 0 < delta <= 15:
                    head = _ONE_BYTE[delta << 4 | ctype]
                else:
                    head = _UBYTE.pack(ctype) + varint(_zig_zag(fid, 16))
                self._last_fid = fid
                write(head + value)
            else:
                self._write_field_begin(fname, ftype, fid)
                self._write_val(ftype, val, container_spec)
        write(_STOP)
        self._last_fid = self._structs.pop()

    def _read_ubyte(self) -> int:
        result: int = _unpack_ubyte(self.trans.read(1))[0]
        return result

    def _read_size(self) -> int:
        return read_varint(self.trans.read)

    def _read_int(self) -> int:
        n = read_varint(self.trans.read)
        return (n >> 1) ^ -(n & 1)

    def read_message_begin(self) -> Tuple[Any, int, int]:
        read = self.trans.read
        name: Any
        (proto_id,) = _unpack_ubyte(read(1))
        if proto_id != _PROTOCOL_ID:
            raise TProtocolException(TProtocolException.BAD_VERSION,
                                     "Bad protocol id in the message: %d" % proto_id)
        (ver_type,) = _unpack_ubyte(read(1))
        version = ver_type & self.VERSION_MASK
        if version != _VERSION:
            raise TProtocolException(TProtocolException.BAD_VERSION,
                                     "Bad version: %d (expect %d)" % (version, _VERSION))
        seqid = read_varint(read)
        name = read(read_varint(read))
        if self.decode_response:
            try:
                name = name.decode("utf-8")
            except UnicodeDecodeError:
                if self.strict_decode:
                    raise
        return name, (ver_type >> _TYPE_SHIFT) & self.TYPE_BITS, seqid

    def read_struct(self, obj: Any) -> None:
        read = self.trans.read
        self._structs.append(self._last_fid)
        self._last_fid = 0
        thrift_spec = obj.thrift_spec
        while True:
            byte = _unpack_ubyte(read(1))[0]
            ctype = byte & 0x0f
            if ctype == 0:  # STOP
                break
            delta = byte >> 4
            if delta == 0:
                n = read_varint(read)
                fid = (n >> 1) ^ -(n & 1)
            else:
                fid = self._last_fid + delta
            self._last_fid = fid
            if ctype == _C_TRUE:
                self._bool_value = True
            elif ctype == _C_FALSE:
                self._bool_value = False
            ftype = TTYPES[ctype]
            if ftype == _STOP_TYPE:
                break
            if fid not in thrift_spec:
                self.skip(ftype)
                continue
            field = thrift_spec[fid]
            if field is not None and (ftype == field[0] or (ftype in BIN_TYPES
                                                            and field[0] in BIN_TYPES)):
                vtype = field[0]
                if vtype == _STRING:
                    value: Any = read(read_varint(read))
                    if self.decode_response:
                        try:
                            value = value.decode("utf-8")
                        except UnicodeDecodeError:
                            if self.strict_decode:
                                raise
                elif vtype == _BINARY:
                    value = read(read_varint(read))
                elif vtype in _INT_BITS:
                    n = read_varint(read)
                    value = (n >> 1) ^ -(n & 1)
                else:
                    value = self._read_val(vtype, field[2])
                setattr(obj, field[1], value)
            else:
                self.skip(ftype)
        self._last_fid = self._structs.pop()


__all__ = ["FastCompactProtocol", "varint", "read_varint"]
