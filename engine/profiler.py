"""Per-stage wall time and memory for one render.

Why: a low-VRAM engine is judged by where its memory peaks and where its time goes. Each part of a
render (load, encode, denoise, every step, decode) runs inside ``with prof.stage(name, **info)``;
the profiler records how long it took and the highest VRAM and host RSS it reached, so the report
says which stage to shrink. `prof.report()` returns a frozen `Report` (threedis.engine.report).

- Time: a CUDA event pair on GPU (no synchronisation at stage start, one at stage end, so queued
  kernels are counted in the stage that queued them); time.perf_counter on CPU.
- VRAM: torch.cuda.reset_peak_memory_stats at stage start, max_memory_allocated/reserved at end.
  Before a nested stage resets the counters, the running peak is folded into every open stage,
  and a finished stage folds its peak into its parents, so "denoise" still sees the peak of
  "step 3". Anything else that resets the peak counters during a stage hides earlier peaks.
- Host RSS: psutil when installed, else /proc/self/statm, else getrusage (a lifetime peak, the
  best that is left). A stage's RSS peak is the highest RSS sampled while it was open (start,
  end, nested stage boundaries, `sample_memory()` calls): RSS has no resettable peak counter.

Overhead, measured on the 2-core CPU dev box (10,000 empty stages, best of 3, psutil present):
about 26 us per stage enabled (65 us with both cores busy), two-thirds of it the two psutil RSS
reads; about 0.3-0.7 us disabled. Negligible next to a denoising step; on CUDA add two event
records, one event synchronize and the peak-counter calls.

Not thread-safe: use one profiler per render (profilers are independent; no module state).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any, ContextManager

import torch

from threedis.engine.errors import UserError
from threedis.engine.report import MemorySample, Report, StageRecord, jsonable

__all__ = ["MemorySample", "Profiler", "Report", "StageRecord"]

_NOOP = contextlib.nullcontext()  # stateless and reentrant: safe to share


class _HostMemory:
    """Current resident set size in bytes, from the best source this machine has."""

    def __init__(self) -> None:
        self._process = None
        self._page = 0
        try:
            import psutil  # optional here: /proc or getrusage stand in without it

            self._process = psutil.Process()
            self.source = "psutil"
        except ImportError:
            if os.path.exists("/proc/self/statm"):
                self._page = os.sysconf("SC_PAGE_SIZE")
                self.source = "/proc/self/statm"
            else:
                self.source = "getrusage (lifetime peak)"

    def rss(self) -> int:
        if self._process is not None:
            return int(self._process.memory_info().rss)
        if self._page:
            with open("/proc/self/statm", "rb") as f:
                return int(f.read().split()[1]) * self._page
        import resource  # POSIX only: the last resort, on machines without psutil or /proc

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


class _Open:
    """A stage that has started and not yet ended."""

    __slots__ = ("name", "info", "slot", "parent", "depth", "start", "event", "peak_alloc", "peak_res", "rss_peak")

    def __init__(self, name: str, info: dict[str, Any], slot: int, parent: int | None, depth: int) -> None:
        self.name, self.info, self.slot, self.parent, self.depth = name, info, slot, parent, depth
        self.start = 0.0
        self.event: Any = None
        self.peak_alloc: int | None = None
        self.peak_res: int | None = None
        self.rss_peak: int | None = None


class _Stage:
    """Context manager returned by `Profiler.stage`; a class, not a generator, to keep overhead low."""

    __slots__ = ("_prof", "_name", "_info", "_open")

    def __init__(self, prof: Profiler, name: str, info: dict[str, Any]) -> None:
        self._prof, self._name, self._info = prof, name, info

    def __enter__(self) -> None:
        self._open = self._prof._begin(self._name, self._info)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        self._prof._end(self._open, exc_type)


def _resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"profiler device {device} asked for, but CUDA is not available: use device='cpu'")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def _bigger(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


class Profiler:
    """Records stages, notes and memory samples of one render; `report()` snapshots them."""

    def __init__(self, device: torch.device | str | None = None, enabled: bool = True) -> None:
        self.enabled = enabled
        self.device = _resolve_device(device) if enabled else torch.device(device or "cpu")
        self._cuda = enabled and self.device.type == "cuda"
        self._t0 = time.perf_counter()
        self._host = _HostMemory() if enabled else None
        self._stack: list[_Open] = []
        self._records: list[StageRecord | None] = []  # in start order; None while open
        self._samples: list[MemorySample] = []
        self._info: dict[str, Any] = {}
        if enabled:
            self._note_environment()

    # -- public ---------------------------------------------------------------------------------

    def stage(self, name: str, **info: Any) -> ContextManager[None]:
        """`with prof.stage("step 3", step=3, backend="flex"):` times and measures the block."""
        if not self.enabled:
            return _NOOP
        return _Stage(self, name, info)

    def note(self, key: str, value: Any) -> None:
        """A run-level fact for the report header (attention backend and reason, tile fraction...)."""
        if self.enabled:
            self._info[key] = value

    def sample_memory(self) -> MemorySample | None:
        """Add a point to the memory chart now (stages sample at start and end on their own)."""
        if not self.enabled:
            return None
        return self._sample()

    def report(self) -> Report:
        """Frozen, JSON-native snapshot of the finished stages; open stages are left out."""
        done = [r for r in self._records if r is not None]
        new_index = {}
        for slot, record in enumerate(self._records):
            if record is not None:
                new_index[slot] = len(new_index)
        stages = tuple(
            StageRecord(**{
                **r.__dict__,
                "info": jsonable(r.info),
                "parent": new_index.get(r.parent) if r.parent is not None else None,
            })
            for r in done
        )
        return Report(stages=stages, info=jsonable(self._info), samples=tuple(self._samples))

    # -- internals ------------------------------------------------------------------------------

    def _now(self) -> float:
        return time.perf_counter() - self._t0

    def _note_environment(self) -> None:
        self._info["device"] = str(self.device)
        self._info["torch"] = torch.__version__
        if self._cuda:
            props = torch.cuda.get_device_properties(self.device)
            self._info["device_name"] = props.name
            self._info["vram_total_GB"] = round(props.total_memory / 1e9, 2)
        self._info["rss_source"] = self._host.source

    def _sample(self) -> MemorySample:
        rss = self._host.rss()
        alloc = res = None
        if self._cuda:
            alloc, res = torch.cuda.memory_allocated(self.device), torch.cuda.memory_reserved(self.device)
        sample = MemorySample(self._now(), alloc, res, rss)
        self._samples.append(sample)
        for o in self._stack:
            o.rss_peak = _bigger(o.rss_peak, rss)
        return sample

    def _fold_peaks(self, alloc: int | None, res: int | None) -> None:
        for o in self._stack:
            o.peak_alloc, o.peak_res = _bigger(o.peak_alloc, alloc), _bigger(o.peak_res, res)

    def _begin(self, name: str, info: dict[str, Any]) -> _Open:
        rss = self._sample().rss
        parent = self._stack[-1].slot if self._stack else None
        o = _Open(name, dict(info), len(self._records), parent, len(self._stack))
        o.rss_peak = rss
        if self._cuda:
            self._fold_peaks(torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
            o.event = torch.cuda.Event(enable_timing=True)
            o.event.record(torch.cuda.current_stream(self.device))
        self._records.append(None)
        self._stack.append(o)
        o.start = self._now()
        return o

    def _end(self, o: _Open, exc_type: type[BaseException] | None) -> None:
        if self._cuda:
            end_event = torch.cuda.Event(enable_timing=True)
            end_event.record(torch.cuda.current_stream(self.device))
            end_event.synchronize()
            end = self._now()
            wall = o.event.elapsed_time(end_event) / 1000.0
        else:
            end = self._now()
            wall = end - o.start
        sample = self._sample()  # o is still open: its rss_peak includes this sample
        if self._cuda:
            self._fold_peaks(torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device))
        # A stage ended out of order (e.g. a generator closed late) is still removed cleanly.
        self._stack.remove(o)
        if self._stack:  # fold into parents: their peaks include this child's
            self._fold_peaks(o.peak_alloc, o.peak_res)
            for p in self._stack:
                p.rss_peak = _bigger(p.rss_peak, o.rss_peak)
        if exc_type is not None:
            o.info["error"] = exc_type.__name__
        self._records[o.slot] = StageRecord(
            name=o.name, info=o.info, depth=o.depth, parent=o.parent, start_s=o.start, end_s=end, wall_s=wall,
            peak_allocated=o.peak_alloc, peak_reserved=o.peak_res, allocated_end=sample.allocated,
            rss_end=sample.rss, rss_peak=o.rss_peak,
        )
