"""The "before" column: the seed article's client behaviour, re-created for measurement.

Behaviour kept from the article's description (its section 5.4), per call:
  - re-read and parse the YAML config file;
  - open a brand-new ZooKeeper session (KazooClient + start);
  - check the appkey's parent exists, list its children, read the data of every
    child of the service, parse the JSON, drop invalid nodes, pick by weight;
  - open a brand-new TCP connection to the picked node, send, receive, close.

Like the article's client, the session is never closed (`close_sessions=False`):
every call leaks a live session and its kazoo threads until the process exits
(ZooKeeper's default maxClientCnxns of 60 per host would refuse it after 60 calls;
the local stack lifts that cap). The benchmark therefore runs it in a throwaway
process. `close_sessions=True` closes each session instead (slower per call: the
close is one more round trip plus joining kazoo's thread).
The article's per-call logging lines are left out (they would only add to its cost).
"""

import functools
import json
import logging
import random
import uuid

import yaml
from kazoo.client import KazooClient
from thriftpy2.protocol import TBinaryProtocolFactory
from thriftpy2.thrift import TApplicationException, TMessageType
from thriftpy2.transport import TBufferedTransportFactory, TSocket

# kazoo logs every session open/close at INFO; the measurement should not print.
logging.getLogger("kazoo").setLevel(logging.WARNING)


class SeedStyleClient(object):
    def __init__(self, service, appkey, service_name, env, config_path, socket_timeout=500,
                 close_sessions=False):
        self._close_sessions = close_sessions
        self._leaked = []
        self._service = service
        self._appkey = appkey
        self._service_name = service_name
        self._env = env
        self._config_path = config_path
        self._socket_timeout = socket_timeout
        self._protocol = None
        self._seqid = 0
        self.zk_sessions = 0

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self._service.thrift_services:
            return functools.partial(self._request, name)
        raise AttributeError("%s has no method %r" % (self._service_name, name))

    # -- one call ------------------------------------------------------------------
    def _request(self, name, *args, **kwargs):
        self._call_id = uuid.uuid1()
        try:
            self._open()
            self._send(name, args, kwargs)
            result_cls = getattr(self._service, name + "_result")
            if not getattr(result_cls, "oneway", False):
                return self._receive(name)
            return None
        finally:
            self.close()

    def _open(self):
        host, port = self._discover()
        sock = TSocket(host, port, socket_timeout=self._socket_timeout,
                       connect_timeout=self._socket_timeout)
        transport = TBufferedTransportFactory().get_transport(sock)
        self._protocol = TBinaryProtocolFactory().get_protocol(transport)
        transport.open()

    def _send(self, name, args, kwargs):
        payload = getattr(self._service, name + "_args")(*args, **kwargs)
        protocol = self._protocol
        protocol.write_message_begin(name, TMessageType.CALL, self._seqid)
        payload.write(protocol)
        protocol.write_message_end()
        protocol.trans.flush()

    def _receive(self, name):
        protocol = self._protocol
        _, message_type, _ = protocol.read_message_begin()
        if message_type == TMessageType.EXCEPTION:
            error = TApplicationException()
            error.read(protocol)
            protocol.read_message_end()
            raise error
        result = getattr(self._service, name + "_result")()
        result.read(protocol)
        protocol.read_message_end()
        if getattr(result, "success", None) is not None:
            return result.success
        if not result.thrift_spec:
            return None
        for field, value in result.__dict__.items():
            if field != "success" and value:
                raise value
        raise TApplicationException(TApplicationException.MISSING_RESULT)

    def close(self):
        if self._protocol is not None:
            self._protocol.trans.close()
            self._protocol = None

    # -- service discovery, from scratch on every call ------------------------------------
    def _discover(self):
        with open(self._config_path, encoding="utf-8") as handle:
            config = yaml.safe_load(handle)
        zk_section = config["zkserver"][self._env]
        hosts = zk_section.get("hosts") or "%s:%s" % (zk_section["host"], zk_section["port"])
        zk = KazooClient(hosts=hosts)
        zk.start(20)
        self.zk_sessions += 1
        try:
            parent = "/services/%s/%s" % (self._env, self._appkey)
            if zk.exists(parent) is None:
                raise RuntimeError("service not started: appkey %s service %s"
                                   % (self._appkey, self._service_name))
            entries = []
            for child in zk.get_children(parent):
                if child.startswith(self._service_name + "_"):
                    entries.append(json.loads(zk.get(parent + "/" + child)[0]))
        finally:
            if self._close_sessions:
                zk.stop()
                zk.close()
            else:
                self._leaked.append(zk)  # as in the article: never stopped
        valid = [entry for entry in entries if entry.get("valid") == 1]
        total = sum(entry["weight"] for entry in valid)
        if not valid or total <= 0:
            raise RuntimeError("service not started: appkey %s service %s"
                               % (self._appkey, self._service_name))
        point = random.randint(1, total)
        for entry in valid:
            point -= entry["weight"]
            if point <= 0:
                break
        return entry["host"], entry["port"]
