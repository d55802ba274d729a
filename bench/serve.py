"""`threedis serve` overheads: submit-to-start latency, event fan-out to 20 WebSocket clients, idle RSS.

    python bench/serve.py [--jobs 10] [--clients 20] [--events 2000] [--out bench/results]

- latency: with the worker idle, the time from sending POST /jobs to the "started"
  event arriving on a WebSocket (client side), and created -> started as the
  service recorded it; tiny checkpoints, 1 step, 64x64, uploaded depth.
- events: N step-sized events published from a non-loop thread (as the render worker
  does) through the service's hub to C connected WebSocket clients; events/s per
  client and messages/s in all, until every client has every event.
- start-up and memory: a `threedis serve` subprocess's seconds from launch to its
  first answer (the page: the engine still loading) and to its models being ready;
  its RSS once ready (no render yet) and after one tiny render (the tiny models loaded).

The WebSocket clients are threads of this same process (sharing its GIL with the
service), so the fan-out numbers are a lower bound. Each row records the load
average: on a shared machine the numbers move with it. Not a timed test: numbers
go to bench/results/serve-<device>.jsonl, one row per metric.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # serve_helpers: in-process uvicorn

from serve_helpers import EventLog, free_port, layout_dict, png_bytes, running_service  # noqa: E402


def versions() -> dict:
    from threedis.kernels.bench_attention import versions as base

    out = base()
    for name in ("fastapi", "uvicorn", "websockets"):
        out[name] = __import__(name).__version__
    return out


def device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores, {platform.machine()})"


def quantiles(values: list[float]) -> dict:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]  # noqa: E731
    return {"p20": pick(0.2), "p50": statistics.median(ordered), "p80": pick(0.8), "n": len(ordered)}


def bench_latency(url: str, client, events: EventLog, jobs: int) -> list[dict]:
    body_of = lambda depth_id: {"layout": layout_dict(), "options": {  # noqa: E731
        "steps": 1, "depth": {"source": "upload", "upload": depth_id}}}
    depth_id = client.post("/api/v1/uploads", files={"file": ("d.png", png_bytes(), "image/png")},
                           data={"kind": "depth"}).json()["id"]
    seen, recorded = [], []
    for i in range(jobs + 1):  # the first job loads the models: warm-up, not counted
        t0 = time.perf_counter()
        job_id = client.post("/api/v1/jobs", json=body_of(depth_id)).json()["id"]
        events.wait_for(lambda e: e.get("job") == job_id and e["type"] == "started")
        t1 = time.perf_counter()
        events.wait_for(lambda e: e.get("job") == job_id and e["type"] in ("done", "failed"))
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if i:
            seen.append((t1 - t0) * 1000)
            recorded.append((job["started"] - job["created"]) * 1000)
    return [{"metric": "submit_to_started_event_ms", **quantiles(seen)},
            {"metric": "created_to_started_recorded_ms", **quantiles(recorded)}]


def bench_events(url: str, token: str, app, clients: int, count: int) -> list[dict]:
    logs = [EventLog(url, token) for _ in range(clients)]
    for log in logs:
        log.wait_for(lambda e: e["type"] == "snapshot")
    hub = app.state.hub
    payload = {"type": "step", "job": "bench", "status": "running", "position": 0, "stage": "denoise", "total": count}

    def publish() -> None:
        for i in range(count):
            hub.publish({**payload, "step": i + 1})

    t0 = time.perf_counter()
    thread = threading.Thread(target=publish)
    thread.start()
    for log in logs:
        log.wait_for(lambda e: e.get("job") == "bench" and e.get("step") == count, timeout=600)
    wall = time.perf_counter() - t0
    thread.join()
    got = [sum(1 for e in log.events if e.get("job") == "bench") for log in logs]
    for log in logs:
        log.close()
    return [{"metric": "event_fanout", "clients": clients, "events": count, "wall_s": wall,
             "events_per_s_per_client": count / wall, "messages_per_s": count * clients / wall,
             "all_delivered": all(n == count for n in got)}]


def bench_memory(port: int, root: Path) -> list[dict]:
    import httpx
    import psutil

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "threedis.engine.cli", "serve", "--no-auth", "--port", str(port),
                             "--out", str(root / "mem-out")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    url = f"http://127.0.0.1:{port}"
    launched = time.monotonic()
    answered = ready = None
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            deadline = launched + 180
            while ready is None:
                try:
                    state = client.get("/api/v1/system").json()["state"]
                    answered = answered or time.monotonic()
                    if state == "ready":
                        ready = time.monotonic()
                    elif state == "failed":
                        raise RuntimeError("the service could not load its models")
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the service did not start")
                time.sleep(0.05)
            time.sleep(2.0)  # let start-up garbage settle
            idle = psutil.Process(proc.pid).memory_info().rss
            depth_id = client.post("/api/v1/uploads", files={"file": ("d.png", png_bytes(), "image/png")},
                                   data={"kind": "depth"}).json()["id"]
            job = client.post("/api/v1/jobs", json={"layout": layout_dict(), "options": {
                "steps": 1, "depth": {"source": "upload", "upload": depth_id}}}).json()["id"]
            while client.get(f"/api/v1/jobs/{job}").json()["status"] in ("queued", "running"):
                time.sleep(0.2)
            after = psutil.Process(proc.pid).memory_info().rss
    finally:
        proc.terminate()
        proc.wait(30)
    return [{"metric": "startup_first_answer_s", "value": answered - launched},
            {"metric": "startup_models_ready_s", "value": ready - launched},
            {"metric": "rss_idle_mb", "value": idle / 2**20},
            {"metric": "rss_after_one_tiny_render_mb", "value": after / 2**20}]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    import httpx

    from threedis.engine.serve import ServeConfig

    rows = []
    with tempfile.TemporaryDirectory(prefix="threedis-bench-serve-") as tmp:
        root = Path(tmp)
        token = "bench-token"
        config = ServeConfig(out=root / "out", port=free_port(), token=token)
        with running_service(config) as (url, app):
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
                events = EventLog(url, token)
                rows += bench_latency(url, client, events, args.jobs)
                events.close()
            rows += bench_events(url, token, app, args.clients, args.events)
        rows += bench_memory(free_port(), root)
    name = device()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load = round(os.getloadavg()[0], 2)
    rows = [{"bench": "serve", **row, "device": name, "load_avg_1min": load, "when": stamp, "versions": versions()}
            for row in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    slug = "cpu" if name.startswith("cpu") else name.lower().replace(" ", "-")
    path = args.out / f"serve-{slug}.jsonl"
    path.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows), encoding="utf-8")
    for row in rows:
        shown = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items() if k not in ("versions", "bench")}
        print(shown)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
