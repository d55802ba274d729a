"""One worker's side of a batch: build the engine once, render items, hand back bytes and numbers.

The same functions run in the driver's process (local mode) and inside each Ray
actor, so an item's image does not depend on where it was made. A failing item
(bad depth file, out of memory, a layout the engine rejects) becomes a failed
Outcome and the worker goes on; only KeyboardInterrupt stops it.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from threedis import Engine, RenderCancelled, UserError
from threedis.engine.batch.jobs import Item


def tiny_checkpoint(kind: str) -> str:
    """Path of a tiny random-weight checkpoint (kind: flux, stage1, photo, sam), written on first use.

    The one place the batch reaches the project's tiny checkpoint writers.
    """
    if kind == "flux":
        from threedis.engine.tiny import tiny_flux_path as path_of
    elif kind == "stage1":
        from threedis.engine.tiny.ldm3d import tiny_ldm3d_path as path_of
    elif kind == "photo":
        from threedis.engine.tiny.depth import tiny_depth_anything_path as path_of
    elif kind == "sam":
        from threedis.engine.tiny.sam2 import tiny_sam2_path as path_of
    else:
        raise ValueError(f"no tiny checkpoint of kind {kind!r}")
    return str(path_of())


@dataclass(frozen=True)
class EngineSpec:
    """How every worker builds its engine (picklable: it travels to Ray actors).

    model None: the tiny built-in checkpoints, like `threedis demo`; `needs` then says
    which tiny auxiliary models (stage1, photo, sam) the jobs use, so only those are made.
    """

    model: str | None = None
    profile: str = "auto"
    overrides: dict = field(default_factory=dict)
    device: str | None = None
    backend: str = "auto"
    stage1: str | None = None
    sam: str | None = None
    depth_model: str | None = None
    local_files_only: bool = False
    needs: frozenset = frozenset()
    loras: tuple = ()  # (path, scale) pairs

    def build(self) -> Engine:
        """Load the engine (models themselves load at the first render and stay)."""
        if self.model is None:
            model = tiny_checkpoint("flux")
            stage1 = self.stage1 or (tiny_checkpoint("stage1") if "stage1" in self.needs else None)
            depth = self.depth_model or (tiny_checkpoint("photo") if "photo" in self.needs else None)
            sam = self.sam or (tiny_checkpoint("sam") if "sam" in self.needs else None)
        else:
            model, stage1, depth, sam = self.model, self.stage1 or "auto", self.depth_model, self.sam
        engine = Engine.from_pretrained(model, profile=self.profile, overrides=self.overrides or None,
                                        device=self.device, backend=self.backend, stage1=stage1, sam=sam,
                                        depth_estimator=depth, local_files_only=self.local_files_only)
        for path, scale in self.loras:
            engine.load_lora(path, scale=scale)
        return engine


@dataclass
class Outcome:
    """What a worker sends back for one item (plain data: it crosses process and machine borders)."""

    job: str
    seed: int
    status: str  # "done" or "failed"
    worker: str
    device: str
    pid: int
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # kind -> (file name, content)
    timings: dict[str, float] = field(default_factory=dict)
    peak_vram: int | None = None  # bytes, CUDA only
    error: str | None = None
    error_type: str | None = None
    traceback: str | None = None  # for failures that are not user mistakes (bugs, out of memory)
    started: float = 0.0  # wall clock (time.time) at start and end, for images per hour per worker
    finished: float = 0.0


def device_name(engine: Engine) -> str:
    device = engine.device
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


def worker_label(name: str) -> str:
    return f"{name}@{socket.gethostname()}:{os.getpid()}"


def render_item(engine: Engine, item: Item, worker: str, cancel: threading.Event | None = None) -> Outcome:
    """Render one (job, seed) and read its saved files back as bytes; a failure is an Outcome too."""
    cuda = engine.device.type == "cuda"
    outcome = Outcome(job=item.job.id, seed=item.seed, status="failed", worker=worker,
                      device=device_name(engine), pid=os.getpid(), started=time.time())
    start = time.perf_counter()
    try:
        if item.job.problem is not None:
            raise UserError(item.job.problem)
        if cuda:
            torch.cuda.reset_peak_memory_stats(engine.device)
        result = engine.render(**item.job.render_kwargs(item.seed), cancel=cancel)
        rendered = time.perf_counter()
        if cuda:
            outcome.peak_vram = int(torch.cuda.max_memory_allocated(engine.device))
        with tempfile.TemporaryDirectory(prefix="threedis-batch-") as tmp:
            paths = result.save(Path(tmp), prefix=f"seed-{item.seed}", pictures=False)
            outcome.files = {kind: (path.name, path.read_bytes()) for kind, path in paths.items()}
        outcome.timings = {"render_s": rendered - start, "save_s": time.perf_counter() - rendered}
        outcome.status = "done"
    except RenderCancelled:
        raise  # the batch is stopping: this item is not finished, not failed
    except Exception as exc:  # noqa: BLE001 - one item's failure is recorded, the batch goes on
        outcome.error = str(exc) or type(exc).__name__
        outcome.error_type = type(exc).__name__
        if not isinstance(exc, UserError):
            outcome.traceback = traceback.format_exc(limit=20)
        if cuda:
            torch.cuda.empty_cache()  # after an out-of-memory error the next item starts clean
    outcome.timings["total_s"] = time.perf_counter() - start
    outcome.finished = time.time()
    return outcome
