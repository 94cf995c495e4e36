"""`probe demo`: the hello-world, end to end, from the installed package alone.

It starts a private ZooKeeper, Redis and MariaDB (`probe.dev.stack.Stack`) on free
loopback ports in a temporary folder, registers the appkey ``hello_www``, starts a
DemoService provider in this process (advertising 127.0.0.1, bound to loopback),
calls ``say()`` through `build_client` and prints the answer, ``hello world``.
Whatever happens (an error, Ctrl-C, SIGTERM) everything it started is stopped and
the folder removed. Nothing is read from or written to the current directory.
"""

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from types import FrameType, ModuleType
from typing import TYPE_CHECKING, Any, Callable, Iterator, List, NoReturn, Optional

if TYPE_CHECKING:
    from ..dev.stack import Stack

DEMO_IDL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.thrift")
APPKEY = "hello_www"
SERVICE = "DemoService"
ENV = "dev"
LOOPBACK = "127.0.0.1"
MAX_SLOW_MS = 5000


class DemoServiceHandler(object):
    """DemoService's implementation: the demo's, the examples' and the tests' provider.

    :param name: what ``whoami()`` answers (tests tell nodes apart by it).
    :param errors: the module whose ``DemoError`` ``fail()`` raises; it must be the
        server's own (default: the shipped demo.thrift as `probe.idl.load_module` loads
        it, which any path to that file, symlinks included, shares; an Apache Thrift
        server passes its generated ``ttypes``).
    """

    def __init__(self, name: str = "probe demo", errors: Optional[ModuleType] = None) -> None:
        self.name = name
        self.errors = errors

    def say(self) -> str:
        return "hello world"

    def echo(self, text: str) -> str:
        return text

    def add(self, a: int, b: int) -> int:
        return a + b

    def fail(self, message: str) -> NoReturn:
        errors = self.errors
        if errors is None:
            from ..idl import load_module
            errors = load_module(DEMO_IDL)
        raise errors.DemoError(message=message)

    def slow(self, millis: int) -> str:
        millis = max(0, min(int(millis), MAX_SLOW_MS))  # a caller cannot park a worker for long
        time.sleep(millis / 1000.0)
        return "slept %d ms" % millis

    def whoami(self) -> str:
        return self.name

    def pid(self) -> int:
        return os.getpid()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt while the demo runs, so a kill still
    reaches the clean-up below (SIGINT does so already)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Optional[FrameType]) -> NoReturn:
        raise KeyboardInterrupt("signal %d" % signum)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(out: Optional[Callable[[str], object]] = None, keep_dir: Optional[str] = None) -> str:
    """Run the demo; return the answer of ``say()``.

    :param out: a callable taking one line of progress (default: print to stdout).
    :param keep_dir: a folder for the stack instead of a fresh temporary one
        (it is wiped at the end all the same).
    :raises probe.errors.ProbeError: a part could not start (the message says which).
    """
    from ..dev import stack as devstack
    from ..admin import Admin
    from ..client import build_client
    from ..server import start_service

    say = out or (lambda line: print(line, flush=True))
    workdir = keep_dir or tempfile.mkdtemp(prefix="probe-demo-")
    stack = devstack.Stack(state_dir=os.path.join(workdir, "stack"), ports="free", env=ENV)
    provider = client = None
    with _sigterm_as_interrupt():
        try:
            say("== starting ZooKeeper, Redis and MariaDB on free loopback ports in %s"
                % stack.state_dir)
            stack.up()
            config = stack.config_path
            ports = stack.ports
            say("   zookeeper %s:%d, redis %s:%d, mariadb %s:%d" % (
                LOOPBACK, ports["zookeeper"], LOOPBACK, ports["redis"],
                LOOPBACK, ports["mysql"]))
            say("== registering appkey %s" % APPKEY)
            with Admin(config_path=config, env=ENV) as admin:
                admin.add_appkey(APPKEY, "probe demo")
            say("== starting a %s provider on %s (port chosen by the system)"
                % (SERVICE, LOOPBACK))
            provider = start_service(
                DEMO_IDL, APPKEY, SERVICE, DemoServiceHandler(), port=0, block=False,
                bind_host=LOOPBACK, advertise_host=LOOPBACK, config_path=config, env=ENV,
                shutdown_grace=0.2, metrics=False)
            say("   registered as %s" % provider.address)
            say("== calling %s.say() through probe" % SERVICE)
            client = build_client(DEMO_IDL, APPKEY, SERVICE, config_path=config, env=ENV,
                                  snapshot_dir=False, metrics=False)
            answer = client.say()
            say(answer)
            return answer
        finally:
            say("== cleaning up")
            _teardown(client, provider, stack, workdir)


def _teardown(client: Any, provider: Any, stack: "Stack", workdir: str) -> None:
    """Stop everything the demo started; each step runs even if an earlier one fails."""
    # A second Ctrl-C must not cut the clean-up short.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for step in (lambda: client and client.close(),
                     lambda: provider and provider.stop(grace=0),
                     lambda: stack.down(wipe=True)):
            try:
                step()
            except Exception as exc:  # keep going: the servers must not outlive us
                print("probe demo: clean-up step failed: %s" % exc, file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``probe demo``; returns the exit status."""
    from ..errors import ProbeError
    try:
        answer = run()
    except KeyboardInterrupt:
        print("probe demo: interrupted; everything it started has been stopped",
              file=sys.stderr)
        return 130
    except ProbeError as exc:
        print("probe demo: %s: %s" % (exc.__class__.__name__, exc), file=sys.stderr)
        return 2
    return 0 if answer == "hello world" else 1
