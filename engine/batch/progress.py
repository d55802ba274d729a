"""The driver's view of a batch: one progress bar (items, ETA, s/item) and the closing summary.

The summary counts done, failed and skipped items and gives images per hour
overall and per worker (done items over that worker's busy span) and each
worker's peak VRAM.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

from threedis.engine.batch.worker import Outcome


@dataclass
class WorkerStats:
    done: int = 0
    failed: int = 0
    first_start: float | None = None
    last_finish: float | None = None
    peak_vram: int | None = None
    device: str = ""

    def add(self, outcome: Outcome) -> None:
        if outcome.status == "done":
            self.done += 1
        else:
            self.failed += 1
        self.first_start = outcome.started if self.first_start is None else min(self.first_start, outcome.started)
        self.last_finish = outcome.finished if self.last_finish is None else max(self.last_finish, outcome.finished)
        if outcome.peak_vram is not None:
            self.peak_vram = max(self.peak_vram or 0, outcome.peak_vram)
        self.device = outcome.device

    @property
    def images_per_hour(self) -> float | None:
        if not self.done or self.first_start is None or self.last_finish is None:
            return None
        span = self.last_finish - self.first_start
        return self.done * 3600.0 / span if span > 0 else None


@dataclass
class Summary:
    """Counts and rates of one run of `threedis batch` (skipped: finished in an earlier run)."""

    total: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0
    failed_before: int = 0  # of the skipped: failed in an earlier run and not retried (--retry-failed)
    retried: int = 0  # items sent again after their worker died
    interrupted: bool = False
    started: float = field(default_factory=time.time)
    finished: float | None = None
    workers: dict[str, WorkerStats] = field(default_factory=dict)

    def add(self, outcome: Outcome) -> None:
        if outcome.status == "done":
            self.done += 1
        else:
            self.failed += 1
        self.workers.setdefault(outcome.worker, WorkerStats()).add(outcome)

    @property
    def remaining_failed(self) -> int:
        """Items whose latest outcome is a failure: this run's and the earlier ones not retried."""
        return self.failed + self.failed_before

    @property
    def wall_s(self) -> float:
        return (self.finished or time.time()) - self.started

    @property
    def images_per_hour(self) -> float | None:
        return self.done * 3600.0 / self.wall_s if self.done and self.wall_s > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total, "done": self.done, "failed": self.failed, "skipped": self.skipped,
            "failed_before": self.failed_before, "retried": self.retried, "interrupted": self.interrupted,
            "wall_s": self.wall_s,
            "images_per_hour": self.images_per_hour,
            "workers": {name: {"done": w.done, "failed": w.failed, "images_per_hour": w.images_per_hour,
                               "peak_vram": w.peak_vram, "device": w.device} for name, w in self.workers.items()},
        }

    def text(self) -> str:
        rate = self.images_per_hour
        lines = [f"batch {'interrupted' if self.interrupted else 'finished'}: {self.done} done, {self.failed} failed, "
                 f"{self.skipped} skipped (of {self.total}) in {self.wall_s:.1f} s"
                 + (f", {rate:.0f} images/hour" if rate else "")]
        if self.failed_before:
            lines.append(f"{self.failed_before} of the skipped item(s) failed in an earlier run; --retry-failed "
                         f"renders them again")
        if self.retried:
            lines.append(f"{self.retried} item(s) sent again after their worker died")
        for name, w in sorted(self.workers.items()):
            per_hour = f"{w.images_per_hour:.0f} images/hour" if w.images_per_hour else "-"
            vram = f"peak VRAM {w.peak_vram / 2**30:.2f} GiB" if w.peak_vram is not None else "peak VRAM n/a"
            lines.append(f"  {name:<28} {w.done:>6} done {w.failed:>4} failed  {per_hour:>18}  {vram}  {w.device}")
        return "\n".join(lines)


class ProgressBar:
    """tqdm over items: done/total, ETA and seconds per item; failures in the postfix."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        from tqdm import tqdm

        self.failed = 0
        self.bar = tqdm(total=total, desc="batch", unit="item", file=sys.stderr, disable=not enabled,
                        dynamic_ncols=True)

    def update(self, outcome: Outcome) -> None:
        if outcome.status != "done":
            self.failed += 1
            self.bar.set_postfix(failed=self.failed, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
