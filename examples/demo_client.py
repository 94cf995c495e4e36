"""The demo consumer: finds a DemoService node of appkey hello_www and calls say().

    python examples/demo_client.py
"""
import os

from probe.client import build_client

IDL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "idl", "demo.thrift")

if __name__ == "__main__":
    client = build_client(IDL, "hello_www", "DemoService")
    print(client.say())
    client.close()
