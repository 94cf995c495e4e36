"""The demo provider: registers DemoService under appkey hello_www and serves it.

    python examples/demo_server.py [port]
"""
import logging
import os
import sys

from probe.demo import DemoServiceHandler  # noqa: F401 (tests and bench import it from here)
from probe.server import start_service

IDL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "idl", "demo.thrift")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8081
    start_service(IDL, "hello_www", "DemoService", DemoServiceHandler("demo:%d" % port), port=port)
