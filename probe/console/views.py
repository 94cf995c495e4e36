"""The console's pages and actions.

Every page but /login needs a session; every POST carries the session's CSRF token
(form field `csrf_token` or header `X-CSRF-Token`); only operators may change
anything. Actions call probe.admin.Admin with `by=<user>` and redirect back with
the outcome (Post/Redirect/Get): a refused input shows the ProbeError's text, as
the CLI prints it, and nothing is written.
"""

import hashlib
import hmac
import logging
import secrets
import time
import uuid
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, cast

from flask import (Flask, Response, abort, current_app, g, jsonify, redirect, render_template, request,
                   url_for)
from flask.typing import ResponseReturnValue
from werkzeug.wrappers import Response as BaseResponse
from werkzeug.exceptions import HTTPException

from .. import naming
from ..errors import ComponentUnavailable, ProbeError
from ..governance import describe
from ..governance.results import ConfigChange
from .auth import same_site_path, throttle_key

if TYPE_CHECKING:
    from .app import Console

log = logging.getLogger("probe.console.views")

SESSION_COOKIE = "probe_session"
LOGIN_CSRF_COOKIE = "probe_login_csrf"
PUBLIC_ENDPOINTS = ("login", "static")
UNAVAILABLE = ("MySQL, Redis or ZooKeeper is unreachable right now; the details are in the "
               "console's log. Try again in a moment.")
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
       "object-src 'none'")


def console() -> "Console":
    """The running console's shared state (probe.console.app.Console)."""
    return current_app.extensions["probe_console"]


def install(app: Flask) -> None:
    app.before_request(_load_session)
    app.after_request(_security_headers)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    app.jinja_env.globals.update(fmt_rate=fmt_rate, fmt_ms=fmt_ms, fmt_pct=fmt_pct, fmt_age=fmt_age)
    for rule, view, methods in (
            ("/login", login, ("GET", "POST")),
            ("/logout", logout, ("POST",)),
            ("/", index, ("GET",)),
            ("/appkeys", add_appkey, ("POST",)),
            ("/apps/<appkey>", app_page, ("GET",)),
            ("/apps/<appkey>/live", app_live, ("GET",)),
            ("/apps/<appkey>/series/<service>", app_series, ("GET",)),
            ("/apps/<appkey>/node", node_action, ("POST",)),
            ("/apps/<appkey>/config", config_page, ("GET",)),
            ("/apps/<appkey>/config", config_action, ("POST",)),
            ("/apps/<appkey>/config/<key>/history", config_history_page, ("GET",)),
            ("/apps/<appkey>/config/<key>/rollback", config_rollback, ("POST",)),
            ("/audit", audit, ("GET",))):
        app.add_url_rule(rule, view.__name__, view, methods=list(methods))


# Values longer than this are shown cut short and not offered for editing: a console
# form is at most MAX_FORM_BYTES (see app.py); `probe config set` takes up to 1 MiB.
EDITABLE_VALUE_CHARS = 8000
HISTORY_ROWS = 100


# -- request plumbing -----------------------------------------------------------
def _load_session() -> Optional[ResponseReturnValue]:
    g.session = None
    if request.endpoint in PUBLIC_ENDPOINTS:
        return None
    try:
        g.session = console().users.session(request.cookies.get(SESSION_COOKIE))
    except ComponentUnavailable as exc:
        log.error("session lookup failed: %s", exc)
        return _page("error.html", 503, message=UNAVAILABLE)
    if g.session is None:
        if request.headers.get("HX-Request"):
            response = Response("", 401)
            response.headers["HX-Redirect"] = url_for("login")
            return response
        if request.method == "GET":
            return redirect(url_for("login", next=request.full_path.rstrip("?")), 303)
        abort(401)
    if request.method == "POST":
        presented = request.headers.get("X-CSRF-Token") or request.form.get("csrf_token")
        if not g.session.csrf_matches(presented):
            log.warning("%s: POST %s refused: missing or wrong CSRF token", g.session.username,
                        request.path)
            abort(403, "The form's security token is missing or out of date: reload the page "
                       "and try again.")
    return None


def _security_headers(response: Response) -> Response:
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    if request.endpoint != "static":
        response.headers["Cache-Control"] = "no-store"
    if console().secure_cookies:
        response.headers["Strict-Transport-Security"] = "max-age=31536000"
    return response


def _http_error(exc: HTTPException) -> ResponseReturnValue:
    if request.headers.get("HX-Request"):
        return Response("", exc.code)
    message = exc.description if exc.code in (401, 403, 404) else exc.name
    if exc.code == 401:
        message = "Log in first."
    return _page("error.html", cast(int, exc.code), message=message, title=exc.name)


def _unexpected_error(exc: Exception) -> ResponseReturnValue:
    reference = uuid.uuid4().hex[:8]
    log.exception("console request %s %s failed (reference %s)", request.method, request.path, reference)
    return _page("error.html", 500, title="Error",
                 message="Something went wrong (reference %s); the details are in the console's "
                         "log." % reference)


def _page(template: str, status: int = 200, **context: Any) -> Tuple[str, int]:
    context.setdefault("session", getattr(g, "session", None))
    context.setdefault("env", console().env)
    return render_template(template, **context), status


def _require_operator() -> None:
    if not g.session.can_change:
        log.warning("%s (viewer): %s %s refused", g.session.username, request.method, request.path)
        abort(403, "Your role is viewer: viewers can look but not change anything.")


def _flash_probe_error(exc: ProbeError) -> None:
    """A refused input: the ProbeError's own text, as the CLI prints it. A component
    outage gets a generic text (its message names hosts and library errors)."""
    if isinstance(exc, ComponentUnavailable):
        log.error("%s: %s", g.session.username, exc)
        console().users.set_flash(g.session, "error", UNAVAILABLE)
    else:
        console().users.set_flash(g.session, "error", "%s: %s" % (exc.__class__.__name__, exc))


def _safe_next(target: Optional[str]) -> str:
    """Only a same-site path is a place to go after login (no open redirect)."""
    return same_site_path(target) or url_for("index")


# -- login ------------------------------------------------------------------------
def login() -> ResponseReturnValue:
    state = console()
    if request.method == "GET":
        token = secrets.token_urlsafe(24)
        body, status = _page("login.html", login_csrf=token, next=_safe_next(request.args.get("next")))
        response: BaseResponse = Response(body, status)
        _set_cookie(response, LOGIN_CSRF_COOKIE, token, 1800, "/login")
        return response
    cookie_token = request.cookies.get(LOGIN_CSRF_COOKIE) or ""
    form_token = request.form.get("csrf_token") or ""
    if not cookie_token or not hmac.compare_digest(cookie_token.encode(), form_token.encode()):
        abort(403, "The login form's security token is missing or out of date: reload the "
                   "page and try again.")
    username = (request.form.get("username") or "").strip()[:64]
    password = request.form.get("password") or ""
    address = request.remote_addr or "?"
    next_page = _safe_next(request.form.get("next"))
    username = throttle_key(username)  # one identity whatever the case
    wait = state.throttle.retry_after(username, address)
    if wait > 0:  # logged once, when the limit was reached
        log.debug("login for %r from %s refused: too many failed logins", username, address)
        return _page("login.html", 429, login_csrf=cookie_token, next=next_page, username=username,
                     error="Too many failed logins for this user or from this address: try again "
                           "in %d minutes." % max(1, round(wait / 60.0)))
    try:
        role = state.users.verify(username, password)
    except ComponentUnavailable as exc:
        log.error("login check failed: %s", exc)
        return _page("login.html", 503, login_csrf=cookie_token, next=next_page, username=username,
                     error=UNAVAILABLE)
    if role is None:
        reached = state.throttle.failed(username, address)
        log.warning("failed login for %r from %s%s", username, address,
                    "; no more logins for this %s for %d s" % (" or ".join(reached), state.throttle.window)
                    if reached else "")
        return _page("login.html", 200, login_csrf=cookie_token, next=next_page, username=username,
                     error="Wrong user name or password.")
    state.throttle.succeeded(username)
    token, _ = state.users.create_session(username, state.session_ttl)
    log.info("%s logged in from %s", username, address)
    response = redirect(next_page, 303)
    _set_cookie(response, SESSION_COOKIE, token, state.session_ttl, "/")
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
    return response


def logout() -> ResponseReturnValue:
    console().users.end_session(g.session)
    response = redirect(url_for("login"), 303)
    response.delete_cookie(SESSION_COOKIE, path="/", secure=console().secure_cookies,
                           httponly=True, samesite="Strict")
    return response


def _set_cookie(response: BaseResponse, name: str, value: str, max_age: int, path: str) -> None:
    response.set_cookie(name, value, max_age=max_age, path=path, httponly=True, samesite="Strict",
                        secure=console().secure_cookies)


# -- appkeys ------------------------------------------------------------------------
def index() -> ResponseReturnValue:
    message = console().users.pop_flash(g.session)
    try:
        appkeys = console().admin().list_appkeys()
    except ComponentUnavailable as exc:
        log.error("listing appkeys failed: %s", exc)
        return _page("index.html", 503, appkeys=[], message=("error", UNAVAILABLE))
    return _page("index.html", appkeys=appkeys, message=message)


def add_appkey() -> ResponseReturnValue:
    _require_operator()
    appkey = (request.form.get("appkey") or "").strip()
    description = (request.form.get("description") or "").strip()
    try:
        if len(description) > 255:
            raise ProbeError("description too long (%d characters): give at most 255" % len(description))
        added = console().admin().add_appkey(appkey, description, by=g.session.username)
    except ProbeError as exc:
        _flash_probe_error(exc)
    else:
        log.info("%s added appkey %s", g.session.username, appkey)
        console().users.set_flash(g.session, "ok", describe.appkey_added(appkey, added))
    return redirect(url_for("index"), 303)


# -- an appkey's services and nodes --------------------------------------------------------
def _node_id(service: str, address: str) -> str:
    return "n" + hashlib.sha1(("%s|%s" % (service, address)).encode("utf-8")).hexdigest()[:12]


def _nodes(appkey: str) -> Tuple[Dict[str, List[Dict[str, Any]]], str]:
    """Admin's node rows (one ZooKeeper read) as page rows, with each live node's age
    (warm-up) and live figures."""
    state = console()
    admin = state.admin()
    now = time.time()
    figures = admin.node_figures(appkey, now, state.live_window)
    services: Dict[str, List[Dict[str, Any]]] = {}
    for node in admin.nodes(appkey):
        age = None if node.registered_at is None else max(0.0, now - node.registered_at)
        row = dict(node.as_dict(), id=_node_id(node.service, node.address), age=age,
                   warming=state.warmup > 0 and age is not None and age < state.warmup,
                   figures=figures.get((node.service, node.address), {}))
        services.setdefault(node.service, []).append(row)
    signature = hashlib.sha1("\n".join("%s|%s" % (r["service"], r["address"])
                                       for rows in services.values() for r in rows)
                             .encode("utf-8")).hexdigest()[:16]
    return services, signature


def _app_context(appkey: str) -> Dict[str, Any]:
    naming.check_appkey(appkey)
    console().admin().require_appkey(appkey)
    services, signature = _nodes(appkey)
    return {"appkey": appkey, "services": services, "signature": signature,
            "refresh": console().refresh, "warmup": console().warmup,
            "live_window": console().live_window, "updated": time.strftime("%H:%M:%S")}


def app_page(appkey: str) -> ResponseReturnValue:
    message = console().users.pop_flash(g.session)
    try:
        context = _app_context(appkey)
    except ComponentUnavailable as exc:
        log.error("reading %s failed: %s", appkey, exc)
        return _page("error.html", 503, message=UNAVAILABLE)
    except ProbeError as exc:
        return _page("error.html", 404, title="Unknown appkey", message=str(exc))
    return _page("app.html", message=message, **context)


def app_live(appkey: str) -> ResponseReturnValue:
    """The live parts of an appkey's page, as htmx out-of-band swaps. If the set of
    nodes changed since the page was drawn, the page reloads instead."""
    try:
        context = _app_context(appkey)
    except ProbeError as exc:
        log.warning("live refresh of %s failed: %s", appkey, exc)
        return _page("_stale.html", 200, error=True)
    if request.args.get("sig") != context["signature"]:
        response = Response("", 200)
        response.headers["HX-Refresh"] = "true"
        return response
    return _page("_live.html", **context)


def app_series(appkey: str, service: str) -> ResponseReturnValue:
    state = console()
    try:
        naming.check_appkey(appkey)
        naming.check_service_name(service)
        return jsonify(state.admin().service_series(appkey, service, time.time()))
    except ComponentUnavailable as exc:
        log.error("chart of %s/%s failed: %s", appkey, service, exc)
        return jsonify({"error": UNAVAILABLE}), 503
    except ProbeError as exc:
        return jsonify({"error": "%s: %s" % (exc.__class__.__name__, exc)}), 400


def node_action(appkey: str) -> ResponseReturnValue:
    _require_operator()
    service = request.form.get("service") or ""
    address = request.form.get("address") or ""
    action = request.form.get("action") or ""
    by = g.session.username
    try:
        naming.check_appkey(appkey)
        admin = console().admin()
        if action == "weight":
            change = admin.set_weight(appkey, service, address, request.form.get("weight", ""), by=by)
        elif action == "disable":
            change = admin.disable(appkey, service, address, by=by)
        elif action == "enable":
            change = admin.enable(appkey, service, address, by=by)
        else:
            abort(400, "Unknown action.")
    except ProbeError as exc:
        _flash_probe_error(exc)
    else:
        console().users.set_flash(g.session, "ok", describe.node_change(change, with_appkey=False))
    return redirect(url_for("app_page", appkey=appkey) if _valid_appkey(appkey) else url_for("index"), 303)


def _valid_appkey(appkey: str) -> bool:
    try:
        naming.check_appkey(appkey)
        return True
    except ProbeError:
        return False


# -- config center ------------------------------------------------------------------------
def _value_cell(value: Any) -> Dict[str, Any]:
    text = describe.config_value(value)
    if len(text) <= EDITABLE_VALUE_CHARS:
        return {"text": text, "editable": True}
    return {"text": text[:200] + "…", "editable": False, "length": len(text.encode("utf-8"))}


def config_page(appkey: str) -> ResponseReturnValue:
    message = console().users.pop_flash(g.session)
    try:
        naming.check_appkey(appkey)
        values = console().admin().list_config(appkey)
    except ComponentUnavailable as exc:
        log.error("reading the config of %s failed: %s", appkey, exc)
        return _page("error.html", 503, message=UNAVAILABLE)
    except ProbeError as exc:
        return _page("error.html", 404, title="Unknown appkey", message=str(exc))
    rows = [dict(_value_cell(value), key=key) for key, value in values.items()]
    return _page("config.html", appkey=appkey, rows=rows, message=message)


def config_action(appkey: str) -> ResponseReturnValue:
    """Set (add or edit) or delete one key, then back to the config page."""
    _require_operator()
    action = request.form.get("action") or ""
    key = (request.form.get("key") or "").strip()
    by = g.session.username
    try:
        naming.check_appkey(appkey)
        admin = console().admin()
        if action == "set":
            result = admin.set_config_json(appkey, key, request.form.get("value") or "", by=by)
        elif action == "delete":
            result = admin.delete_config(appkey, key, by=by)
        else:
            abort(400, "Unknown action.")
    except ProbeError as exc:
        _flash_probe_error(exc)
    else:
        console().users.set_flash(g.session, "ok", _outcome(result))
    return redirect(url_for("config_page", appkey=appkey) if _valid_appkey(appkey)
                    else url_for("index"), 303)


def config_history_page(appkey: str, key: str) -> ResponseReturnValue:
    message = console().users.pop_flash(g.session)
    try:
        naming.check_appkey(appkey)
        rows = console().admin().config_history(appkey, key, limit=HISTORY_ROWS)
    except ComponentUnavailable as exc:
        log.error("reading the history of %s/%s failed: %s", appkey, key, exc)
        return _page("error.html", 503, message=UNAVAILABLE)
    except ProbeError as exc:
        return _page("error.html", 404, title="Unknown appkey or key",
                     message="%s: %s" % (exc.__class__.__name__, exc))
    shown = [dict(row.as_dict(), text=None if row.deleted else _value_cell(row.value)["text"])
             for row in rows]
    return _page("config_history.html", appkey=appkey, key=key, rows=shown, message=message,
                 limit=HISTORY_ROWS)


def config_rollback(appkey: str, key: str) -> ResponseReturnValue:
    _require_operator()
    version = request.form.get("version") or ""
    try:
        naming.check_appkey(appkey)
        naming.check_config_key(key)
        result = console().admin().rollback_config(appkey, key, version, by=g.session.username)
    except ProbeError as exc:
        _flash_probe_error(exc)
    else:
        console().users.set_flash(g.session, "ok", "rollback to version %s: %s" % (
            version, _outcome(result)))
    if not (_valid_appkey(appkey) and naming.is_config_key(key)):
        return redirect(url_for("index"), 303)
    return redirect(url_for("config_history_page", appkey=appkey, key=key), 303)


def _outcome(result: ConfigChange) -> str:
    return describe.config_change_sentence(result)


# -- audit ------------------------------------------------------------------------
def audit() -> ResponseReturnValue:
    appkey = (request.args.get("appkey") or "").strip() or None
    try:
        rows = console().admin().audit(appkey, limit=200)
        appkeys = [row["appkey"] for row in console().admin().list_appkeys()]
    except ComponentUnavailable as exc:
        log.error("reading the audit log failed: %s", exc)
        return _page("audit.html", 503, rows=[], appkeys=[], selected=appkey,
                     message=("error", UNAVAILABLE))
    except ProbeError as exc:
        return _page("audit.html", 400, rows=[], appkeys=[], selected=None,
                     message=("error", "%s: %s" % (exc.__class__.__name__, exc)))
    return _page("audit.html", rows=rows, appkeys=appkeys, selected=appkey, message=None)


# -- formatting -------------------------------------------------------------------------
def fmt_rate(value: Optional[float]) -> str:
    if value is None:
        return "–"
    return "0" if value == 0 else "%.1f" % value if value < 100 else "%.0f" % value


def fmt_ms(value: Optional[float]) -> str:
    if value is None:
        return "–"
    return "%.2f" % value if value < 10 else "%.1f" % value if value < 100 else "%.0f" % value


def fmt_pct(value: Optional[float]) -> str:
    if value is None:
        return "–"
    return "0%" if value == 0 else "%.1f%%" % (value * 100.0)


def fmt_age(seconds: Optional[float]) -> str:
    if seconds is None:
        return "–"
    seconds = int(seconds)
    if seconds < 60:
        return "%ds" % seconds
    if seconds < 3600:
        return "%dm %02ds" % (seconds // 60, seconds % 60)
    if seconds < 86400:
        return "%dh %02dm" % (seconds // 3600, seconds % 3600 // 60)
    return "%dd %02dh" % (seconds // 86400, seconds % 86400 // 3600)
