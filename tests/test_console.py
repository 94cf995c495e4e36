"""The web console in a real browser (Debian's chromium, driven by Playwright)
against the real stack: login, live node figures, governance actions, roles, CSRF.

Screenshots (1280x800) go to the test's tmp dir; with PROBE_SCREENSHOT_DIR set, the
node view is also copied there (that is how docs/images/console-nodes.png is made).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import threading

import pytest

from conftest import run_probe, wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
OPERATOR, OPERATOR_PASSWORD = "olga", "operator-pass-1"
VIEWER, VIEWER_PASSWORD = "victor", "viewer-pass-1"
VIEWPORT = {"width": 1280, "height": 800}


# -- units: pure logic, no browser ------------------------------------------------
def test_throttle_limits_per_user_and_per_address():
    from probe.console.auth import LoginThrottle
    throttle = LoginThrottle(per_user=3, per_address=5, window=60)
    assert [throttle.failed("ann", "10.0.0.1", now=0) for _ in range(3)] == [[], [], ["user"]]
    assert throttle.retry_after("ann", "10.0.0.2", now=1) == pytest.approx(59)
    assert throttle.retry_after("bob", "10.0.0.1", now=1) == 0  # the address has 3 of 5
    for name in ("bob", "cid"):
        throttle.failed(name, "10.0.0.1", now=2)
    assert throttle.retry_after("dan", "10.0.0.1", now=3) > 0  # the address is spent
    assert throttle.retry_after("dan", "10.0.0.9", now=3) == 0
    assert throttle.retry_after("ann", "10.0.0.2", now=61) == 0  # the window has passed
    throttle.failed("eve", "10.0.0.3", now=100)
    throttle.succeeded("eve")
    assert throttle.retry_after("eve", "10.0.0.7", now=100) == 0


def test_throttle_memory_is_bounded():
    from probe.console.auth import LoginThrottle
    throttle = LoginThrottle(max_entries=100)
    for n in range(5000):
        throttle.failed("user%d" % n, "10.%d.%d.1" % (n // 256, n % 256), now=0)
    assert throttle.size() == 200


def test_series_and_figures_skip_hostile_stats(stack):
    import redis as redis_lib
    from probe.console.figures import node_figures, service_series
    from probe.naming import stats_key
    from probe.settings import load_settings
    settings = load_settings()
    client = redis_lib.Redis(host=settings.redis.host, port=settings.redis.port)
    key = stats_key("dev", "hostile_app", "server", 1000000)
    good = '{"count": 20, "sum": 0.02, "buckets": [0,0,0,0,20,0,0,0,0,0,0,0,0,0,0,0,0,0]}'
    client.hset(key, mapping={"S|say|127.0.0.1:1|ok|w": good, "S|say|127.0.0.1:1|timeout|w":
                              '{"count": 5, "sum": 1, "buckets": null}', "bad-field": good,
                              "S|say|127.0.0.1:1|ok|x": "not json", "S|say|127.0.0.1:2|ok|y":
                              '{"count": "many", "buckets": []}'})
    client.expire(key, 60)
    figures = node_figures(client, "dev", "hostile_app", now=1000005, window=10)
    assert list(figures) == [("S", "127.0.0.1:1")]
    cell = figures[("S", "127.0.0.1:1")]
    assert cell["calls"] == 25 and cell["error_rate"] == pytest.approx(0.2)
    assert 0.5 < cell["p99_ms"] <= 1.0
    series = service_series(client, "dev", "hostile_app", "S", now=1000005, minutes=5, step=60)
    assert len(series["labels"]) == 5 and sum(series["rate"]) > 0
    client.close()


# -- the browser and the console --------------------------------------------------
def _add_user(name, password, role):
    """Through the CLI, as an operator would, the password on stdin."""
    done = subprocess.run([sys.executable, "-m", "probe.cli", "console", "user", "add", name,
                           "--role", role], input=password + "\n", capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def users(stack):
    _add_user(OPERATOR, OPERATOR_PASSWORD, "operator")
    _add_user(VIEWER, VIEWER_PASSWORD, "viewer")


@pytest.fixture(scope="module")
def console_url(users):
    from probe.console import ConsoleServer
    # Refresh every second over a 10 s window, so the tests see traffic move quickly.
    server = ConsoleServer(bind="127.0.0.1", port=0, refresh=1, live_window=10, warmup=30).start()
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def browser(stack):
    from playwright.sync_api import sync_playwright
    playwright = sync_playwright().start()
    browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    yield browser
    browser.close()
    playwright.stop()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.problems = []
    page.on("console", lambda msg: msg.type == "error" and page.problems.append(msg.text))
    page.on("pageerror", lambda exc: page.problems.append(str(exc)))
    yield page
    context.close()


def _login(page, url, name, password):
    page.goto(url + "/login")
    page.get_by_label("Username").fill(name)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_load_state()


def _row(page, address):
    return page.get_by_role("row").filter(has_text=address)


def _rate(page, address):
    text = _row(page, address).locator("[id$='-rate']").inner_text().strip()
    return float(text) if re.match(r"^[0-9.]+$", text) else None


def _shot(page, tmp_path, name):
    path = str(tmp_path / ("%s.png" % name))
    page.screenshot(path=path)
    return path


def _csrf(page):
    return page.locator("input[name=csrf_token]").first.get_attribute("value")


def _post(page, path, form, headers=None):
    """A POST from inside the page (same origin, the session cookie goes along):
    the status code, or "redirect" (what a successful action answers)."""
    return page.evaluate("""async ([path, form, headers]) => {
        const body = new URLSearchParams(form);
        const r = await fetch(path, {method: "POST", body: body, headers: headers, redirect: "manual"});
        return r.type === "opaqueredirect" ? "redirect" : r.status; }""", [path, form, headers or {}])


def test_pages_need_a_login_and_a_wrong_password_is_refused(console_url, page, appkey, tmp_path):
    page.goto(console_url + "/apps/%s" % appkey)
    assert "/login" in page.url and "next=" in page.url
    page.get_by_label("Username").fill(OPERATOR)
    page.get_by_label("Password").fill("not-the-password")
    page.get_by_role("button", name="Log in").click()
    page.wait_for_load_state()
    assert page.get_by_role("alert").inner_text() == "Wrong user name or password."
    assert "/login" in page.url
    _shot(page, tmp_path, "login-refused")
    page.get_by_label("Password").fill(OPERATOR_PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(re.compile(r"/apps/%s$" % appkey))  # back where it was going
    assert page.get_by_role("heading", name=appkey).is_visible()
    response = page.request.get(console_url + "/audit")
    assert response.status == 200
    response = page.request.get(console_url + "/apps/%s/series/Bad-Name" % appkey)
    assert response.status == 400 and "InvalidServiceName" in response.json()["error"]
    assert page.request.get(console_url + "/apps/%s/series/DemoService" % appkey).json()["labels"]
    assert page.problems == [], page.problems


def test_operator_moves_traffic_off_a_disabled_node(console_url, page, appkey, providers, clients,
                                                    tmp_path):
    from probe.admin import Admin
    first = providers(appkey, name="first", stats_interval=1)
    second = providers(appkey, name="second", stats_interval=1)
    client = clients(appkey)
    wait_for(lambda: len({client.whoami() for _ in range(20)}) == 2, message="both nodes in use")
    served = {"first": 0, "second": 0}
    stop = threading.Event()

    def consume():
        while not stop.is_set():
            try:
                served[client.whoami()] += 1
            except Exception:  # a call may fail while the test changes the fleet
                pass
            stop.wait(0.005)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    try:
        _login(page, console_url, OPERATOR, OPERATOR_PASSWORD)
        page.goto(console_url + "/apps/%s" % appkey)
        assert page.locator("table.nodes tbody tr").count() == 2
        for provider in (first, second):
            row = _row(page, provider.address)
            assert row.count() == 1
            assert row.get_by_role("button", name="Disable").is_visible()
            assert row.get_by_label("Weight").input_value() == "10"
            assert row.get_by_role("button", name="Save").is_visible()
        # Live figures arrive without a reload: mark the page, then watch it.
        page.evaluate("window.stillTheSamePage = true")
        wait_for(lambda: (_rate(page, first.address) or 0) > 0 and (_rate(page, second.address) or 0) > 0,
                 timeout=30, interval=0.5, message="both nodes' calls/s on the page")
        assert page.evaluate("window.stillTheSamePage") is True
        page.wait_for_function("document.querySelector('canvas').getAttribute('width') > 0")
        _shot(page, tmp_path, "nodes-both-serving")

        _row(page, first.address).get_by_role("button", name="Disable").click()
        page.wait_for_load_state()
        assert "valid 1 -> 0" in page.get_by_role("status").inner_text()
        assert _row(page, first.address).get_by_role("button", name="Enable").is_visible()
        disabled_at = dict(served)
        wait_for(lambda: served["second"] > disabled_at["second"] + 50, message="traffic continues")
        moved = dict(served)
        wait_for(lambda: served["second"] > moved["second"] + 50, message="more traffic")
        assert served["first"] == moved["first"]  # nothing reaches the disabled node
        page.evaluate("window.stillTheSamePage = true")
        wait_for(lambda: _rate(page, first.address) == 0 and (_rate(page, second.address) or 0) > 0,
                 timeout=60, interval=0.5, message="the page showing traffic moved off the node")
        assert page.evaluate("window.stillTheSamePage") is True
        assert "disabled" in _row(page, first.address).inner_text()
        shot = _shot(page, tmp_path, "nodes-one-disabled")
        if os.environ.get("PROBE_SCREENSHOT_DIR"):
            os.makedirs(os.environ["PROBE_SCREENSHOT_DIR"], exist_ok=True)
            shutil.copy(shot, os.path.join(os.environ["PROBE_SCREENSHOT_DIR"], "console-nodes.png"))

        _row(page, first.address).get_by_role("button", name="Enable").click()
        page.wait_for_load_state()
        assert _row(page, first.address).get_by_role("button", name="Disable").is_visible()
        before = dict(served)
        wait_for(lambda: served["first"] > before["first"] + 20, message="traffic back on the node")
    finally:
        stop.set()
        consumer.join(5)
    with Admin() as admin:
        changes = admin.audit(appkey)
    assert [(c["action"], c["new"], c["changed_by"]) for c in changes[:2]] == \
        [("valid", "1", OPERATOR), ("valid", "0", OPERATOR)]
    assert page.problems == [], page.problems


def test_weight_change_and_a_refused_weight(console_url, page, appkey, providers, tmp_path):
    from probe.admin import Admin
    node = providers(appkey)
    _login(page, console_url, OPERATOR, OPERATOR_PASSWORD)
    page.goto(console_url + "/apps/%s" % appkey)
    row = _row(page, node.address)
    row.get_by_label("Weight").fill("25")
    row.get_by_role("button", name="Save").click()
    page.wait_for_load_state()
    assert "weight 10 -> 25" in page.get_by_role("status").inner_text()
    assert _row(page, node.address).get_by_label("Weight").input_value() == "25"
    with Admin() as admin:
        assert [r["weight"] for r in admin.nodes(appkey)] == [25]
        audited = len(admin.audit(appkey))

    _row(page, node.address).get_by_label("Weight").fill("5000")
    _row(page, node.address).get_by_role("button", name="Save").click()
    page.wait_for_load_state()
    shown = page.get_by_role("alert").inner_text()
    cli = run_probe("node", "weight", appkey, "DemoService", node.address, "5000", check=False)
    assert cli.returncode == 2
    assert shown in cli.stderr and "5000" in shown and "0 to 1000" in shown
    _shot(page, tmp_path, "weight-refused")
    with Admin() as admin:
        assert [r["weight"] for r in admin.nodes(appkey)] == [25]  # nothing written
        assert len(admin.audit(appkey)) == audited
    assert page.problems == [], page.problems


def test_viewer_cannot_change_anything(console_url, page, appkey, providers, tmp_path):
    from probe.admin import Admin
    node = providers(appkey)
    _login(page, console_url, VIEWER, VIEWER_PASSWORD)
    page.goto(console_url + "/apps/%s" % appkey)
    row = _row(page, node.address)
    assert row.count() == 1 and "enabled" in row.inner_text()
    for name in ("Disable", "Enable", "Save"):
        assert page.get_by_role("button", name=name).count() == 0
    assert page.get_by_label("Weight").count() == 0
    _shot(page, tmp_path, "viewer-nodes")
    token = _csrf(page)  # the viewer's own valid token: the role alone must refuse
    form = {"csrf_token": token, "service": "DemoService", "address": node.address, "action": "disable"}
    assert _post(page, "/apps/%s/node" % appkey, form) == 403
    assert _post(page, "/apps/%s/node" % appkey, dict(form, action="weight", weight="0")) == 403
    assert _post(page, "/appkeys", {"csrf_token": token, "appkey": "viewer_made"}) == 403
    with Admin() as admin:
        assert [(r["valid"], r["weight"]) for r in admin.nodes(appkey)] == [(1, 10)]
        assert admin.audit(appkey) == []
        assert "viewer_made" not in [a["appkey"] for a in admin.list_appkeys()]
    # A node that appears later shows up by itself (the page reloads when the set changes).
    later = providers(appkey)
    wait_for(lambda: _row(page, later.address).count() == 1, timeout=30, interval=0.5,
             message="the new node on the page")
    assert page.get_by_role("button", name="Disable").count() == 0


def test_passwords_are_stored_as_argon2_hashes(users):
    from probe.console.users import ConsoleUserError, UserStore
    from probe.settings import load_settings
    store = UserStore(load_settings().mysql)
    try:
        stored = store._run("SELECT password_hash FROM console_users WHERE username = %s", (OPERATOR,),
                            fetch=True)[0][0]
        assert stored.startswith("$argon2id$") and OPERATOR_PASSWORD not in stored
        assert store.verify(OPERATOR, OPERATOR_PASSWORD) == "operator"
        assert store.verify(OPERATOR, OPERATOR_PASSWORD + "x") is None
        assert store.verify("nobody_here", OPERATOR_PASSWORD) is None
        for bad in (("bad name", "long-enough-1", "viewer"), ("nl_name\n", "long-enough-1", "viewer"),
                    ("ok_name", "short", "viewer"),
                    ("ok_name", "long-enough-1", "admin")):
            with pytest.raises(ConsoleUserError):
                store.add_user(*bad)
        assert store.verify("ok_name", "long-enough-1") is None  # nothing half-created
    finally:
        store.close()


def test_a_post_without_the_csrf_token_is_refused(console_url, page, appkey, providers):
    from probe.admin import Admin
    node = providers(appkey)
    _login(page, console_url, OPERATOR, OPERATOR_PASSWORD)
    page.goto(console_url + "/apps/%s" % appkey)
    form = {"service": "DemoService", "address": node.address, "action": "disable"}
    assert _post(page, "/apps/%s/node" % appkey, form) == 403
    assert _post(page, "/apps/%s/node" % appkey, dict(form, csrf_token="forged" * 8)) == 403
    assert _post(page, "/apps/%s/node" % appkey, form, {"X-CSRF-Token": "forged"}) == 403
    with Admin() as admin:
        assert [r["valid"] for r in admin.nodes(appkey)] == [1]
    # The header form of the token is accepted.
    assert _post(page, "/apps/%s/node" % appkey, form, {"X-CSRF-Token": _csrf(page)}) == "redirect"
    with Admin() as admin:
        assert [r["valid"] for r in admin.nodes(appkey)] == [0]


def test_audit_page_filters_by_appkey_and_appkeys_can_be_added(console_url, page, appkey, providers,
                                                                tmp_path):
    from probe.admin import Admin
    node = providers(appkey)
    with Admin() as admin:
        admin.set_weight(appkey, "DemoService", node.address, 7, by="someone-else")
    _login(page, console_url, OPERATOR, OPERATOR_PASSWORD)
    new_key = appkey + "_new"
    page.get_by_label("Appkey").fill(new_key)
    page.get_by_label("Description").fill("made in the console")
    page.get_by_role("button", name="Add appkey").click()
    page.wait_for_load_state()
    assert "appkey %s added" % new_key in page.get_by_role("status").inner_text()
    assert page.get_by_role("link", name=new_key).is_visible()
    _shot(page, tmp_path, "appkeys")
    page.get_by_label("Appkey").fill("bad appkey!")
    page.get_by_role("button", name="Add appkey").click()
    page.wait_for_load_state()
    assert "InvalidAppkey: bad appkey 'bad appkey!'" in page.get_by_role("alert").inner_text()

    page.goto(console_url + "/audit?appkey=%s" % appkey)
    rows = page.get_by_role("row").filter(has_text=node.address)
    assert rows.count() == 1 and "someone-else" in rows.inner_text()
    _shot(page, tmp_path, "audit")
    page.goto(console_url + "/audit?appkey=%s" % new_key)
    assert page.get_by_role("row").filter(has_text=node.address).count() == 0
    # The appkey the console added is audited as the logged-in user.
    added = page.get_by_role("row").filter(has_text="appkey add")
    assert added.count() == 1 and OPERATOR in added.inner_text()
    with Admin() as admin:
        admin.remove_appkey(new_key, by="tidy-up")
        assert [(row["action"], row["changed_by"]) for row in admin.audit(new_key)] == [
            ("appkey remove", "tidy-up"), ("appkey add", OPERATOR)]


def test_failed_logins_are_rate_limited(console_url, page, stack):
    _add_user("rita", "rita-password-1", "viewer")
    for _ in range(5):
        _login(page, console_url, "rita", "wrong-password")
    _login(page, console_url, "rita", "rita-password-1")  # right, but too late
    assert "Too many failed logins" in page.get_by_role("alert").inner_text()
    assert "/login" in page.url


def test_log_out_ends_the_session(console_url, page):
    _login(page, console_url, OPERATOR, OPERATOR_PASSWORD)
    cookie = [c for c in page.context.cookies() if c["name"] == "probe_session"][0]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and not cookie["secure"]
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url(re.compile(r"/login$"))
    page.context.add_cookies([cookie])  # the old cookie is worth nothing now
    page.goto(console_url + "/")
    assert "/login" in page.url


def test_removing_a_user_ends_their_sessions(console_url, page):
    _add_user("temp_user", "temp-password-1", "operator")
    _login(page, console_url, "temp_user", "temp-password-1")
    assert page.get_by_role("button", name="Log out").is_visible()
    assert run_probe("console", "user", "remove", "temp_user").returncode == 0
    page.goto(console_url + "/")
    assert "/login" in page.url
    assert run_probe("console", "user", "remove", "temp_user", check=False).returncode == 1


def test_tls_marks_the_session_cookie_secure(users, browser, tmp_path):
    from probe.console import ConsoleServer
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    server = ConsoleServer(bind="127.0.0.1", port=0, cert=cert, key=key).start()
    context = browser.new_context(viewport=VIEWPORT, ignore_https_errors=True)
    try:
        assert server.url.startswith("https://127.0.0.1:")
        page = context.new_page()
        _login(page, server.url, OPERATOR, OPERATOR_PASSWORD)
        assert page.get_by_role("button", name="Log out").is_visible()
        cookie = [c for c in context.cookies() if c["name"] == "probe_session"][0]
        assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        response = page.request.get(server.url + "/")
        assert "max-age" in response.headers["strict-transport-security"]
    finally:
        context.close()
        server.stop()


def test_probe_console_command_serves_on_loopback(stack):
    import signal
    import socket
    import urllib.error
    import urllib.request
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "probe.cli", "console", "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert "on http://127.0.0.1:%d" % port in line, (line, process.stderr.read() if process.poll() else "")
        with urllib.request.urlopen("http://127.0.0.1:%d/login" % port, timeout=10) as response:
            assert response.status == 200
            assert "default-src 'self'" in response.headers["Content-Security-Policy"]
            assert 'name="csrf_token"' in response.read().decode()

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args, **kwargs):
                return None
        opener = urllib.request.build_opener(NoRedirect)
        with pytest.raises(urllib.error.HTTPError) as refused:
            opener.open("http://127.0.0.1:%d/audit" % port, timeout=10)
        assert refused.value.code == 303 and refused.value.headers["Location"].startswith("/login")
        with pytest.raises(urllib.error.HTTPError) as post:  # a POST with no session at all
            opener.open(urllib.request.Request("http://127.0.0.1:%d/logout" % port, data=b"x=1"), timeout=10)
        assert post.value.code == 401
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(15) == 0


# -- the config center's pages -------------------------------------------------------
def _config_row(page, key):
    return page.locator("table.config tbody tr").filter(
        has=page.locator("td.key", has_text=re.compile("^%s$" % re.escape(key))))


def test_operator_sets_edits_and_rolls_back_a_config_key(console_url, page, appkey, tmp_path):
    from probe.admin import Admin
    from probe.configcenter import live_config
    from probe.errors import UnknownConfigKey
    key = "db.pool_size"
    reader = live_config(appkey, backup_dir=str(tmp_path / "backup"))
    try:
        _login(page, console_url, OPERATOR, OPERATOR_PASSWORD)
        page.goto(console_url + "/apps/%s" % appkey)
        _shot(page, tmp_path, "app-config-link")
        page.get_by_role("link", name="Config", exact=True).click()
        page.wait_for_url(re.compile(r"/apps/%s/config$" % appkey))
        assert "has no config keys yet" in page.locator("main").inner_text()

        page.get_by_label("Key", exact=True).fill(key)
        page.locator("#new-value").fill("10")
        page.get_by_role("button", name="Add").click()
        page.wait_for_load_state()
        assert "config key %s set to 10 (version 1)" % key in page.get_by_role("status").inner_text()
        assert _config_row(page, key).get_by_label("Value").input_value() == "10"
        with Admin() as admin:
            assert admin.get_config(appkey, key) == 10
        wait_for(lambda: reader.get(key) == 10, message="the live reader sees the new key")

        # An edit; the markup inside the value is shown as text, never as markup.
        edited = {"max": 20, "note": "<b id=injected>x</b>"}
        _config_row(page, key).get_by_label("Value").fill('{"note": "<b id=injected>x</b>", "max": 20}')
        _config_row(page, key).get_by_role("button", name="Save").click()
        page.wait_for_load_state()
        assert "(version 2)" in page.get_by_role("status").inner_text()
        assert page.locator("#injected").count() == 0
        assert json.loads(_config_row(page, key).get_by_label("Value").input_value()) == edited
        wait_for(lambda: reader.get(key) == edited, message="the live reader sees the edit")

        # A refused value: the CLI's message, and nothing written.
        _config_row(page, key).get_by_label("Value").fill("{bad")
        _config_row(page, key).get_by_role("button", name="Save").click()
        page.wait_for_load_state()
        shown = page.get_by_role("alert").inner_text()
        cli = run_probe("config", "set", appkey, key, "{bad", check=False)
        assert cli.returncode != 0
        assert shown.startswith("InvalidConfigValue: ") and shown in cli.stderr and "{bad" in shown
        page.get_by_label("Key", exact=True).fill("bad key!")
        page.locator("#new-value").fill("1")
        page.get_by_role("button", name="Add").click()
        page.wait_for_load_state()
        assert page.get_by_role("alert").inner_text().startswith("InvalidConfigKey: ")
        with Admin() as admin:
            assert admin.get_config(appkey, key) == edited
            assert [row["version"] for row in admin.config_history(appkey, key)] == [2, 1]
            assert list(admin.list_config(appkey)) == [key]
        _shot(page, tmp_path, "config")

        _config_row(page, key).get_by_role("link", name="history").click()
        page.wait_for_url(re.compile(r"/apps/%s/config/%s/history$" % (appkey, re.escape(key))))
        rows = page.locator("table.config-history tbody tr")
        assert rows.count() == 2
        assert rows.nth(0).locator("td").nth(0).inner_text() == "2"
        assert rows.nth(1).locator("td").nth(0).inner_text() == "1"
        assert OPERATOR in rows.nth(0).inner_text() and OPERATOR in rows.nth(1).inner_text()
        assert "<b id=injected>x</b>" in rows.nth(0).inner_text() and page.locator("#injected").count() == 0
        _shot(page, tmp_path, "config-history")
        rows.nth(1).get_by_role("button", name="Roll back").click()
        page.wait_for_load_state()
        assert "rollback to version 1: config key %s set to 10 (version 3)" % key in \
            page.get_by_role("status").inner_text()
        assert page.locator("table.config-history tbody tr").count() == 3
        with Admin() as admin:
            assert admin.get_config(appkey, key) == 10
            assert [(r["version"], r["action"], r["changed_by"]) for r in admin.config_history(appkey, key)][0] \
                == (3, "rollback", OPERATOR)
        wait_for(lambda: reader.get(key) == 10, message="the live reader sees the rollback")

        page.goto(console_url + "/apps/%s/config" % appkey)
        _config_row(page, key).get_by_role("button", name="Delete").click()
        page.wait_for_load_state()
        assert "config key %s deleted (version 4)" % key in page.get_by_role("status").inner_text()
        assert _config_row(page, key).count() == 0
        with Admin() as admin, pytest.raises(UnknownConfigKey):
            admin.get_config(appkey, key)
        wait_for(lambda: key not in reader, message="the live reader sees the deletion")
    finally:
        reader.close()
    assert page.problems == [], page.problems


def test_viewer_sees_config_but_cannot_change_it(console_url, page, appkey, tmp_path):
    from probe.admin import Admin
    with Admin() as admin:
        admin.set_config(appkey, "feature.flag", True, by="someone-else")
        admin.set_config(appkey, "feature.flag", False, by="someone-else")
        admin.set_config(appkey, "greeting", "<i id=injected>hi</i>", by="someone-else")
    _login(page, console_url, VIEWER, VIEWER_PASSWORD)
    page.goto(console_url + "/apps/%s/config" % appkey)
    assert _config_row(page, "feature.flag").locator("td.value").inner_text().strip() == "false"
    assert _config_row(page, "greeting").locator("td.value").inner_text().strip() == \
        '"<i id=injected>hi</i>"'
    assert page.locator("#injected").count() == 0
    for name in ("Save", "Add", "Delete", "Roll back"):
        assert page.get_by_role("button", name=name).count() == 0
    assert page.get_by_label("Value").count() == 0 and page.get_by_label("Key").count() == 0
    _shot(page, tmp_path, "viewer-config")
    _config_row(page, "feature.flag").get_by_role("link", name="history").click()
    page.wait_for_load_state()
    assert page.locator("table.config-history tbody tr").count() == 2
    assert page.get_by_role("button", name="Roll back").count() == 0
    assert page.problems == [], page.problems

    token = _csrf(page)  # the viewer's own valid token: the role alone must refuse
    base = "/apps/%s/config" % appkey
    assert _post(page, base, {"csrf_token": token, "action": "set", "key": "feature.flag",
                              "value": "true"}) == 403
    assert _post(page, base, {"csrf_token": token, "action": "set", "key": "new.key", "value": "1"}) == 403
    assert _post(page, base, {"csrf_token": token, "action": "delete", "key": "greeting"}) == 403
    assert _post(page, base + "/feature.flag/rollback", {"csrf_token": token, "version": "1"}) == 403
    with Admin() as admin:
        assert admin.list_config(appkey) == {"feature.flag": False, "greeting": "<i id=injected>hi</i>"}
        assert len(admin.config_history(appkey, "feature.flag")) == 2


def test_node_table_shows_a_node_ejected_by_consumers(console_url, page, appkey, providers,
                                                      clients, fresh_metrics):
    from demo_server import DemoServiceHandler
    from probe import metrics

    class Broken(DemoServiceHandler):
        def whoami(self):
            raise RuntimeError("database is down")

    bad = providers(appkey, handler=Broken("bad"))
    good = providers(appkey, name="good")
    client = clients(appkey, stats_interval=0.2)
    wait_for(lambda: len(client.watcher.table) == 2, message="both nodes routed")
    for _ in range(20):
        try:
            client.whoami()
        except Exception:
            pass
    assert client.health.ejected()
    metrics.flush_now()
    _login(page, console_url, OPERATOR, OPERATOR_PASSWORD)
    page.goto(console_url + "/apps/%s" % appkey)
    row = _row(page, bad.address)
    assert "ejected by 1" in row.inner_text()
    assert "consecutive failures" in row.locator("[id$='-note']").inner_text()
    assert "ejected" not in _row(page, good.address).inner_text()
    assert page.problems == [], page.problems
