"""Real ZooKeeper, Redis and MariaDB server processes for development.

`Stack` runs one of each on loopback ports from a state folder (data, logs,
`stack.json` with pids and ports, and a `config.yml` in probe's format that points
at them). `probe stack up|down|status` is a thin shell over it. What only tests
need (killing one component, a ZooKeeper ensemble, a Redis cluster) lives in
`probe.testing`, built on the pieces here.

The stack is loopback-only: every server binds 127.0.0.1, and the config it writes
sets ``advertise_host: 127.0.0.1``, so providers started against it register a
loopback address and no dev, test or bench traffic leaves 127.0.0.0/8.

The servers are started in their own session and are never waited for, so they
outlive the Python process that started them; any later `Stack` on the same
folder finds them again through `stack.json`. Nothing here ever uses the ports of
a system ZooKeeper, MySQL or Redis (2181, 3306, 6379).

Threading: an instance is not thread-safe. Processes sharing a state folder are
serialised by a file lock around every operation that starts or stops servers.
"""

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import time
from typing import (TYPE_CHECKING, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Type,
                    TypeVar, Union)

from probe.errors import ProbeError

log = logging.getLogger(__name__)

COMPONENTS = ("zookeeper", "redis", "mysql")
DEV_PORTS = {"zookeeper": 22181, "redis": 26379, "mysql": 23306}
# The well-known ports of system servers that may share the machine: never ours.
SYSTEM_PORTS = frozenset((2181, 3306, 6379))
LOOPBACK = "127.0.0.1"

MYSQL_DATABASE = "probe"
MYSQL_USER = "probe"
MYSQL_PASSWORD = "probe"
# The user a secured stack gives ZooKeeper (digest), Redis (ACL) and MariaDB; its
# passwords are random, kept in <state dir>/secrets.json (0600).
SECURE_USER = "probe"

ZOOKEEPER_JAR = "/usr/share/java/zookeeper.jar"
ZOOKEEPER_CONF_DIR = "/etc/zookeeper/conf"
# Optional: without an slf4j binding ZooKeeper logs nothing at all.
SLF4J_SIMPLE_JAR = "/usr/share/java/slf4j-simple.jar"
# Executable names to look for, first found wins.
SERVER_BINARIES = {
    "java": ("java",),
    "redis-server": ("redis-server",),
    "mariadbd": ("mariadbd", "mysqld"),
    "mariadb-install-db": ("mariadb-install-db", "mysql_install_db"),
}
# Debian keeps server binaries in sbin, which is often not on a user's PATH.
_EXTRA_BIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")

# Unix socket paths longer than this do not fit in sockaddr_un (108 bytes).
_MAX_SOCKET_PATH = 100
_KILL_WAIT = 5.0
_POLL_INTERVAL = 0.1


def default_state_dir() -> str:
    """`PROBE_STACK_DIR`, else ``~/.probe/stack``, read now."""
    return os.environ.get("PROBE_STACK_DIR") or os.path.join(
        os.path.expanduser("~"), ".probe", "stack")


DEFAULT_STATE_DIR = default_state_dir()


class StackError(ProbeError):
    """A development server could not be installed, started, reached or stopped."""


def _check_bind_host(host: str) -> str:
    """`host` if it is one IPv4 address a server can bind (not 0.0.0.0)."""
    import ipaddress
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        address = None
    if address is None or address.is_unspecified or address.is_multicast:
        raise StackError("host must be one IPv4 address to bind, such as 127.0.0.1, "
                         "got %r" % (host,))
    return str(address)


# --------------------------------------------------------------------------- ports

def free_port() -> int:
    """A loopback TCP port that nothing listens on right now."""
    return _free_ports(1)[0]


_LOWEST_FREE_PORT = 10000


def _ephemeral_ports() -> Tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as handle:
            low, high = (int(part) for part in handle.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def _free_ports(count: int, avoid: Sequence[int] = (), below: Optional[int] = None) -> List[int]:
    """`count` distinct free loopback ports, none of them a system or dev port.

    They are drawn below the kernel's ephemeral range (and below `below`): a port
    from that range can be taken as the local port of some outgoing connection in
    the moment between choosing it and the server binding it.
    """
    unwanted = set(avoid) | SYSTEM_PORTS | set(DEV_PORTS.values())
    top = min(_ephemeral_ports()[0], below or 65536)
    candidates = [port for port in range(_LOWEST_FREE_PORT, top) if port not in unwanted]
    random.shuffle(candidates)
    ports = []  # type: List[int]
    for port in candidates:
        if len(ports) == count:
            return ports
        if _can_bind(port):
            ports.append(port)
    if below is not None:
        raise StackError("found no %d free loopback ports below %d" % (count, top))
    # No room below the ephemeral range on this host: let the kernel choose.
    held = []  # keep every probe socket bound until the end so no port repeats
    try:
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(sock)
            sock.bind((LOOPBACK, 0))
            port = sock.getsockname()[1]
            if port not in unwanted and port not in ports:
                ports.append(port)
    finally:
        for sock in held:
            sock.close()
    return ports


def _can_bind(port: int) -> bool:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((LOOPBACK, port))
        return True
    except OSError:
        return False
    finally:
        sock.close()


def _port_in_use(port: int, host: str = LOOPBACK) -> bool:
    """True if something listens on host:port (default 127.0.0.1).

    A connect, not a trial bind: after a server is killed, its port keeps
    TIME_WAIT sockets that fail a test bind but do not stop the server's own.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            result = sock.connect_ex((host, port))
        except socket.timeout:
            return True  # something is there, just slow to accept
        if result == 0 and sock.getsockname()[1] == port:
            return False  # TCP self-connect: the kernel picked `port` as our source
    return result != errno.ECONNREFUSED


def _exchange(port: int, request: bytes, enough: Callable[[bytes], bool], timeout: float = 1.0,
              host: str = LOOPBACK) -> bytes:
    """Send `request` to host:port and read until `enough(reply)` or EOF.

    Returns b"" when nothing answers, so callers can treat it as "not up".
    """
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            return _send_and_read(sock, request, enough)
    except OSError:
        return b""


def _tls_exchange(port: int, request: bytes, enough: Callable[[bytes], bool], ca: str,
                  client_pair: Optional[Tuple[str, str]], timeout: float = 1.0,
                  host: str = LOOPBACK) -> bytes:
    """`_exchange` over TLS, checking the server's certificate against `ca`."""
    import ssl
    try:
        context = ssl.create_default_context(cafile=ca)
        if client_pair:
            context.load_cert_chain(*client_pair)
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host) as sock:
                return _send_and_read(sock, request, enough, (OSError, ValueError))
    except (OSError, ValueError):
        return b""


def _send_and_read(sock: socket.socket, request: bytes, enough: Callable[[bytes], bool],
                   errors: Tuple[Type[BaseException], ...] = (OSError,)) -> bytes:
    """Send `request` (if any), then read until `enough(reply)` or EOF; one of `errors`
    (a timeout, a reset) ends the read with what had come so far."""
    reply = b""
    try:
        if request:
            sock.sendall(request)
        while not enough(reply):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    except errors:
        pass
    return reply


def _four_letter_word(port: int, word: str, host: str = LOOPBACK) -> str:
    """ZooKeeper's answer to a four-letter command ("ruok", "srvr", ...)."""
    return _exchange(port, word.encode("ascii"), lambda reply: False, host=host).decode(
        "utf-8", "replace")


# ----------------------------------------------------------------------- processes

# Popen objects of the servers this Python process started, by pid. Polling them
# reaps exited children, which would otherwise linger as zombies and look alive.
_CHILDREN = {}  # type: Dict[int, subprocess.Popen]


def _read_stat(path: str) -> Optional[Tuple[str, int]]:
    """(state letter, start time in clock ticks) from a /proc stat file, or None."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    # The command name is in parentheses and may itself contain spaces or ")".
    fields = data[data.rindex(b")") + 2:].split()
    return fields[0].decode("ascii"), int(fields[19])


def _process_state(pid: int) -> Optional[Tuple[str, int]]:
    """(state letter, start time in clock ticks) of `pid`, or None if it does not exist."""
    if os.path.isdir("/proc/self"):
        return _read_stat("/proc/%d/stat" % pid)
    try:  # no procfs (not Linux): existence is all we can learn
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return ("R", 0)


def _threads_still_exiting(pid: int) -> bool:
    """True if some thread of `pid` has not finished exiting.

    The main thread of a killed multi-threaded server (a JVM, mariadbd) turns
    zombie first; its sockets stay open until the last thread is gone.
    """
    try:
        threads = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return False
    for thread in threads:
        state = _read_stat("/proc/%d/task/%s/stat" % (pid, thread))
        if state is not None and state[0] not in ("Z", "X"):
            return True
    return False


def _is_alive(pid: Optional[int], start_time: Optional[int]) -> bool:
    """True if process `pid`, started at `start_time`, has not completely exited."""
    if pid is None:
        return False
    child = _CHILDREN.get(pid)
    if child is not None:
        # waitpid reports our child only once every thread is gone, and until we
        # reap it the pid cannot be recycled.
        if child.poll() is None:
            return True
        del _CHILDREN[pid]
        return False
    state = _process_state(pid)
    if state is None:
        return False
    if start_time not in (None, 0) and state[1] != start_time:
        return False  # the pid now belongs to another process
    if state[0] not in ("Z", "X"):
        return True
    return _threads_still_exiting(pid)


def _find_binary(names: Sequence[str]) -> Optional[str]:
    search_path = os.pathsep.join(
        [os.environ.get("PATH", os.defpath)] + list(_EXTRA_BIN_DIRS))
    for name in names:
        found = shutil.which(name, path=search_path)
        if found:
            return found
    return None


def _log_tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 8192))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _write_file(path: str, text: str, private: bool = False) -> None:
    """Write atomically, so a reader never sees half a file; `private`: mode 0600
    (the file holds passwords)."""
    temporary = path + ".tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                     0o600 if private else 0o644)
    with os.fdopen(handle, "w") as out:
        out.write(text)
    os.replace(temporary, path)


def _read_json(path: str) -> dict:
    try:
        with open(path) as handle:
            return json.load(handle)
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise StackError("%s is not valid JSON (%s); remove it and stop the servers "
                         "it listed by hand" % (path, exc))


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[None]:
    """Hold an exclusive lock on `directory` (one `probe stack` command at a time)."""
    os.makedirs(directory, exist_ok=True)
    # Popen closes inherited descriptors, so servers never hold this lock.
    with open(os.path.join(directory, ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _Server:
    """One server process: its files, how to start it, how to tell it answers.

    `pid` and `start_time` identify the running process; the start time guards
    against a recycled pid being taken for ours.
    """

    name = "server"
    grace = 5.0  # seconds between SIGTERM and SIGKILL
    host = LOOPBACK  # the address it binds; Stack(host=...) sets another

    def __init__(self, home: str, port: int) -> None:
        self.home = home
        self.port = port
        self.pid = None  # type: Optional[int]
        self.start_time = None  # type: Optional[int]

    @property
    def data_dir(self) -> str:
        return os.path.join(self.home, "data")

    @property
    def log_path(self) -> str:
        return os.path.join(self.home, self.name + ".log")

    def ports(self) -> List[int]:
        """Every port this server binds."""
        return [self.port]

    def check_installed(self) -> None:
        raise NotImplementedError

    def prepare(self) -> None:
        """Create the files the server needs before it can start."""
        os.makedirs(self.data_dir, exist_ok=True)

    def command(self) -> List[str]:
        raise NotImplementedError

    def answers(self) -> bool:
        raise NotImplementedError

    def wipe(self) -> None:
        shutil.rmtree(self.data_dir, ignore_errors=True)

    # -- record kept in the owner's JSON file

    def record(self) -> dict:
        return {"port": self.port, "pid": self.pid, "start_time": self.start_time}

    def restore(self, record: dict) -> None:
        self.pid = record.get("pid")
        self.start_time = record.get("start_time")

    # -- process control

    def is_alive(self) -> bool:
        return _is_alive(self.pid, self.start_time)

    def is_running(self) -> bool:
        return self.is_alive() and self.answers()

    def spawn(self) -> None:
        self.prepare()
        argv = self.command()
        log.info("starting %s on %s:%d: %s", self.name, self.host, self.port,
                 " ".join(argv))
        with open(self.log_path, "ab") as output:
            # A new session: the server survives the CLI that started it and
            # gets no SIGHUP/SIGINT from its terminal.
            child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output,
                                     stderr=subprocess.STDOUT, cwd=self.home,
                                     start_new_session=True, close_fds=True)
        _CHILDREN[child.pid] = child
        state = _process_state(child.pid)
        self.pid = child.pid
        self.start_time = state[1] if state else None

    def signal(self, signum: int) -> None:
        if self.is_alive():
            try:
                os.kill(self.pid, signum)  # type: ignore[arg-type]
            except ProcessLookupError:
                pass

    def wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.is_alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_INTERVAL)
        return True

    def wait_answering(self, deadline: float) -> None:
        while True:
            if not self.is_alive():
                raise StackError(
                    "%s on port %d is not running (it exited or was never started); "
                    "see %s:\n%s" % (self.name, self.port, self.log_path,
                                     _log_tail(self.log_path)))
            if self.answers():
                return
            if time.monotonic() >= deadline:
                raise StackError(
                    "%s (pid %s) did not answer on %s:%d in time; see %s:\n%s" % (
                        self.name, self.pid, self.host, self.port, self.log_path,
                        _log_tail(self.log_path)))
            time.sleep(_POLL_INTERVAL)


def _netty_jars() -> List[str]:
    """The Netty jars ZooKeeper's secure port needs (Debian's libnetty-java)."""
    found = [os.path.join("/usr/share/java", "netty-%s.jar" % part) for part in (
        "buffer", "codec", "common", "handler", "resolver", "transport",
        "transport-native-epoll", "transport-native-unix-common")]
    return [path for path in found if os.path.isfile(path)] or (
        ["/usr/share/java/netty-all.jar"] if os.path.isfile("/usr/share/java/netty-all.jar") else [])


class _ZooKeeperServer(_Server):
    """A standalone ZooKeeper server (probe.testing adds ensemble members)."""

    name = "zookeeper"
    # "super:<digest>" for a secured stack: that identity may change any znode
    # (recovery when an ACL names lost credentials). Digest auth itself needs no
    # server setting.
    super_digest = None  # type: Optional[str]
    # Set for a secured stack: (ca, cert, key) PEM paths, and the port of ZooKeeper's
    # secure client port (Netty, TLS with client certificates). The plain clientPort
    # stays for the health check; probe's config names the secure one.
    tls = None  # type: Optional[Tuple[str, str, str]]
    secure_port = None  # type: Optional[int]

    @property
    def config_path(self) -> str:
        return os.path.join(self.home, "zoo.cfg")

    @property
    def keystore_path(self) -> str:
        return os.path.join(self.home, "keystore.pem")

    def ports(self) -> List[int]:
        return [self.port] + ([self.secure_port] if self.tls and self.secure_port else [])

    def record(self) -> dict:
        record = super().record()
        if self.secure_port:
            record["secure_port"] = self.secure_port
        return record

    def restore(self, record: dict) -> None:
        super().restore(record)
        if isinstance(record.get("secure_port"), int) and self.secure_port is None:
            self.secure_port = record["secure_port"]

    def check_installed(self) -> None:
        if _find_binary(SERVER_BINARIES["java"]) is None:
            raise StackError("ZooKeeper needs Java, and `java` is not on PATH: "
                             "apt-get install default-jre-headless zookeeper")
        if not os.path.isfile(ZOOKEEPER_JAR):
            raise StackError("ZooKeeper is not installed (%s is missing): "
                             "apt-get install zookeeper (it also needs Java)"
                             % ZOOKEEPER_JAR)

    def prepare(self) -> None:
        super().prepare()
        if self.tls:
            # ZooKeeper reads a PEM key store (ssl.keyStore.type=PEM): key and chain in
            # one file, so no keytool and no PKCS12 conversion are needed.
            with open(self.tls[2], "rb") as key, open(self.tls[1], "rb") as cert:
                _write_file(self.keystore_path, (key.read() + b"\n" + cert.read()).decode("ascii"),
                            private=True)
        _write_file(self.config_path, "\n".join(self.config_lines()) + "\n")

    def config_lines(self) -> List[str]:
        """The lines of zoo.cfg."""
        return [
            "# Written by probe.dev.stack; rewritten on every start.",
            "tickTime=500",
            "initLimit=10",
            "syncLimit=5",
            "dataDir=%s" % self.data_dir,
            "clientPort=%d" % self.port,
            "clientPortAddress=%s" % self.host,
            "admin.enableServer=false",
            "minSessionTimeout=1000",
            "maxSessionTimeout=60000",
            # Tests open many sessions from 127.0.0.1; the default cap is 60.
            "maxClientCnxns=0",
            "4lw.commands.whitelist=ruok,srvr,stat,mntr,cons,dump,wchs,conf",
        ] + self._tls_lines()

    def _tls_lines(self) -> List[str]:
        if not (self.tls and self.secure_port):
            return []
        return [
            "serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory",
            "secureClientPort=%d" % self.secure_port,
            "secureClientPortAddress=%s" % self.host,
            "ssl.keyStore.location=%s" % self.keystore_path,
            "ssl.keyStore.type=PEM",
            "ssl.trustStore.location=%s" % self.tls[0],
            "ssl.trustStore.type=PEM",
            "ssl.clientAuth=need",
            # Clients connect by IP from loopback: their certificates name no host.
            "ssl.hostnameVerification=false",
        ]

    def command(self) -> List[str]:
        classpath = [ZOOKEEPER_JAR]
        if os.path.isfile(SLF4J_SIMPLE_JAR):
            classpath.append(SLF4J_SIMPLE_JAR)
        if os.path.isdir(ZOOKEEPER_CONF_DIR):
            classpath.append(ZOOKEEPER_CONF_DIR)
        if self.tls:
            classpath.extend(_netty_jars())
        return [
            _find_binary(SERVER_BINARIES["java"]) or "java",
            "-Xmx256m",
            "-XX:+UseSerialGC",  # fewer threads and less memory for a tiny server
            "-Djava.net.preferIPv4Stack=true",
            "-Dzookeeper.log.dir=%s" % self.home,
        ] + ([] if not self.super_digest else [
            "-Dzookeeper.DigestAuthenticationProvider.superDigest=%s" % self.super_digest,
        ]) + [
            "-cp", os.pathsep.join(classpath),
            "org.apache.zookeeper.server.quorum.QuorumPeerMain",
            self.config_path,
        ]

    def answers(self) -> bool:
        return _four_letter_word(self.port, "ruok", self.host) == "imok"


class _RedisServer(_Server):
    name = "redis"
    # Set for a secured stack: TLS only on `port` (with client certificates), and
    # one ACL user instead of the passwordless default user.
    tls = None  # type: Optional[Tuple[str, str, str]]  # (ca, cert, key)
    client_pair = None  # type: Optional[Tuple[str, str]]  # (cert, key) for answers()
    acl_user = None  # type: Optional[Tuple[str, str]]  # (user, password)

    @property
    def secure_config_path(self) -> str:
        return os.path.join(self.home, "secure.conf")

    def prepare(self) -> None:
        super().prepare()
        if self.tls or self.acl_user:
            _write_file(self.secure_config_path, "\n".join(self._secure_lines()) + "\n",
                        private=True)

    def _secure_lines(self) -> List[str]:
        """redis.conf lines of a secured server; in a 0600 file, never on the
        command line (where `ps` and our log would show the password)."""
        lines = ["# Written by probe.dev.stack for a secured stack; rewritten on every start."]
        if self.tls:
            ca, cert, key = self.tls
            lines += ["port 0", "tls-port %d" % self.port, "tls-cert-file %s" % cert,
                      "tls-key-file %s" % key, "tls-ca-cert-file %s" % ca,
                      "tls-auth-clients yes"]
        if self.acl_user:
            user, password = self.acl_user
            lines += ["user default off", "user %s on >%s ~* &* +@all" % (user, password)]
        return lines

    def check_installed(self) -> None:
        if _find_binary(SERVER_BINARIES["redis-server"]) is None:
            raise StackError("redis-server is not installed (not on PATH): "
                             "apt-get install redis-server")

    def command(self) -> List[str]:
        return [
            _find_binary(SERVER_BINARIES["redis-server"]) or "redis-server",
        ] + ([self.secure_config_path] if self.tls or self.acl_user else []) + [
            "--port", "0" if self.tls else str(self.port),
            "--bind", self.host,
            "--protected-mode", "no",
            "--save", "",  # a dev/test cache: no snapshots, no AOF
            "--appendonly", "no",
            "--dir", self.data_dir,
            "--daemonize", "no",
            "--logfile", "",  # stdout, which goes to our log file
        ]

    def answers(self) -> bool:
        if self.tls:
            reply = _tls_exchange(self.port, b"PING\r\n", lambda data: b"\r\n" in data,
                                  self.tls[0], self.client_pair, host=self.host)
        else:
            reply = _exchange(self.port, b"PING\r\n", lambda data: b"\r\n" in data,
                              host=self.host)
        # An ACL-secured server answers an unauthenticated PING with -NOAUTH.
        return reply.startswith(b"+PONG") or reply.startswith(b"-NOAUTH")


class _MariaDBServer(_Server):
    name = "mysql"
    grace = 15.0  # InnoDB flushes on a clean shutdown

    _INNODB_LOG_SIZE = "--innodb-log-file-size=16M"  # default 96M: wasted disk
    tls = None  # type: Optional[Tuple[str, str, str]]  # (ca, cert, key) for a secured stack

    def __init__(self, home: str, port: int, socket_path: str) -> None:
        super().__init__(home, port)
        self.socket_path = socket_path

    def check_installed(self) -> None:
        if (_find_binary(SERVER_BINARIES["mariadbd"]) is None
                or _find_binary(SERVER_BINARIES["mariadb-install-db"]) is None):
            raise StackError("MariaDB is not installed (mariadbd / mariadb-install-db "
                             "not found): apt-get install mariadb-server")

    @staticmethod
    def _user() -> str:
        return pwd.getpwuid(os.geteuid()).pw_name

    @property
    def tmp_dir(self) -> str:
        # Its own, not /tmp: temporary table files are named by pid, and servers in
        # other pid namespaces sharing /tmp can collide with ours.
        return os.path.join(self.home, "tmp")

    def prepare(self) -> None:
        os.makedirs(self.tmp_dir, exist_ok=True)
        if os.path.isdir(os.path.join(self.data_dir, "mysql")):
            return
        # A data dir without the system schema is a failed install: start over.
        shutil.rmtree(self.data_dir, ignore_errors=True)
        argv = [
            _find_binary(SERVER_BINARIES["mariadb-install-db"]) or "mariadb-install-db",
            "--no-defaults",
            "--datadir=%s" % self.data_dir,
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
            "--user=%s" % self._user(),
            "--tmpdir=%s" % self.tmp_dir,
            self._INNODB_LOG_SIZE,
        ]
        log.info("initialising MariaDB data in %s", self.data_dir)
        with open(self.log_path, "ab") as output:
            result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=output,
                                    stderr=subprocess.STDOUT, cwd=self.home)
        if result.returncode != 0:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            raise StackError("mariadb-install-db failed (exit %d); see %s:\n%s" % (
                result.returncode, self.log_path, _log_tail(self.log_path)))

    def command(self) -> List[str]:
        return [
            _find_binary(SERVER_BINARIES["mariadbd"]) or "mariadbd",
            "--no-defaults",
            "--datadir=%s" % self.data_dir,
            "--port=%d" % self.port,
            "--bind-address=%s" % self.host,
            "--socket=%s" % self.socket_path,
            "--pid-file=%s" % os.path.join(self.home, "mariadbd.pid"),
            "--user=%s" % self._user(),
            "--tmpdir=%s" % self.tmp_dir,
            "--skip-name-resolve",
            "--innodb-buffer-pool-size=32M",
            self._INNODB_LOG_SIZE,
            "--max-connections=500",
            "--log-error=%s" % self.log_path,
        ] + ([] if not self.tls else [
            "--ssl-ca=%s" % self.tls[0], "--ssl-cert=%s" % self.tls[1],
            "--ssl-key=%s" % self.tls[2],
        ])

    def answers(self) -> bool:
        # The server speaks first: a packet whose payload starts with protocol 10,
        # or an error packet (0xff) when no account may log in from our address yet.
        greeting = _exchange(self.port, b"", lambda data: len(data) >= 5, host=self.host)
        return len(greeting) >= 5 and greeting[4] in (10, 0xFF)

    def wipe(self) -> None:
        super().wipe()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)


def _start_servers(servers: Sequence[_Server], timeout: float, owner: str) -> None:
    """Start those of `servers` that are not alive and wait until all answer.

    On failure, stops the ones this call started, so a failed start leaves things
    as they were.
    """
    to_start = [server for server in servers if not server.is_alive()]
    for server in to_start:
        server.pid = server.start_time = None  # a dead pid from an earlier run
        server.check_installed()
    for server in to_start:
        for port in server.ports():
            if port in SYSTEM_PORTS:
                raise StackError("port %d (%s) belongs to a system server; probe's "
                                 "dev servers never use it: choose another port"
                                 % (port, server.name))
            if _port_in_use(port, server.host):
                raise StackError(
                    "port %d (%s) on %s is already in use by a process that is not "
                    "part of %s; stop that process or choose another port"
                    % (port, server.name, server.host, owner))
    started = []  # type: List[_Server]
    try:
        for server in to_start:
            server.spawn()
            started.append(server)
        deadline = time.monotonic() + timeout
        for server in servers:
            server.wait_answering(deadline)
    except BaseException:
        _stop_servers(started)
        raise


def _stop_servers(servers: Sequence[_Server], force: bool = False) -> None:
    """Stop the live ones among `servers`: SIGTERM (or SIGKILL), then SIGKILL."""
    alive = [server for server in servers if server.is_alive()]
    for server in alive:
        log.info("%s %s (pid %d)", "killing" if force else "stopping",
                 server.name, server.pid)
        server.signal(signal.SIGKILL if force else signal.SIGTERM)
    for server in alive:
        if server.wait_exit(_KILL_WAIT if force else server.grace):
            continue
        if not force:
            log.warning("%s (pid %d) did not stop within %.0f s; killing it",
                        server.name, server.pid, server.grace)
            server.signal(signal.SIGKILL)
            if server.wait_exit(_KILL_WAIT):
                continue
        # server.pid is set here: the server was running
        raise StackError("%s (pid %d) survived SIGKILL; check it with `ps -p %d`"
                         % (server.name, server.pid, server.pid))  # type: ignore[str-format]
    for server in servers:
        if not server.is_alive():
            server.pid = server.start_time = None


# --------------------------------------------------------------------------- stack

_R = TypeVar("_R", bound="_Recorded")


class _Recorded:
    """A group of servers whose pids and ports live in a JSON record in state_dir.
    Subclasses provide state_dir, _record_path, _restore(record), _save(), up() and
    down(); `with group:` runs up() and always down()."""

    state_dir: str
    _record_path: str

    if TYPE_CHECKING:  # provided by the subclasses
        def up(self) -> object: ...

        def down(self) -> None: ...

        def _restore(self, record: dict) -> None: ...

        def _save(self) -> None: ...

    def __enter__(self: _R) -> _R:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.down()

    @contextlib.contextmanager
    def _recorded(self) -> Iterator[None]:
        """Hold the folder's lock with the record loaded; save it however we leave."""
        with _locked(self.state_dir):
            self._restore(_read_json(self._record_path))
            try:
                yield
            finally:
                self._save()


class Stack(_Recorded):
    """One ZooKeeper, one Redis and one MariaDB on loopback ports, for one env.

    ``ports`` is "dev" (`DEV_PORTS`), "free" (unused loopback ports, for tests) or a
    dict overriding some of `DEV_PORTS`. Ports recorded in an existing
    ``stack.json`` win over "dev" and "free", so a component keeps its port for
    the life of the state folder. ``host`` is the one IPv4 address all three bind
    (default 127.0.0.1); another one only makes sense inside a network namespace
    of a test (tests/test_multihost.py), never a public interface.
    """

    def __init__(self, state_dir: Optional[str] = None, ports: Union[str, Dict[str, int]] = "dev",
                 env: str = "dev", host: str = LOOPBACK,
                 secure: Optional[bool] = None) -> None:
        if not env or not isinstance(env, str):
            raise StackError("env must be a non-empty string such as 'dev', got %r"
                             % (env,))
        self.state_dir = os.path.abspath(os.path.expanduser(
            state_dir or default_state_dir()))
        self.env = env
        self.host = _check_bind_host(host)
        self.config_path = os.path.join(self.state_dir, "config.yml")
        self._record_path = os.path.join(self.state_dir, "stack.json")
        record = _read_json(self._record_path)
        stored = {name: entry["port"]
                  for name, entry in record.get("components", {}).items()
                  if name in COMPONENTS and entry.get("port")}
        chosen = self._choose_ports(ports, stored)
        self._servers = {
            "zookeeper": _ZooKeeperServer(self._home("zookeeper"), chosen["zookeeper"]),
            "redis": _RedisServer(self._home("redis"), chosen["redis"]),
            "mysql": _MariaDBServer(self._home("mysql"), chosen["mysql"],
                                    record.get("mysql_socket") or self._socket_path()),
        }  # type: Dict[str, _Server]
        for server in self._servers.values():
            server.host = self.host
        recorded_secure = bool(record.get("secure", False))
        self.secure = recorded_secure if secure is None else bool(secure)
        if self.secure != recorded_secure and any(
                _is_alive(entry.get("pid"), entry.get("start_time"))
                for entry in record.get("components", {}).values()):
            raise StackError("the stack in %s is running %s; run `probe stack down` before "
                             "starting it %s" % (self.state_dir,
                                                 "secured" if recorded_secure else "unsecured",
                                                 "secured" if self.secure else "unsecured"))
        self._secrets = {}  # type: Dict[str, str]
        if self.secure:
            self._secure_servers()
        for name, entry in record.get("components", {}).items():
            moved = name in chosen and entry.get("port") != chosen[name]
            if moved and _is_alive(entry.get("pid"), entry.get("start_time")):
                raise StackError(
                    "%s is running on port %d (pid %d) in %s; run `probe stack down` "
                    "before moving it to port %d" % (name, entry["port"], entry["pid"],
                                                     self.state_dir, chosen[name]))
        self._restore(record)
        zookeeper = self._servers["zookeeper"]
        if self.secure and not zookeeper.secure_port:  # type: ignore[attr-defined]
            zookeeper.secure_port = _free_ports(1, avoid=list(chosen.values()))[0]  # type: ignore

    def __repr__(self) -> str:
        return "Stack(%r, ports=%r, env=%r%s)" % (self.state_dir, self.ports, self.env,
                                                  ", secure=True" if self.secure else "")

    @property
    def tls_dir(self) -> str:
        return os.path.join(self.state_dir, "tls")

    @property
    def _secrets_path(self) -> str:
        return os.path.join(self.state_dir, "secrets.json")

    def _secure_servers(self) -> None:
        """Passwords (made once per state folder) and certificate paths for the
        servers of a secured stack. The certificates are made by up()."""
        import secrets
        from .certs import stack_cert_paths
        stored = _read_json(self._secrets_path)
        wanted = ("zookeeper", "zookeeper_super", "redis", "mysql")
        if not all(isinstance(stored.get(name), str) for name in wanted):
            stored = {name: stored.get(name) or secrets.token_urlsafe(18) for name in wanted}
            os.makedirs(self.state_dir, exist_ok=True)
            _write_file(self._secrets_path, json.dumps(stored, indent=2) + "\n", private=True)
        self._secrets = stored
        certs = stack_cert_paths(self.tls_dir)
        self._certs = certs
        zookeeper = self._servers["zookeeper"]
        from kazoo.security import make_digest_acl_credential
        zookeeper.super_digest = make_digest_acl_credential(  # type: ignore[attr-defined]
            "super", stored["zookeeper_super"])
        zookeeper.tls = (certs.ca, certs.server.cert, certs.server.key)  # type: ignore
        redis_server = self._servers["redis"]
        redis_server.tls = (certs.ca, certs.server.cert, certs.server.key)  # type: ignore
        redis_server.client_pair = tuple(certs.client)  # type: ignore[attr-defined]
        redis_server.acl_user = (SECURE_USER, stored["redis"])  # type: ignore[attr-defined]
        self._servers["mysql"].tls = (  # type: ignore[attr-defined]
            certs.ca, certs.server.cert, certs.server.key)

    @property
    def _mysql_password(self) -> str:
        return self._secrets["mysql"] if self.secure else MYSQL_PASSWORD

    @property
    def ports(self) -> Dict[str, int]:
        return {name: server.port for name, server in self._servers.items()}

    # -- lifecycle

    def up(self, timeout: float = 60) -> dict:
        """Start whatever is not running, wait until all answer; idempotent."""
        with self._recorded():
            if self.secure:
                from .certs import make_stack_certs
                make_stack_certs(self.tls_dir, self.host)
            _start_servers(list(self._servers.values()), timeout,
                           "the stack in %s" % self.state_dir)
            self._create_probe_database()
            self._write_config()
        return self.status()

    def down(self, wipe: bool = False) -> None:
        """Stop every server; with ``wipe=True`` also delete data, logs and state."""
        if not os.path.isdir(self.state_dir):
            return
        with self._recorded():
            _stop_servers(list(self._servers.values()))
        if wipe:
            # After the record is saved, so nothing writes it back into the folder.
            with _locked(self.state_dir):
                for server in self._servers.values():
                    server.wipe()
                    shutil.rmtree(server.home, ignore_errors=True)
                for path in (self._record_path, self.config_path, self._secrets_path):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                shutil.rmtree(self.tls_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.state_dir, ".lock"))
                os.rmdir(self.state_dir)

    def status(self) -> dict:
        """Per component: running (alive and answering), pid, port, address, log."""
        self._restore(_read_json(self._record_path))
        result = {}
        for name, server in self._servers.items():
            alive = server.is_alive()
            result[name] = {
                "running": alive and server.answers(),
                "pid": server.pid if alive else None,
                "port": server.port,
                "address": "%s:%d" % (self.host, server.port),
                "log": server.log_path,
                "secure": self.secure,
            }
        return result

    def config(self) -> dict:
        """The probe configuration (as written to `config_path`) for these servers."""
        ports = self.ports
        config: Dict[str, object] = {
            "mysql": {self.env: {
                "host": self.host, "port": ports["mysql"], "username": MYSQL_USER,
                "password": MYSQL_PASSWORD, "database": MYSQL_DATABASE}},
            "redis": {self.env: {
                "host": self.host, "port": ports["redis"], "password": None,
                "cluster": 0}},
            "zkserver": {self.env: {"host": self.host, "port": ports["zookeeper"]}},
        }
        if self.secure:
            self._secure_config(config)
        if self.host == LOOPBACK:
            # A loopback stack: providers run against it register 127.0.0.1, never
            # the machine's outbound address. A stack on another address (a test
            # host) lets each provider find its own by the outbound-route rule.
            config["advertise_host"] = LOOPBACK
        return config

    def _secure_config(self, config: dict) -> None:
        """Credentials and TLS files of a secured stack, in probe's config keys."""
        certs, env = self._certs, self.env
        config["mysql"][env].update(password=self._secrets["mysql"], ssl={
            "ca": certs.ca, "cert": certs.client.cert, "key": certs.client.key})
        config["redis"][env].update(
            username=SECURE_USER, password=self._secrets["redis"], ssl=True,
            ssl_ca_certs=certs.ca, ssl_certfile=certs.client.cert,
            ssl_keyfile=certs.client.key)
        config["zkserver"][env]["auth"] = "%s:%s" % (SECURE_USER, self._secrets["zookeeper"])
        zookeeper = self._servers["zookeeper"]
        if zookeeper.secure_port:  # type: ignore[attr-defined]
            # The digest password only over TLS: the secure client port, kazoo's use_ssl.
            config["zkserver"][env].update(
                port=zookeeper.secure_port, use_ssl=True, ca=certs.ca,  # type: ignore
                certfile=certs.client.cert, keyfile=certs.client.key)
        # One certificate for both ends (it is made for server and client use); the
        # consumer-only pair rpc-consumer*.pem sits beside it for a second config.
        config["rpc_tls"] = {env: {"ca": certs.rpc_ca, "cert": certs.rpc_provider.cert,
                                   "key": certs.rpc_provider.key}}

    # -- internals

    def _home(self, component: str) -> str:
        return os.path.join(self.state_dir, component)

    def _socket_path(self) -> str:
        path = os.path.join(self._home("mysql"), "mysqld.sock")
        if len(path) <= _MAX_SOCKET_PATH:
            return path
        digest = hashlib.sha1(self.state_dir.encode("utf-8")).hexdigest()[:12]
        return "/tmp/probe-mysql-%s.sock" % digest

    @staticmethod
    def _choose_ports(ports: Union[str, Dict[str, int]], stored: Dict[str, int]) -> Dict[str, int]:
        if ports == "dev":
            chosen = dict(DEV_PORTS, **stored)
        elif ports == "free":
            missing = [name for name in COMPONENTS if name not in stored]
            fresh = _free_ports(len(missing), avoid=list(stored.values()))
            chosen = dict(stored, **dict(zip(missing, fresh)))
        elif isinstance(ports, dict):
            unknown = sorted(set(ports) - set(COMPONENTS))
            if unknown:
                raise StackError("unknown component(s) %s in ports; use %s"
                                 % (", ".join(unknown), ", ".join(COMPONENTS)))
            chosen = dict(DEV_PORTS, **stored)
            chosen.update((name, int(port)) for name, port in ports.items())
        else:
            raise StackError("ports must be 'dev', 'free' or a dict such as "
                             "{'redis': 26380}, got %r" % (ports,))
        for name, port in chosen.items():
            if port in SYSTEM_PORTS or not 0 < port < 65536:
                raise StackError("port %d for %s is not allowed: it must be 1-65535 "
                                 "and not a system server's port (%s)" % (
                                     port, name, ", ".join(map(str, sorted(SYSTEM_PORTS)))))
        if len(set(chosen.values())) != len(chosen):
            raise StackError("components must have distinct ports, got %r" % (chosen,))
        return chosen

    def _restore(self, record: dict) -> None:
        entries = record.get("components", {})
        for name, server in self._servers.items():
            entry = entries.get(name)
            if entry and entry.get("port") == server.port:
                server.restore(entry)
            else:
                server.pid = server.start_time = None

    def _save(self) -> None:
        os.makedirs(self.state_dir, exist_ok=True)
        mysql = self._servers["mysql"]
        record = {
            "env": self.env,
            "secure": self.secure,
            "components": {name: server.record()
                           for name, server in self._servers.items()},
            "mysql_socket": mysql.socket_path,  # type: ignore[attr-defined]
        }
        _write_file(self._record_path, json.dumps(record, indent=2) + "\n")

    def _create_probe_database(self) -> None:
        """Create the `probe` database and user; safe to repeat."""
        import pymysql  # only needed once MariaDB is up

        # root@localhost over the server's socket: root has no account for a
        # TCP client on any address but loopback.
        socket_path = self._servers["mysql"].socket_path  # type: ignore[attr-defined]
        try:
            connection = pymysql.connect(unix_socket=socket_path, user="root", password="",
                                         connect_timeout=5, autocommit=True)
        except pymysql.MySQLError as exc:
            raise StackError("cannot log in to MariaDB on %s as root with an "
                             "empty password (%s); to start over with fresh data run "
                             "`probe stack down --wipe`, then `probe stack up`"
                             % (socket_path, exc)) from exc
        try:
            with connection.cursor() as cursor:
                cursor.execute("CREATE DATABASE IF NOT EXISTS `%s`" % MYSQL_DATABASE)
                for host in ("%", "127.0.0.1", "localhost"):
                    cursor.execute("CREATE USER IF NOT EXISTS %s@%s IDENTIFIED BY %s",
                                   (MYSQL_USER, host, self._mysql_password))
                    # Again for an existing user: the stack may have been (un)secured.
                    cursor.execute("ALTER USER %%s@%%s IDENTIFIED BY %%s REQUIRE %s"
                                   % ("SSL" if self.secure else "NONE"),
                                   (MYSQL_USER, host, self._mysql_password))
                    cursor.execute("GRANT ALL PRIVILEGES ON `%s`.* TO %%s@%%s"
                                   % MYSQL_DATABASE, (MYSQL_USER, host))
        finally:
            connection.close()
        # The tables too, so `serviceapp` exists for anyone inserting appkeys by SQL.
        from ..stores.appkeys import AppkeyStore
        from ..settings import MysqlSettings, MysqlTls
        tls = None
        if self.secure:
            tls = MysqlTls(self._certs.ca, self._certs.client.cert, self._certs.client.key)
        store = AppkeyStore(MysqlSettings(self.host, self.ports["mysql"], MYSQL_USER,
                                          self._mysql_password, MYSQL_DATABASE, tls))
        try:
            store.ensure_schema()
        finally:
            store.close()

    def _write_config(self) -> None:
        import yaml  # a dependency of probe; imported late to keep status() light

        header = ("# Written by `probe stack up` for the servers in %s.\n"
                  "# Point PROBE_CONFIG here to use them; rewritten on every up.\n"
                  % self.state_dir)
        body = yaml.safe_dump(self.config(), sort_keys=False, default_flow_style=None)
        _write_file(self.config_path, header + body, private=self.secure)
