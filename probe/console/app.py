"""The console's Flask application and the WSGI server that runs it.

Flask renders the pages and routes the requests; probe.rpc.httpserver (a selector
that parks connections until a whole request has arrived, h11 parsing, deadlines
and connection caps; shared with /metrics) serves them. Every change goes
through probe.admin.Admin, exactly as the CLI does.
"""

import logging
import os
import threading
from typing import Any, Callable, Optional

from flask import Flask

from ..admin import Admin
from ..rpc.httpserver import BoundedHttpServer, HttpLimits, server_ssl_context
from .auth import LoginThrottle
from .users import UserStore

log = logging.getLogger("probe.console")

DEFAULT_BIND = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_SESSION_TTL = 8 * 3600  # seconds a login lasts
DEFAULT_REFRESH = 3  # seconds between two refreshes of a page's live figures
DEFAULT_LIVE_WINDOW = 20  # seconds of call stats behind a node's live figures
MAX_FORM_BYTES = 16 * 1024  # every console form is tiny


class Console(object):
    """What the views share: the Admin, the user store, the login throttle and options.

    Admin's connections open on first use; `admin()` opens them under a lock so
    that concurrent first requests do not race, and retries on the next request
    if a component was down.
    """

    def __init__(self, config_path: Optional[str] = None, env: Optional[str] = None,
                 session_ttl: float = DEFAULT_SESSION_TTL, secure_cookies: bool = False,
                 refresh: float = DEFAULT_REFRESH, live_window: float = DEFAULT_LIVE_WINDOW,
                 warmup: float = 0.0, throttle: Optional[LoginThrottle] = None) -> None:
        self._admin = Admin(config_path=config_path, env=env)
        self.env = self._admin.env
        self.users = UserStore(self._admin.settings.mysql)
        self.throttle = throttle or LoginThrottle()
        self.session_ttl = int(session_ttl)
        self.secure_cookies = bool(secure_cookies)
        self.refresh = max(1, int(refresh))
        self.live_window = float(live_window)
        self.warmup = float(warmup)

    def admin(self) -> Admin:
        self._admin.open()
        return self._admin

    def close(self) -> None:
        self.users.close()
        self._admin.close()


def create_app(config_path: Optional[str] = None, env: Optional[str] = None,
               **options: Any) -> Flask:
    """The console as a WSGI app. Options: see `Console`."""
    from . import views
    app = Flask("probe.console", root_path=os.path.dirname(os.path.abspath(__file__)))
    app.config.update(MAX_CONTENT_LENGTH=MAX_FORM_BYTES, MAX_FORM_MEMORY_SIZE=MAX_FORM_BYTES,
                      TEMPLATES_AUTO_RELOAD=False, SEND_FILE_MAX_AGE_DEFAULT=3600)
    app.extensions["probe_console"] = Console(config_path=config_path, env=env, **options)
    views.install(app)
    return app


def _is_loopback(host: str) -> bool:
    import ipaddress
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


CONSOLE_LIMITS = HttpLimits(max_body_bytes=MAX_FORM_BYTES, workers=8)


class ConsoleServer(object):
    """The console on probe's bounded HTTP server: `start()` in a thread, or `serve_forever()`.

    :param bind: address to listen on (loopback by default: expose it on purpose)
    :param port: TCP port; 0 picks a free one (see `.port` after `start`)
    :param cert: PEM certificate path; with `key`, serve HTTPS only and mark cookies Secure
    :param threads: request threads (a request holds one only while the app runs)
    :param limits: deadlines and caps of the listener (probe.rpc.httpserver.HttpLimits)
    """

    def __init__(self, app: Optional[Flask] = None, bind: str = DEFAULT_BIND,
                 port: int = DEFAULT_PORT, cert: Optional[str] = None, key: Optional[str] = None,
                 threads: int = 8, config_path: Optional[str] = None, env: Optional[str] = None,
                 limits: Optional[HttpLimits] = None, **options: Any) -> None:
        if bool(cert) != bool(key):
            from ..errors import ConfigError
            raise ConfigError("TLS needs both --cert and --key (got cert=%r key=%r)" % (cert, key))
        self.tls = bool(cert)
        if not self.tls and not _is_loopback(bind):
            log.warning("serving plain HTTP on %s: passwords and session cookies would cross the "
                        "network in clear; serve TLS (--cert/--key) or put an HTTPS proxy in front",
                        bind)
        context = server_ssl_context(cert, key) if cert and key else None  # = self.tls
        if app is None:
            options.setdefault("secure_cookies", self.tls)
            app = create_app(config_path=config_path, env=env, **options)
        self.app = app
        limits = (limits or CONSOLE_LIMITS)._replace(workers=int(threads))
        self.server = BoundedHttpServer(app, bind, int(port), context, limits,
                                        server_name="probe-console")
        self._bind = bind

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        host = self._bind
        host = "[%s]" % host if ":" in host else host
        return "%s://%s:%d" % ("https" if self.tls else "http", host, self.port)

    def start(self) -> "ConsoleServer":
        """Serve in a background thread; the port is already open."""
        self.server.start()
        return self

    def serve_forever(self, on_ready: Optional[Callable[[str], Any]] = None) -> None:
        """Call `on_ready(url)`, serve until interrupted, then stop."""
        if on_ready is not None:
            on_ready(self.url)
        try:
            self.server.serve_forever()
        finally:
            self.stop()

    def stop(self) -> None:
        self.server.stop()
        self.app.extensions["probe_console"].close()
