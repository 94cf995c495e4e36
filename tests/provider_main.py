"""A demo provider in its own process, for the fault tests: SIGTERM, kill -9 and
restarts need a real process. Usage: provider_main.py APPKEY NAME PORT"""

import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

from demo_server import DemoServiceHandler  # noqa: E402
from probe.server import start_service  # noqa: E402

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(name)s: %(message)s")
    appkey, name, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    idl = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "idl", "demo.thrift")
    start_service(idl, appkey, "DemoService", DemoServiceHandler(name), port=port,
                  shutdown_grace=float(os.environ.get("PROBE_TEST_GRACE", "0.5")),
                  workers=int(os.environ.get("PROBE_TEST_WORKERS", "1")),
                  stats_interval=float(os.environ.get("PROBE_TEST_STATS_INTERVAL", "5")))
