"""Running a real `threedis serve` app in-process for tests and the benchmark: uvicorn on a free port.

running_service() starts the app's uvicorn server in a thread on 127.0.0.1 and
stops it (lifespan shutdown included) on exit; EventLog reads the events WebSocket
in a thread and lets a test wait for an event without sleeping.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

START_S = 120  # bound on start-up (imports, tiny checkpoints written on first use)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png_bytes(size: tuple[int, int] = (64, 64), mode: str = "L") -> bytes:
    """A depth-like test image: a horizontal ramp."""
    from PIL import Image

    image = Image.linear_gradient("L").rotate(90).resize(size).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@contextlib.contextmanager
def running_service(config: Any, ready: bool = True, log_level: str = "warning",
                    engine_factory: Callable[[], Any] | None = None) -> Iterator[tuple[str, Any]]:
    """(base URL, app) of the service for `config`, served by uvicorn in a thread until the block ends.

    ready: wait until the engine is built too (the page answers before that).
    """
    import uvicorn

    from threedis.engine.serve.app import create_app

    app = create_app(config, engine_factory=engine_factory)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level,
                                           ws="auto", lifespan="on"))
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_S
    while not server.started or (ready and not app.state.jobs.holder.loaded.is_set()):
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test service did not start")
        time.sleep(0.05)
    try:
        yield f"http://{config.host}:{config.port}", app
    finally:
        server.should_exit = True
        thread.join(60)


class EventLog:
    """Every message of one events WebSocket, collected by a reader thread.

    how: "header" (Authorization: Bearer), "message" (the token as the first message) or
    "query" (?token=, which the service refuses).
    """

    def __init__(self, url: str, token: str | None, origin: str | None = None, how: str = "header",
                 headers: dict | None = None) -> None:
        from websockets.sync.client import connect

        query = f"?token={token}" if token and how == "query" else ""
        extra = dict(headers or {})
        if token and how == "header":
            extra["Authorization"] = f"Bearer {token}"
        ws_url = url.replace("http://", "ws://") + f"/api/v1/events{query}"
        self.ws = connect(ws_url, origin=origin, open_timeout=30, additional_headers=extra)
        if token and how == "message":
            self.ws.send(json.dumps({"type": "auth", "token": token}))
        self.events: list[dict] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for message in self.ws:
                with self._changed:
                    self.events.append(json.loads(message))
                    self._changed.notify_all()
        except Exception:  # closed
            pass

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float = 120.0) -> dict:
        """The first event (already seen or to come) for which predicate is true."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for event in self.events:
                    if predicate(event):
                        return event
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no matching event within {timeout} s; got {self.types()}")
                self._changed.wait(left)

    def of(self, job_id: str) -> list[dict]:
        with self._changed:
            return [e for e in self.events if e.get("job") == job_id]

    def types(self) -> list[str]:
        with self._changed:
            return [f"{e['type']}:{e.get('job')}" for e in self.events][-30:]

    def close(self) -> None:
        self.ws.close()
        self._thread.join(10)


def wait_final(client: Any, job_id: str, timeout: float = 120.0) -> dict:
    """Poll GET /jobs/{id} until it leaves queued/running (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] not in ("queued", "running"):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")
        time.sleep(0.1)


def layout_dict(size: int = 64, instances: int = 2) -> dict:
    boxes = [[0.05, 0.1, 0.45, 0.8], [0.55, 0.2, 0.95, 0.9], [0.3, 0.05, 0.7, 0.4]]
    prompts = ["a red cardinal", "a blue jay", "a yellow moon"]
    return {"prompt": "two birds on a branch", "width": size, "height": size,
            "instances": [{"prompt": prompts[i], "box": boxes[i]} for i in range(instances)]}


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
