"""A FastAPI app calling a probe service through the asyncio client.

    pip install 'thriftprobe[fastapi]'
    uvicorn examples.fastapi_app:app --port 8000      # (from the repo root)
    curl localhost:8000/hello          # {"message": "hello world", "node": "..."}
    curl 'localhost:8000/add?a=2&b=40' # {"sum": 42}

One client for the whole app, built in the lifespan on the server's event loop
and closed with it: its methods are coroutines, so a slow provider never stalls
the other requests on the loop, and many calls run at once over the client's
per-node connection pools. Set PROBE_APPKEY (default hello_www) and the usual
PROBE_CONFIG / PROBE_ENV. A provider to call: examples/aio_server.py or
examples/demo_server.py.
"""

import os
from contextlib import asynccontextmanager
from typing import AsyncIterator, Dict, Union

from fastapi import FastAPI, HTTPException, Request

import probe
from probe.aio import build_client
from probe.errors import NoAvailableNode, NodeCallFailed, NodeUnreachable

IDL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "idl", "demo.thrift")
demo = probe.load_thrift(IDL)  # the IDL module: its exceptions are the ones the client raises


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.demo = await build_client(IDL, os.environ.get("PROBE_APPKEY", "hello_www"),
                                        "DemoService", socket_timeout=1000,
                                        idempotent=["say", "add", "whoami"])
    try:
        yield
    finally:
        await app.state.demo.close()


app = FastAPI(title="probe + FastAPI", lifespan=lifespan)


@app.get("/hello")
async def hello(request: Request) -> Dict[str, str]:
    client = request.app.state.demo
    try:
        return {"message": await client.say(), "node": await client.whoami()}
    except (NoAvailableNode, NodeUnreachable, NodeCallFailed):
        # Say what failed, not how: the details are in the app's log.
        raise HTTPException(status_code=503, detail="DemoService is unavailable")


@app.get("/add")
async def add(request: Request, a: int, b: int) -> Dict[str, int]:
    try:
        return {"sum": await request.app.state.demo.add(a, b)}
    except (NoAvailableNode, NodeUnreachable, NodeCallFailed):
        raise HTTPException(status_code=503, detail="DemoService is unavailable")


@app.get("/fail")
async def fail(request: Request, message: str) -> Dict[str, Union[str, bool]]:
    try:
        await request.app.state.demo.fail(message)
    except demo.DemoError as exc:  # a declared exception is an answer, not an outage
        return {"failed": True, "message": exc.message}
    return {"failed": False, "message": ""}
