"""The demo provider on asyncio: DemoService's methods as `async def`, served on
one loop by probe.aio.start_service until SIGTERM/SIGINT.

    python examples/aio_server.py [port]
"""
import asyncio
import logging
import os
import sys

from probe import load_thrift
from probe.aio import start_service

IDL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "idl", "demo.thrift")
demo = load_thrift(IDL)


class AsyncDemoHandler(object):
    """DemoService with coroutine methods. `inflight` / `most_inflight` count the
    calls running at once (the tests read them)."""

    def __init__(self, name: str = "probe aio demo") -> None:
        self.name = name
        self.inflight = 0
        self.most_inflight = 0
        self.calls = 0

    async def say(self) -> str:
        return "hello world"

    async def echo(self, text: str) -> str:
        return text

    async def add(self, a: int, b: int) -> int:
        return a + b

    async def fail(self, message: str) -> str:
        if message == "undeclared":
            raise RuntimeError("secret database password in this text")
        raise demo.DemoError(message=message)

    async def slow(self, millis: int) -> str:
        self.inflight += 1
        self.calls += 1
        self.most_inflight = max(self.most_inflight, self.inflight)
        try:
            await asyncio.sleep(millis / 1000.0)
        finally:
            self.inflight -= 1
        return "slept %d ms" % millis

    async def whoami(self) -> str:
        return self.name

    async def pid(self) -> int:
        return os.getpid()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8081
    appkey = sys.argv[2] if len(sys.argv) > 2 else "hello_www"
    name = sys.argv[3] if len(sys.argv) > 3 else "aio:%d" % port
    asyncio.run(start_service(IDL, appkey, "DemoService", AsyncDemoHandler(name), port=port,
                              shutdown_grace=float(os.environ.get("PROBE_TEST_GRACE", "1.0"))))
