"""Governance split by noun, typed results, one MySQL access policy, one stats reader
and the option checks (issue 17, items 2-4)."""

import json

import pymysql
import pytest

from probe.errors import ComponentUnavailable, ProbeError
from probe.governance import describe
from probe.governance.results import ConfigChange, ConfigVersion, NodeChange, NodeRow
from probe.options import check_number
from probe.settings import load_settings

from conftest import IDL


# -- typed results -------------------------------------------------------------------
def _row(**changes):
    fields = dict(service="S", address="127.0.0.1:9", live=True, weight=10, valid=1,
                  stored=True, problem=None, registered_at=1.5)
    fields.update(changes)
    return NodeRow(**fields)


def test_results_are_typed_and_read_as_the_dicts_they_replace():
    row = _row()
    assert row.weight == 10 and row["weight"] == 10 and row.get("nope") is None
    assert dict(row) == row.as_dict() and row == row.as_dict() and row.as_dict() == row
    assert list(row) == ["service", "address", "live", "weight", "valid", "stored", "problem",
                         "registered_at", "transport", "protocol", "ejected_by", "ejected_reasons"]
    assert json.loads(json.dumps(row.as_dict()))["address"] == "127.0.0.1:9"
    with pytest.raises(KeyError):
        row["as_dict"]  # attributes that are no fields are not keys
    with pytest.raises(Exception):
        row.weight = 3  # frozen
    assert row != _row(weight=11)


def test_people_read_the_same_sentences_in_the_cli_and_the_console():
    change = NodeChange(appkey="app", service="S", address="127.0.0.1:9", key="weight", old=10,
                        new=25, live=True, settings={})
    assert describe.node_change(change) == \
        "app S 127.0.0.1:9: weight 10 -> 25 (applied to the live node)"
    waiting = NodeChange(**dict(change.as_dict(), live=False))
    assert describe.node_change(waiting, with_appkey=False) == \
        "S 127.0.0.1:9: weight 10 -> 25 (stored in Redis; applies when the node registers)"
    set_ = ConfigChange(appkey="app", env="dev", key="k", action="set", old=None, new="1" * 70,
                        changed=True, version=3)
    assert describe.config_change_line(set_) == "app k: set to %s..., version 3" % ("1" * 57)
    assert describe.config_change_sentence(set_) == "config key k set to %s (version 3)" % ("1" * 70)
    gone = ConfigChange(**dict(set_.as_dict(), new=None, version=4))
    assert describe.config_change_sentence(gone) == "config key k deleted (version 4)"
    same = ConfigChange(**dict(set_.as_dict(), changed=False, version=None))
    assert describe.config_change_line(same) == "app k: unchanged"
    history = describe.history_rows([ConfigVersion(version=2, value={"a": 1}, changed_by="x",
                                                   changed_at="t", action="set", old_value=None,
                                                   deleted=False)])
    assert history[0]["value"] == '{"a": 1}'


def test_node_table_words_and_columns():
    rows = describe.node_rows([_row(), _row(address="127.0.0.1:10", live=False, valid=0,
                                            weight=None, problem="odd"),
                               _row(address="127.0.0.1:11", transport="framed",
                                    protocol="compact", ejected_by=2,
                                    ejected_reasons=["timeout", "reset"])])
    text = describe.table(rows, describe.NODE_COLUMNS)
    lines = text.splitlines()
    assert lines[0].split() == ["SERVICE", "ADDRESS", "STATE", "WEIGHT", "SWITCH", "DIALECT",
                                "HEALTH", "NOTE"]
    assert lines[1].split() == ["S", "127.0.0.1:9", "up", "10", "enabled", "ok"]
    assert lines[2].split() == ["S", "127.0.0.1:10", "down", "disabled", "ok", "odd"]
    assert lines[3].split() == ["S", "127.0.0.1:11", "up", "10", "enabled", "framed+compact",
                                "ejected", "by", "2", "consumer(s):", "timeout;", "reset"]
    assert describe.table([], describe.NODE_COLUMNS) == "(none)"
    assert [describe.ms(v) for v in (None, 0.1234, 12.34, 1234.5)] == ["-", "0.123", "12.3", "1234"]


# -- the option check ---------------------------------------------------------------
@pytest.mark.parametrize("value", [True, False, "3", None, float("nan"), [1]])
def test_check_number_refuses_what_is_no_number(value):
    with pytest.raises(ProbeError, match="bad read_timeout_s"):
        check_number("read_timeout_s", value, 0, "s", allow_equal=False)


def test_check_number_ranges_units_and_error_class():
    assert check_number("n", 5, 1, integer=True) == 5
    assert check_number("t", 0.5, 0, "s", allow_equal=False) == 0.5
    with pytest.raises(ProbeError, match=r"bad n 1\.5: give a whole number >= 1"):
        check_number("n", 1.5, 1, integer=True)
    with pytest.raises(ProbeError, match=r"bad t 0: give a number > 0 \(s\)"):
        check_number("t", 0, 0, "s", allow_equal=False)
    with pytest.raises(ProbeError, match=r"give a whole number from 1 to 10 \(connections\)"):
        check_number("c", 11, 1, "connections", maximum=10, integer=True)
    with pytest.raises(ValueError, match="bad w"):
        check_number("w", -1, 0, error=ValueError)


# -- one MySQL access policy --------------------------------------------------------
def _kill_own_connection(access):
    """The server drops the access's kept connection, as a restart or wait_timeout does."""
    settings = load_settings().mysql
    with access.connection.cursor() as cursor:
        cursor.execute("SELECT CONNECTION_ID()")
        own = cursor.fetchone()[0]
    root = pymysql.connect(host=settings.host, port=settings.port, user=settings.username,
                           password=settings.password, database=settings.database)
    try:
        with root.cursor() as cursor:
            cursor.execute("KILL %s", (own,))
    finally:
        root.close()


def test_every_mysql_user_reconnects_once_after_the_server_dropped_it(stack, appkey):
    from probe.stores.appkeys import AppkeyStore
    from probe.stores.confighistory import ConfigHistory
    from probe.console.users import UserStore
    settings = load_settings().mysql
    store, users, history = AppkeyStore(settings), UserStore(settings), ConfigHistory(settings)
    try:
        for access, call in ((store.db, lambda: store.require(appkey)),
                             (users._db, lambda: users.verify("nobody", "x" * 8)),
                             (history.db, lambda: history.history("dev", appkey, "k"))):
            call()
            first = access.connection
            _kill_own_connection(access)
            call()  # the dead connection is replaced, the call succeeds
            assert access.connection is not None and access.connection is not first
    finally:
        store.close()
        users.close()
        history.close()


def test_an_unreachable_mysql_is_the_same_named_error_everywhere():
    import socket
    from probe.stores.appkeys import AppkeyStore
    from probe.stores.confighistory import ConfigHistory
    from probe.console.users import UserStore
    from probe.settings import MysqlSettings
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]  # closed again: nothing listens there
    settings = MysqlSettings("127.0.0.1", port, "probe", "secret", "probe", None)
    for call in (lambda: AppkeyStore(settings, 1.0).require("some_app"),
                 lambda: UserStore(settings, 1.0).verify("ann", "password"),
                 lambda: ConfigHistory(settings, 1.0).history("dev", "some_app", "k")):
        with pytest.raises(ComponentUnavailable, match="MySQL at 127.0.0.1:%d/probe is "
                                                       "unreachable" % port):
            call()


# -- one stats reader ---------------------------------------------------------------
def test_one_stats_reader_drops_negative_and_malformed_counts(stack):
    import redis as redis_lib
    from probe.console.figures import node_figures
    from probe.naming import stats_key
    from probe.stores.stats import WIDTH, read_entries, read_stats
    settings = load_settings()
    client = redis_lib.Redis(host=settings.redis.host, port=settings.redis.port)
    now, appkey = 2000005, "negative_app"
    key = stats_key("dev", appkey, "server", 2000000)
    buckets = [0] * WIDTH
    buckets[4] = 20
    good = json.dumps({"count": 20, "sum": 0.02, "buckets": buckets})
    client.hset(key, mapping={
        "S|say|127.0.0.1:1|ok|w": good,
        "S|say|127.0.0.1:1|ok|neg": json.dumps({"count": -1000, "sum": -5.0, "buckets": buckets}),
        "S|say|127.0.0.1:1|timeout|nb": '{"count": 5, "sum": 1, "buckets": null}',
        "S|say|127.0.0.1:1|ok|list": "[1, 2]",
        "S|say|127.0.0.1:1|ok|huge": '{"count": 1e400, "sum": 0, "buckets": []}',
        "S|say|127.0.0.1:1|ok|negb": json.dumps({"count": 1, "sum": -3, "buckets": [-9] * WIDTH}),
    })
    client.expire(key, 60)
    try:
        entries = sorted(read_entries(client, "dev", appkey, [2000000]), key=lambda e: e.calls)
        assert [(e.status, e.calls, e.buckets is None) for e in entries] == [
            ("ok", 1, False), ("timeout", 5, True), ("ok", 20, False)]
        assert entries[0].seconds == 0.0 and entries[0].buckets == [0] * WIDTH
        rows = read_stats(client, "dev", appkey, minutes=1, now=now)
        assert [(r["calls"], r["errors"]) for r in rows] == [(26, 5)]
        cell = node_figures(client, "dev", appkey, now=now, window=10)[("S", "127.0.0.1:1")]
        assert cell["calls"] == 26  # the same entries: negatives dropped in both
    finally:
        client.delete(key)
        client.close()


def test_the_stats_reader_names_an_unreachable_redis():
    import socket
    import redis as redis_lib
    from probe.stores.stats import read_stats
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]
    client = redis_lib.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
    with pytest.raises(ComponentUnavailable, match="cannot read call stats of app"):
        read_stats(client, "dev", "app")


# -- the façade and its nouns -------------------------------------------------------
def test_admin_nodes_carry_registration_time_and_the_facade_shares_connections(
        stack, appkey, providers):
    from probe.admin import Admin
    provider = providers(appkey, name="a")
    with Admin() as admin:
        rows = admin.nodes(appkey)
        assert [(r.address, r.live) for r in rows] == [(provider.address, True)]
        assert rows[0].registered_at is not None and rows[0].registered_at > 1e9
        assert admin.node_ops.backends is admin.appkey_ops.backends is admin.config_ops.backends
        admin.require_appkey(appkey)
        assert admin.zk is admin.backends.zk


# -- options as value objects ------------------------------------------------------
def test_value_objects_check_their_fields_once_with_units_in_the_names():
    from probe.options import (EjectionPolicy, MetricsOptions, ProviderLimits, ProviderTimeouts,
                               RetryPolicy)
    limits = ProviderLimits(max_connections=5, idle_timeout_s=2)
    assert limits.idle_timeout_s == 2.0 and isinstance(limits.idle_timeout_s, float)
    assert ProviderTimeouts().connect_timeout_ms == 3000
    for bad in (dict(max_connections=0), dict(read_timeout_s=True), dict(worker_threads=2.5),
                dict(max_message_bytes=10)):
        with pytest.raises(ProbeError):
            ProviderLimits(**bad)
    with pytest.raises(ProbeError, match="bad stats_interval_s 11"):
        MetricsOptions(stats_interval_s=11)
    with pytest.raises(ProbeError, match="metrics_addr"):
        MetricsOptions(addr="a b")
    with pytest.raises(ProbeError, match="bad retries -1"):
        RetryPolicy(retries=-1)
    with pytest.raises(ProbeError, match="bad eject_backoff_s 0"):
        EjectionPolicy(eject_backoff_s=0)


def test_flat_keywords_resolve_into_the_objects_and_both_ways_is_a_type_error():
    from probe.options import MetricsOptions, ProviderLimits
    made = ProviderLimits.resolve(None, max_connections=7, idle_timeout=3)
    assert made == ProviderLimits(max_connections=7, idle_timeout_s=3.0)
    with pytest.raises(ProbeError, match="bad idle_timeout 0"):  # named as the caller wrote it
        ProviderLimits.resolve(None, idle_timeout=0)
    given = ProviderLimits(max_connections=9)
    assert ProviderLimits.resolve(given, max_connections=10000) is given  # defaults: no clash
    with pytest.raises(TypeError, match="max_connections given twice"):
        ProviderLimits.resolve(given, max_connections=8)
    with pytest.raises(TypeError, match="limits must be a probe.options.ProviderLimits"):
        ProviderLimits.resolve({"max_connections": 8})
    with pytest.raises(TypeError, match="stats_interval given twice"):
        MetricsOptions.resolve(MetricsOptions(), stats_interval=2)


def test_start_service_and_build_client_take_the_value_objects(stack, appkey, providers):
    from probe.client import build_client
    from probe.options import (EjectionPolicy, MetricsOptions, ProviderLimits, ProviderTimeouts,
                               RetryPolicy)
    from probe.server import start_service
    from probe.demo import DemoServiceHandler
    provider = start_service(IDL, appkey, "DemoService", DemoServiceHandler(), port=0, block=False,
                             limits=ProviderLimits(max_connections=3, read_timeout_s=2.5),
                             timeouts=ProviderTimeouts(drain_timeout_s=1.5, shutdown_grace_s=0.1),
                             metrics=MetricsOptions(stats_interval_s=2.0))
    try:
        assert provider.limits["max_connections"] == 3 and provider.limits["read_timeout"] == 2.5
        assert provider.drain_timeout == 1.5 and provider.shutdown_grace == 0.1
        assert provider.metrics.stats_interval == 2.0
    finally:
        provider.stop()
    flat = providers(appkey, name="flat", max_connections=4, drain_timeout=2.0)
    assert flat.options["limits"].max_connections == 4
    assert flat.options["timeouts"].drain_timeout_s == 2.0
    with pytest.raises(TypeError, match="max_connections given twice"):
        start_service(IDL, appkey, "DemoService", object(), port=0, block=False,
                      limits=ProviderLimits(), max_connections=5)
    client = build_client(IDL, appkey, "DemoService", 2000, retry=RetryPolicy(retries=0),
                          ejection=EjectionPolicy(eject_after=5, eject_backoff_s=0.5),
                          metrics=MetricsOptions(enabled=False))
    try:
        assert client.say() == "hello world"
        assert (client.retries, client.eject_after, client.eject_backoff) == (0, 5, 0.5)
        # The ejection policy lands in node health (main's engine since issue 18).
        policy = client.health.policy
        assert (policy.consecutive_failures, policy.base_ejection_s) == (5, 0.5)
    finally:
        client.close()
    with pytest.raises(TypeError, match="retries given twice"):
        build_client(IDL, appkey, "DemoService", retries=1, retry=RetryPolicy())



def test_cli_prints_the_typed_results_as_json_and_as_tables(stack, appkey, providers):
    from conftest import run_probe
    provider = providers(appkey, name="cli")
    listed = json.loads(run_probe("nodes", appkey, "--json").stdout)
    assert [(r["address"], r["live"], r["weight"]) for r in listed] == [(provider.address, True, 10)]
    assert listed[0]["registered_at"] > 1e9
    changed = run_probe("node", "weight", appkey, "DemoService", provider.address, "12",
                        "--by", "house").stdout
    assert changed.strip() == "%s DemoService %s: weight 10 -> 12 (applied to the live node)" % (
        appkey, provider.address)
    audit = json.loads(run_probe("audit", appkey, "--json").stdout)
    assert [(a["changed_by"], a["action"], a["new"]) for a in audit] == [("house", "weight", "12")]
    table = run_probe("nodes", appkey).stdout.splitlines()
    assert table[0] == "env dev, appkey %s" % appkey
    assert table[2].split()[:5] == ["DemoService", provider.address, "up", "12", "enabled"]


def test_aio_and_sync_share_the_option_resolution():
    """Merged with main: the asyncio provider and client take the same value objects,
    through the same resolution functions; max_inflight lives in ProviderLimits too."""
    from probe.aio.server import AsyncProvider
    from probe.client import client_choices
    from probe.idl import load_service
    from probe.options import EjectionPolicy, ProviderLimits, ProviderTimeouts, RetryPolicy
    from probe.server import Provider

    limits = ProviderLimits(max_connections=7, max_inflight=3,
                            max_inflight_per_method={"say": 1})
    for cls in (AsyncProvider, Provider):
        provider = cls(IDL, "demo_app", "DemoService", object(), port=0, limits=limits,
                       timeouts=ProviderTimeouts(drain_timeout_s=2.0), transport="framed")
        assert provider.limits["max_connections"] == 7 and provider.drain_timeout == 2.0
        assert provider.limiter is not None and provider.transport == "framed"
        flat = cls(IDL, "demo_app", "DemoService", object(), port=0, max_inflight=2)
        assert flat.options["limits"].max_inflight == 2 and flat.limiter is not None
        with pytest.raises(TypeError, match="given twice"):
            cls(IDL, "demo_app", "DemoService", object(), port=0, limits=ProviderLimits(),
                max_inflight=5)
        with pytest.raises(ProbeError, match="max_inflight_per_method names unknown"):
            cls(IDL, "demo_app", "DemoService", object(), port=0,
                limits=ProviderLimits(max_inflight_per_method={"nope": 1}))
    with pytest.raises(TypeError, match="worker_threads"):
        AsyncProvider(IDL, "demo_app", "DemoService", object(), port=0, worker_threads=4)

    service = load_service(IDL, "DemoService")
    base = dict(socket_timeout=500, connect_timeout=None, balancer="weighted_random",
                retries=2, idempotent=False, eject_after=None, eject_backoff=None, health=True,
                retry_budget=True, timeouts=None, max_idle=64, warmup=0.0, zk_timeout=3.0,
                observe=None, metrics=False, metrics_port=None, metrics_addr=None,
                stats_interval=None, stats_ttl=None, slow_call_ms=None, retry=None,
                ejection=None)
    choice = client_choices(service, **dict(base, retry=RetryPolicy(retries=0),
                                            ejection=EjectionPolicy(eject_after=4,
                                                                    eject_backoff_s=0.25)))
    assert choice.options["retries"] == 0
    assert (choice.policy.consecutive_failures, choice.policy.base_ejection_s) == (4, 0.25)
    only_after = client_choices(service, **dict(base, eject_after=6)).policy
    default = client_choices(service, **base).policy
    assert only_after.consecutive_failures == 6
    assert only_after.base_ejection_s == default.base_ejection_s
    with pytest.raises(TypeError, match="given twice"):
        client_choices(service, **dict(base, eject_after=6, ejection=EjectionPolicy()))
    with pytest.raises(ProbeError, match="needs node health"):
        client_choices(service, **dict(base, health=False, balancer="p2c_ewma"))
