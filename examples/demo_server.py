"""The demo provider: registers DemoService under appkey hello_www and serves it.

    python examples/demo_server.py [port]
"""
import logging
import os
import sys
import time

from probe.server import start_service

IDL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "idl", "demo.thrift")


class DemoServiceHandler(object):
    def __init__(self, name):
        self.name = name

    def say(self):
        return "hello world"

    def echo(self, text):
        return text

    def add(self, a, b):
        return a + b

    def fail(self, message):
        from probe.idl import load_module
        raise load_module(IDL).DemoError(message=message)

    def slow(self, millis):
        time.sleep(millis / 1000.0)
        return "slept %d ms" % millis

    def whoami(self):
        return self.name

    def pid(self):
        return os.getpid()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8081
    start_service(IDL, "hello_www", "DemoService", DemoServiceHandler("demo:%d" % port), port=port)
