"""Security against a real secured stack (`Stack(secure=True)`, as `probe stack up
--secure` makes it): ZooKeeper digest ACLs, Redis with an ACL user over TLS, MariaDB
over TLS, /metrics on loopback (and HTTPS when asked), and no secret in any repr,
log line or error text."""

import json
import logging
import os
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid

import pymysql
import pytest
import redis as redis_lib
import yaml
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError
from kazoo.security import OPEN_ACL_UNSAFE

from conftest import IDL, wait_for, write_config

from probe import naming, settings as settings_module
from probe.zk import acl as zkacl
from probe.errors import ConfigError, ProbeError, ZooKeeperAuthFailed
from probe.settings import load_settings

ENV = "dev"


@pytest.fixture
def secure_settings(secure_config):
    return load_settings(secure_config, ENV)


def _zk_tls(settings):
    """kazoo's TLS options when the config says use_ssl (the secured stack does)."""
    tls = settings.zookeeper.tls
    return tls.kazoo_options() if tls is not None else {}


def anonymous_zookeeper(settings):
    client = KazooClient(hosts=settings.zookeeper.hosts, timeout=5, **_zk_tls(settings))
    client.start(timeout=10)
    return client


def run_cli(config, *args):
    env = dict(os.environ, PROBE_CONFIG=config, PROBE_ENV=ENV)
    return subprocess.run([sys.executable, "-m", "probe.cli"] + list(args), capture_output=True,
                          text=True, env=env, timeout=60)


# -- ZooKeeper --------------------------------------------------------------------

def test_anonymous_client_reads_the_registry_but_cannot_change_it(
        secure_settings, secure_appkey, secure_providers):
    provider = secure_providers(secure_appkey)
    parent = naming.appkey_path(ENV, secure_appkey)
    node = parent + "/" + naming.node_name("DemoService", provider.host, provider.port)
    anonymous = anonymous_zookeeper(secure_settings)
    try:
        assert anonymous.get_children(parent) == [node.rsplit("/", 1)[1]]
        data, _ = anonymous.get(node)
        assert json.loads(data)["port"] == provider.port
        for attempt in (lambda: anonymous.create(parent + "/DemoService_127.0.0.1_1", b"{}"),
                        lambda: anonymous.set(node, b'{"weight": 1000}'),
                        lambda: anonymous.delete(node),
                        lambda: anonymous.create(naming.appkey_path(ENV, "s_thief")),
                        lambda: anonymous.set_acls(node, OPEN_ACL_UNSAFE)):
            with pytest.raises(NoAuthError):
                attempt()
        assert json.loads(anonymous.get(node)[0])["port"] == provider.port
    finally:
        anonymous.stop()
        anonymous.close()
    # Every znode probe made, parents included, carries the one ACL.
    owner = KazooClient(hosts=secure_settings.zookeeper.hosts, **_zk_tls(secure_settings),
                        auth_data=[("digest", secure_settings.zookeeper.auth)])
    owner.start(timeout=10)
    try:
        for path in ("/services", "/services/" + ENV, parent, node):
            assert sorted(owner.get_acls(path)[0]) == sorted(
                zkacl.znode_acl(secure_settings.zookeeper.auth)), path
    finally:
        owner.stop()
        owner.close()


def test_config_center_znodes_carry_the_acl_and_anonymous_writes_are_refused(
        secure_config, secure_settings, secure_appkey, tmp_path):
    from probe.configcenter import live_config
    done = run_cli(secure_config, "config", "set", secure_appkey, "pool.size", "8")
    assert done.returncode == 0, done.stderr
    cfg = live_config(secure_appkey, env=ENV, config_path=secure_config,
                      backup_dir=str(tmp_path / "backup"))
    try:
        assert cfg.get("pool.size") == 8
    finally:
        cfg.close()
    parent = naming.config_appkey_path(ENV, secure_appkey)
    owner = KazooClient(hosts=secure_settings.zookeeper.hosts, **_zk_tls(secure_settings),
                        auth_data=[("digest", secure_settings.zookeeper.auth)])
    owner.start(timeout=10)
    try:
        for path in ("/configs", "/configs/" + ENV, parent, parent + "/pool.size"):
            assert sorted(owner.get_acls(path)[0]) == sorted(
                zkacl.znode_acl(secure_settings.zookeeper.auth)), path
    finally:
        owner.stop()
        owner.close()
    anonymous = anonymous_zookeeper(secure_settings)
    try:
        assert json.loads(anonymous.get(parent + "/pool.size")[0]) == 8
        for attempt in (lambda: anonymous.set(parent + "/pool.size", b"9"),
                        lambda: anonymous.create(parent + "/stolen", b"1"),
                        lambda: anonymous.delete(parent + "/pool.size")):
            with pytest.raises(NoAuthError):
                attempt()
    finally:
        anonymous.stop()
        anonymous.close()


def test_provider_consumer_and_cli_work_with_credentials(
        secure_config, secure_settings, secure_appkey, secure_providers):
    from probe.client import build_client
    provider = secure_providers(secure_appkey, name="tls-node")
    client = build_client(IDL, secure_appkey, "DemoService", config_path=secure_config, env=ENV,
                          snapshot_dir=False)
    try:
        assert client.say() == "hello world"
        assert client.whoami() == "tls-node"
        address = "%s:%d" % (provider.host, provider.port)
        listed = run_cli(secure_config, "nodes", secure_appkey, "--json")
        assert listed.returncode == 0, listed.stderr
        assert [row["address"] for row in json.loads(listed.stdout)] == [address]
        changed = run_cli(secure_config, "node", "weight", secure_appkey, "DemoService",
                          address, "7", "--by", "security-test")
        assert changed.returncode == 0, changed.stderr
        assert "applied to the live node" in changed.stdout
        stats = run_cli(secure_config, "stats", secure_appkey, "--json")
        assert stats.returncode == 0, stats.stderr
        anonymous = anonymous_zookeeper(secure_settings)
        try:
            data, _ = anonymous.get(provider.path)
        finally:
            anonymous.stop()
            anonymous.close()
        assert json.loads(data)["weight"] == 7
    finally:
        client.close()


def test_consumer_without_credentials_still_routes(secure_config, secure_appkey,
                                                   secure_providers, tmp_path):
    """Consumers only read the registry: world READ is enough for them."""
    from probe.client import build_client
    secure_providers(secure_appkey, name="read-only")

    def no_auth(config):
        del config["zkserver"][ENV]["auth"]
    reader = write_config(tmp_path / "reader.yml", secure_config, no_auth)
    client = build_client(IDL, secure_appkey, "DemoService", config_path=reader, env=ENV,
                          snapshot_dir=False)
    try:
        assert client.whoami() == "read-only"
    finally:
        client.close()


def test_consumer_without_credentials_waits_for_an_appkey_not_yet_registered(
        secure_config, secure_appkey, secure_providers, tmp_path, caplog):
    """It may not create /services/<env>/<appkey>: it waits for a provider to, quietly."""
    from probe.client import build_client

    def no_auth(config):
        del config["zkserver"][ENV]["auth"]
    reader = write_config(tmp_path / "reader.yml", secure_config, no_auth)
    caplog.set_level(logging.INFO, logger="probe")
    client = build_client(IDL, secure_appkey, "DemoService", config_path=reader, env=ENV,
                          snapshot_dir=False)
    try:
        time.sleep(1.5)  # the span a retry loop would fill with warnings
        secure_providers(secure_appkey, name="late")
        assert wait_for(lambda: client.watcher.table.nodes, message="the late provider")
        assert client.whoami() == "late"
    finally:
        client.close()
    retries = [r for r in caplog.records if "watching" in r.getMessage() and "failed" in r.getMessage()]
    assert retries == []


def test_wrong_zookeeper_password_fails_at_start_and_registers_nothing(
        secure_config, secure_settings, secure_appkey, secure_providers, tmp_path):
    secure_providers(secure_appkey)  # the registry of this appkey exists, with its ACL
    wrong_password = "not-the-" + uuid.uuid4().hex

    def wrong(config):
        config["zkserver"][ENV]["auth"] = "probe:" + wrong_password
    wrong_config = write_config(tmp_path / "wrong.yml", secure_config, wrong)
    parent = naming.appkey_path(ENV, secure_appkey)
    anonymous = anonymous_zookeeper(secure_settings)
    try:
        before = sorted(anonymous.get_children(parent))
        with pytest.raises(ZooKeeperAuthFailed) as refused:
            secure_providers(secure_appkey, config_path=wrong_config)
        assert "password" in str(refused.value) and "'probe'" in str(refused.value)
        assert wrong_password not in str(refused.value)
        assert sorted(anonymous.get_children(parent)) == before
    finally:
        anonymous.stop()
        anonymous.close()
    # Nothing reached Redis either: ZooKeeper is checked before the node's settings.
    from probe.stores.nodestore import NodeStore
    store = NodeStore(secure_settings.redis, ENV)
    try:
        assert len(store.all(secure_appkey)) == len(before)
    finally:
        store.close()
    cli = run_cli(wrong_config, "nodes", secure_appkey)
    assert cli.returncode == 2 and "ZooKeeperAuthFailed" in cli.stderr
    assert wrong_password not in cli.stderr + cli.stdout


def test_probe_zk_secure_migrates_an_open_registry(secure_config, secure_settings):
    """Znodes made before the registry had credentials (open ACL) get probe's ACL."""
    legacy_app = "s_legacy_%s" % uuid.uuid4().hex[:6]
    parent = naming.appkey_path(ENV, legacy_app)
    node = parent + "/DemoService_127.0.0.1_4321"
    owner = KazooClient(hosts=secure_settings.zookeeper.hosts, **_zk_tls(secure_settings),
                        auth_data=[("digest", secure_settings.zookeeper.auth)])
    owner.start(timeout=10)
    anonymous = anonymous_zookeeper(secure_settings)
    try:
        owner.create(parent, b"", acl=OPEN_ACL_UNSAFE)
        owner.create(node, b'{"host": "127.0.0.1", "port": 4321, "weight": 10, "valid": 1}',
                     acl=OPEN_ACL_UNSAFE)
        anonymous.set(node, b'{"host": "127.0.0.1", "port": 4321, "weight": 11, "valid": 1}')
        done = run_cli(secure_config, "zk", "secure")
        assert done.returncode == 0, done.stderr
        assert "/services/%s: ACL set on" % ENV in done.stdout
        for attempt in (lambda: anonymous.set(node, b"{}"), lambda: anonymous.delete(node),
                        lambda: anonymous.create(parent + "/x")):
            with pytest.raises(NoAuthError):
                attempt()
        assert sorted(owner.get_acls(node)[0]) == sorted(
            zkacl.znode_acl(secure_settings.zookeeper.auth))
        again = run_cli(secure_config, "zk", "secure")
        assert "/services/%s: ACL set on 0 znode(s)" % ENV in again.stdout
    finally:
        owner.delete(parent, recursive=True)
        owner.stop()
        owner.close()
        anonymous.stop()
        anonymous.close()


def test_zk_secure_without_credentials_is_refused(secure_config, tmp_path):
    def open_registry(config):
        del config["zkserver"][ENV]["auth"]
    plain = write_config(tmp_path / "plain.yml", secure_config, open_registry)
    done = run_cli(plain, "zk", "secure")
    assert done.returncode == 2 and "zkserver.%s.auth" % ENV in done.stderr


# -- Redis and MySQL ------------------------------------------------------------------

def test_redis_is_reached_over_tls_as_its_acl_user(secure_settings, secure_stack):
    from probe.stores.nodestore import NodeStore
    redis_settings = secure_settings.redis
    assert redis_settings.ssl and redis_settings.username == "probe"
    store = NodeStore(redis_settings, ENV)
    try:
        store.ping()
        assert store.redis.client_info()["user"] == "probe"
        assert store.redis.connection_pool.connection_class.__name__ == "SSLConnection"
    finally:
        store.close()
    # Plaintext gets no answer: the server speaks TLS only.
    plain = redis_lib.Redis(host=redis_settings.host, port=redis_settings.port,
                            socket_timeout=2, socket_connect_timeout=2)
    with pytest.raises(redis_lib.ConnectionError):
        plain.ping()
    # TLS without a client certificate is refused at the handshake.
    no_cert = redis_lib.Redis(host=redis_settings.host, port=redis_settings.port, ssl=True,
                              ssl_ca_certs=redis_settings.ssl_ca_certs, socket_timeout=2,
                              username="probe", password=redis_settings.password)
    with pytest.raises(redis_lib.ConnectionError):
        no_cert.ping()
    # TLS with a certificate but without the ACL user: the default user is off.
    anonymous = redis_lib.Redis(host=redis_settings.host, port=redis_settings.port, ssl=True,
                                ssl_ca_certs=redis_settings.ssl_ca_certs,
                                ssl_certfile=redis_settings.ssl_certfile,
                                ssl_keyfile=redis_settings.ssl_keyfile, socket_timeout=2)
    with pytest.raises(redis_lib.AuthenticationError):
        anonymous.get("anything")


def test_stats_and_metrics_sink_use_the_secured_redis(secure_settings):
    """Every place that opens Redis goes through connect_redis, with TLS and the user."""
    from probe.stores.nodestore import connect_redis
    client = connect_redis(secure_settings.redis)
    try:
        whoami = client.acl_whoami()
        assert (whoami.decode() if isinstance(whoami, bytes) else whoami) == "probe"
    finally:
        client.close()


def test_mysql_is_reached_over_tls_and_plaintext_is_refused(secure_settings, secure_appkey):
    from probe.stores.appkeys import AppkeyStore
    store = AppkeyStore(secure_settings.mysql)
    try:
        store.require(secure_appkey)
        connection = store.connect()
        with connection.cursor() as cursor:
            cursor.execute("SHOW STATUS LIKE 'Ssl_cipher'")
            cipher = cursor.fetchone()[1]
            cursor.execute("SELECT CURRENT_USER()")
            user = cursor.fetchone()[0]
        connection.close()
    finally:
        store.close()
    assert cipher, "the MySQL session is not encrypted"
    assert user.startswith("probe@")
    mysql = secure_settings.mysql
    with pytest.raises(pymysql.err.OperationalError) as refused:
        pymysql.connect(host=mysql.host, port=mysql.port, user=mysql.username,
                        password=mysql.password, database=mysql.database, ssl_disabled=True,
                        connect_timeout=5)
    assert refused.value.args[0] == 1045  # access denied: the user REQUIRE SSL


def test_a_wrong_ca_is_refused(secure_config, tmp_path):
    """TLS checks the server: a config trusting another CA cannot connect."""
    from probe.stores.appkeys import AppkeyStore
    from probe.stores.nodestore import NodeStore
    from probe.dev.certs import make_stack_certs
    other = make_stack_certs(str(tmp_path / "other-ca"))

    def other_ca(config):
        config["mysql"][ENV]["ssl"]["ca"] = other.ca
        config["redis"][ENV]["ssl_ca_certs"] = other.ca
    settings = load_settings(write_config(tmp_path / "other.yml", secure_config, other_ca), ENV)
    with pytest.raises(ProbeError):
        AppkeyStore(settings.mysql).connect()
    store = NodeStore(settings.redis, ENV)
    try:
        with pytest.raises(ProbeError):
            store.ping()
    finally:
        store.close()


# -- /metrics ---------------------------------------------------------------------------

def test_metrics_listen_on_loopback_by_default(monkeypatch):
    from probe import metrics
    monkeypatch.delenv("PROBE_METRICS_ADDR", raising=False)
    assert metrics.metrics_options(metrics_port=0).addr == "127.0.0.1"
    endpoint = metrics.serve(0)
    try:
        assert endpoint.httpd.server_address[0] == "127.0.0.1"
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % endpoint.port,
                                    timeout=5) as reply:
            assert reply.status == 200
    finally:
        endpoint.close()


def test_metrics_over_https_with_client_certificates(monkeypatch, secure_stack):
    from probe import metrics
    from probe.dev.certs import stack_cert_paths
    certs = stack_cert_paths(secure_stack[0].tls_dir)
    monkeypatch.setenv("PROBE_METRICS_CERTFILE", certs.server.cert)
    monkeypatch.setenv("PROBE_METRICS_KEYFILE", certs.server.key)
    monkeypatch.setenv("PROBE_METRICS_CLIENT_CAFILE", certs.ca)
    endpoint = metrics.serve(0)
    url = "https://127.0.0.1:%d/metrics" % endpoint.port
    try:
        scraper = ssl.create_default_context(cafile=certs.ca)
        scraper.load_cert_chain(*certs.client)
        with urllib.request.urlopen(url, context=scraper, timeout=5) as reply:
            assert reply.status == 200
        stranger = ssl.create_default_context(cafile=certs.ca)  # no client certificate
        with pytest.raises(OSError):
            urllib.request.urlopen(url, context=stranger, timeout=5).read()
        with pytest.raises(OSError):
            urllib.request.urlopen("http://127.0.0.1:%d/metrics" % endpoint.port,
                                   timeout=5).read()
    finally:
        endpoint.close()


def test_metrics_tls_half_configured_is_refused_before_start(monkeypatch, tmp_path):
    from probe import metrics
    monkeypatch.setenv("PROBE_METRICS_CERTFILE", str(tmp_path / "missing.pem"))
    monkeypatch.delenv("PROBE_METRICS_KEYFILE", raising=False)
    with pytest.raises(ProbeError) as refused:
        metrics.metrics_options(metrics_port=0)
    assert "PROBE_METRICS_KEYFILE" in str(refused.value)


# -- secrets stay secret ------------------------------------------------------------------

def test_no_secret_in_repr_log_or_error(secure_stack, secure_config, secure_appkey,
                                        secure_providers, caplog, tmp_path):
    stack, _, secrets = secure_stack
    settings = load_settings(secure_config, ENV)
    shown = " ".join(repr(part) for part in (settings, settings.mysql, settings.redis,
                                             settings.zookeeper, stack))
    assert "***" in shown and "probe:***" in shown
    caplog.set_level(logging.DEBUG, logger="probe")
    provider = secure_providers(secure_appkey, metrics_port=0)
    provider.stop(grace=0)
    status = run_cli(secure_config, "stack", "status", "--dir", stack.state_dir)
    assert status.returncode == 0, status.stderr
    texts = [shown, caplog.text, status.stdout, status.stderr]
    # Errors that name the settings: a bad ZooKeeper auth value, and a refused login.
    bad_auth = "probe:" + secrets["zookeeper"] + " with spaces"

    def malformed(config):
        config["zkserver"][ENV]["auth"] = bad_auth
    with pytest.raises(ConfigError) as bad:
        settings_module.load_settings(write_config(tmp_path / "bad.yml", secure_config,
                                                   malformed), ENV).zookeeper
    texts.append(str(bad.value))

    def wrong_redis(config):
        config["redis"][ENV]["password"] = "x" + secrets["redis"]
        config["mysql"][ENV]["password"] = "x" + secrets["mysql"]
    wrong = load_settings(write_config(tmp_path / "wrong.yml", secure_config, wrong_redis), ENV)
    from probe.stores.appkeys import AppkeyStore
    from probe.stores.nodestore import NodeStore
    with pytest.raises(ProbeError) as mysql_refused:
        AppkeyStore(wrong.mysql).connect()
    store = NodeStore(wrong.redis, ENV)
    with pytest.raises(ProbeError) as redis_refused:
        store.ping()
    store.close()
    texts += [str(mysql_refused.value), str(redis_refused.value), repr(wrong.redis),
              repr(wrong.mysql)]
    everything = "\n".join(texts)
    for name, secret in secrets.items():
        assert secret not in everything, "the %s secret leaked" % name


# -- settings (no servers) -----------------------------------------------------------------

def _settings_from(tmp_path, sections):
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(sections))
    return settings_module.Settings(sections, ENV, str(path), "test")


def test_settings_check_tls_and_auth_keys(tmp_path):
    pem = tmp_path / "ca.pem"
    pem.write_text("not checked here")
    redis_ok = _settings_from(tmp_path, {"redis": {ENV: {
        "host": "127.0.0.1", "port": 7000, "username": "u", "password": "p", "ssl": True,
        "ssl_ca_certs": str(pem)}}}).redis
    assert (redis_ok.username, redis_ok.ssl, redis_ok.ssl_ca_certs) == ("u", True, str(pem))
    cluster = _settings_from(tmp_path, {"redis": {ENV: {
        "cluster": 1, "startup_nodes": [{"host": "127.0.0.1", "port": 7000}], "ssl": True,
        "ssl_ca_certs": str(pem)}}}).redis
    assert cluster.cluster and cluster.ssl
    for bad in ({"ssl_ca_certs": str(pem)},                      # files without ssl: true
                {"ssl": True, "ssl_ca_certs": str(tmp_path / "nope.pem")},
                {"ssl": True, "ssl_certfile": str(pem)},         # cert without key
                {"ssl": "yes please"}):
        section = dict({"host": "127.0.0.1", "port": 7000}, **bad)
        with pytest.raises(ConfigError):
            _settings_from(tmp_path, {"redis": {ENV: section}}).redis
    mysql = dict(host="h", port=3306, username="u", password="secret", database="d")
    assert _settings_from(tmp_path, {"mysql": {ENV: dict(mysql, ssl={"ca": str(pem)})}}
                          ).mysql.ssl.ca == str(pem)
    for bad in ({"cert": str(pem), "key": str(pem)}, {"ca": str(pem), "cert": str(pem)},
                {"ca": str(pem), "verify": True}, "yes"):
        with pytest.raises(ConfigError):
            _settings_from(tmp_path, {"mysql": {ENV: dict(mysql, ssl=bad)}}).mysql
    zk = {"host": "127.0.0.1", "port": 2}
    assert _settings_from(tmp_path, {"zkserver": {ENV: dict(zk, auth="u:p:q")}}
                          ).zookeeper.auth_user == "u"
    for bad in ("nopassword", ":p", "u:", "u: spaced secret", 42):
        with pytest.raises(ConfigError) as refused:
            _settings_from(tmp_path, {"zkserver": {ENV: dict(zk, auth=bad)}}).zookeeper
        assert "spaced secret" not in str(refused.value)


def test_rpc_tls_settings(tmp_path):
    pem = tmp_path / "x.pem"
    pem.write_text("x")
    good = {"ca": str(pem), "cert": str(pem), "key": str(pem)}
    assert _settings_from(tmp_path, {}).rpc_tls is None
    assert _settings_from(tmp_path, {"rpc_tls": {"prod": good}}).rpc_tls is None  # other env
    assert _settings_from(tmp_path, {"rpc_tls": {ENV: good}}).rpc_tls.cert == str(pem)
    for bad in ({"ca": str(pem), "cert": str(pem)}, dict(good, key=str(tmp_path / "no.pem")),
                dict(good, extra=1), "yes"):
        with pytest.raises(ConfigError):
            _settings_from(tmp_path, {"rpc_tls": {ENV: bad}}).rpc_tls


def test_znode_acl_is_digest_all_and_world_read():
    acl = zkacl.znode_acl("probe:secret")
    assert zkacl.granted(acl, "probe:secret") == 31  # ALL
    assert zkacl.granted(acl, "probe:other") == 1    # READ only, as everyone
    assert zkacl.granted(acl, None) == 1
    assert zkacl.znode_acl(None) is None and zkacl.kazoo_auth_options(None) == {}
    assert zkacl.kazoo_auth_options("probe:secret")["default_acl"] == acl


def test_cluster_clients_get_tls_and_the_acl_user(secure_config, tmp_path):
    """RedisCluster gets the same TLS and user options: against the secured (single,
    non-cluster) server it gets as far as asking for the cluster's slots, which
    plaintext or a missing user never would."""
    from probe.stores.nodestore import connect_redis

    def as_cluster(config):
        config["redis"][ENV]["cluster"] = 1
    settings = load_settings(write_config(tmp_path / "cluster.yml", secure_config, as_cluster),
                             ENV)
    assert settings.redis.cluster and settings.redis.ssl
    with pytest.raises(ProbeError) as refused:
        connect_redis(settings.redis)
    assert "Cluster mode is not enabled" in str(refused.value)


# -- the stack ---------------------------------------------------------------------------

def test_default_stack_stays_unsecured(tmp_path):
    from probe.dev.stack import Stack
    config = Stack(state_dir=str(tmp_path / "plain"), ports="free").config()
    assert "auth" not in config["zkserver"]["dev"] and "rpc_tls" not in config
    assert "ssl" not in config["redis"]["dev"] and "ssl" not in config["mysql"]["dev"]
    assert not os.path.exists(str(tmp_path / "plain" / "secrets.json"))


def test_a_running_secured_stack_is_not_switched_to_unsecured(secure_stack):
    from probe.dev.stack import Stack, StackError
    stack = secure_stack[0]
    assert Stack(state_dir=stack.state_dir, ports="free").secure  # remembered
    with pytest.raises(StackError) as refused:
        Stack(state_dir=stack.state_dir, ports="free", secure=False)
    assert "probe stack down" in str(refused.value)
    config = stack.config()
    assert config["rpc_tls"][ENV]["ca"].endswith("rpc-ca.pem")
    for path in config["rpc_tls"][ENV].values():
        assert os.path.isfile(path)
    assert os.stat(stack.config_path).st_mode & 0o077 == 0  # it holds passwords
