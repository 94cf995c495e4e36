"""The client side's one place that knows transports and protocols.

A node's data says what it speaks (``"transport": "buffered" | "framed"``,
``"protocol": "binary" | "compact"``; see :mod:`probe.naming`). For each such
dialect a :class:`Codec` says how a pooled connection wraps its socket and how one
call is written on it; the reply is read back through the connection's protocol
object, whatever it is.

- binary (buffered or framed): the start of each request (version|type, name
  length, name) is encoded once per method (:func:`binary_header`); a call writes
  that, its seqid and the args struct. Over a framed transport the same bytes go
  into the frame buffer and ``flush()`` writes length + payload in one send.
- compact: thriftpy2's compact protocol is pure Python (thriftpy2 0.7 has no
  Cython one); connections use :class:`probe.rpc.compact.FastCompactProtocol`, its
  drop-in with the header's constant parts encoded once per method and leaner
  varint and struct code (same bytes on the wire).

Transports are thriftpy2's Cython ones (``TCyBufferedTransport``,
``TCyFramedTransport``); the binary protocol is its Cython one.
"""

import struct
from typing import Any, Callable, Dict, Optional, Tuple, cast

from thriftpy2.protocol.binary import VERSION_1
from thriftpy2.protocol.cybin import TCyBinaryProtocolFactory  # type: ignore[attr-defined]
from thriftpy2.transport import TCyBufferedTransportFactory, TCyFramedTransportFactory

from ..naming import PROTOCOLS, TRANSPORTS, check_dialect
from .compact import FastCompactProtocol

_SEQID_THEN_STOP = struct.Struct("!iB")  # seqid, then the empty args struct's STOP byte
_SEQID = struct.Struct("!i")

_TRANSPORT_FACTORIES = {"buffered": TCyBufferedTransportFactory(),
                        "framed": TCyFramedTransportFactory()}


class _FastCompactProtocolFactory(object):
    """thriftpy2's TCompactProtocolFactory, making FastCompactProtocol."""

    def get_protocol(self, trans: Any) -> FastCompactProtocol:
        return FastCompactProtocol(trans)


_PROTOCOL_FACTORIES: Dict[str, Any] = {"binary": TCyBinaryProtocolFactory(),
                                       "compact": _FastCompactProtocolFactory()}


def binary_header(name: str, message_type: int) -> bytes:
    """The binary protocol's message start for `name` (version|type, name length,
    name): constant per method, so encoded once; the seqid follows per call."""
    encoded = name.encode("utf-8")
    return struct.pack("!iI", VERSION_1 | message_type, len(encoded)) + encoded


def _send_binary(conn: Any, method: Any, payload: Any, seqid: int) -> None:
    """Write and flush one request on a binary-protocol connection (any transport)."""
    transport = conn.transport
    if payload is None:
        transport.write(method.header + _SEQID_THEN_STOP.pack(seqid, 0))
    else:
        transport.write(method.header + _SEQID.pack(seqid))
        conn.protocol.write_struct(payload)
    transport.flush()


def _send_generic(conn: Any, method: Any, payload: Any, seqid: int) -> None:
    """Write and flush one request through the connection's protocol object."""
    protocol = conn.protocol
    protocol.write_message_begin(method.name, method.message_type, seqid)
    if payload is None:
        payload = method.args_cls()
    protocol.write_struct(payload)
    protocol.write_message_end()
    conn.transport.flush()


class Codec(object):
    """One dialect on the client side. Immutable and shared by every pool using it.

    :ivar transport: ``"buffered"`` or ``"framed"``.
    :ivar protocol: ``"binary"`` or ``"compact"``.
    :ivar send_call: ``send_call(conn, method, payload, seqid)`` writes and flushes
        one request (payload None: the method takes no arguments).
    """

    __slots__ = ("transport", "protocol", "send_call", "_transport_factory", "_protocol_factory")

    def __init__(self, transport: str, protocol: str) -> None:
        check_dialect(transport, protocol)
        self.transport = transport
        self.protocol = protocol
        self._transport_factory = _TRANSPORT_FACTORIES[transport]
        self._protocol_factory = _PROTOCOL_FACTORIES[protocol]
        self.send_call: Callable[[Any, Any, Any, int], None] = (
            _send_binary if protocol == "binary" else _send_generic)

    @property
    def dialect(self) -> Tuple[str, str]:
        return (self.transport, self.protocol)

    def wrap(self, raw: Any) -> Tuple[Any, Any]:
        """(transport, protocol) over an open thriftpy2 socket transport."""
        transport = self._transport_factory.get_transport(raw)
        return transport, self._protocol_factory.get_protocol(transport)

    def __repr__(self) -> str:
        return "Codec(%s, %s)" % (self.transport, self.protocol)


_CODECS: Dict[Tuple[str, str], Codec] = {
    (t, p): Codec(t, p) for t in TRANSPORTS for p in PROTOCOLS}

#: buffered + binary: thriftpy2's default, and of every node that declares nothing.
DEFAULT_CODEC = _CODECS[(TRANSPORTS[0], PROTOCOLS[0])]


def codec_for(transport: Optional[str] = None, protocol: Optional[str] = None) -> Codec:
    """The shared Codec of a dialect (None: the default of each); InvalidNodeData
    for a name that is not one."""
    key = (transport or TRANSPORTS[0], protocol or PROTOCOLS[0])
    codec = _CODECS.get(key)
    if codec is None:
        check_dialect(*key)  # raises, naming the bad value
    return cast(Codec, codec)  # not None: check_dialect raised otherwise


__all__ = ["Codec", "codec_for", "binary_header", "DEFAULT_CODEC"]
