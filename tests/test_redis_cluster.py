"""Node settings in a Redis cluster (`cluster: 1`): the same calls as one server."""

import json

import pytest
import yaml

from conftest import wait_for
from probe import naming
from probe.admin import Admin
from probe.stores.nodestore import NodeStore
from probe.settings import load_settings


@pytest.fixture(scope="module")
def cluster_config(stack, tmp_path_factory):
    from probe.testing import RedisClusterStack
    state = tmp_path_factory.mktemp("redis-cluster")
    cluster = RedisClusterStack(str(state))
    cluster.up()
    config = yaml.safe_load(open(load_settings().path))
    config["redis"]["dev"] = {"cluster": 1, "password": None, "startup_nodes": cluster.startup_nodes}
    path = str(state / "cluster.yml")
    yaml.safe_dump(config, open(path, "w"))
    try:
        yield path
    finally:
        cluster.down()


def test_provider_and_admin_use_the_cluster(appkey, providers, clients, cluster_config):
    settings = load_settings(cluster_config)
    assert settings.redis.cluster and len(settings.redis.startup_nodes) == 3
    provider = providers(appkey, name="a", config_path=cluster_config)
    store = NodeStore(settings.redis, "dev")
    field = naming.settings_field(appkey, "dev", "DemoService", provider.host, provider.port)
    assert store.get(field) == naming.NodeSettings(provider.host, provider.port, 10, 1)
    with Admin(config_path=cluster_config) as admin:
        admin.set_weight(appkey, "DemoService", provider.address, 55)
        assert json.loads(admin.zk.client.get(provider.path)[0])["weight"] == 55
        assert [row["weight"] for row in admin.nodes(appkey)] == [55]
    assert store.get(field).weight == 55
    raw = store.redis.hget(naming.settings_hash("dev"), field)
    assert json.loads(raw) == {"host": provider.host, "port": provider.port, "weight": 55, "valid": 1}
    client = clients(appkey)
    wait_for(lambda: [n.weight for n in client.watcher.table.nodes] == [55], message="weight 55")
