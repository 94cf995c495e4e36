"""The `probe` command: a thin shell over probe.admin and probe.dev.stack."""

import argparse
import json
import logging
import sys
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Sequence, Union, cast

from .errors import InvalidArgument, InvalidConfigValue, ProbeError

if TYPE_CHECKING:
    from .admin import Admin
    from .governance.describe import Columns

MAX_LIST_LIMIT = 10000  # rows a listing (--limit) may ask for


def _print_table(rows: Sequence[Any], columns: "Columns") -> None:
    from .governance.describe import table
    print(table(rows, columns))


def _print_json(rows: Sequence[Any]) -> None:
    print(json.dumps([row.as_dict() if hasattr(row, "as_dict") else row for row in rows],
                     indent=2, ensure_ascii=False, default=str))


def _print_rows(args: argparse.Namespace, rows: Sequence[Any], columns: "Columns",
                people_rows: Optional[Sequence[Any]] = None, title: Optional[str] = None) -> int:
    """`--json`: the rows as JSON; else the title and a table of `people_rows` (the
    rows in words, default the rows themselves)."""
    if args.json:
        _print_json(rows)
        return 0
    if title:
        print(title)
    _print_table(rows if people_rows is None else people_rows, columns)
    return 0


def _admin(args: argparse.Namespace) -> "Admin":
    from .admin import Admin
    return Admin(config_path=args.config, env=args.env)


def cmd_appkey(args: argparse.Namespace) -> int:
    from .governance import describe
    with _admin(args) as admin:
        if args.action == "add":
            added = admin.add_appkey(args.appkey, args.description, by=args.by)
            print(describe.appkey_added(args.appkey, added))
        elif args.action == "remove":
            removed = admin.remove_appkey(args.appkey, by=args.by)
            print(describe.appkey_removed(args.appkey, removed))
            return 0 if removed else 1
        else:
            return _print_rows(args, admin.list_appkeys(), describe.APPKEY_COLUMNS)
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    from .governance import describe
    with _admin(args) as admin:
        rows = admin.nodes(args.appkey, args.service)
    return _print_rows(args, rows, describe.NODE_COLUMNS, describe.node_rows(rows),
                       "env %s, appkey %s" % (admin.env, args.appkey))


def cmd_node(args: argparse.Namespace) -> int:
    from .governance import describe
    with _admin(args) as admin:
        if args.action == "weight":
            change = admin.set_weight(args.appkey, args.service, args.address, args.weight,
                                      create=args.create, by=args.by)
        elif args.action == "disable":
            change = admin.disable(args.appkey, args.service, args.address, create=args.create, by=args.by)
        else:
            change = admin.enable(args.appkey, args.service, args.address, create=args.create, by=args.by)
    print(describe.node_change(change))
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    """Keep a node registered for a server in another language while it answers."""
    import signal
    from . import naming
    from .governance.register import ForeignNode
    host, port = naming.parse_address(args.address)
    node = ForeignNode(args.appkey, args.service, host, port, transport=args.transport,
                       protocol=args.protocol, weight=args.weight, check=args.check,
                       interval=args.interval, check_timeout=args.check_timeout,
                       rise=args.rise, fall=args.fall, config_path=args.config, env=args.env)
    previous = {sig: signal.signal(sig, lambda signum, frame: node.stop())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        node.open()
        print("keeping %s registered while %s:%d answers its %s (%s + %s); stop with SIGTERM"
              % (node.path, host, port, "call of %s()" % args.check if args.check
                 else "TCP connect", args.transport, args.protocol), flush=True)
        node.run()
    finally:
        node.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("deregistered %s" % node.path, flush=True)
    return 0


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a number of seconds: %r" % text)
    return value


def _add_register_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    from .governance.register import (DEFAULT_CHECK_TIMEOUT, DEFAULT_FALL, DEFAULT_INTERVAL,
                                      DEFAULT_RISE)
    register = sub.add_parser(
        "register", help="keep a node registered for a server probe did not start (another "
                         "language), while it answers its check; SIGTERM deregisters")
    register.add_argument("appkey")
    register.add_argument("service", help="the service name, as in the IDL")
    register.add_argument("address", help="host:port the server listens on (as consumers reach it)")
    register.add_argument("--transport", choices=("buffered", "framed"), default="buffered",
                          help="what the server speaks (default buffered)")
    register.add_argument("--protocol", choices=("binary", "compact"), default="binary",
                          help="what the server speaks (default binary)")
    register.add_argument("--weight", help="weight stored when Redis has none for the node "
                                           "yet (0..1000, default 10); operator edits win")
    register.add_argument("--check", metavar="METHOD",
                          help="check with a real Thrift call of METHOD (no arguments; any "
                               "reply, a TApplicationException included, counts as alive) "
                               "instead of a TCP connect")
    register.add_argument("--interval", type=_seconds, default=DEFAULT_INTERVAL,
                          help="seconds between checks (%g)" % DEFAULT_INTERVAL)
    register.add_argument("--check-timeout", type=_seconds, default=DEFAULT_CHECK_TIMEOUT,
                          help="seconds one check may take (%g)" % DEFAULT_CHECK_TIMEOUT)
    register.add_argument("--rise", type=int, default=DEFAULT_RISE,
                          help="passing checks that register the node (%d)" % DEFAULT_RISE)
    register.add_argument("--fall", type=int, default=DEFAULT_FALL,
                          help="failing checks that deregister it (%d)" % DEFAULT_FALL)
    register.set_defaults(func=cmd_register)


def cmd_audit(args: argparse.Namespace) -> int:
    from .governance import describe
    with _admin(args) as admin:
        rows = admin.audit(args.appkey, args.limit)
    return _print_rows(args, rows, describe.AUDIT_COLUMNS)


def cmd_stats(args: argparse.Namespace) -> int:
    from .governance import describe
    with _admin(args) as admin:
        rows = admin.stats(args.appkey, args.service, minutes=args.minutes, side=args.side)
    return _print_rows(args, rows, describe.STATS_COLUMNS, describe.stats_rows(rows),
                       "env %s, appkey %s, last %g min, %s side"
                       % (admin.env, args.appkey, args.minutes, args.side))


def cmd_console(args: argparse.Namespace) -> int:
    """`probe console`: serve the web console, or add/remove its users."""
    if args.console_action is None:
        from .console import ConsoleServer
        server = ConsoleServer(bind=args.bind, port=args.port, cert=args.cert, key=args.key,
                               config_path=args.config, env=args.env, session_ttl=args.session_ttl,
                               warmup=args.warmup)
        try:
            server.serve_forever(on_ready=lambda url: print("probe console (env %s) on %s"
                                                            % (server.app.extensions["probe_console"].env, url),
                                                            flush=True))
        except KeyboardInterrupt:
            pass
        return 0
    from .console.users import UserStore, normalize_username
    from .settings import load_settings
    store = UserStore(load_settings(args.config, args.env).mysql)
    try:
        if args.user_action == "add":
            if sys.stdin.isatty():
                import getpass
                password = getpass.getpass("password for %s: " % args.name)
            else:
                password = sys.stdin.readline().rstrip("\r\n")
            added = store.add_user(args.name, password, args.role)
            print("console user %s %s (role %s)" % (normalize_username(args.name),
                                                    "added" if added else "updated", args.role))
        else:
            removed = store.remove_user(args.name)
            print("console user %s %s" % (args.name, "removed" if removed else "did not exist"))
            return 0 if removed else 1
    finally:
        store.close()
    return 0


def _add_console_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    console = sub.add_parser("console", help="serve the web console; manage its users")
    console.add_argument("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    console.add_argument("--port", type=whole_number("--port", 0, 65535), default=8080,
                         help="TCP port (default 8080)")
    console.add_argument("--cert", help="PEM certificate: serve HTTPS (with --key)")
    console.add_argument("--key", help="PEM private key of --cert")
    console.add_argument("--session-ttl", type=whole_number("--session-ttl", 60, 30 * 86400),
                         default=8 * 3600, help="seconds a login lasts (default 28800)")
    console.add_argument("--warmup", type=number("--warmup", 0, 3600, low_inclusive=True), default=0.0,
                         help="consumers' warm-up in seconds: younger live nodes are marked (default 0)")
    console_sub = console.add_subparsers(dest="console_action", metavar="ACTION")
    user = console_sub.add_parser("user", help="add or remove console users (MySQL console_users)")
    user_sub = user.add_subparsers(dest="user_action", metavar="ACTION")
    user_sub.required = True
    add = user_sub.add_parser("add", help="add a user, or reset their password and role; password on stdin")
    add.add_argument("name")
    add.add_argument("--role", choices=("viewer", "operator"), required=True)
    remove = user_sub.add_parser("remove", help="remove a user and end their sessions")
    remove.add_argument("name")
    console.set_defaults(func=cmd_console)


def cmd_zk(args: argparse.Namespace) -> int:
    """`probe zk secure`: put the configured credentials' ACL on an open registry."""
    with _admin(args) as admin:
        changed = admin.secure_registry()
        user = admin.settings.zookeeper.auth_user
    for tree, count in changed.items():
        print("%s: ACL set on %d znode(s)" % (tree, count))
    print("every znode above now allows digest user %r all, everyone else read only" % user)
    return 0


def cmd_stack(args: argparse.Namespace) -> int:
    from .dev import stack as devstack
    stack = devstack.Stack(state_dir=args.dir or devstack.DEFAULT_STATE_DIR,
                           ports="free" if args.free_ports else "dev",
                           secure=True if args.secure else None)
    if args.action == "up":
        status = stack.up()
        _print_stack(status)
        print("config: %s" % stack.config_path)
        print("use it: export PROBE_CONFIG=%s" % stack.config_path)
    elif args.action == "down":
        stack.down(wipe=args.wipe)
        print("stack in %s stopped%s" % (stack.state_dir, " and wiped" if args.wipe else ""))
    else:
        status = stack.status()
        _print_stack(status)
        return 0 if all(c["running"] for c in status.values()) else 3
    return 0


def _print_stack(status: Dict[str, Dict[str, Any]]) -> None:
    rows = [{"component": name, "state": "running" if c["running"] else "stopped",
             "address": c.get("address") or "", "pid": c.get("pid") or ""}
            for name, c in sorted(status.items())]
    _print_table(rows, [("component", "COMPONENT"), ("state", "STATE"), ("address", "ADDRESS"),
                        ("pid", "PID")])


def _config_value(args: argparse.Namespace) -> Union[str, bytes]:
    """The JSON text of `probe config set`: the argument, or with `-` standard input,
    or with `--file PATH` (or `@PATH`: no JSON text starts with @) a file; at most
    MAX_VALUE_BYTES (one more byte is read to tell)."""
    from .configcenter.values import MAX_VALUE_BYTES
    if args.file is not None and args.value is not None:
        raise InvalidArgument("give the value as an argument, as - (standard input) or with "
                              "--file PATH, not two of them")
    if args.file is None and args.value is None:
        raise InvalidArgument("give the value: as JSON text, as - to read standard input, or "
                              "with --file PATH")
    if args.file is None and args.value.startswith("@") and len(args.value) > 1:
        args.file = args.value[1:]
    elif args.file is None and args.value != "-":
        return args.value
    try:
        if args.file is None:
            data = sys.stdin.buffer.read(MAX_VALUE_BYTES + 1)
        else:
            with open(args.file, "rb") as handle:
                data = handle.read(MAX_VALUE_BYTES + 1)
    except OSError as exc:
        raise InvalidArgument("cannot read the value from %s: %s" % (
            "standard input" if args.file is None else repr(args.file), exc.strerror or exc))
    if len(data) > MAX_VALUE_BYTES:
        raise InvalidConfigValue("config value is over the limit of %d bytes (1 MiB less 1 KiB "
                                 "for the znode path)" % MAX_VALUE_BYTES)
    return data.rstrip(b"\r\n")  # a file's or a heredoc's last newline is not part of it


def cmd_config(args: argparse.Namespace) -> int:
    from .governance import describe
    value = _config_value(args) if args.action == "set" else None  # before any connection
    with _admin(args) as admin:
        if args.action == "set":
            change = admin.set_config_json(args.appkey, args.key, cast(Union[str, bytes], value),
                                           by=args.by)  # read above, as the action is set
        elif args.action == "delete":
            change = admin.delete_config(args.appkey, args.key, by=args.by)
        elif args.action == "rollback":
            change = admin.rollback_config(args.appkey, args.key, args.version, by=args.by)
        elif args.action == "get":
            print(json.dumps(admin.get_config(args.appkey, args.key), ensure_ascii=False))
            return 0
        elif args.action == "list":
            values = admin.list_config(args.appkey)
            if args.json:
                print(json.dumps(values, indent=2, ensure_ascii=False))
            else:
                for key, value in values.items():
                    print("%s\t%s" % (key, json.dumps(value, ensure_ascii=False)))
            return 0
        elif args.action == "history":
            rows = admin.config_history(args.appkey, args.key, args.limit)
            return _print_rows(args, rows, describe.HISTORY_COLUMNS, describe.history_rows(rows))
        else:
            print(describe.config_restore(admin.restore_config(args.appkey, by=args.by)))
            return 0
    print(describe.config_change_line(change))
    return 0


def _add_config_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    config = sub.add_parser("config", help="live configuration (ZooKeeper, history in MySQL)")
    actions = config.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    for action, text in (("set", "set a key to a JSON value"), ("get", "print a key's JSON value"),
                         ("list", "list the keys and values"), ("delete", "delete a key"),
                         ("history", "a key's changes, newest first"),
                         ("rollback", "write an old version as a new change"),
                         ("restore", "write back keys missing in ZooKeeper from MySQL history")):
        one = actions.add_parser(action, help=text)
        one.add_argument("appkey")
        if action not in ("list", "restore"):
            one.add_argument("key")
        if action == "set":
            one.add_argument("value", nargs="?",
                             help="JSON, e.g. 42, '\"text\"', '[1, 2]', '{\"a\": 1}'; - reads it "
                                  "from standard input (up to 1 MiB)")
            one.add_argument("--file", metavar="PATH",
                             help="read the JSON value from a file (also: @PATH as the value)")
        if action == "rollback":
            one.add_argument("version", type=whole_number("version", 1, 2 ** 63 - 1))
        if action in ("set", "delete", "rollback", "restore"):
            one.add_argument("--by", help="who makes the change (default: the OS user)")
        if action in ("list", "history"):
            one.add_argument("--json", action="store_true")
        if action == "history":
            one.add_argument("--limit", type=whole_number("--limit", 1, MAX_LIST_LIMIT), default=100)
    config.set_defaults(func=cmd_config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="probe", description="probe: thrift service governance")
    parser.add_argument("--config", help="config YAML (default: PROBE_CONFIG or the packaged one)")
    parser.add_argument("--env", help="env name (default: PROBE_ENV or hostname rules)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what probe does")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    appkey = sub.add_parser("appkey", help="add, list or remove appkeys (MySQL serviceapp)")
    appkey_sub = appkey.add_subparsers(dest="action", metavar="ACTION")
    appkey_sub.required = True
    add = appkey_sub.add_parser("add", help="register an appkey (creates the schema if missing)")
    add.add_argument("appkey")
    add.add_argument("--description", default="")
    remove = appkey_sub.add_parser("remove", help="unregister an appkey")
    remove.add_argument("appkey")
    for one in (add, remove):
        one.add_argument("--by", help="who makes the change, for the audit log (default: the OS user)")
    listing = appkey_sub.add_parser("list", help="list appkeys")
    listing.add_argument("--json", action="store_true")
    appkey.set_defaults(func=cmd_appkey)

    nodes = sub.add_parser("nodes", help="live nodes joined with their Redis settings")
    nodes.add_argument("appkey")
    nodes.add_argument("service", nargs="?")
    nodes.add_argument("--json", action="store_true")
    nodes.set_defaults(func=cmd_nodes)

    node = sub.add_parser("node", help="change a node's weight or switch it off/on")
    node_sub = node.add_subparsers(dest="action", metavar="ACTION")
    node_sub.required = True
    for action, text in (("weight", "set the weight (0..1000)"), ("disable", "switch off (valid=0)"),
                         ("enable", "switch on (valid=1)")):
        one = node_sub.add_parser(action, help=text)
        one.add_argument("appkey")
        one.add_argument("service")
        one.add_argument("address", help="ip:port as registered")
        if action == "weight":
            one.add_argument("weight", help="whole number 0..1000")
        one.add_argument("--create", action="store_true",
                         help="store settings for a node that is not registered yet")
        one.add_argument("--by", help="who makes the change (default: the OS user)")
    node.set_defaults(func=cmd_node)

    audit = sub.add_parser("audit", help="list governance changes")
    audit.add_argument("appkey", nargs="?")
    audit.add_argument("--limit", type=whole_number("--limit", 1, MAX_LIST_LIMIT), default=50)
    audit.add_argument("--json", action="store_true")
    audit.set_defaults(func=cmd_audit)

    stats = sub.add_parser("stats", help="calls, errors and latency per method and node")
    stats.add_argument("appkey")
    stats.add_argument("service", nargs="?")
    stats.add_argument("--minutes", type=number("--minutes", 0, 24 * 60), default=5)
    stats.add_argument("--side", choices=("server", "client"), default="server")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(func=cmd_stats)

    stack = sub.add_parser("stack", help="the local ZooKeeper, Redis and MariaDB")
    stack.add_argument("action", choices=("up", "down", "status"))
    stack.add_argument("--dir", help="state folder (default: PROBE_STACK_DIR or ~/.probe/stack)")
    stack.add_argument("--free-ports", action="store_true", help="pick free ports, not the dev ones")
    stack.add_argument("--wipe", action="store_true", help="with down: delete the data too")
    stack.add_argument("--secure", action="store_true",
                       help="with up: ZooKeeper digest ACLs, Redis ACL user + TLS, MariaDB TLS, "
                            "certificates (kept for the state folder until down --wipe)")
    stack.set_defaults(func=cmd_stack)

    zk = sub.add_parser("zk", help="ZooKeeper registry maintenance")
    zk.add_argument("action", choices=("secure",),
                    help="secure: give /services and /configs of the env the ACL of "
                         "zkserver.<env>.auth (that user all, everyone else read)")
    zk.set_defaults(func=cmd_zk)

    demo = sub.add_parser("demo", help="hello world end to end on a private stack, then clean up")
    from .demo import main as demo_main  # stdlib imports only; the parts load when it runs
    demo.set_defaults(func=lambda args: demo_main())
    _add_console_parser(sub)
    _add_config_commands(sub)
    _add_register_parser(sub)
    return parser


def whole_number(name: str, low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number low..high in ASCII digits, else InvalidArgument."""
    def parse(text: str) -> int:
        stripped = text.strip()
        digits = stripped[1:] if stripped.startswith("-") else stripped
        if not (digits.isascii() and digits.isdigit()) or len(digits) > 20 \
                or not low <= int(stripped) <= high:
            raise InvalidArgument("bad %s %r: give a whole number %d..%d" % (name, text, low, high))
        return int(stripped)
    return parse


def number(name: str, low: float, high: float,
           low_inclusive: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in (low, high] (or [low, high]), else InvalidArgument."""
    def parse(text: str) -> float:
        try:
            value = float(text) if text.strip().isascii() and len(text) <= 32 else None
        except ValueError:
            value = None
        if value is None or value != value or not (low <= value if low_inclusive else low < value) \
                or value > high:
            raise InvalidArgument("bad %s %r: give a number %s %g and <= %g" % (
                name, text, ">=" if low_inclusive else ">", low, high))
        return value
    return parse


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except ProbeError as exc:  # a bad numeric argument (argparse calls its type)
        print("probe: %s: %s" % (exc.__class__.__name__, exc), file=sys.stderr)
        return 2
    if args.verbose:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger = logging.getLogger("probe")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        return args.func(args)
    except ProbeError as exc:
        print("probe: %s: %s" % (exc.__class__.__name__, exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # never a traceback (it names internals): --verbose logs it
        if args.verbose:
            logging.getLogger("probe.cli").error("unexpected error", exc_info=True)
        print("probe: unexpected %s; run with --verbose for details" % type(exc).__name__,
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
