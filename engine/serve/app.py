"""The routes: /api/v1 (jobs, uploads, LoRAs, depth, plan, system, events), the editor page and signing in.

Handlers are thin: they parse, call the JobManager / UploadStore / planner, and turn
UserError subclasses into 4xx answers of one shape,
{"detail": {"message": "...", "problems": [{"field", "message"}, ...]}}.
Blocking work (SQLite, PIL) runs in FastAPI's thread pool, renders in the worker
thread: the event loop only moves bytes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import html
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs

from fastapi import FastAPI, File, Form, Request, UploadFile, WebSocket, WebSocketDisconnect
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from threedis import __version__
from threedis.engine.errors import UserError
from threedis.engine.locks import folder_lock
from threedis.engine.serve.config import ServeConfig
from threedis.engine.serve.engines import EngineHolder, default_factory
from threedis.engine.serve.events import EventHub
from threedis.engine.serve.history import FINAL, LIVE, History
from threedis.engine.serve.jobs import API, JobManager
from threedis.engine.serve.loras import LoraStore
from threedis.engine.serve.requests import RequestError, defaults_for, parse_json
from threedis.engine.serve.security import AUTHENTICATED, WS_AUTH_CLOSE, Auth, Guard, install_log_redaction
from threedis.engine.serve.system import plan_rows, system_info
from threedis.engine.serve.uploads import UploadStore

log = logging.getLogger("threedis.serve")

STATIC_DIR = Path(__file__).parent / "static"
MULTIPART_SLACK = 64 * 1024  # form boundaries and the kind field around an upload's bytes
FIRST_MESSAGE_S = 10.0  # a WebSocket without the header or the cookie has this long to send the token
JOB_KINDS = ("render", "depth")
NO_STORE = {"Cache-Control": "no-store"}

_JOB_EXAMPLE = {
    "layout": {"prompt": "two birds on a branch", "width": 512, "height": 512,
               "instances": [{"prompt": "a red cardinal", "box": [0.08, 0.22, 0.45, 0.7]}]},
    "options": {"seed": 0, "steps": 20, "guidance": 10.0, "sam": False, "depth": {"source": "stage1"}},
}


class EditorAssets(StaticFiles):
    """The editor's scripts and styles. Its HTML pages are served only by `/`, which checks the session."""

    async def get_response(self, path: str, scope: dict) -> Response:
        if path.lower().endswith((".html", ".htm")):
            raise StarletteHTTPException(404, "Not Found")
        return await super().get_response(path, scope)


def _error(status: int, message: str, problems: list | None = None) -> JSONResponse:
    return JSONResponse({"detail": {"message": message, "problems": problems or []}}, status_code=status)


def _json_body(example: dict) -> dict:
    """The OpenAPI description of a JSON body the route reads itself (so it can refuse bombs with 422)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"type": "object"}, "example": example}}}}


def _page(name: str, fallback: str) -> str:
    path = STATIC_DIR / name
    return path.read_text(encoding="utf-8") if path.is_file() else fallback


def index_page(config: ServeConfig) -> str:
    """index.html with the tiny flag as a meta tag. It carries no secret: the page's calls use its cookie."""
    page = _page("index.html", "<!doctype html><html><head><title>threedis</title></head><body><p>threedis "
                               "serve: the web editor is not installed; the API is at /docs.</p></body></html>")
    tag = f'<meta name="threedis-tiny" content="{1 if config.tiny else 0}">'
    page = re.sub(r'<meta name="threedis-tiny"[^>]*>', "", page)
    head = re.search(r"<head[^>]*>", page, re.IGNORECASE)
    return page[:head.end()] + tag + page[head.end():] if head else tag + page


def sign_in_page(message: str = "") -> str:
    """The page `/` shows a browser that has not shown the token: a form that posts it to /login."""
    page = _page("signin.html", "<!doctype html><html><body><form method='post' action='/login'>"
                                "<!--message--><input name='token' type='password'><button>Sign in</button>"
                                "</form></body></html>")
    note = f'<p class="signin-error" role="alert">{html.escape(message, quote=False)}</p>' if message else ""
    return page.replace("<!--message-->", note)


def _docs_page(openapi_url: str) -> HTMLResponse:
    """Swagger UI from local files, with a CSP that allows exactly its one inline script (by hash)."""
    page = get_swagger_ui_html(openapi_url=openapi_url, title="threedis serve: API",
                               swagger_js_url="/docs-static/swagger-ui-bundle.js",
                               swagger_css_url="/docs-static/swagger-ui.css",
                               swagger_favicon_url="/docs-static/favicon-32x32.png").body.decode()
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
                      for body in re.findall(r"<script>(.*?)</script>", page, re.DOTALL))
    csp = (f"default-src 'self'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; "
           f"img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
    return HTMLResponse(page, headers={"Content-Security-Policy": csp})


def _swagger_assets() -> str | None:
    """Swagger UI's files from the swagger-ui-bundle package (the serve extra), or None: FastAPI's CDN page."""
    try:
        import swagger_ui_bundle  # optional; without it /docs loads Swagger UI from a CDN
    except ImportError:
        return None
    return str(swagger_ui_bundle.swagger_ui_path)


def _names(value: str | None, allowed: tuple[str, ...], field: str) -> tuple[str, ...]:
    """A comma-separated filter (?status=done,failed) checked against `allowed`."""
    names = tuple(v for v in (value or "").split(",") if v)
    bad = [v for v in names if v not in allowed]
    if bad:
        message = f"unknown {field} {bad[0][:40]!r}; use one or more of {', '.join(allowed)}, comma-separated"
        raise RequestError(message, [{"field": field, "message": message}])
    return names


def create_app(config: ServeConfig, engine_factory: Callable[[], Any] | None = None,
               on_loaded: Callable[[EngineHolder], None] | None = None) -> FastAPI:
    """One service: its folder lock, history, uploads, LoRAs, event hub, job manager and routes.

    The engine is built by the render worker once the app runs (the page answers meanwhile);
    on_loaded(holder) is called from the worker when that build ended (holder.state says how).
    """
    Path(config.out).mkdir(parents=True, exist_ok=True)
    lock = contextlib.ExitStack()  # one service per output folder: a second one would share history.sqlite3
    lock.enter_context(folder_lock(config.out, f"threedis serve at http://{config.host}:{config.port}/",
                                   hint="stop it, or pass another --out"))
    try:
        history = History(config.history_path)
        uploads = UploadStore(config.uploads_dir, history, config.max_upload_bytes, config.max_upload_pixels)
        loras = LoraStore(config.lora_dir, config.loras_dir, history, config.max_lora_bytes)
        hub = EventHub()
        defaults = defaults_for(config.model, config.stage1)  # tiny checkpoints: tiny numbers (tiny_rules)
        jobs = JobManager(config, history, uploads, hub, engine_factory or default_factory(config), defaults,
                          loras, on_loaded)
    except BaseException:
        lock.close()
        raise
    auth = Auth(config.token, config.port)
    install_log_redaction((config.token,))

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
            lock.close()

    offline_docs = _swagger_assets()
    app = FastAPI(title="threedis serve", version=__version__, lifespan=lifespan,
                  docs_url=None if offline_docs else "/docs",
                  description="3DIS-FLUX layout-to-image jobs over loopback. See docs/api.md.")
    if offline_docs:  # the OpenAPI page from local files: a desktop machine may be offline
        app.mount("/docs-static", StaticFiles(directory=offline_docs), name="docs-static")

        @app.get("/docs", include_in_schema=False)
        def docs() -> HTMLResponse:
            return _docs_page(app.openapi_url)
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

    async def json_body(request: Request) -> Any:
        return parse_json(await request.body())

    # -- the page and signing in ----------------------------------------------

    def signed_in(response: Response) -> Response:
        if auth.required:
            response.headers["Set-Cookie"] = auth.set_cookie()
        return response

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index(request: Request) -> Response:
        """The editor for a browser with the session cookie; /?token= signs in; else the sign-in page."""
        if "token" in request.query_params:
            if not auth.token_ok(request.query_params["token"]):
                return HTMLResponse(sign_in_page("That is not this service's token."), 401, headers=NO_STORE)
            return signed_in(RedirectResponse("/", 303, headers=NO_STORE))  # the token leaves the address bar
        if not auth.cookie_ok(request.headers.get("cookie")):
            return HTMLResponse(sign_in_page(), 401, headers=NO_STORE)
        return HTMLResponse(index_page(config), headers=NO_STORE)

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        """The sign-in form: the token in the body (never in a URL), then the editor."""
        given = parse_qs((await request.body()).decode("utf-8", "replace")).get("token", [""])[0].strip()
        if not auth.token_ok(given):
            return HTMLResponse(sign_in_page("That is not this service's token."), 401, headers=NO_STORE)
        return signed_in(RedirectResponse("/", 303, headers=NO_STORE))

    app.mount("/static", EditorAssets(directory=STATIC_DIR, check_dir=False), name="static")

    # -- system and planning ---------------------------------------------------

    @app.get(f"{API}/system", tags=["system"], summary="state, device, memory, profile, backend, models, queue")
    def system() -> dict:
        return system_info(jobs.holder, config, queue_length=len(jobs.queue()), running=jobs.running)

    @app.post(f"{API}/plan", tags=["system"], summary="the memory planner's rows for a layout",
              openapi_extra=_json_body({"layout": _JOB_EXAMPLE["layout"], "profile": "12gb", "stage1": True,
                                        "sam": False, "photo": False}))
    async def plan(request: Request) -> dict:
        body = await json_body(request)
        return await run_in_threadpool(plan_rows, jobs.holder, body, uploads, jobs.defaults.stage1_size)

    # -- uploads and LoRAs -----------------------------------------------------

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

    @app.get(f"{API}/loras", tags=["loras"], summary="the LoRAs jobs may use: --lora-dir files and uploads")
    def list_loras() -> dict:
        return loras.available()

    @app.post(f"{API}/loras", status_code=201, tags=["loras"], summary="upload a .safetensors LoRA")
    async def upload_lora(file: UploadFile = File(...)) -> dict:
        return await run_in_threadpool(loras.save, file.file, file.filename)

    # -- jobs ------------------------------------------------------------------

    @app.post(f"{API}/jobs", status_code=202, tags=["jobs"], summary="queue a render",
              openapi_extra=_json_body(_JOB_EXAMPLE))
    async def submit(request: Request) -> dict:
        body = await json_body(request)
        return await run_in_threadpool(jobs.submit, "render", body)

    @app.post(f"{API}/depth", status_code=202, tags=["jobs"], summary="queue a depth-only job (stage 1 or photo)",
              openapi_extra=_json_body({"layout": _JOB_EXAMPLE["layout"],
                                        "options": {"seed": 0, "depth": {"source": "stage1"}}}))
    async def submit_depth(request: Request) -> dict:
        body = await json_body(request)
        return await run_in_threadpool(jobs.submit, "depth", body)

    @app.get(f"{API}/jobs", tags=["jobs"], summary="a page of jobs, newest first, filtered by status and kind")
    def list_jobs(limit: int = 500, offset: int = 0, status: str | None = None, kind: str | None = None) -> dict:
        statuses = _names(status, (*LIVE, *FINAL), "status")
        kinds = _names(kind, JOB_KINDS, "kind")
        return jobs.jobs(max(1, min(limit, 5000)), max(0, min(offset, 2**62)), statuses, kinds)  # SQLite's range

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
        if not ws.scope.get(AUTHENTICATED) and not await _first_message_auth(ws, auth):
            return
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
        if path == f"{API}/uploads":
            return config.max_upload_bytes + MULTIPART_SLACK
        if path == f"{API}/loras":
            return config.max_lora_bytes + MULTIPART_SLACK
        return config.max_json_bytes

    if config.allow_origins:  # answers the preflights of the origins the user allowed
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allow_origins), allow_methods=["*"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(Guard, host=config.host, port=config.port, auth=auth,  # outermost: runs first
                       allow_origins=config.allow_origins, body_limit=body_limit)
    return app


async def _first_message_auth(ws: WebSocket, auth: Auth) -> bool:
    """A WebSocket that showed neither the header nor the cookie: its first message must be the token."""
    why = "send {\"type\": \"auth\", \"token\": \"<token>\"} as the first message"
    try:
        message = await asyncio.wait_for(ws.receive_text(), FIRST_MESSAGE_S)
        data = json.loads(message)
        if isinstance(data, dict) and data.get("type") == "auth" and auth.token_ok(data.get("token")):
            return True
        why = "missing or wrong token; " + why
    except asyncio.TimeoutError:
        why = f"no token within {FIRST_MESSAGE_S:g} s; " + why
    except (ValueError, KeyError, WebSocketDisconnect, RuntimeError):
        why = "missing or wrong token; " + why
    with contextlib.suppress(Exception):
        await ws.close(code=WS_AUTH_CLOSE, reason=why[:120])
    return False


async def _drain(ws: WebSocket) -> None:
    """Read (and ignore) what the client sends, so that a closed socket is noticed at once."""
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
    except (WebSocketDisconnect, RuntimeError):
        return
