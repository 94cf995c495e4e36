"""The config center against the real stack: live reads, callbacks, the local backup,
the resync, concurrent writers, history and rollback, refusals, and a ZooKeeper
rebuilt from scratch."""

import json
import logging
import os
import threading

import pytest
from kazoo.client import KazooClient

from conftest import run_probe, wait_for
from probe import naming
from probe.configcenter import MAX_VALUE_BYTES, canonical_text, live_config, parse_value
from probe.errors import (ComponentUnavailable, ConfigUnavailable, InvalidAppkey, InvalidConfigKey,
                          InvalidConfigValue, UnknownAppkey, UnknownConfigKey)
from probe.settings import load_settings


# -- pure logic ----------------------------------------------------------------------

@pytest.mark.parametrize("text, value", [
    ("42", 42), ("-1.5", -1.5), ('"text"', "text"), ("[1, 2]", [1, 2]),
    ('{"b": 1, "a": [true, null]}', {"a": [True, None], "b": 1}), ("true", True),
])
def test_values_are_json(text, value):
    assert parse_value(text)[0] == value
    assert parse_value(text.encode())[1] == canonical_text(value)


@pytest.mark.parametrize("text", ["{bad", "text", "NaN", "[1, Infinity]", "", "1 2", "null",
                                  "[" * 100000 + "]" * 100000])
def test_values_that_are_not_json_are_refused(text):
    with pytest.raises(InvalidConfigValue):
        parse_value(text)


def test_value_size_and_encoding_limits():
    with pytest.raises(InvalidConfigValue, match="limit"):
        parse_value('"%s"' % ("x" * MAX_VALUE_BYTES))
    with pytest.raises(InvalidConfigValue, match="UTF-8"):
        parse_value(b'"\xff"')
    assert parse_value('"%s"' % ("x" * (MAX_VALUE_BYTES - 2))) is not None
    assert MAX_VALUE_BYTES <= 1024 * 1024


@pytest.mark.parametrize("key", ["db.pool_size", "A-1", "x" * 128, "_"])
def test_good_config_keys(key):
    assert naming.check_config_key(key) == key
    assert naming.config_key_path("dev", "app", key) == "/configs/dev/app/" + key


@pytest.mark.parametrize("key", ["", "a/b", "x" * 129, "..", ".", "sp ace", "ü", None, 5,
                                 "nl\n", "x\n"])
def test_bad_config_keys(key):
    with pytest.raises(InvalidConfigKey):
        naming.check_config_key(key)


def test_backup_file_name():
    assert naming.config_backup_file("/tmp/b/", "dev", "app") == "/tmp/b/dev/app.json"


# -- against the stack ------------------------------------------------------------------

@pytest.fixture
def admin(stack):
    from probe.admin import Admin
    with Admin() as one:
        yield one


@pytest.fixture
def configs(stack, tmp_path):
    """live_config(appkey, **options) with a per-test backup dir; all closed at the end."""
    opened = []

    def open_config(appkey, **options):
        options.setdefault("backup_dir", str(tmp_path / "backup"))
        cfg = live_config(appkey, **options)
        opened.append(cfg)
        return cfg

    yield open_config
    for cfg in opened:
        cfg.close()


class Recorder(object):
    def __init__(self, cfg):
        self.calls = []
        self.threads = set()
        cfg.on_change(self)

    def __call__(self, key, old, new):
        self.threads.add(threading.current_thread().name)
        self.calls.append((key, old, new))


def test_hot_reload_keys_added_and_deleted_live(admin, appkey, configs):
    admin.set_config(appkey, "pool", 10)
    cfg = configs(appkey)
    assert cfg["pool"] == 10 and cfg.get("missing", "dflt") == "dflt" and not cfg.stale
    seen = Recorder(cfg)

    def boom(key, old, new):
        raise RuntimeError("a broken callback")
    cfg.on_change(boom)
    after = Recorder(cfg)  # registered after the one that raises: still called

    admin.set_config(appkey, "pool", 20)
    wait_for(lambda: cfg.get("pool") == 20, message="new value read live")
    admin.set_config_json(appkey, "hosts", '["a", "b"]')
    wait_for(lambda: "hosts" in cfg, message="key added live")
    assert cfg["hosts"] == ["a", "b"]
    admin.delete_config(appkey, "pool")
    wait_for(lambda: "pool" not in cfg, message="key deleted live")
    assert dict(cfg) == {"hosts": ["a", "b"]}
    expected = [("pool", 10, 20), ("hosts", None, ["a", "b"]), ("pool", 20, None)]
    wait_for(lambda: after.calls == expected, message="callbacks in order")
    assert seen.calls == expected  # once per change, in order
    assert all(name.startswith("probe-config") for name in seen.threads | after.threads)
    # Setting the same value again is no change: no write, no callback.
    assert admin.set_config(appkey, "hosts", ["a", "b"])["changed"] is False


def test_malformed_znode_data_keeps_the_last_good_value(admin, appkey, configs, caplog):
    admin.set_config(appkey, "limit", 5)
    cfg = configs(appkey)
    seen = Recorder(cfg)
    path = naming.config_key_path("dev", appkey, "limit")
    with caplog.at_level(logging.WARNING, logger="probe.configcenter"):
        admin.zk.client.set(path, b"{not json")
        admin.zk.client.create(naming.config_key_path("dev", appkey, "other"), b"\xff\xfe")
        admin.set_config(appkey, "ok", "still updating")
        wait_for(lambda: cfg.get("ok") == "still updating", message="updates go on")
    assert cfg["limit"] == 5 and "other" not in cfg
    assert "limit" in caplog.text and "not valid JSON" in caplog.text
    admin.zk.client.set(path, b"6")
    wait_for(lambda: ("limit", 5, 6) in seen.calls, message="a good value again")
    assert cfg["limit"] == 6


def test_backup_serves_a_restart_while_zookeeper_is_down(admin, appkey, configs, stack, tmp_path,
                                                         caplog):
    backup_dir = str(tmp_path / "backup")
    admin.set_config(appkey, "feature", {"on": True})
    admin.set_config(appkey, "retries", 3)
    first = configs(appkey, backup_dir=backup_dir)
    backup = naming.config_backup_file(backup_dir, "dev", appkey)
    admin.set_config(appkey, "retries", 4)
    wait_for(lambda: os.path.exists(backup) and json.load(open(backup))["values"].get("retries") == 4,
             message="backup written after the change")
    first.close()
    admin.close()
    stack.kill("zookeeper")
    try:
        with caplog.at_level(logging.WARNING, logger="probe.configcenter"):
            cfg = configs(appkey, backup_dir=backup_dir, timeout=1)
        assert cfg.stale and dict(cfg) == {"feature": {"on": True}, "retries": 4}
        assert "local backup" in caplog.text
        # Without a backup: a named error, or an empty stale mapping if asked for.
        with pytest.raises(ConfigUnavailable, match="no local backup"):
            configs(appkey, backup_dir=str(tmp_path / "none"), timeout=1)
        empty = configs(appkey, backup_dir=str(tmp_path / "none"), timeout=1, wait=False)
        assert empty.stale and len(empty) == 0
    finally:
        stack.start("zookeeper")
    wait_for(lambda: not cfg.stale, timeout=30, message="live again after the outage")
    wait_for(lambda: dict(empty) == dict(cfg) and not empty.stale, timeout=30,
             message="the empty one filled in")
    from probe.admin import Admin
    with Admin() as later:
        later.set_config(appkey, "retries", 5)
    wait_for(lambda: cfg.get("retries") == 5, timeout=20, message="watching after the outage")


def test_resync_catches_a_missed_watch(admin, appkey, configs):
    admin.set_config(appkey, "mode", "a")
    cfg = configs(appkey, resync_interval=0.3)
    cfg._retire_watches()  # as if every watch had died silently
    admin.set_config(appkey, "mode", "b")
    admin.set_config(appkey, "added", 1)
    wait_for(lambda: cfg.get("mode") == "b" and cfg.get("added") == 1, timeout=15,
             message="the resync found the missed changes")
    assert cfg.resyncs >= 1
    # The resync set the watches up again: deletions arrive too.
    admin.delete_config(appkey, "added")
    wait_for(lambda: "added" not in cfg, timeout=15, message="watching again")


def test_concurrent_writers_land_in_order(appkey, stack):
    from probe.admin import Admin
    results, errors = [], []

    def writer(name):
        with Admin() as own:
            for i in range(15):
                try:
                    results.append(own.set_config(appkey, "counter", "%s-%d" % (name, i), by=name))
                except Exception as exc:  # a clear conflict error is allowed; record it
                    errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in ("w1", "w2", "w3")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    with Admin() as check:
        history = check.config_history(appkey, "counter")
        current = check.get_config(appkey, "counter")
    assert len(history) == len(results) == 45
    assert [h["version"] for h in history] == list(range(45, 0, -1))
    ordered = list(reversed(history))
    for before, after in zip(ordered, ordered[1:]):
        assert after["old_value"] == before["value"]  # each change saw the one before it
    assert current == history[0]["value"]
    assert sorted(h["value"] for h in history) == sorted("%s-%d" % (n, i) for n in ("w1", "w2", "w3")
                                                       for i in range(15))


def test_history_and_rollback_through_the_cli(appkey, stack):
    run_probe("config", "set", appkey, "timeout", "1.5")
    run_probe("config", "set", appkey, "timeout", '{"ms": 300}', "--by", "alice")
    assert json.loads(run_probe("config", "get", appkey, "timeout").stdout) == {"ms": 300}
    history = json.loads(run_probe("config", "history", appkey, "timeout", "--json").stdout)
    assert [(h["version"], h["value"]) for h in history] == [(2, {"ms": 300}), (1, 1.5)]
    assert history[0]["changed_by"] == "alice" and history[0]["changed_at"]
    assert set(history[0]) >= {"version", "value", "changed_by", "changed_at"}
    run_probe("config", "rollback", appkey, "timeout", "1")
    assert json.loads(run_probe("config", "get", appkey, "timeout").stdout) == 1.5
    history = json.loads(run_probe("config", "history", appkey, "timeout", "--json").stdout)
    assert [(h["version"], h["value"], h["action"]) for h in history][0] == (3, 1.5, "rollback")
    run_probe("config", "delete", appkey, "timeout")
    listed = run_probe("config", "list", appkey, "--json").stdout
    assert json.loads(listed) == {}
    history = json.loads(run_probe("config", "history", appkey, "timeout", "--json").stdout)
    assert history[0]["deleted"] and history[0]["version"] == 4
    missing = run_probe("config", "rollback", appkey, "timeout", "99", check=False)
    assert missing.returncode == 2 and "no version 99" in missing.stderr


def test_bad_keys_and_values_are_refused_with_nothing_written(admin, appkey, stack):
    for args, error in (
            (("config", "set", appkey, "a/b", "1"), "InvalidConfigKey"),
            (("config", "set", appkey, "good", "{bad"), "InvalidConfigValue"),
            (("config", "set", appkey, "good", "NaN"), "InvalidConfigValue"),
            (("config", "set", appkey, "good", "text"), "InvalidConfigValue"),
            (("config", "set", appkey, "nl\n", "1"), "InvalidConfigKey"),
            (("config", "set", appkey, "good", "1", "--by", "b" * 129), "changed-by"),
            (("config", "set", appkey, "good", "1", "--by", "tab\there"), "changed-by"),
            (("config", "set", "no_such_app_x", "good", "1"), "UnknownAppkey"),
            (("config", "set", "bad/app", "good", "1"), "InvalidAppkey"),
            (("config", "get", appkey, "good"), "UnknownConfigKey"),
            (("config", "delete", appkey, "good"), "UnknownConfigKey")):
        done = run_probe(*args, check=False)
        assert done.returncode == 2 and error in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr
    with pytest.raises(InvalidConfigValue, match="limit"):
        admin.set_config(appkey, "big", "x" * MAX_VALUE_BYTES)
    with pytest.raises(InvalidConfigValue):
        admin.set_config(appkey, "obj", object())
    with pytest.raises(InvalidConfigKey):
        admin.set_config(appkey, "", 1)
    with pytest.raises(InvalidAppkey):
        admin.set_config("../x", "k", 1)
    with pytest.raises(UnknownAppkey):
        admin.set_config("missing_%s" % appkey, "k", 1)
    with pytest.raises(UnknownConfigKey):
        admin.rollback_config(appkey, "big", 1)
    with pytest.raises(UnknownConfigKey, match="bad version"):
        admin.rollback_config(appkey, "big", "\u0661")  # ARABIC-INDIC DIGIT ONE
    assert admin.list_config(appkey) == {}
    assert admin.zk.client.exists(naming.config_appkey_path("dev", appkey)) is None
    for key in ("big", "obj", "good", "a"):
        assert admin.config_history(appkey, key) == []


def test_zookeeper_wiped_config_held_then_restored_from_mysql(admin, appkey, configs, stack, tmp_path):
    values = {"db.url": "mysql://db/x", "pool": 8, "flags": {"a": [1, 2]}}
    for key, value in values.items():
        admin.set_config(appkey, key, value)
    admin.delete_config(appkey, "pool")
    admin.set_config(appkey, "pool", 9)
    del values["pool"]
    values["pool"] = 9
    cfg = configs(appkey)
    seen = Recorder(cfg)
    admin.close()
    stack.stop("zookeeper")
    stack.start("zookeeper", wipe=True)
    # The config stays in use while ZooKeeper has none: stale, not emptied.
    wait_for(lambda: cfg.stale, timeout=40, message="config marked stale on the wiped ZooKeeper")
    assert dict(cfg) == values
    # A process that starts now, with a backup, serves the backup.
    late = configs(appkey)
    assert late.stale and dict(late) == values

    inspector = KazooClient(hosts=load_settings().zookeeper.hosts, timeout=10)
    inspector.start(20)
    try:
        assert inspector.exists(naming.config_appkey_path("dev", appkey)) is None
    finally:
        inspector.stop()
        inspector.close()
    done = run_probe("config", "restore", appkey)
    assert "3 key(s) restored" in done.stdout
    wait_for(lambda: not cfg.stale and not late.stale, timeout=30, message="live again")
    assert dict(cfg) == values and dict(late) == values
    assert seen.calls == []  # nothing flapped: no key went away and came back
    run_probe("config", "set", appkey, "pool", "10")
    wait_for(lambda: seen.calls and late.get("pool") == 10, timeout=20,
             message="changes flow again after the restore")
    assert seen.calls == [("pool", 9, 10)]
    again = run_probe("config", "restore", appkey)
    assert "0 key(s) restored" in again.stdout
    history = json.loads(run_probe("config", "history", appkey, "db.url", "--json").stdout)
    assert history[0]["action"] == "restore" and history[0]["value"] == "mysql://db/x"


def test_the_largest_allowed_value_is_stored_and_read(admin, appkey, configs):
    big = "x" * (MAX_VALUE_BYTES - 2)  # with its quotes: exactly the limit
    assert admin.set_config(appkey, "big", big)["changed"]
    cfg = configs(appkey)
    assert cfg["big"] == big
    assert admin.config_history(appkey, "big")[0]["value"] == big
    admin.set_config(appkey, "big", big[:-1])
    wait_for(lambda: cfg["big"] == big[:-1], message="a big value changed live")


def test_zookeeper_outage_and_session_expiry(admin, appkey, configs, stack):
    import time
    from conftest import SESSION_TIMEOUT
    from probe.admin import Admin
    admin.set_config(appkey, "level", "info")
    cfg = configs(appkey)
    seen = Recorder(cfg)
    admin.close()
    # A short outage: the same session comes back, and the config is re-read in full.
    resyncs = cfg.resyncs
    stack.kill("zookeeper")
    time.sleep(1.0)
    assert cfg["level"] == "info"
    stack.start("zookeeper")
    wait_for(lambda: cfg.resyncs > resyncs, timeout=30, message="full resync after reconnect")
    # Down past the session timeout: a new session, new watches, nothing lost meanwhile.
    stack.stop("zookeeper")
    time.sleep(SESSION_TIMEOUT + 1.5)
    assert cfg["level"] == "info"
    stack.start("zookeeper")
    with Admin() as later:
        # Just restarted, ZooKeeper may still drop a first connection: a refused write
        # says "nothing was written; try again", which is what an operator would do.
        def write():
            try:
                later.set_config(appkey, "level", "debug")
                return True
            except ComponentUnavailable:
                return False
        wait_for(write, timeout=30, message="the write once ZooKeeper is back")
    wait_for(lambda: seen.calls, timeout=30, message="watching on the new session")
    assert seen.calls == [("level", "info", "debug")] and not cfg.stale
