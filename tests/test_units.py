"""Fast tests of the pure parts: naming, settings, balancers."""

import random
from collections import Counter

import pytest

from probe import naming
from probe.routing.balancer import (LeastInFlight, Node, RoutingTable, SmoothRoundRobin, WeightedRandom,
                            make_balancer, warmed_weight)
from probe.errors import (ConfigError, InvalidAppkey, InvalidNodeAddress, InvalidServiceName,
                          InvalidWeight, NoAvailableNode, ProbeError)
from probe.naming import NodeSettings
from probe.settings import choose_env, load_settings, clear_cache


def node(name, weight=10, valid=1, registered_at=0.0):
    return Node(name, "10.0.0.1", 9000 + len(name), weight, valid, registered_at)


# -- naming -----------------------------------------------------------------
def test_paths_fields_and_names():
    assert naming.appkey_path("dev", "hello_www") == "/services/dev/hello_www"
    assert naming.node_path("dev", "hello_www", "DemoService", "10.0.0.5", 8081) == \
        "/services/dev/hello_www/DemoService_10.0.0.5_8081"
    assert naming.settings_hash("prod") == "thriftprobe_prod"
    assert naming.settings_field("hello_www", "dev", "DemoService", "10.0.0.5", 8081) == \
        "hello_www|dev|DemoService|10.0.0.5|8081"
    assert naming.parse_node_name("Demo_Service_10.0.0.5_8081") == ("Demo_Service", "10.0.0.5", 8081)
    assert naming.is_node_of("DemoService_10.0.0.5_8081", "DemoService")
    assert not naming.is_node_of("DemoService2_10.0.0.5_8081", "DemoService")
    assert naming.parse_node_name("garbage") is None
    assert naming.parse_settings_field("a|dev|S|1.2.3.4|80") == ("a", "dev", "S", "1.2.3.4", 80)


@pytest.mark.parametrize("bad", ["", "a-b", "a b", "ä", None, 5])
def test_bad_service_names(bad):
    with pytest.raises(InvalidServiceName):
        naming.check_service_name(bad)


@pytest.mark.parametrize("bad", ["", "a/b", "a|b", "..", None, "x" * 129])
def test_bad_appkeys(bad):
    with pytest.raises(InvalidAppkey):
        naming.check_appkey(bad)


@pytest.mark.parametrize("bad", [-1, 1001, 1.5, "ten", True, None, "1e3"])
def test_bad_weights(bad):
    with pytest.raises(InvalidWeight):
        naming.check_weight(bad)


def test_good_weights():
    assert naming.check_weight("30") == 30 and naming.check_weight(0) == 0
    assert naming.check_weight(1000) == 1000


@pytest.mark.parametrize("bad", ["10.0.0.1", "10.0.0.1:", ":80", "10.0.0.1:0", "10.0.0.1:70000", "a:b"])
def test_bad_addresses(bad):
    with pytest.raises(InvalidNodeAddress):
        naming.parse_address(bad)


def test_node_settings_json_round_trip_and_rejects():
    settings = NodeSettings("10.0.0.1", 8081)
    assert NodeSettings.from_json(settings.to_json()) == NodeSettings("10.0.0.1", 8081, 10, 1)
    for raw in (b"not json", b"[]", b'{"host": "h"}', b'{"host": "h", "port": "80"}',
                b'{"host": "h", "port": 80, "weight": -1}', b'{"host": 1, "port": 80}'):
        with pytest.raises(ValueError):
            NodeSettings.from_json(raw)


# -- settings --------------------------------------------------------------------
def write(tmp_path, text):
    path = tmp_path / "config.yml"
    path.write_text(text)
    return str(path)


def test_env_from_probe_env_then_hostname(monkeypatch, tmp_path):
    monkeypatch.delenv("PROBE_ENV", raising=False)
    assert choose_env({}, "x", hostname="prod12")[0] == "prod"
    assert choose_env({}, "x", hostname="prodx")[0] == "dev"
    assert choose_env({"env_rules": [{"pattern": "^stg", "env": "staging"}]}, "x", hostname="stg1")[0] == "staging"
    monkeypatch.setenv("PROBE_ENV", "qa")
    assert choose_env({}, "x", hostname="prod12")[0] == "qa"


def test_missing_section_names_file_and_key(monkeypatch, tmp_path):
    clear_cache()
    monkeypatch.setenv("PROBE_ENV", "prod")
    path = write(tmp_path, "zkserver:\n  dev: {host: h, port: 1}\n")
    settings = load_settings(path)
    with pytest.raises(ConfigError) as error:
        settings.zookeeper
    assert path in str(error.value) and "zkserver.prod" in str(error.value)


def test_zookeeper_ensemble_and_redis_cluster(monkeypatch, tmp_path):
    clear_cache()
    monkeypatch.setenv("PROBE_ENV", "dev")
    path = write(tmp_path, """
zkserver:
  dev: {hosts: "a:2181,b:2181,c:2181"}
redis:
  dev: {password: s, cluster: 1, startup_nodes: [{host: r1, port: 7000}, {host: r2, port: 7001}]}
mysql:
  dev: {host: m, port: "3306", username: u, password: p, database: d}
""")
    settings = load_settings(path)
    assert settings.zookeeper.hosts == "a:2181,b:2181,c:2181"
    assert settings.redis.cluster and settings.redis.startup_nodes == (("r1", 7000), ("r2", 7001))
    assert settings.mysql.port == 3306


def test_bad_values_are_named(monkeypatch, tmp_path):
    clear_cache()
    monkeypatch.setenv("PROBE_ENV", "dev")
    settings = load_settings(write(tmp_path, "mysql:\n  dev: {host: m, port: abc}\n"))
    with pytest.raises(ConfigError) as error:
        settings.mysql
    assert "mysql.dev.port" in str(error.value)
    with pytest.raises(ConfigError):
        load_settings(str(tmp_path / "missing.yml"))


def test_packaged_config_targets_the_dev_stack(monkeypatch):
    clear_cache()
    monkeypatch.delenv("PROBE_CONFIG", raising=False)
    monkeypatch.setenv("PROBE_ENV", "dev")
    settings = load_settings()
    assert settings.zookeeper.hosts == "127.0.0.1:22181"
    assert settings.redis.port == 26379 and settings.mysql.port == 23306
    # The local stack is loopback-only: so are the providers of its config.
    monkeypatch.delenv("PROBE_ADVERTISE_HOST", raising=False)
    assert settings.advertise_host == "127.0.0.1"
    clear_cache()


# -- balancers -------------------------------------------------------------------
def test_table_skips_disabled_and_zero_weight():
    table = RoutingTable([node("a"), node("b", valid=0), node("c", weight=0)])
    assert [n.name for n in table.nodes] == ["a"]
    with pytest.raises(NoAvailableNode) as error:
        WeightedRandom().pick(RoutingTable([node("b", valid=0)], describe="env=dev appkey=k service=S"))
    assert "appkey=k" in str(error.value) and "none enabled" in str(error.value)
    with pytest.raises(NoAvailableNode):
        WeightedRandom().pick(RoutingTable([]))


def test_weighted_random_follows_weights():
    table = RoutingTable([node("a", 10), node("b", 30)])
    balancer = WeightedRandom(random.Random(7))
    counts = Counter(balancer.pick(table).name for _ in range(40000))
    # Binomial(40000, .25): sd 86.6; +-6 sd.
    assert 9480 <= counts["a"] <= 10520


@pytest.mark.parametrize("weights", [[1], [10, 30], [3, 0, 7, 1, 9], [1] * 50 + [1000], list(range(1, 200))])
def test_alias_table_gives_exact_probabilities(weights):
    from probe.routing.balancer import alias_table
    table = alias_table(weights)
    share = [0.0] * len(weights)
    for slot, (threshold, other) in enumerate(table):
        share[slot] += threshold
        share[other] += 1.0 - threshold
    total = float(sum(weights))
    for index, weight in enumerate(weights):
        assert abs(share[index] / len(weights) - weight / total) < 1e-9


def test_weighted_random_exclude():
    table = RoutingTable([node("a"), node("b"), node("c")])
    picks = {WeightedRandom().pick(table, {"a", "b"}).name for _ in range(200)}
    assert picks == {"c"}


def test_smooth_round_robin_is_nginx_sequence():
    table = RoutingTable([node("a", 5), node("b", 1), node("c", 1)])
    balancer = SmoothRoundRobin()
    sequence = [balancer.pick(table).name for _ in range(14)]
    assert sequence == list("aabacaa") * 2


def test_smooth_round_robin_exact_counts_per_cycle():
    weights = {"a": 3, "b": 7, "c": 10}
    table = RoutingTable([node(n, w) for n, w in weights.items()])
    balancer = SmoothRoundRobin()
    counts = Counter(balancer.pick(table).name for _ in range(20 * 5))
    assert counts == {n: w * 5 for n, w in weights.items()}


def test_round_robin_large_table_exact_shares_and_flat_cost():
    weights = [1 + (i % 7) for i in range(500)]
    table = RoutingTable([node("n%03d" % i, w) for i, w in enumerate(weights)])
    balancer = SmoothRoundRobin()
    total = sum(weights)
    counts = Counter(balancer.pick(table).name for _ in range(total * 2))
    assert counts == {"n%03d" % i: 2 * w for i, w in enumerate(weights)}
    # Smooth: a node's turns are spread over the cycle, never bunched up.
    sequence = [balancer.pick(table).name for _ in range(total)]
    heavy = [i for i, name in enumerate(sequence) if name == "n006"]  # weight 7
    gaps = [b - a for a, b in zip(heavy, heavy[1:])]
    assert min(gaps) > total / 7 / 3


def test_round_robin_large_table_exclude():
    table = RoutingTable([node("n%03d" % i) for i in range(100)])
    balancer = SmoothRoundRobin()
    skip = {"n%03d" % i for i in range(99)}
    assert {balancer.pick(table, skip).name for _ in range(20)} == {"n099"}


def test_least_inflight_prefers_idle_nodes():
    table = RoutingTable([node("busy"), node("idle")])
    load = {"busy": 50, "idle": 0}
    balancer = LeastInFlight(lambda n: load[n.name], random.Random(3))
    counts = Counter(balancer.pick(table).name for _ in range(1000))
    assert counts["idle"] == 1000


def test_least_inflight_splits_by_weight_at_zero_load():
    # Calls one at a time: nothing in flight, so every pick is a tie and the
    # split must follow the weights (10:30), as Dubbo's LeastActive does.
    table = RoutingTable([node("a", 10), node("b", 30)])
    balancer = LeastInFlight(lambda n: 0, random.Random(5))
    counts = Counter(balancer.pick(table).name for _ in range(8000))
    assert 1700 < counts["a"] < 2300 and counts["a"] + counts["b"] == 8000


def test_least_inflight_splits_equal_load_by_weight_among_many():
    # In flight in proportion to weight: every node is equally loaded per unit of
    # weight, so every pick is a tie.
    weights = {"a": 10, "b": 20, "c": 30, "d": 40}
    table = RoutingTable([node(name, w) for name, w in weights.items()])
    balancer = LeastInFlight(lambda n: weights[n.name] // 10 * 3, random.Random(11))
    counts = Counter(balancer.pick(table).name for _ in range(10000))
    for name, weight in weights.items():
        assert abs(counts[name] - 100 * weight) < 400, counts


def test_least_inflight_weighs_load_by_weight():
    # 2 in flight on weight 30 is a lighter load than 1 on weight 10.
    table = RoutingTable([node("light", 10), node("heavy", 30)])
    load = {"light": 1, "heavy": 2}
    balancer = LeastInFlight(lambda n: load[n.name], random.Random(2))
    assert {balancer.pick(table).name for _ in range(500)} == {"heavy"}


def test_warmup_ramps_from_one_to_weight():
    assert warmed_weight(100, 0, 60) == 1
    assert warmed_weight(100, 30, 60) == 50
    assert warmed_weight(100, 60, 60) == 100
    assert warmed_weight(100, 5, 0) == 100
    table = RoutingTable([node("new", 100, registered_at=1000.0), node("old", 100, registered_at=0.0)],
                         now=1015.0, warmup=60)
    assert table.weights == (25, 100) and table.refresh_at is not None


def test_unknown_balancer_is_refused():
    with pytest.raises(ProbeError):
        make_balancer("fastest")



# -- validation that cannot be slipped past (naming) -----------------------------
from probe.errors import InvalidEnv, InvalidHost, InvalidNodeData  # noqa: E402
from probe.routing.watcher import _snapshot_node  # noqa: E402


@pytest.mark.parametrize("good", ["127.0.0.1", "10.0.0.5", "::1", "2001:db8::7", "node-1",
                                  "a.example.com", "x" * 63 + ".com"])
def test_hosts_accepted(good):
    assert naming.check_host(good) == good
    assert naming.parse_node_name(naming.node_name("DemoService", good, 80)) == \
        ("DemoService", good, 80)


@pytest.mark.parametrize("bad", ["", "bad_host", "a/b", "a|b", "h\n", "127.0.0.1\n", " h", "h.",
                                 "-h", "h-", "x" * 64, ("a." * 127) + "bc", "999.1.1.1", "1.2.3",
                                 "fe80::1%eth0", "h\u00e9st", "\uff11.2.3.4", None, 5, b"h"])
def test_hosts_refused_by_every_builder(bad):
    with pytest.raises(InvalidHost):
        naming.check_host(bad)
    with pytest.raises(InvalidNodeAddress):  # InvalidHost is one
        naming.node_name("DemoService", bad, 80)
    with pytest.raises(InvalidNodeAddress):
        naming.node_path("dev", "app", "DemoService", bad, 80)
    with pytest.raises(InvalidNodeAddress):
        naming.settings_field("app", "dev", "DemoService", bad, 80)


@pytest.mark.parametrize("bad", [0, 65536, -1, True, "80\n", "\uff18\uff10", "\u0668\u0660", 8.0])
def test_ports_refused_by_builders(bad):
    with pytest.raises(InvalidNodeAddress):
        naming.node_name("DemoService", "127.0.0.1", bad)


@pytest.mark.parametrize("bad", ["DemoService\n", "S" * 129, "Dém", "\u0661"])
def test_service_names_full_match_ascii_and_length(bad):
    with pytest.raises(InvalidServiceName):
        naming.check_service_name(bad)
    assert naming.check_service_name("S" * 128)


@pytest.mark.parametrize("bad", ["app\n", "x" * 129, "\u0661app"])
def test_appkeys_full_match_ascii_and_length(bad):
    with pytest.raises(InvalidAppkey):
        naming.check_appkey(bad)


@pytest.mark.parametrize("bad", ["dev\n", "e" * 65, "", "d/v", "d\u0661", None])
def test_bad_env_is_invalid_env_not_invalid_appkey(bad):
    with pytest.raises(InvalidEnv) as refused:
        naming.check_env(bad)
    assert not isinstance(refused.value, InvalidAppkey)


@pytest.mark.parametrize("bad", ["25\n", " 25", "\uff12\uff15", "\u0662\u0665", "+5", "1_0",
                                 "00001", 10 ** 400])
def test_weights_full_match_ascii(bad):
    with pytest.raises(InvalidWeight):
        naming.check_weight(bad)


@pytest.mark.parametrize("bad", ["127.0.0.1:80\n", "127.0.0.1:\uff18\uff10", "bad_host:80",
                                 "a/b:80", "[fe80::1%eth0]:80", "[::1]:0", ("a" * 254) + ":80"])
def test_addresses_full_match(bad):
    with pytest.raises(InvalidNodeAddress):
        naming.parse_address(bad)
    assert naming.parse_address("[::1]:8081") == ("::1", 8081)


def test_changed_by_and_description_fit_their_columns():
    assert naming.check_changed_by("b" * 128)
    for bad in ("b" * 129, "", "a\nb", "tab\there", None):
        with pytest.raises(ProbeError):
            naming.check_changed_by(bad)
    assert naming.check_description("") == "" and naming.check_description("d" * 255)
    with pytest.raises(ProbeError):
        naming.check_description("d" * 256)


def test_parsers_refuse_what_builders_refuse():
    assert naming.parse_node_name("DemoService_127.0.0.1_\uff18\uff10") is None
    assert naming.parse_node_name("DemoService_127.0.0.1_80\n") is None
    assert naming.parse_node_name("DemoService_127.0.0.1_70000") is None
    assert naming.parse_node_name(b"DemoService_127.0.0.1_80") is None
    assert naming.parse_settings_field("a|dev|S|1.2.3.4|\u0668\u0660") is None
    assert naming.parse_settings_field("a|dev|S|bad_host|80") is None
    assert naming.parse_settings_field("a|dev\n|S|1.2.3.4|80") is None


@pytest.mark.parametrize("raw", [
    b'{"host": "127.0.0.1", "port": 80, "weight": ' + b"9" * 400 + b"}",
    b'{"host": "127.0.0.1", "port": 80, "weight": 1001}',
    b'{"host": "127.0.0.1", "port": 80, "weight": 1e400}',
    b'{"host": "127.0.0.1", "port": 80, "weight": NaN}',
    b'{"host": "127.0.0.1", "port": 80, "valid": 2}',
    b'{"host": "127.0.0.1", "port": 80, "valid": true}',
    b'{"host": "bad_host", "port": 80}',
    b'{"host": "127.0.0.1", "port": 0}',
    b"[" * 2000 + b"]" * 2000,
    b'{"a": ' * 3000 + b"1" + b"}" * 3000,
    b"\xff\xfe\x00",
    b'"a string"', b"null", b"12",
    b'{"host": "127.0.0.1", "port": 80, "pad": "' + b"x" * 5000 + b'"}',
    None, 12,
])
def test_hostile_node_data_raises_one_named_error(raw):
    with pytest.raises(InvalidNodeData) as refused:
        NodeSettings.from_json(raw)
    assert isinstance(refused.value, ValueError)  # older `except ValueError` still catch it
    assert len(str(refused.value)) < 300          # never echoes the hostile input whole


def test_node_data_must_name_its_own_address():
    name = "DemoService_10.0.0.2_8081"
    assert naming.parse_node_data(name, NodeSettings("10.0.0.2", 8081, 5, 0).to_bytes()) == \
        NodeSettings("10.0.0.2", 8081, 5, 0)
    for host, port in (("elsewhere", 443), ("10.0.0.2", 443), ("10.0.0.3", 8081)):
        with pytest.raises(InvalidNodeData):
            naming.parse_node_data(name, NodeSettings(host, port).to_bytes())
    with pytest.raises(InvalidNodeData):
        naming.parse_node_data("garbage", NodeSettings("10.0.0.2", 8081).to_bytes())


def test_snapshot_entries_are_checked_like_znode_data():
    good = {"name": "DemoService_127.0.0.1_80", "host": "127.0.0.1", "port": 80, "weight": 10,
            "valid": 1, "registered_at": 5.0}
    assert _snapshot_node(good, "DemoService") == Node(*[good[k] for k in (
        "name", "host", "port", "weight", "valid", "registered_at")])
    for bad in (dict(good, host="elsewhere"), dict(good, port=81), dict(good, weight=10 ** 400),
                dict(good, valid="1"), dict(good, registered_at="now"),
                dict(good, registered_at=float("nan")), dict(good, name="Other_127.0.0.1_80"),
                {"name": good["name"]}, "text", None):
        with pytest.raises((ValueError, KeyError, TypeError)):
            _snapshot_node(bad, "DemoService")


def test_advertise_host_is_checked_when_read(monkeypatch, tmp_path):
    path = write(tmp_path, "advertise_host: bad_host\nzkserver: {dev: {host: h, port: 1}}\n")
    monkeypatch.delenv("PROBE_ADVERTISE_HOST", raising=False)
    settings = load_settings(path, "dev")
    with pytest.raises(InvalidHost) as refused:
        settings.advertise_host
    assert path in str(refused.value)
    monkeypatch.setenv("PROBE_ADVERTISE_HOST", "a/b")
    with pytest.raises(InvalidHost) as refused:
        settings.advertise_host
    assert "PROBE_ADVERTISE_HOST" in str(refused.value)
    monkeypatch.setenv("PROBE_ADVERTISE_HOST", "127.0.0.1")
    assert settings.advertise_host == "127.0.0.1"


def test_bad_env_from_probe_env_is_invalid_env(monkeypatch, tmp_path):
    path = write(tmp_path, "zkserver: {dev: {host: h, port: 1}}\n")
    monkeypatch.setenv("PROBE_ENV", "dev\n")
    clear_cache()
    with pytest.raises(InvalidEnv):
        load_settings(path)
    clear_cache()


def test_admin_connect_timeout_is_milliseconds(monkeypatch, tmp_path):
    from probe.admin import Admin
    path = write(tmp_path, "zkserver: {dev: {host: h, port: 1}}\n")
    admin = Admin(config_path=path, env="dev", connect_timeout=1500)
    assert admin.connect_timeout == 1500 and admin._timeout == 1.5
    assert Admin(config_path=path, env="dev").connect_timeout == 3000
    for bad in (0, -5, True, "3000"):
        with pytest.raises(ProbeError):
            Admin(config_path=path, env="dev", connect_timeout=bad)
