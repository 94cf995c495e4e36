"""probe's web console: see the fleet, move traffic and switch nodes in a browser,
behind a login (`probe console`). See docs/notes/console.md."""

from .app import ConsoleServer, create_app

__all__ = ["ConsoleServer", "create_app"]
