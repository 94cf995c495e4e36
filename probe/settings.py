"""Load and validate probe's YAML configuration and pick the environment.

The file is read once per process (per path and env) and handed around as a
`Settings` object; nothing re-reads it on the call path. Errors name the file and
the key that is wrong.
"""

import os
import re
import socket
import threading
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import yaml

from .errors import ConfigError, InvalidHost
from .naming import check_env, is_valid_host
from .options import DEFAULT_CONNECT_TIMEOUT_S

PACKAGED_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "config.yml")
DEFAULT_ENV_RULES = ((r"^prod\d+$", "prod"),)
DEFAULT_ENV = "dev"
DEFAULT_SESSION_TIMEOUT = 6.0  # seconds: a crashed provider leaves the registry this fast
DEFAULT_CONNECT_TIMEOUT = DEFAULT_CONNECT_TIMEOUT_S  # for MySQL, Redis and ZooKeeper at start


HIDDEN = "***"  # what a repr shows instead of a secret


class MysqlTls(NamedTuple):
    """`mysql.<env>.ssl`: PEM paths (PyMySQL's names). `ca` checks the server's
    certificate and name; `cert` + `key` are the client's own, if the server asks."""
    ca: Optional[str] = None
    cert: Optional[str] = None
    key: Optional[str] = None


class MysqlSettings(NamedTuple):
    host: str
    port: int
    username: str
    password: str
    database: str
    ssl: Optional[MysqlTls] = None

    def __repr__(self) -> str:
        return "MysqlSettings(host=%r, port=%r, username=%r, password=%s, database=%r, ssl=%r)" % (
            self.host, self.port, self.username, HIDDEN if self.password else "''",
            self.database, self.ssl)


class RedisSettings(NamedTuple):
    host: str
    port: int
    password: Optional[str]
    cluster: bool
    startup_nodes: Tuple[Tuple[str, int], ...]
    username: Optional[str] = None
    ssl: bool = False
    ssl_ca_certs: Optional[str] = None
    ssl_certfile: Optional[str] = None
    ssl_keyfile: Optional[str] = None

    @property
    def address(self) -> str:
        if self.cluster:
            return ",".join("%s:%d" % node for node in self.startup_nodes)
        return "%s:%d" % (self.host, self.port)

    def __repr__(self) -> str:
        return ("RedisSettings(address=%r, cluster=%r, username=%r, password=%s, ssl=%r, "
                "ssl_ca_certs=%r, ssl_certfile=%r, ssl_keyfile=%r)" % (
                    self.address, self.cluster, self.username,
                    None if self.password is None else HIDDEN, self.ssl, self.ssl_ca_certs,
                    self.ssl_certfile, self.ssl_keyfile))


class ZooKeeperTls(NamedTuple):
    """`zkserver.<env>` TLS keys, kazoo's KazooClient names: `use_ssl` (bool), `ca`,
    `certfile`, `keyfile` (PEM paths; the pair when the server wants client
    certificates), `verify_certs` (default true)."""
    ca: Optional[str] = None
    certfile: Optional[str] = None
    keyfile: Optional[str] = None
    verify_certs: bool = True

    def kazoo_options(self) -> Dict[str, Any]:
        return {"use_ssl": True, "ca": self.ca, "certfile": self.certfile,
                "keyfile": self.keyfile, "verify_certs": self.verify_certs}


class ZooKeeperSettings(NamedTuple):
    hosts: str
    session_timeout: float
    auth: Optional[str] = None  # "user:password" for ZooKeeper's digest scheme
    tls: Optional[ZooKeeperTls] = None  # None: plain TCP

    @property
    def auth_user(self) -> Optional[str]:
        """The user part of `auth` (safe to show), or None."""
        return self.auth.split(":", 1)[0] if self.auth else None

    def __repr__(self) -> str:
        return "ZooKeeperSettings(hosts=%r, session_timeout=%r, auth=%s, tls=%r)" % (
            self.hosts, self.session_timeout,
            None if self.auth is None else repr("%s:%s" % (self.auth_user, HIDDEN)), self.tls)


class RpcTls(NamedTuple):
    """`rpc_tls.<env>`: PEM paths for mutual TLS between consumers and providers:
    `ca` signs the peers' certificates, `cert` + `key` are this process's own."""
    ca: str
    cert: str
    key: str


class Settings(object):
    """One environment's view of a config file. Sections are validated on first use,
    so a consumer that needs only ZooKeeper is not refused for a missing MySQL."""

    def __init__(self, raw: Dict[str, Any], env: str, path: str, env_source: str) -> None:
        self.raw = raw
        self.env = env
        self.path = path
        self.env_source = env_source

    def __repr__(self) -> str:
        return "Settings(env=%r, path=%r)" % (self.env, self.path)

    def _section(self, name: str) -> Dict[str, Any]:
        top = self.raw.get(name)
        if not isinstance(top, dict) or not isinstance(top.get(self.env), dict):
            raise ConfigError(
                "config %s has no '%s.%s' section (env %r chosen by %s): add it, "
                "point PROBE_CONFIG at a file that has it, or set PROBE_ENV"
                % (self.path, name, self.env, self.env, self.env_source))
        return top[self.env]

    def _require(self, name: str, section: Dict[str, Any], key: str, kind: type) -> Any:
        value = section.get(key)
        if kind is int and isinstance(value, str) and re.fullmatch(r"[0-9]{1,9}", value):
            value = int(value)
        if value is None or (kind is int and (isinstance(value, bool) or not isinstance(value, int))) \
                or (kind is str and not isinstance(value, str)):
            raise ConfigError("config %s: '%s.%s.%s' must be a%s %s, got %r"
                              % (self.path, name, self.env, key,
                                 "n" if kind is int else "", "integer" if kind is int else "string",
                                 value))
        return value

    def _pem_path(self, name: str, section: Dict[str, Any], key: str,
                  where: Optional[str] = None) -> Optional[str]:
        """An existing file named by `section[key]`, or None if the key is absent."""
        value = section.get(key)
        if value in (None, ""):
            return None
        label = "%s.%s.%s" % (name, self.env, where or key)
        if not isinstance(value, str):
            raise ConfigError("config %s: '%s' must be the path of a PEM file, got %r"
                              % (self.path, label, value))
        path = os.path.expanduser(value)
        if not os.path.isfile(path):
            raise ConfigError("config %s: '%s' names %s, which is not a readable file: fix "
                              "the path" % (self.path, label, value))
        return path

    @property
    def mysql(self) -> MysqlSettings:
        section = self._section("mysql")
        password = section.get("password")
        tls = section.get("ssl")
        if tls in (None, False, {}):
            tls = None
        elif isinstance(tls, dict) and not set(tls) - {"ca", "cert", "key"}:
            tls = MysqlTls(*(self._pem_path("mysql", tls, key, "ssl.%s" % key)
                             for key in ("ca", "cert", "key")))
            if tls.ca is None or (tls.cert is None) != (tls.key is None):
                raise ConfigError("config %s: 'mysql.%s.ssl' needs 'ca' (the CA that signed the "
                                  "server's certificate), and 'cert' and 'key' together or not "
                                  "at all" % (self.path, self.env))
        else:
            raise ConfigError("config %s: 'mysql.%s.ssl' must be a mapping with keys ca, cert, "
                              "key (PEM paths), got %r" % (self.path, self.env, tls))
        return MysqlSettings(
            host=self._require("mysql", section, "host", str),
            port=self._require("mysql", section, "port", int),
            username=self._require("mysql", section, "username", str),
            password="" if password is None else str(password),
            database=self._require("mysql", section, "database", str),
            ssl=tls)

    def _redis_security(self, section: Dict[str, Any]) -> Tuple[Any, ...]:
        """(username, ssl, ssl_ca_certs, ssl_certfile, ssl_keyfile) of a redis section."""
        username = section.get("username")
        if username in (None, ""):
            username = None
        elif not isinstance(username, str):
            raise ConfigError("config %s: 'redis.%s.username' must be a string (a Redis ACL "
                              "user), got %r" % (self.path, self.env, username))
        ssl = section.get("ssl", False)
        if ssl not in (True, False, 0, 1):
            raise ConfigError("config %s: 'redis.%s.ssl' must be true or false, got %r"
                              % (self.path, self.env, ssl))
        paths = [self._pem_path("redis", section, key)
                 for key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")]
        if any(paths) and not ssl:
            raise ConfigError("config %s: 'redis.%s' names TLS files but 'ssl' is not true: "
                              "add 'ssl: true' (or remove the ssl_* keys)" % (self.path, self.env))
        if (paths[1] is None) != (paths[2] is None):
            raise ConfigError("config %s: 'redis.%s.ssl_certfile' and 'ssl_keyfile' go together"
                              % (self.path, self.env))
        return (username, bool(ssl)) + tuple(paths)

    @property
    def redis(self) -> RedisSettings:
        section = self._section("redis")
        cluster = section.get("cluster", 0) in (1, True, "1")
        password = section.get("password")
        password = None if password in (None, "") else str(password)
        if cluster:
            nodes = section.get("startup_nodes")
            if not nodes and section.get("host"):
                nodes = [{"host": section["host"], "port": section.get("port")}]
            if not isinstance(nodes, list) or not nodes:
                raise ConfigError("config %s: 'redis.%s.startup_nodes' must list {host, port} "
                                  "entries when cluster is 1" % (self.path, self.env))
            startup: List[Tuple[str, int]] = []
            for index, node in enumerate(nodes):
                if not isinstance(node, dict):
                    raise ConfigError("config %s: 'redis.%s.startup_nodes[%d]' must be {host, port}"
                                      % (self.path, self.env, index))
                startup.append((self._require("redis", node, "host", str),
                                self._require("redis", node, "port", int)))
            return RedisSettings(startup[0][0], startup[0][1], password, True, tuple(startup),
                                 *self._redis_security(section))
        return RedisSettings(self._require("redis", section, "host", str),
                             self._require("redis", section, "port", int), password, False, (),
                             *self._redis_security(section))

    @property
    def zookeeper(self) -> ZooKeeperSettings:
        section = self._section("zkserver")
        hosts = section.get("hosts")
        if hosts:
            if isinstance(hosts, list):
                hosts = ",".join(str(h) for h in hosts)
            if not isinstance(hosts, str) or not re.fullmatch(r"[\w.\-\[\]:]+(,[\w.\-\[\]:]+)*(/[\w/\-]*)?",
                                                               hosts, re.ASCII):
                raise ConfigError("config %s: 'zkserver.%s.hosts' must look like "
                                  "'h1:2181,h2:2181', got %r" % (self.path, self.env, hosts))
        else:
            hosts = "%s:%d" % (self._require("zkserver", section, "host", str),
                               self._require("zkserver", section, "port", int))
        timeout = section.get("session_timeout", DEFAULT_SESSION_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ConfigError("config %s: 'zkserver.%s.session_timeout' must be seconds > 0, got %r"
                              % (self.path, self.env, timeout))
        auth = section.get("auth")
        if auth in (None, ""):
            auth = None
        elif not isinstance(auth, str) or not re.fullmatch(r"[^:\s]+:\S+", auth):
            # Never echo the value: it holds a password.
            raise ConfigError("config %s: 'zkserver.%s.auth' must be \"user:password\" (a user "
                              "without ':' or spaces, then a password without spaces)"
                              % (self.path, self.env))
        return ZooKeeperSettings(hosts, float(timeout), auth, self._zookeeper_tls(section))

    def _zookeeper_tls(self, section: Dict[str, Any]) -> Optional[ZooKeeperTls]:
        """ZooKeeperTls from `use_ssl`, `ca`, `certfile`, `keyfile`, `verify_certs`."""
        use_ssl = section.get("use_ssl", False)
        if use_ssl not in (True, False, 0, 1) or isinstance(use_ssl, float):
            raise ConfigError("config %s: 'zkserver.%s.use_ssl' must be true or false, got %r"
                              % (self.path, self.env, use_ssl))
        paths = {key: self._pem_path("zkserver", section, key) for key in ("ca", "certfile", "keyfile")}
        verify = section.get("verify_certs", True)
        if verify not in (True, False):
            raise ConfigError("config %s: 'zkserver.%s.verify_certs' must be true or false, got "
                              "%r" % (self.path, self.env, verify))
        if not use_ssl:
            given = [key for key, path in paths.items() if path]
            if given:
                raise ConfigError("config %s: 'zkserver.%s' names %s but not 'use_ssl: true': "
                                  "set use_ssl to talk TLS to ZooKeeper's secure port, or drop "
                                  "them" % (self.path, self.env, ", ".join(given)))
            return None
        if bool(paths["certfile"]) != bool(paths["keyfile"]):
            raise ConfigError("config %s: 'zkserver.%s' needs both certfile and keyfile (a "
                              "client certificate and its key), or neither"
                              % (self.path, self.env))
        if verify and not paths["ca"]:
            raise ConfigError("config %s: 'zkserver.%s.use_ssl' needs 'ca' (the PEM file of "
                              "the CA that signed ZooKeeper's certificate) to verify the server"
                              % (self.path, self.env))
        return ZooKeeperTls(paths["ca"], paths["certfile"], paths["keyfile"], bool(verify))

    @property
    def rpc_tls(self) -> Optional[RpcTls]:
        """RpcTls for this env, or None when the config has no `rpc_tls.<env>`
        (plain RPC). Every file must exist; no other key is allowed."""
        top = self.raw.get("rpc_tls")
        if top is None or (isinstance(top, dict) and top.get(self.env) is None):
            return None
        section = top.get(self.env) if isinstance(top, dict) else None
        if not isinstance(section, dict) or set(section) != {"ca", "cert", "key"}:
            raise ConfigError("config %s: 'rpc_tls.%s' must be a mapping with exactly the keys "
                              "ca, cert and key (PEM paths)" % (self.path, self.env))
        # An empty value passes as None here (as it always has): _pem_path's Optional
        return RpcTls(*(self._pem_path("rpc_tls", section, key)  # type: ignore[arg-type]
                        for key in ("ca", "cert", "key")))

    @property
    def advertise_host(self) -> Optional[str]:
        """PROBE_ADVERTISE_HOST, else the config's `advertise_host`, else None.
        Raises InvalidHost (naming where it came from) unless it is a host name or
        an IP literal: it becomes part of the node's znode name and Redis field."""
        from_env = os.environ.get("PROBE_ADVERTISE_HOST")
        host: Any  # the config's value is untrusted: checked below
        if from_env:
            host, source = from_env, "PROBE_ADVERTISE_HOST"
        else:
            host, source = self.raw.get("advertise_host"), "'advertise_host' in config %s" % self.path
        if host in (None, ""):
            return None
        if not is_valid_host(host):
            raise InvalidHost("bad %s %r: give a host name (letters, digits, '-', '.'; no '_' "
                              "or '/') or an IP address, e.g. 127.0.0.1"
                              % (source, host if not isinstance(host, str) else host[:80]))
        return host

    @property
    def log_dir(self) -> Optional[str]:
        """Where a prod provider writes its file log; None in other envs by default."""
        logging_section = self.raw.get("logging") or {}
        dirs = logging_section.get("dir") or {}
        if isinstance(dirs, dict):
            return dirs.get(self.env)
        return dirs or None


def _read_yaml(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError("config file %s does not exist (PROBE_CONFIG=%r)"
                          % (path, os.environ.get("PROBE_CONFIG")))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError("config file %s cannot be read as YAML: %s" % (path, exc))
    if not isinstance(raw, dict):
        raise ConfigError("config file %s must hold a YAML mapping with sections "
                          "mysql, redis and zkserver" % path)
    return raw


def choose_env(raw: Dict[str, Any], path: str,
               hostname: Optional[str] = None) -> Tuple[str, str]:
    """(env, why): PROBE_ENV wins; else the first hostname rule that matches."""
    forced = os.environ.get("PROBE_ENV")
    if forced:
        return check_env(forced), "PROBE_ENV"
    hostname = hostname if hostname is not None else socket.gethostname()
    rules = raw.get("env_rules")
    if rules is None:
        rules = [{"pattern": p, "env": e} for p, e in DEFAULT_ENV_RULES]
    if not isinstance(rules, list):
        raise ConfigError("config %s: 'env_rules' must be a list of {pattern, env}" % path)
    for rule in rules:
        try:
            if re.match(rule["pattern"], hostname):
                return check_env(rule["env"]), "hostname rule %r" % rule["pattern"]
        except (KeyError, TypeError, re.error) as exc:
            raise ConfigError("config %s: bad env rule %r: %s" % (path, rule, exc))
    return check_env(raw.get("default_env") or DEFAULT_ENV), "default env for hostname %r" % hostname


_cache: Dict[Tuple[str, Optional[str], Optional[str]], Settings] = {}
_cache_lock = threading.Lock()


def load_settings(config_path: Optional[str] = None, env: Optional[str] = None) -> Settings:
    """Settings for `env` (default: PROBE_ENV or hostname rules) from `config_path`
    (default: PROBE_CONFIG or the packaged file). Cached per process."""
    path = os.path.abspath(config_path or os.environ.get("PROBE_CONFIG") or PACKAGED_CONFIG)
    key = (path, env, os.environ.get("PROBE_ENV"))
    with _cache_lock:
        cached = _cache.get(key)
    if cached is not None:
        return cached
    raw = _read_yaml(path)
    if env:
        chosen, why = check_env(env), "the env argument"
    else:
        chosen, why = choose_env(raw, path)
    settings = Settings(raw, chosen, path, why)
    with _cache_lock:
        _cache[key] = settings
    return settings


def clear_cache() -> None:
    """Forget loaded settings (tests switch PROBE_CONFIG between stacks)."""
    with _cache_lock:
        _cache.clear()


def outbound_ip(towards: Optional[str] = None) -> str:
    """The address this host uses to reach `towards` (a host), or its default route.

    A UDP connect() only asks the kernel for a route; it sends no packet. Avoids
    gethostbyname(hostname), which gives 127.0.1.1 on Debian.
    """
    targets: List[str] = []
    if towards:
        targets.append(towards)
    targets.append("203.0.113.1")  # TEST-NET-3: picks the default route, never contacted
    for target in targets:
        try:
            probe_socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                probe_socket.connect((target, 9))
                ip = probe_socket.getsockname()[0]
            finally:
                probe_socket.close()
        except OSError:
            continue
        if ip and not ip.startswith("127.") and ip != "0.0.0.0":
            return ip
    return "127.0.0.1"
