"""The driver: decide what to render (resume), run it on a runner, record every outcome once.

Recording an outcome is: put its files in DIR/<job-id>/, then append its
manifest row. Ctrl-C or SIGTERM during that step is held until the row is written, so an
interrupted batch leaves a manifest that matches the folder; the item that was
rendering has no row and is rendered on the next run. The driver holds DIR's lock
(engine/locks.py) from start to end: a second batch on the same folder stops at
once and says who is writing it.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

from threedis.engine.batch.files import place_files, remove_placed, sha256_bytes
from threedis.engine.batch.jobs import Item, JobFile
from threedis.engine.batch.manifest import ManifestWriter, plan_resume
from threedis.engine.batch.progress import ProgressBar, Summary
from threedis.engine.batch.worker import Outcome
from threedis.engine.interrupts import uninterruptible
from threedis.engine.locks import folder_lock


class Runner(Protocol):
    def run(self, items: Iterable[Item]) -> Iterator[Outcome]: ...


def _problem_outcome(item: Item) -> Outcome:
    now = time.time()
    return Outcome(job=item.job.id, seed=item.seed, status="failed", worker="(invalid jobs)", device="", pid=0,
                   error=f"line {item.job.line}: {item.job.problem}", error_type="InvalidJob", started=now,
                   finished=now)


def _settings(item: Item, outcome: Outcome) -> dict[str, Any] | None:
    """What the image was made with, beyond the layout: the protocol's numbers and torch's thread count
    (CPU renders sum in another order with another count: see docs/batch.md on identical pixels)."""
    job = item.job
    if job.problem is not None or job.layout is None:
        return None
    return {"steps": job.steps, "guidance": job.guidance, "width": job.layout.width, "height": job.layout.height,
            "torch_threads": outcome.threads}


def manifest_row(item: Item, outcome: Outcome, files: dict[str, str],
                 run: dict[str, Any] | None = None) -> dict[str, Any]:
    image = outcome.files.get("image")
    row = {
        "job": item.job.id, "seed": item.seed, "status": outcome.status, "line": item.job.line,
        "job_key": item.job.key, "files": files, "sha256": sha256_bytes(image[1]) if image else None,
        "timings": outcome.timings, "peak_vram": outcome.peak_vram, "device": outcome.device,
        "worker": outcome.worker, "error": outcome.error, "error_type": outcome.error_type,
        "traceback": outcome.traceback, "meta": item.job.meta, "settings": _settings(item, outcome),
        "finished_at": datetime.fromtimestamp(outcome.finished or time.time(), timezone.utc).isoformat(),
    }
    if item.seed is None:
        row["seeds"] = len(item.job.seeds)  # a bad line: one row for all the seeds it asked for
    if run:
        row["run"] = run
    return row


class Recorder:
    """Writes each outcome's files and manifest row; the only writer of the output folder."""

    def __init__(self, out: Path, previous: dict[tuple[str, int | None], dict[str, Any]], summary: Summary,
                 bar: ProgressBar, on_outcome: Callable[[Outcome], None] | None,
                 run: dict[str, Any] | None = None) -> None:
        self.out = out
        self.run = run
        self.previous = previous
        self.summary = summary
        self.bar = bar
        self.on_outcome = on_outcome
        self.manifest = ManifestWriter(out)

    def record(self, item: Item, outcome: Outcome) -> None:
        with uninterruptible():  # SIGINT and SIGTERM: files and row land together
            stale = self.previous.get((item.job.id, item.seed), {}).get("files")
            files = place_files(self.out, item.job.id, outcome.files, stale=stale)
            row = manifest_row(item, outcome, files, self.run)
            try:
                self.manifest.append(row)
            except BaseException:  # e.g. the disk filled up: the next run renders the item again
                remove_placed(self.out, files.values())
                raise
            self.previous[(item.job.id, item.seed)] = row
            self.summary.add(outcome)
            self.bar.update(outcome)
        if self.on_outcome is not None:
            self.on_outcome(outcome)

    def close(self) -> None:
        self.manifest.close()


def run_batch(jobs: JobFile, out: str | Path, runner: Runner, retry_failed: bool = False, progress: bool = True,
              on_outcome: Callable[[Outcome], None] | None = None, run: dict[str, Any] | None = None,
              prepare: Callable[[Path], None] | None = None) -> Summary:
    """Render every item of `jobs` not finished yet into `out`; returns the summary (interrupted on Ctrl-C).

    run: what every manifest row records about this command (its job file and default seeds), so that
    readers of the run (threedis eval mig) find every item it should hold. A second batch already writing
    `out` is a UserError. prepare: called with `out` once it is locked, before anything else is written
    there (`batch --from-mig` writes its job file into `out`: never over the file of a batch still running).
    """
    from threedis.engine.outputs import check_output_folder

    out = check_output_folder(out, need_bytes=0)  # a read-only folder: one line, before anything loads
    with folder_lock(out, "threedis batch", hint="give this command another --out"):
        if prepare is not None:
            prepare(out)
        return _run_locked(jobs, out, runner, retry_failed, progress, on_outcome, run)


def _run_locked(jobs: JobFile, out: Path, runner: Runner, retry_failed: bool, progress: bool,
                on_outcome: Callable[[Outcome], None] | None, run: dict[str, Any] | None) -> Summary:
    items = list(jobs.items())
    plan = plan_resume(items, out, retry_failed)
    summary = Summary(total=len(items), skipped=len(plan.skipped),
                      failed_before=plan.failed_before)
    by_name = {item.name: item for item in plan.to_run}
    bar = ProgressBar(len(plan.to_run), enabled=progress)
    recorder = Recorder(out, plan.previous, summary, bar, on_outcome, run)
    outcomes = None
    try:
        for item in (i for i in plan.to_run if i.job.problem is not None):
            recorder.record(item, _problem_outcome(item))
        outcomes = runner.run([i for i in plan.to_run if i.job.problem is None])
        for outcome in outcomes:
            recorder.record(by_name[f"{outcome.job}/seed-{outcome.seed}"], outcome)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        if outcomes is not None:
            outcomes.close()  # the runner cleans up (Ray actors, a Ray instance it started)
        recorder.close()
        bar.close()
        summary.retried = getattr(runner, "resent", 0)
        summary.finished = time.time()
    return summary
