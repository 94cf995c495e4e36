"""`probe register`: keep a node registered for a server probe did not start.

A Thrift server written in another language (a Java `TThreadedSelectorServer`, a
Go Kitex service, ...) gets the same ephemeral znode a probe provider has, kept
alive by this process only while the server answers its check, the way Airbnb's
Nerve does for SmartStack:

- the check is a TCP connect, or with ``check=METHOD`` a real Thrift call of
  METHOD (no arguments) in the node's declared dialect. Any well-formed reply
  with the call's seqid counts as alive, a TApplicationException included (an
  unknown method, missing required arguments): it proves a Thrift server decoded
  the call and answered in that dialect. A method without arguments (a ping) is
  the natural choice; no IDL is needed.
- ``rise`` passing checks in a row register the node (1), ``fall`` failing ones
  deregister it (2); it comes back when the server answers again.
- the node's weight and switch come from Redis as a provider's do (``weight``
  is only what is stored when Redis has nothing for the node yet); its address
  and dialect are the ones given here.
- `stop()` (SIGTERM/SIGINT in the CLI) deletes the node. A killed registrar's node
  goes when its ZooKeeper session expires.

Threading: `run()` loops on the calling thread until `stop()` is called from any
thread (or a signal handler); the ZooKeeper session keeps the node meanwhile
through probe.zk.registration.Registration.
"""

import io
import logging
import struct
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from kazoo.exceptions import KazooException
from kazoo.handlers.threading import KazooTimeoutError
from thriftpy2.protocol.binary import TBinaryProtocol as PureBinaryProtocol
from thriftpy2.protocol.compact import TCompactProtocol as PureCompactProtocol
from thriftpy2.thrift import TMessageType
from thriftpy2.transport import TSocket

from .. import naming
from ..stores.appkeys import AppkeyStore
from ..errors import ProbeError, RegisterError
from ..naming import NodeSettings
from ..stores.nodestore import NodeStore
from ..zk.registration import Registration
from ..zk.session import ZooKeeper, release_zookeeper, shared_zookeeper
from ..rpc.codec import codec_for
from ..settings import load_settings

log = logging.getLogger("probe.register")

DEFAULT_INTERVAL = 0.5       # seconds between two checks (a connect costs next to nothing)
DEFAULT_CHECK_TIMEOUT = 1.0  # seconds one check may take (connect + reply)
DEFAULT_RISE = 1
DEFAULT_FALL = 2
MAX_REPLY_BYTES = 65536  # read of a check's reply: its header is all that is looked at
_PURE_PROTOCOLS = {"binary": PureBinaryProtocol, "compact": PureCompactProtocol}


class ForeignNode(object):
    """A node of `service` under `appkey` at `host:port`, served by a process probe
    did not start, kept registered while it passes its check.

    Every argument is checked here (RegisterError and the naming errors), before
    anything is written; `open()` then checks the appkey (MySQL) and reaches Redis
    and ZooKeeper, still writing nothing if one of them refuses.
    """

    def __init__(self, appkey: str, service: str, host: str, port: int, *,
                 transport: str = "buffered", protocol: str = "binary",
                 weight: Optional[int] = None, check: Optional[str] = None,
                 interval: float = DEFAULT_INTERVAL, check_timeout: float = DEFAULT_CHECK_TIMEOUT,
                 rise: int = DEFAULT_RISE, fall: int = DEFAULT_FALL,
                 config_path: Optional[str] = None, env: Optional[str] = None) -> None:
        naming.check_appkey(appkey)
        naming.check_service_name(service)
        naming.check_host(host)
        port = naming.check_port(port)
        naming.check_dialect(transport, protocol)
        if weight is not None:
            weight = naming.check_weight(weight)
        if check is not None and not naming.is_method_name(check):
            raise RegisterError("bad --check %r: give a Thrift method name (letters, digits, "
                                "'_'), e.g. ping" % (check[:80] if isinstance(check, str) else check,))
        for name, value, low, high in (("interval", interval, 0.05, 3600),
                                       ("check_timeout", check_timeout, 0.01, 600)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not low <= value <= high:
                raise RegisterError("%s must be seconds from %g to %g, got %r"
                                    % (name, low, high, value))
        for name, value in (("rise", rise), ("fall", fall)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100:
                raise RegisterError("%s must be a whole number from 1 to 100, got %r" % (name, value))
        self.appkey = appkey
        self.service = service
        self.host = host
        self.port = port
        self.codec = codec_for(transport, protocol)
        self.weight = weight
        self.check_method = check
        self.interval = float(interval)
        self.check_timeout = float(check_timeout)
        self.rise = rise
        self.fall = fall
        self.settings = load_settings(config_path, env)
        self.env = self.settings.env
        self.path = naming.node_path(self.env, appkey, service, host, port)
        self.field = naming.settings_field(appkey, self.env, service, host, port)
        self.registration: Optional[Registration] = None
        self.zk: Optional[ZooKeeper] = None
        self.store: Optional[NodeStore] = None
        self._stop = threading.Event()
        self._seqid = 0
        self._last_data: Optional[NodeSettings] = None
        # A deregistration ZooKeeper could not be told of yet (see _deregister).
        self._pending: Optional[Registration] = None

    @property
    def registered(self) -> bool:
        return self.registration is not None

    def default_settings(self) -> NodeSettings:
        """What Redis gets when it holds nothing for this node yet."""
        transport, protocol = self.codec.dialect
        return NodeSettings(self.host, self.port,
                            naming.DEFAULT_WEIGHT if self.weight is None else self.weight, 1,
                            None if transport == naming.TRANSPORTS[0] else transport,
                            None if protocol == naming.PROTOCOLS[0] else protocol)

    def open(self) -> "ForeignNode":
        """Check the appkey and reach Redis and ZooKeeper (nothing is written yet)."""
        timeout = 3.0
        appkeys = AppkeyStore(self.settings.mysql, timeout)
        try:
            appkeys.require(self.appkey)
        finally:
            appkeys.close()
        store = self.store = NodeStore(self.settings.redis, self.env, timeout)
        store.ping()
        self.zk = shared_zookeeper(self.settings.zookeeper, timeout=timeout)
        return self

    # -- the check ------------------------------------------------------------
    def check(self) -> Optional[str]:
        """None when the server answers, else why not (short, for the log)."""
        raw = TSocket(self.host, self.port, socket_timeout=self.check_timeout * 1000,
                      connect_timeout=self.check_timeout * 1000)
        try:
            raw.open()
        except Exception as exc:  # TTransportException, OSError
            return "connect failed (%s)" % (getattr(exc, "message", None) or exc)
        try:
            if self.check_method is None:
                return None
            return self._call(raw)
        finally:
            try:
                raw.close()
            except OSError:
                pass

    def _call(self, raw: Any) -> Optional[str]:
        """A real call of the check method with no arguments, in the node's dialect.

        The reply is read raw, at most MAX_REPLY_BYTES, and decoded by thriftpy2's
        pure-Python protocols from memory: a server (or impostor) declaring a huge
        frame or name costs nothing."""
        transport, protocol = self.codec.dialect
        self._seqid = (self._seqid + 1) & 0x7FFFFFFF
        out = io.BytesIO()
        writer = _PURE_PROTOCOLS[protocol](out)
        writer.write_message_begin(self.check_method, TMessageType.CALL, self._seqid)
        writer.write_struct(_NoArgs())
        writer.write_message_end()
        request = out.getvalue()
        if transport == "framed":
            request = struct.pack("!i", len(request)) + request
        sock = raw.sock
        received = b""
        try:
            sock.sendall(request)
            deadline = time.monotonic() + self.check_timeout
            while True:
                header = _reply_header(received, transport, protocol)
                if header is not None:
                    break
                if len(received) >= MAX_REPLY_BYTES:
                    return "no Thrift reply to %s() in its first %d bytes" % (
                        self.check_method, MAX_REPLY_BYTES)
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                chunk = sock.recv(MAX_REPLY_BYTES - len(received))
                if not chunk:
                    return "connection closed before a reply to %s()" % self.check_method
                received += chunk
        except (OSError, ValueError) as exc:  # timeouts, resets
            return "no Thrift reply to %s() (%s)" % (self.check_method, exc.__class__.__name__)
        name, message_type, seqid = header
        if name != self.check_method or seqid != self._seqid or \
                message_type not in (TMessageType.REPLY, TMessageType.EXCEPTION):
            return "an answer that is not a reply to %s() in %s + %s" % (
                self.check_method, transport, protocol)
        return None

    # -- the loop ---------------------------------------------------------------
    def run(self) -> None:
        """Check every `interval` s; register after `rise` passes, deregister after
        `fall` failures; return (deregistered) once `stop()` is called."""
        passes = fails = 0
        first = True
        try:
            while not self._stop.is_set():
                why = self.check()
                if why is None:
                    passes, fails = passes + 1, 0
                    if not self.registered and passes >= self.rise:
                        try:
                            self._register()
                        except (ProbeError, KazooException, KazooTimeoutError) as exc:
                            # Redis or ZooKeeper failing: the next passing check tries again.
                            log.warning("cannot register %s yet (%s: %s); retrying", self.path,
                                        exc.__class__.__name__, exc)
                else:
                    passes, fails = 0, fails + 1
                    if first or (self.registered and fails >= self.fall):
                        log.warning("%s:%d does not answer its check: %s%s", self.host, self.port,
                                    why, "; deregistering %s" % self.path if self.registered else
                                    " (registering once it answers)")
                    if self.registered and fails >= self.fall:
                        self._deregister()
                self._retry_pending()
                first = False
                self._stop.wait(self.interval)
        finally:
            self._deregister()

    def stop(self) -> None:
        """Make `run()` deregister and return. Safe from a signal handler."""
        self._stop.set()

    def close(self) -> None:
        self.stop()
        self._deregister()
        if self.zk is not None:
            release_zookeeper(self.zk)
            self.zk = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def _register(self) -> None:
        own = self.default_settings()
        assert self.store is not None and self.zk is not None, "open() first"
        try:
            stored = self.store.get_or_create(self.field, own)
        except ProbeError as exc:
            if self._last_data is None:
                raise
            log.warning("cannot read %s from Redis (%s): registering with the last known "
                        "settings", self.field, exc)
            stored = self._last_data
        data = stored._replace(transport=own.transport, protocol=own.protocol)
        store, field = self.store, self.field

        def reload_settings() -> Optional[NodeSettings]:
            try:
                return store.get(field)
            except (ProbeError, ValueError) as exc:
                log.warning("cannot re-read %s from Redis (%s): keeping the last known", field, exc)
                return None
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.abandon_delete()  # the node is ours again: never delete it now
        registration = Registration(self.zk, self.path, data, reload_settings)
        registration.register()
        self.registration = registration
        self._last_data = registration.data
        log.info("%s:%d answers: registered %s %s", self.host, self.port, self.path,
                 registration.data.to_json())

    def _deregister(self) -> None:
        registration, self.registration = self.registration, None
        if registration is not None:
            self._last_data = registration.data  # operator edits seen while registered
            if registration.close():
                log.info("deregistered %s", self.path)
            else:
                # ZooKeeper could not be asked: the node stays while the session
                # lives, so the delete is retried (owner-checked) on every pass of
                # the loop and on reconnect until done or the session is gone.
                self._pending = registration
        else:
            self._retry_pending()

    def _retry_pending(self) -> None:
        pending = self._pending
        if pending is not None and pending.close():
            self._pending = None
            log.info("deregistered %s (ZooKeeper is back)", self.path)


def _reply_header(data: bytes, transport: str, protocol: str) -> Optional[Tuple[str, int, int]]:
    """(name, type, seqid) of the message at the start of `data`, None while it is
    incomplete; a ("", -1, -1) header for bytes that are no message of the dialect."""
    if transport == "framed":
        if len(data) < 4:
            return None
        (length,) = struct.unpack("!i", data[:4])
        if not 0 < length:
            return ("", -1, -1)
        data = data[4:4 + length]
    if not data:
        return None
    try:
        name, message_type, seqid = _PURE_PROTOCOLS[protocol](io.BytesIO(data)).read_message_begin()
    except Exception:  # struct.error, EOF, a bad version: more bytes may complete it
        if data[:1] not in (b"\x80", b"\x82"):
            return ("", -1, -1)
        return None
    if not isinstance(name, str):
        name = name.decode("utf-8", "replace")
    return name, message_type, seqid


class _NoArgs(object):
    """An empty args struct: written as the STOP byte alone in any protocol."""

    thrift_spec: Dict[int, Any] = {}
    default_spec: List[Any] = []


__all__ = ["ForeignNode", "RegisterError", "DEFAULT_INTERVAL", "DEFAULT_FALL", "DEFAULT_RISE"]
