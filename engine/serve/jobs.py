"""The FIFO job queue and its one render worker thread.

A GPU renders one thing at a time, so jobs wait in a deque and one thread takes
them in order. The worker first builds the engine (the page answers meanwhile and
jobs queue up). Every state change is written to the history, and the worker's own
view (which job runs) updated, before it is published as an event, so a client that
reads /jobs after an event sees at least that state. Cancelling a queued job removes
it at once; a running one gets its engine cancel event set and stops at the next
step. Nothing a job does can stop the worker: user mistakes become the job's error
line, anything else a short error plus a traceback in the service's log.
"""

from __future__ import annotations

import base64
import io
import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from threedis.engine.errors import UserError
from threedis.engine.serve.config import ServeConfig
from threedis.engine.serve.engines import FAILED, EngineHolder, internal_error
from threedis.engine.serve.events import EventHub
from threedis.engine.serve.history import FINAL, History
from threedis.engine.serve.loras import LoraStore
from threedis.engine.serve.requests import Defaults, check_request, layout_shape, resolve_layout
from threedis.engine.serve.uploads import UploadStore

if TYPE_CHECKING:
    from threedis import Engine, Stage1Options

log = logging.getLogger("threedis.serve")

API = "/api/v1"
PREVIEW_SIDE = 128  # previews are small: they go to every client several times per render
PREVIEWS_PER_RENDER = 8


class JobError(UserError):
    """A job action that cannot be done (unknown id, nothing to cancel); status is the HTTP code."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class LiveJob:
    """What the worker knows of a queued or running job beyond its history record."""

    id: str
    kind: str
    layout: Any
    options: dict
    cancel: threading.Event = field(default_factory=threading.Event)
    stage: str | None = None
    step: int = 0
    total: int = 0
    eta_s: float | None = None
    stage_t0: float = 0.0


def new_job_id() -> str:
    return secrets.token_hex(8)


def preview_url(image: Any) -> str:
    """A small PNG data URL of a preview frame."""
    small = image.copy()
    small.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    buffer = io.BytesIO()
    small.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class JobManager:
    """Queue, worker and job views. Thread-safe; the event loop only ever calls the quick methods."""

    def __init__(self, config: ServeConfig, history: History, uploads: UploadStore, hub: EventHub,
                 engine_factory: Callable[[], "Engine"], defaults: Defaults, loras: LoraStore,
                 on_loaded: Callable[[EngineHolder], None] | None = None) -> None:
        self.config, self.history, self.uploads, self.hub, self.defaults = config, history, uploads, hub, defaults
        self.loras, self.on_loaded = loras, on_loaded
        self.interrupted = history.interrupt_live()  # what a stopped service left behind
        self.holder = EngineHolder(engine_factory, config)
        self._lock = threading.Condition()
        self._queue: deque[str] = deque()
        self._live: dict[str, LiveJob] = {}
        self._running: str | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="threedis-render-worker", daemon=True)

    @property
    def engine(self) -> "Engine | None":
        return self.holder.engine

    # -- lifetime -------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking jobs, cancel the running one (recorded as interrupted), wait for the worker."""
        with self._lock:
            self._stopping = True
            if self._running is not None:
                self._live[self._running].cancel.set()
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- submitting and cancelling -------------------------------------------

    def submit(self, kind: str, body: Any, resubmitted_from: str | None = None) -> dict:
        layout, options = check_request(body, kind, self.defaults, self.uploads, self._is_depth_job,
                                        self.loras.problems)
        with self._lock:
            if self._stopping:
                raise JobError("the service is shutting down", status=503)
            if self.holder.state == FAILED:
                raise JobError(f"the models did not load: {self.holder.error}", status=503)
            if len(self._queue) >= self.config.max_queue:
                raise JobError(f"the queue is full ({self.config.max_queue} jobs); wait or cancel some", status=429)
            job_id = new_job_id()
            self.history.add_job(job_id, kind, layout, options, resubmitted_from)
            self._live[job_id] = LiveJob(job_id, kind, layout, options)
            self._queue.append(job_id)
            position = len(self._queue)
            self._publish("queued", job_id, kind=kind, queue=self.queue())  # before the worker can start it
            self._lock.notify_all()
        return {"id": job_id, "position": position}

    def resubmit(self, job_id: str) -> dict:
        record = self._record(job_id)
        if record["status"] not in ("interrupted", "failed", "cancelled", "done"):
            raise JobError(f"job {job_id} is {record['status']}; only finished jobs can be resubmitted")
        body = {"layout": record["layout"], "options": record["options"]}
        return self.submit(record["kind"], body, resubmitted_from=job_id)

    def cancel(self, job_id: str) -> dict:
        with self._lock:
            record = self._record(job_id)
            if job_id in self._queue:
                self._queue.remove(job_id)
                self._live.pop(job_id, None)
                self.history.update_job(job_id, status="cancelled", finished=time.time(),
                                        error="cancelled before it started")
                status = "cancelled"
                self._publish("cancelled", job_id)
            elif job_id == self._running:
                self._live[job_id].cancel.set()
                return {"id": job_id, "status": "running", "cancel_requested": True}
            else:
                raise JobError(f"job {job_id} is already {record['status']}; nothing to cancel")
        return {"id": job_id, "status": status, "cancel_requested": True}

    # -- views ----------------------------------------------------------------

    def _record(self, job_id: str) -> dict:
        record = self.history.job(job_id) if isinstance(job_id, str) else None
        if record is None:
            raise JobError(f"no job with id {str(job_id)[:40]!r}", status=404)
        return record

    def _is_depth_job(self, job_id: str) -> bool:
        record = self.history.job(job_id)
        return record is not None and record["kind"] == "depth"

    def position(self, job_id: str) -> int | None:
        """1 for the next job to run, 0 for the running one, None for finished ones."""
        with self._lock:
            if job_id == self._running:
                return 0
            try:
                return self._queue.index(job_id) + 1
            except ValueError:
                return None

    def view(self, record: dict, report: bool = True) -> dict:
        """The API's job object: the history record plus live progress and file URLs."""
        job_id = record["id"]
        live = self._live.get(job_id)
        files = {name: f"{API}/jobs/{job_id}/files/{name}" for name in (record["files"] or {})}
        position = None if record["status"] in FINAL else self.position(job_id)
        return {
            "id": job_id, "kind": record["kind"], "status": record["status"], "position": position,
            "stage": live.stage if live else None, "step": live.step if live else None,
            "total": live.total if live else None, "eta_s": live.eta_s if live else None,
            "error": record["error"], "warnings": record["warnings"] or [], "created": record["created"],
            "started": record["started"], "finished": record["finished"], "layout": record["layout"],
            "options": record["options"], "files": files, "resubmitted_from": record["resubmitted_from"],
            "report": self._report(job_id, record) if report else None,
        }

    def _report(self, job_id: str, record: dict) -> Any:
        import json

        if "report.json" not in (record["files"] or {}):
            return None
        try:
            return json.loads(self.file_path(job_id, "report.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def job(self, job_id: str) -> dict:
        return self.view(self._record(job_id))

    def jobs(self, limit: int = 500, offset: int = 0, statuses: tuple[str, ...] = (),
             kinds: tuple[str, ...] = ()) -> dict:
        """GET /jobs: a page of jobs, newest first, and how many match the filters in all."""
        records = self.history.jobs(limit, offset, statuses, kinds)
        return {"jobs": [self.view(record, report=False) for record in records],
                "total": self.history.count(statuses, kinds), "offset": offset, "limit": limit}

    def snapshot(self) -> list[dict]:
        """Every live job (running first, then the queue in order), for a client that connects now."""
        with self._lock:
            ids = ([self._running] if self._running else []) + list(self._queue)
        records = [self.history.job(job_id) for job_id in ids]
        return [self.view(r, report=False) for r in records if r is not None]

    def queue(self) -> list[str]:
        with self._lock:
            return list(self._queue)

    @property
    def running(self) -> str | None:
        return self._running

    def file_path(self, job_id: str, name: str) -> Path:
        """The path of one of the job's own output files (names from its list only), else JobError 404."""
        record = self._record(job_id)
        if name not in (record["files"] or {}):
            raise JobError(f"job {job_id} has no file {name[:60]!r}; its files are listed in "
                           f"GET {API}/jobs/{job_id}", status=404)
        folder = (self.config.jobs_dir / job_id).resolve()
        path = (folder / record["files"][name]).resolve()
        if path.parent != folder or not path.is_file():
            raise JobError(f"file {name[:60]!r} of job {job_id} is gone from the output folder", status=404)
        return path

    # -- the worker -----------------------------------------------------------

    def _publish(self, event: str, job_id: str, **extra: Any) -> None:
        record = self.history.job(job_id)
        status = record["status"] if record else None
        position = None if status in FINAL else self.position(job_id)
        self.hub.publish({"type": event, "job": job_id, "status": status, "position": position, **extra})

    def _work(self) -> None:
        loaded = self.holder.load()  # the page already answers; jobs queue meanwhile
        self.hub.publish({"type": "system", "state": self.holder.state, "error": self.holder.error})
        if self.on_loaded is not None:
            self.on_loaded(self.holder)
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return
                job_id = self._queue.popleft()
                self._running = job_id
                job = self._live[job_id]
            try:
                if loaded:
                    self._run(job)
                else:
                    self._end(job, "failed", error=f"the models did not load: {self.holder.error}")
            finally:
                with self._lock:  # _end did this already, unless something escaped it
                    if self._running == job_id:
                        self._running = None
                    self._live.pop(job_id, None)
                if loaded:
                    _give_back_memory()

    def _run(self, job: LiveJob) -> None:
        from threedis.engine.denoise import RenderCancelled

        self.history.update_job(job.id, status="running", started=time.time())
        self._publish("started", job.id, kind=job.kind, queue=self.queue())
        self._set_stage(job, "prepare", 0)
        try:
            files, warnings = self._render(job) if job.kind == "render" else self._depth(job)
        except RenderCancelled:
            status = "interrupted" if self._stopping else "cancelled"
            error = "the service stopped during this job; resubmit it" if self._stopping else "cancelled while running"
            self._end(job, status, error=error)
            return
        except UserError as err:
            self._end(job, "failed", error=" ".join(str(err).split()))
            return
        except Exception as exc:  # a bug or a broken model: the service stays up, the log has the traceback
            log.exception("job %s failed", job.id)
            self._end(job, "failed", error=internal_error(exc))
            return
        urls = {name: f"{API}/jobs/{job.id}/files/{name}" for name in files}
        self._end(job, "done", event={"files": urls, "warnings": warnings}, files=files, warnings=warnings)

    def _end(self, job: LiveJob, status: str, event: dict | None = None, **record: Any) -> None:
        """Record the job's final state and stop counting it as running, then tell every client.

        In that order: a client that asks GET /jobs/{id} the moment the event arrives must find
        the job finished with no queue position (not still "running", position 0).
        """
        with self._lock:
            self.history.update_job(job.id, status=status, finished=time.time(), **record)
            if self._running == job.id:
                self._running = None
            self._live.pop(job.id, None)
        extra = dict(event or {})
        if "error" in record:
            extra["error"] = record["error"]
        self._publish(status, job.id, **extra)

    def _set_stage(self, job: LiveJob, stage: str, total: int) -> None:
        job.stage, job.step, job.total, job.eta_s, job.stage_t0 = stage, 0, total, None, time.perf_counter()
        self._publish("stage", job.id, stage=stage, total=total)

    def _progress(self, job: LiveJob, stage: str, step: int, total: int, preview: Any = None) -> None:
        if job.stage != stage:
            self._set_stage(job, stage, total)
        now = time.perf_counter()
        if step <= 1:  # the first step's time includes loading: measure the rate from it on
            job.stage_t0 = now
        job.step, job.total = step, total
        job.eta_s = round((now - job.stage_t0) / (step - 1) * (total - step), 3) if step > 1 else None
        every = self.config.preview_every or max(1, total // PREVIEWS_PER_RENDER)
        extra = {}
        if preview is not None and (step % every == 0 or step == total):
            extra["preview"] = preview_url(preview)
        self._publish("step", job.id, stage=stage, step=step, total=total, eta_s=job.eta_s, **extra)

    def _render(self, job: LiveJob) -> tuple[dict, list]:
        from threedis.engine.options import RenderOptions
        from threedis.kernels.rule import Schedule

        options = job.options
        layout = resolve_layout(job.layout, self.uploads)
        depth_args = self._depth_source(options["depth"])
        schedule = options["schedule"]
        engine = self._engine_with_loras(options["loras"])
        result = engine.render(
            layout, seed=options["seed"], steps=options["steps"], guidance=float(options["guidance"]),
            schedule=Schedule(steps=options["steps"], **schedule) if schedule else None, sam=options["sam"],
            options=RenderOptions(preview=bool(options["preview"])), cancel=job.cancel,
            on_step=lambda step, total, preview: self._progress(job, "denoise", step, total, preview),
            on_stage1_step=lambda step, total: self._progress(job, "stage1", step, total),
            **depth_args,
        )
        self._set_stage(job, "save", 0)
        paths = result.save(self.config.jobs_dir / job.id, pictures=True)
        return {path.name: path.name for path in paths.values()}, list(result.settings.get("warnings", []))

    def _engine_with_loras(self, loras: list[dict]) -> "Engine":
        """The engine with the job's LoRAs; a LoRA's error names it as the client did, not by its path."""
        resolved = [self.loras.resolve(item) for item in loras]
        try:
            return self.holder.with_loras([(path, item["scale"]) for (path, _), item in zip(resolved, loras)])
        except UserError as err:
            message = str(err)
            for path, label in resolved:
                message = message.replace(str(path), label)
            raise UserError(message) from None

    def _depth(self, job: LiveJob) -> tuple[dict, list]:
        from threedis.engine.serve.depth import photo_depth, stage1_depth

        options = job.options
        source = options["depth"]
        folder = self.config.jobs_dir / job.id
        if source["source"] == "photo":
            width, height, _ = layout_shape(job.layout, self.uploads)
            photo = self.uploads.get(source["upload"], "photo").path
            paths = photo_depth(self.holder.engine, photo, (width, height), job.layout, folder)
        else:
            layout = resolve_layout(job.layout, self.uploads)
            paths = stage1_depth(self.holder.engine, layout, folder, options["seed"], _stage1_options(source["stage1"]),
                                 lambda step, total: self._progress(job, "stage1", step, total), job.cancel)
        return {name: path.name for name, path in paths.items()}, []

    def _depth_source(self, depth: dict) -> dict:
        """Engine.render's depth arguments for the request's depth source."""
        source = depth["source"]
        if source == "upload":
            return {"depth": self.uploads.get(depth["upload"], "depth").path}
        if source == "photo":
            return {"depth_from_photo": self.uploads.get(depth["upload"], "photo").path}
        if source == "job":
            record = self._record(depth["job"])
            if record["status"] != "done" or "depth.png" not in (record["files"] or {}):
                raise UserError(f"options.depth.job: job {depth['job']} has no depth map (it is {record['status']})")
            return {"depth": self.file_path(depth["job"], "depth.png")}
        return {"stage1": _stage1_options(depth["stage1"])}


def _give_back_memory() -> None:
    """After a job (above all a cancelled or failed one), return freed GPU blocks to the driver."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _stage1_options(values: dict) -> "Stage1Options":
    from threedis.engine.stages import Stage1Options

    return Stage1Options(steps=values["steps"], size=tuple(values["size"]), seed=values["seed"],
                         migc_steps=values["migc_steps"], guidance=values["guidance"],
                         refine_steps=values.get("refine_steps"))
