"""The routes: /api/v1 (jobs, uploads, depth, plan, system, events) and the editor page.

Handlers are thin: they parse, call the JobManager / UploadStore / planner, and turn
UserError subclasses into 4xx answers of one shape,
{"detail": {"message": "...", "problems": [{"field", "message"}, ...]}}.
Blocking work (SQLite, PIL) runs in FastAPI's thread pool, renders in the worker
thread: the event loop only moves bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import re
from pathlib import Path
from typing import Any, Callable

from fastapi import Body, FastAPI, File, Form, Request, UploadFile, WebSocket, WebSocketDisconnect
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from threedis import Engine, UserError, __version__
from threedis.engine.serve.config import ServeConfig
from threedis.engine.serve.engines import default_factory
from threedis.engine.serve.events import EventHub
from threedis.engine.serve.history import History
from threedis.engine.serve.jobs import API, JobManager
from threedis.engine.serve.requests import RequestError, defaults_for, resolve_layout
from threedis.engine.serve.security import Guard
from threedis.engine.serve.system import plan_rows, system_info
from threedis.engine.serve.uploads import UploadStore

log = logging.getLogger("threedis.serve")

STATIC_DIR = Path(__file__).parent / "static"
MULTIPART_SLACK = 64 * 1024  # form boundaries and the kind field around an upload's bytes

_JOB_EXAMPLE = {
    "layout": {"prompt": "two birds on a branch", "width": 512, "height": 512,
               "instances": [{"prompt": "a red cardinal", "box": [0.08, 0.22, 0.45, 0.7]}]},
    "options": {"seed": 0, "steps": 20, "guidance": 10.0, "sam": False, "depth": {"source": "stage1"}},
}


def _error(status: int, message: str, problems: list | None = None) -> JSONResponse:
    return JSONResponse({"detail": {"message": message, "problems": problems or []}}, status_code=status)


def index_page(config: ServeConfig) -> str:
    """index.html with the token and the tiny flag as meta tags (the page reads them; no other channel)."""
    path = STATIC_DIR / "index.html"
    page = path.read_text(encoding="utf-8") if path.is_file() else (
        "<!doctype html><html><head><title>threedis</title></head>"
        "<body><p>threedis serve: the web editor is not installed; the API is at /docs.</p></body></html>")
    tags = (f'<meta name="threedis-token" content="{html.escape(config.token or "")}">'
            f'<meta name="threedis-tiny" content="{1 if config.tiny else 0}">')
    page = re.sub(r'<meta name="threedis-(token|tiny)"[^>]*>', "", page)
    head = re.search(r"<head[^>]*>", page, re.IGNORECASE)
    return page[:head.end()] + tags + page[head.end():] if head else tags + page


def _swagger_assets() -> str | None:
    """Swagger UI's files from the swagger-ui-bundle package (the serve extra), or None: FastAPI's CDN page."""
    try:
        import swagger_ui_bundle  # optional; without it /docs loads Swagger UI from a CDN
    except ImportError:
        return None
    return str(swagger_ui_bundle.swagger_ui_path)


def create_app(config: ServeConfig, engine_factory: Callable[[], Engine] | None = None) -> FastAPI:
    """One service: its history, uploads, event hub, job manager (with the Engine) and routes."""
    history = History(config.history_path)
    uploads = UploadStore(config.uploads_dir, history, config.max_upload_bytes, config.max_upload_pixels)
    hub = EventHub()
    defaults = defaults_for(config.model, config.stage1)  # tiny checkpoints: tiny numbers (tiny_rules)
    jobs = JobManager(config, history, uploads, hub, engine_factory or default_factory(config), defaults)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        hub.start(asyncio.get_running_loop())
        jobs.start()
        try:
            yield
        finally:
            await run_in_threadpool(jobs.stop)
            hub.stop()
            history.close()

    offline_docs = _swagger_assets()
    app = FastAPI(title="threedis serve", version=__version__, lifespan=lifespan,
                  docs_url=None if offline_docs else "/docs",
                  description="3DIS-FLUX layout-to-image jobs over loopback. See docs/api.md.")
    if offline_docs:  # the OpenAPI page from local files: a desktop machine may be offline
        app.mount("/docs-static", StaticFiles(directory=offline_docs), name="docs-static")

        @app.get("/docs", include_in_schema=False)
        def docs() -> HTMLResponse:
            return get_swagger_ui_html(openapi_url=app.openapi_url, title="threedis serve: API",
                                       swagger_js_url="/docs-static/swagger-ui-bundle.js",
                                       swagger_css_url="/docs-static/swagger-ui.css",
                                       swagger_favicon_url="/docs-static/favicon-32x32.png")
    app.state.config, app.state.jobs, app.state.hub, app.state.uploads = config, jobs, hub, uploads

    @app.exception_handler(UserError)
    async def user_error(request: Request, err: UserError) -> JSONResponse:
        return _error(getattr(err, "status", 400), str(err), getattr(err, "problems", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = [{"field": ".".join(str(p) for p in e.get("loc", ()) if p != "body"), "message": e.get("msg", "")}
                    for e in err.errors()]
        first = problems[0] if problems else {"field": "", "message": "invalid request"}
        return _error(422, f"invalid request: {first['field'] or 'body'}: {first['message']}", problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error(err.status_code, str(err.detail))

    # -- the page --------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(index_page(config), headers={"Cache-Control": "no-store"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")

    # -- system and planning ---------------------------------------------------

    @app.get(f"{API}/system", tags=["system"], summary="device, memory, profile, backend, loaded models, queue")
    def system() -> dict:
        return system_info(jobs.holder.engine, jobs.holder.about, config, queue_length=len(jobs.queue()),
                           running=jobs.running)

    @app.post(f"{API}/plan", tags=["system"], summary="the memory planner's rows for a layout")
    def plan(body: dict[str, Any] = Body(..., examples=[{"layout": _JOB_EXAMPLE["layout"], "profile": "12gb",
                                                        "stage1": True, "sam": False}])) -> dict:
        unknown = [k for k in body if k not in ("layout", "profile", "stage1", "sam", "stage1_size")]
        if unknown:
            raise RequestError(f"unknown key {unknown[0]!r}; allowed: layout, profile, stage1, sam, stage1_size",
                               [{"field": k, "message": "unknown key"} for k in unknown])
        layout = resolve_layout(body.get("layout"), uploads)
        return plan_rows(jobs.holder.engine, layout, body)

    # -- uploads ---------------------------------------------------------------

    @app.post(f"{API}/uploads", status_code=201, tags=["uploads"],
              summary="store a depth map, photo or mask image; returns its id")
    async def upload(file: UploadFile = File(...), kind: str = Form(...)) -> dict:
        data = await file.read(config.max_upload_bytes + 1)  # the client's file name is ignored
        stored = await run_in_threadpool(uploads.save, data, kind)
        return stored.to_dict()

    @app.get(f"{API}/uploads/{{upload_id}}", tags=["uploads"], summary="the stored PNG of an upload",
             response_class=FileResponse)
    def get_upload(upload_id: str) -> FileResponse:
        return FileResponse(uploads.get(upload_id).path, media_type="image/png")

    # -- jobs ------------------------------------------------------------------

    @app.post(f"{API}/jobs", status_code=202, tags=["jobs"], summary="queue a render")
    def submit(body: dict[str, Any] = Body(..., examples=[_JOB_EXAMPLE])) -> dict:
        return jobs.submit("render", body)

    @app.post(f"{API}/depth", status_code=202, tags=["jobs"], summary="queue a depth-only job (stage 1 or photo)")
    def submit_depth(body: dict[str, Any] = Body(..., examples=[{"layout": _JOB_EXAMPLE["layout"],
                                                                "options": {"seed": 0, "depth": {"source": "stage1"}}}])
                     ) -> dict:
        return jobs.submit("depth", body)

    @app.get(f"{API}/jobs", tags=["jobs"], summary="every job, newest first")
    def list_jobs(limit: int = 500) -> dict:
        return {"jobs": jobs.jobs(max(1, min(limit, 5000)))}

    @app.get(f"{API}/jobs/{{job_id}}", tags=["jobs"], summary="one job: status, progress, files, report")
    def get_job(job_id: str) -> dict:
        return jobs.job(job_id)

    @app.post(f"{API}/jobs/{{job_id}}/cancel", tags=["jobs"], summary="cancel a queued or running job")
    def cancel(job_id: str) -> dict:
        return jobs.cancel(job_id)

    @app.post(f"{API}/jobs/{{job_id}}/resubmit", status_code=202, tags=["jobs"],
              summary="queue a finished, failed, cancelled or interrupted job again")
    def resubmit(job_id: str) -> dict:
        return jobs.resubmit(job_id)

    @app.get(f"{API}/jobs/{{job_id}}/files/{{name}}", tags=["jobs"], summary="one output file of a job",
             response_class=FileResponse)
    def job_file(job_id: str, name: str) -> FileResponse:
        return FileResponse(jobs.file_path(job_id, name), headers={"Cache-Control": "private, max-age=86400"})

    # -- events ----------------------------------------------------------------

    @app.websocket(f"{API}/events")
    async def events(ws: WebSocket) -> None:
        await ws.accept()
        queue = hub.subscribe()
        try:
            snapshot = await run_in_threadpool(jobs.snapshot)
            await ws.send_json({"type": "snapshot", "jobs": snapshot})
            receiver = asyncio.ensure_future(_drain(ws))
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, receiver}, return_when=asyncio.FIRST_COMPLETED)
                if receiver in done:
                    getter.cancel()
                    break
                text = getter.result()
                if text is None:  # the service is stopping, or this client fell behind
                    break
                await ws.send_text(text)
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            hub.unsubscribe(queue)
            with contextlib.suppress(Exception):
                await ws.close()

    def body_limit(path: str) -> int:
        return config.max_upload_bytes + MULTIPART_SLACK if path == f"{API}/uploads" else config.max_json_bytes

    if config.allow_origins:  # answers the preflights of the origins the user allowed
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allow_origins), allow_methods=["*"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(Guard, host=config.host, port=config.port, token=config.token,  # outermost: runs first
                       allow_origins=config.allow_origins, body_limit=body_limit)
    return app


async def _drain(ws: WebSocket) -> None:
    """Read (and ignore) what the client sends, so that a closed socket is noticed at once."""
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
    except (WebSocketDisconnect, RuntimeError):
        return
