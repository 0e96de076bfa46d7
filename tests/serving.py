"""Test helper: run the real server (uvicorn) on a free loopback port in a background thread."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn

from finemoe.server import Server, ServerConfig, create_app


@dataclass
class Live:
    base: str  # http://127.0.0.1:PORT
    server: Server  # the app's state (scheduler, metrics)
    uvicorn: uvicorn.Server

    @property
    def v1(self) -> str:
        return self.base + "/v1"


@contextlib.contextmanager
def live_server(engine: Any, config: ServerConfig, graceful_s: int = 2) -> Iterator[Live]:
    """Start the app on port 0 (the OS picks a free one); stop it (lifespan shutdown) on exit."""
    app = create_app(engine, config)
    cfg = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=graceful_s, lifespan="on"
    )
    srv = uvicorn.Server(cfg)
    thread = threading.Thread(target=srv.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = srv.servers[0].sockets[0].getsockname()[1]
    try:
        yield Live(f"http://127.0.0.1:{port}", app.state.server, srv)
    finally:
        srv.should_exit = True
        thread.join(timeout=60)


def metric(text: str, name: str) -> float:
    """The value of one sample line `name` (with its labels, if any) in a Prometheus exposition."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)
