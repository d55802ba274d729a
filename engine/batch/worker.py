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
from typing import Any

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


# The auxiliary models a batch may keep loaded between items: profile keys and names for messages.
AUX_KEYS = {"stage1": ("ldm3d_unet", "ldm3d_vae", "ldm3d_text"), "sam": ("sam2",), "photo": ("depth_estimator",)}
AUX_NAMES = {"stage1": "stage 1", "sam": "SAM2", "photo": "the depth estimator"}


@dataclass(frozen=True)
class Largest:
    """The most demanding render of a batch: what keeping a model loaded must still leave room for."""

    width: int = 512
    height: int = 512
    instances: int = 0
    stage1: Any = None  # the largest stage-1 settings (Stage1Options) when some job runs stage 1
    sam: bool = False
    photo: bool = False  # some job estimates its depth from a photo


@dataclass(frozen=True)
class EngineSpec:
    """How every worker builds its engine (picklable: it travels to Ray actors).

    model None: the tiny built-in checkpoints, like `threedis demo`; `needs` then says
    which tiny auxiliary models (stage1, photo, sam) the jobs use, so only those are made.
    largest: the batch's most demanding render; with it, `build_with_notes` keeps the
    auxiliary models a profile frees after each stage (`*-then-freed`) loaded across
    items wherever the memory plan still fits.
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
    largest: Largest | None = None

    def build(self) -> Engine:
        """Load the engine (models themselves load at the first render and stay)."""
        return self.build_with_notes()[0]

    def build_with_notes(self) -> tuple[Engine, list[str]]:
        """The engine, keeping auxiliary models loaded where the plan allows, and one line per model saying so."""
        if self.largest is None or not self.needs:
            engine, notes = self.bare_engine(self.overrides), []
        else:
            engine, notes = keep_loaded(self)
        for path, scale in self.loras:  # loads the transformer: only into the engine that is kept
            engine.load_lora(path, scale=scale)
        return engine, notes

    def bare_engine(self, overrides: dict) -> Engine:
        """An engine with these profile overrides and no LoRA (nothing is loaded yet)."""
        if self.model is None:
            model = tiny_checkpoint("flux")
            stage1 = self.stage1 or (tiny_checkpoint("stage1") if "stage1" in self.needs else None)
            depth = self.depth_model or (tiny_checkpoint("photo") if "photo" in self.needs else None)
            sam = self.sam or (tiny_checkpoint("sam") if "sam" in self.needs else None)
        else:
            model, stage1, depth, sam = self.model, self.stage1 or "auto", self.depth_model, self.sam
        engine = Engine.from_pretrained(model, profile=self.profile, overrides=overrides or None,
                                        device=self.device, backend=self.backend, stage1=stage1, sam=sam,
                                        depth_estimator=depth, local_files_only=self.local_files_only)
        return engine


def keep_loaded(spec: EngineSpec) -> tuple[Engine, list[str]]:
    """Switch `*-then-freed` auxiliary models to kept ones, one kind at a time, while the largest render fits.

    A kept model stays in memory next to the rendering models, so the plan is checked
    with it (Engine.check_fits) before the switch; what does not fit keeps its profile's
    load-and-free and is named as reloaded for every item.
    """
    largest = spec.largest
    engine = spec.bare_engine(spec.overrides)
    kept: dict[str, str] = {}
    notes: list[str] = []
    for kind in ("stage1", "sam", "photo"):
        if kind not in spec.needs:
            continue
        freed = [key for key in AUX_KEYS[kind] if engine.profile.policy(key).device.freed_after_stage]
        if not freed:
            notes.append(f"{AUX_NAMES[kind]} stays loaded across items (profile {engine.profile.name})")
            continue
        trial_overrides = {**kept, **{f"{key}.device": "gpu" if engine.profile.policy(key).device.on_gpu else "cpu"
                                      for key in freed}}
        try:
            trial = spec.bare_engine({**spec.overrides, **trial_overrides})
            trial.check_fits(largest.width, largest.height, largest.instances, stage1=largest.stage1,
                             sam=largest.sam, photo=largest.photo)
        except UserError as err:
            notes.append(f"{AUX_NAMES[kind]} is loaded for every item and freed after it (profile "
                         f"{engine.profile.name}): keeping it loaded would not fit ({err})")
            continue
        kept, engine = trial_overrides, trial
        notes.append(f"{AUX_NAMES[kind]} stays loaded across items (the memory plan allows it; the profile "
                     f"{engine.profile.name} frees it after each render)")
    return engine, notes


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
    threads: int = 0  # torch's CPU thread count for this render (CPU sums depend on it)


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
                      device=device_name(engine), pid=os.getpid(), started=time.time(),
                      threads=torch.get_num_threads())
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
