"""Wire compatibility with the official Apache Thrift library, both directions.

The Apache side uses code generated at test time from idl/demo.thrift by Debian's
`thrift` compiler (package thrift-compiler, installed by `make deps`) and the
`thrift` package from PyPI, with the binary protocol on a buffered transport:
the default of thriftpy2, and so of probe.

- An Apache Thrift client calls a probe provider.
- An Apache Thrift server, registered in ZooKeeper the way a provider registers,
  is reached through a probe client, alone and beside a probe provider.
"""

import importlib
import shutil
import socket
import subprocess
import sys
import threading

import pytest
from thrift.protocol import TBinaryProtocol, TCompactProtocol
from thrift.server import TServer
from thrift.Thrift import TApplicationException, TMessageType
from thrift.transport import TSocket, TTransport

from conftest import ADVERTISED_HOST, IDL, wait_for
from probe import naming
from probe.demo import DemoServiceHandler
from probe.dev.stack import free_port
from probe.idl import load_module
from probe.zk.registration import Registration
from probe.zk.session import release_zookeeper, shared_zookeeper
from probe.settings import load_settings

GENERATED_PACKAGE = "apache_demo"  # not "demo": nothing else may shadow it


@pytest.fixture(scope="module")
def apache(tmp_path_factory):
    """The modules `thrift --gen py` makes from demo.thrift: .DemoService, .ttypes."""
    compiler = shutil.which("thrift")
    if compiler is None:
        pytest.fail("the Apache Thrift compiler is not installed: run `make deps` "
                    "(apt-get install thrift-compiler)")
    out = tmp_path_factory.mktemp("apache-thrift")
    subprocess.run([compiler, "--gen", "py", "-out", str(out), IDL], check=True,
                   capture_output=True, timeout=60)
    (out / "demo").rename(out / GENERATED_PACKAGE)  # the generated code imports relatively
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module(GENERATED_PACKAGE + ".DemoService"), \
            importlib.import_module(GENERATED_PACKAGE + ".ttypes")
    finally:
        sys.path.remove(str(out))
        for name in [n for n in sys.modules if n.split(".")[0] == GENERATED_PACKAGE]:
            del sys.modules[name]


DIALECTS = [("buffered", "binary"), ("buffered", "compact"), ("framed", "binary"),
            ("framed", "compact")]
_TRANSPORTS = {"buffered": TTransport.TBufferedTransport, "framed": TTransport.TFramedTransport}
_PROTOCOLS = {"binary": TBinaryProtocol.TBinaryProtocol, "compact": TCompactProtocol.TCompactProtocol}
_TRANSPORT_FACTORIES = {"buffered": TTransport.TBufferedTransportFactory,
                        "framed": TTransport.TFramedTransportFactory}
_PROTOCOL_FACTORIES = {"binary": TBinaryProtocol.TBinaryProtocolFactory,
                       "compact": TCompactProtocol.TCompactProtocolFactory}


def apache_client(service_module, host, port, transport="buffered", protocol="binary"):
    """An Apache Thrift client: TSocket + the transport + the protocol."""
    transport = _TRANSPORTS[transport](TSocket.TSocket(host, port))
    protocol = _PROTOCOLS[protocol](transport)
    transport.open()
    return service_module.Client(protocol), protocol, transport


# ------------------------------------------------------- Apache client -> probe provider

@pytest.mark.parametrize("dialect", DIALECTS, ids="+".join)
def test_apache_thrift_client_calls_a_probe_provider(apache, appkey, providers, dialect):
    service_module, ttypes = apache
    provider = providers(appkey, name="probe")
    assert provider.host == ADVERTISED_HOST
    client, protocol, transport = apache_client(service_module, provider.host, provider.port,
                                                *dialect)
    try:
        assert client.say() == "hello world"
        text = "h\u00e9llo \u2713 " + "x" * 5000  # UTF-8 and longer than one buffer
        assert client.echo(text) == text
        assert client.add(2, 40) == 42
        assert client.add(-2147483648, 0) == -2147483648
        assert client.whoami() == "probe"
        # A declared exception arrives as the generated exception class.
        with pytest.raises(ttypes.DemoError) as declared:
            client.fail("boom")
        assert declared.value.message == "boom"
        assert client.say() == "hello world"  # the connection is still in step

        # A method the provider does not have: built by hand with the Apache
        # protocol, as a client generated from a newer IDL would send it.
        protocol.writeMessageBegin("no_such_method", TMessageType.CALL, 77)
        protocol.writeStructBegin("no_such_method_args")
        protocol.writeFieldStop()
        protocol.writeStructEnd()
        protocol.writeMessageEnd()
        transport.flush()
        name, kind, seqid = protocol.readMessageBegin()
        assert (name, kind, seqid) == ("no_such_method", TMessageType.EXCEPTION, 77)
        error = TApplicationException()
        error.read(protocol)
        protocol.readMessageEnd()
        assert error.type == TApplicationException.UNKNOWN_METHOD
        assert "no_such_method" in str(error.message)
    finally:
        transport.close()
    # A fresh connection is served as before.
    again, _, transport = apache_client(service_module, provider.host, provider.port, *dialect)
    try:
        assert again.say() == "hello world"
    finally:
        transport.close()


# ------------------------------------------------------- probe client -> Apache server

class _ServerStopped(BaseException):
    """Ends TThreadedServer.serve(), which catches and logs every Exception."""


class _StoppableServerSocket(TSocket.TServerSocket):
    stopping = False

    def accept(self):
        client = super().accept()
        if self.stopping:
            client.close()
            raise _ServerStopped()
        return client


class ApacheProvider(object):
    """A TThreadedServer (the dialect's transport and protocol) on 127.0.0.1, with
    its node registered under an appkey the way a probe provider registers,
    declaring its dialect."""

    def __init__(self, apache, appkey, name="apache", transport="buffered", protocol="binary"):
        service_module, ttypes = apache
        self.host, self.port = ADVERTISED_HOST, free_port()
        self._socket = _StoppableServerSocket(host=self.host, port=self.port)
        self._server = TServer.TThreadedServer(
            service_module.Processor(DemoServiceHandler(name, errors=ttypes)), self._socket,
            _TRANSPORT_FACTORIES[transport](), _PROTOCOL_FACTORIES[protocol](), daemon=True)
        self._thread = threading.Thread(target=self._serve, name="apache-thrift", daemon=True)
        self._thread.start()
        wait_for(self._listening, message="the Apache Thrift server listening")
        self._zk = shared_zookeeper(load_settings().zookeeper)
        self.registration = Registration(
            self._zk, naming.node_path("dev", appkey, "DemoService", self.host, self.port),
            naming.NodeSettings(self.host, self.port, transport=transport, protocol=protocol))
        self.registration.register()

    def _serve(self):
        try:
            self._server.serve()
        except _ServerStopped:
            pass

    def _listening(self):
        try:
            socket.create_connection((self.host, self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def stop(self):
        self.registration.close()
        release_zookeeper(self._zk)
        self._socket.stopping = True
        try:  # wake the accept() the server thread is blocked in
            socket.create_connection((self.host, self.port), timeout=1).close()
        except OSError:
            pass
        self._thread.join(10)
        self._socket.close()
        assert not self._thread.is_alive()


@pytest.fixture
def apache_provider(apache, appkey):
    started = []

    def start(name="apache", transport="buffered", protocol="binary"):
        provider = ApacheProvider(apache, appkey, name, transport, protocol)
        started.append(provider)
        return provider

    yield start
    for provider in started:
        provider.stop()


@pytest.mark.parametrize("dialect", DIALECTS, ids="+".join)
def test_probe_client_calls_an_apache_thrift_server(appkey, apache_provider, clients, dialect):
    apache_provider("apache", *dialect)
    client = clients(appkey)
    wait_for(lambda: len(client.watcher.table) == 1, message="the Apache Thrift node")
    assert client.say() == "hello world"
    text = "h\u00e9llo \u2713 " + "x" * 5000
    assert client.echo(text) == text
    assert client.add(2, 40) == 42
    assert client.whoami() == "apache"
    # The declared exception the Apache server sends is the one probe's IDL module
    # declares: `except DemoError` catches it.
    with pytest.raises(load_module(IDL).DemoError) as declared:
        client.fail("from apache")
    assert declared.value.message == "from apache"
    assert [client.add(i, i) for i in range(100)] == [2 * i for i in range(100)]


def test_apache_and_probe_providers_side_by_side_behind_one_client(
        appkey, providers, apache_provider, clients):
    providers(appkey, name="probe")
    apache_provider("apache")
    apache_provider("framed-compact", "framed", "compact")
    client = clients(appkey)
    wait_for(lambda: len(client.watcher.table) == 3, message="the three nodes")
    for node in client.watcher.table.nodes:
        assert node.host == ADVERTISED_HOST
    assert {(n.transport, n.protocol) for n in client.watcher.table.nodes} == {
        ("buffered", "binary"), ("framed", "compact")}
    assert {client.whoami() for _ in range(150)} == {"probe", "apache", "framed-compact"}
    DemoError = load_module(IDL).DemoError
    for _ in range(20):  # either node: the same class, the same message
        with pytest.raises(DemoError) as declared:
            client.fail("either")
        assert declared.value.message == "either"
